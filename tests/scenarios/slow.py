"""A scenario whose build() sleeps when HARNESS_TEST_BUILD_SLEEP is set.

Replaying the ``weights`` format calls build(), so an environment that sets
the variable (through its ``env``) makes that cell slow: material for cell
timeouts and for killing a node while a cell runs.
"""

import os
import time

import numpy as np

from harness import Scenario


def _build():
    import keras

    _marker()
    time.sleep(float(os.environ.get("HARNESS_TEST_BUILD_SLEEP", "0")))
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


SCENARIO = Scenario(
    name="test-slow-build", build=_build, seed=1,
    data=lambda rng: (rng.normal(size=(16, 2)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)),
    probe=lambda rng: rng.normal(size=(8, 2)).astype(np.float32),
    compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1},
    description="build() sleeps HARNESS_TEST_BUILD_SLEEP seconds")


def _marker():
    """When HARNESS_TEST_MARKER_DIR is set, record which Ray node is building (for node-loss tests)."""
    marker_dir = os.environ.get("HARNESS_TEST_MARKER_DIR")
    if marker_dir:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "none"
        with open(os.path.join(marker_dir, f"{node}.{os.getpid()}"), "w") as f:
            f.write(str(time.time()))
