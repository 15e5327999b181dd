"""A scenario whose build() sleeps or waits when told to.

Replaying the ``weights`` format calls build(), so an environment that sets
``HARNESS_TEST_BUILD_SLEEP`` (seconds) or ``HARNESS_TEST_BUILD_GATE`` (a directory:
build() waits until a file named after its Ray node id, or ``all``, exists there) through its ``env`` makes that
cell slow: material for cell timeouts and for killing a node while a cell
runs, without racing a clock.
"""

import os
import time

import numpy as np

from harness import Scenario


def _build():
    import keras

    _marker()
    time.sleep(float(os.environ.get("HARNESS_TEST_BUILD_SLEEP", "0")))
    gate = os.environ.get("HARNESS_TEST_BUILD_GATE")
    if gate:  # a directory: wait for a file named after this Ray node (or "all")
        keys = [os.path.join(gate, name) for name in (_node_id(), "all")]
        deadline = time.time() + 600
        while not any(os.path.exists(k) for k in keys) and time.time() < deadline:
            time.sleep(0.05)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


SCENARIO = Scenario(
    name="test-slow-build", build=_build, seed=1,
    data=lambda rng: (rng.normal(size=(16, 2)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)),
    probe=lambda rng: rng.normal(size=(8, 2)).astype(np.float32),
    compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1},
    description="build() sleeps HARNESS_TEST_BUILD_SLEEP seconds")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "none"


def _marker():
    """When HARNESS_TEST_MARKER_DIR is set, record which Ray node is building, for which environment
    (for node-loss tests): a file ``<node id>.<pid>`` holding ``<time> <environment>``."""
    marker_dir = os.environ.get("HARNESS_TEST_MARKER_DIR")
    if marker_dir:
        with open(os.path.join(marker_dir, f"{_node_id()}.{os.getpid()}"), "w") as f:
            f.write(f"{time.time()} {os.environ.get('HARNESS_ENVIRONMENT', '')}")
