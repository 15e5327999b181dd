"""Custom Keras classes, the two ways users make them loadable.

``zoo-custom-registered``: a layer registered with
``keras.saving.register_keras_serializable(package="zoo")``; loads need no
``custom_objects``, so the class must be registered in every worker before a
load. Keras stays out of the driver: the class is defined (and registered) by
the scenario's ``setup`` hook, which the harness runs once per process
(a module-level decorated class works too: the worker executes this module).

``zoo-custom-objects``: an unregistered layer that reloads only through
``Scenario(custom_objects=...)`` (a function, so the class is made in the worker).
"""

import functools

import numpy as np

from harness import Scenario


@functools.cache
def _scale_class():
    import keras

    @keras.saving.register_keras_serializable(package="zoo")
    class ChannelScale(keras.layers.Layer):
        """y = x * exp(log_scale) + shift, per channel (trainable)."""

        def build(self, input_shape):
            self.log_scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="log_scale")
            self.shift = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="shift")

        def call(self, x):
            return x * keras.ops.exp(self.log_scale) + self.shift

    return ChannelScale


@functools.cache
def _gate_class():
    import keras

    class GatedResidual(keras.layers.Layer):
        """x + sigmoid(x W_g) * tanh(x W_h): a gated residual unit with its own config."""

        def __init__(self, units_hint: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.units_hint = units_hint

        def build(self, input_shape):
            d = input_shape[-1]
            self.w_gate = self.add_weight(shape=(d, d), initializer="glorot_uniform", name="w_gate")
            self.w_hidden = self.add_weight(shape=(d, d), initializer="glorot_uniform", name="w_hidden")
            self.steps = self.add_weight(shape=(), initializer="zeros", trainable=False, name="steps")

        def call(self, x, training=False):
            if training:
                self.steps.assign_add(1.0)
            return x + keras.ops.sigmoid(x @ self.w_gate) * keras.ops.tanh(x @ self.w_hidden)

        def get_config(self):
            return {**super().get_config(), "units_hint": self.units_hint}

    return GatedResidual


def _registered():
    import keras

    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), _scale_class()(),
                             keras.layers.Dense(2)], name="registered_custom")


def _with_custom_objects():
    import keras

    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), _gate_class()(units_hint=8),
                             keras.layers.Dense(1)], name="custom_objects")


def _data(rng):
    x = rng.normal(size=(64, 6)).astype(np.float32)
    return x, np.stack([x[:, 0] - x[:, 1], x[:, 2] * x[:, 3]], axis=1).astype(np.float32)


def _probe(rng):
    return rng.normal(size=(16, 6)).astype(np.float32)


SCENARIOS = [
    Scenario(
        name="zoo-custom-registered",
        description="custom layer registered with keras.saving.register_keras_serializable (no custom_objects)",
        setup=_scale_class,
        build=_registered,
        data=_data,
        probe=_probe,
        compile={"optimizer": "adam", "loss": "mse"},
        fit={"epochs": 3, "batch_size": 16},
        seed=31,
    ),
    Scenario(
        name="zoo-custom-objects",
        description="unregistered custom layer (with a non-trainable counter) known only through custom_objects",
        build=_with_custom_objects,
        custom_objects=lambda: {"GatedResidual": _gate_class()},
        data=lambda rng: (_data(rng)[0], _data(rng)[1][:, :1]),
        probe=_probe,
        compile={"optimizer": "adam", "loss": "mse"},
        fit={"epochs": 3, "batch_size": 16},
        seed=32,
    ),
]
