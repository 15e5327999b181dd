"""Test scenarios: a two-input, two-output functional model with BatchNorm
(non-trainable variables), and a plain tf.Module trained by a custom loop."""

import numpy as np

from harness import Scenario


def _build_multi():
    import keras

    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="tanh")(h)
    h = keras.layers.BatchNormalization()(h)
    return keras.Model({"a": a, "b": b}, {"cls": keras.layers.Dense(2, activation="softmax", name="cls")(h),
                                          "reg": keras.layers.Dense(1, name="reg")(h)})


def _multi_data(rng):
    x = {"a": rng.normal(size=(64, 3)).astype(np.float32), "b": rng.normal(size=(64, 2)).astype(np.float32)}
    y = {"cls": rng.integers(0, 2, 64), "reg": rng.normal(size=(64, 1)).astype(np.float32)}
    return x, y


def _multi_probe(rng):
    return {"a": rng.normal(size=(40, 3)).astype(np.float32), "b": rng.normal(size=(40, 2)).astype(np.float32)}


def _train_module(seed):
    import tensorflow as tf

    class Affine(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([4, 1], seed=[seed, 1]), name="w")
            self.b = tf.Variable(tf.zeros([1]), name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return x @ self.w + self.b

    module = Affine()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    opt = tf.keras.optimizers.SGD(0.05)
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((module(x) - y) ** 2)
        grads = tape.gradient(loss, [module.w, module.b])
        opt.apply_gradients(zip(grads, [module.w, module.b]))
    return module


SCENARIOS = [
    Scenario(name="test-multi-io", build=_build_multi, data=_multi_data, probe=_multi_probe,
             compile={"optimizer": "adam", "loss": {"cls": "sparse_categorical_crossentropy", "reg": "mse"}},
             fit={"epochs": 2, "batch_size": 16}, seed=3, description="two inputs, two outputs, BatchNorm",
             outputs={"cls": "classes", "reg": "regression"}),
    Scenario(name="test-tf-module", train=_train_module,
             probe=lambda rng: rng.normal(size=(16, 4)).astype(np.float32), seed=5,
             description="plain tf.Module, custom training loop"),
]
