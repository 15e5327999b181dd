"""Two tiny models, one whose inference is random: what ``repeats`` must tell apart.

``test-noisy`` is Dense -> ``InferenceNoise`` -> Dense. ``InferenceNoise`` adds Gaussian noise
(standard deviation 1e-3) on every call, at inference too, drawn by ``tf.random.stateless_normal``
from a seed read off the clock (``tf.timestamp``, in microseconds) at each call: no global or op
seed that Keras, TensorFlow or the harness sets can make two calls -- let alone two processes --
draw the same noise. It is graph ops only (no Python callback), so it saves and reloads as any
layer does (registered in a ``setup`` hook). ``test-steady`` is the same network without it.
"""

import functools

import numpy as np

from harness import Scenario


@functools.cache
def _noise_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="harness_test")
    class InferenceNoise(keras.layers.Layer):
        """``x + N(0, 1e-3)``, new noise on every call (training or not), unseeded."""

        def call(self, x):
            micros = tf.cast(tf.timestamp() * 1e6, tf.int64)
            seed = tf.stack([micros, micros // 7919])
            return x + 1e-3 * tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)

    return InferenceNoise


def _build(noisy: bool):
    def build():
        import keras

        noise = [_noise_class()(name="noise")] if noisy else []
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                                 *noise, keras.layers.Dense(2, name="head")])

    return build


def _data(rng):
    return rng.normal(size=(32, 4)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)


def _probe(rng):
    return rng.normal(size=(16, 4)).astype(np.float32)


SCENARIOS = [
    Scenario(name="test-noisy", build=_build(True), setup=_noise_class, seed=21, data=_data, probe=_probe,
             compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1}, outputs={"output": "regression"},
             description="Dense -> InferenceNoise (unseeded, new on every call) -> Dense: flaky by design"),
    Scenario(name="test-steady", build=_build(False), seed=21, data=_data, probe=_probe,
             compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1}, outputs={"output": "regression"},
             description="the same network without the noise: every repeat gives the same bits"),
]
