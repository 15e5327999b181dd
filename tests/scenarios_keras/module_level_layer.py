"""A user-style scenario module: Keras imported and a custom layer registered at
module level (no setup hook). Kept out of tests/scenarios because importing it
imports TensorFlow."""

import keras
import numpy as np

from harness import Scenario


@keras.saving.register_keras_serializable(package="harness_tests")
class Doubler(keras.layers.Layer):
    """y = 2 * x * w, w trainable per feature."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return 2.0 * x * self.w


def _build():
    return keras.Sequential([keras.Input((3,)), Doubler(), keras.layers.Dense(1)], name="doubler_net")


SCENARIO = Scenario(
    name="test-module-level-layer", build=_build, seed=4,
    data=lambda rng: (rng.normal(size=(32, 3)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32)),
    probe=lambda rng: rng.normal(size=(8, 3)).astype(np.float32),
    compile={"optimizer": "adam", "loss": "mse"}, fit={"epochs": 2},
    description="custom layer registered at module level, Keras imported at module level")
