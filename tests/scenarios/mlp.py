"""A 64-256-256-10 MLP: large enough that oneDNN's kernel choice (ISA, FMA or not) shows in its bits."""

import numpy as np

from harness import Scenario


def _build():
    import keras

    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])


SCENARIO = Scenario(
    name="test-mlp", build=_build, seed=3,
    data=lambda rng: (rng.random((64, 64), dtype=np.float32), rng.random((64, 10), dtype=np.float32)),
    probe=lambda rng: rng.random((32, 64), dtype=np.float32),
    compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1},
    description="64-256-256-10 MLP, one epoch: kernel choices show in its bits")
