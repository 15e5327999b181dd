"""A plain tf.Module with a custom training loop, noise/augmentation layers that
must be inert at inference, and a multi-output model with float32 and int64 outputs."""

import numpy as np

from harness import Scenario


# -- plain tf.Module, custom loop ------------------------------------------------
def _train_module(seed: int):
    import tensorflow as tf

    class TwoLayerMLP(tf.Module):
        def __init__(self):
            super().__init__(name="two_layer_mlp")
            self.w1 = tf.Variable(tf.random.stateless_normal([5, 16], seed=[seed, 1]) * 0.4, name="w1")
            self.b1 = tf.Variable(tf.zeros([16]), name="b1")
            self.w2 = tf.Variable(tf.random.stateless_normal([16, 1], seed=[seed, 2]) * 0.25, name="w2")
            self.b2 = tf.Variable(tf.zeros([1]), name="b2")

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)])
        def __call__(self, x):
            return tf.nn.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    module = TwoLayerMLP()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(128, 5)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2).astype(np.float32)
    params = [module.w1, module.b1, module.w2, module.b2]

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((module(xb) - yb) ** 2)
        for p, g in zip(params, tape.gradient(loss, params)):
            p.assign_sub(0.05 * g)
        return loss

    for _ in range(3):
        for i in range(0, 128, 32):
            step(x[i:i + 32], y[i:i + 32])
    return module


# -- noise and augmentation layers ------------------------------------------------
def _augmented_cnn():
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((16, 16, 1)),
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(0.1),
        layers.RandomZoom(0.1),
        layers.GaussianNoise(0.05),
        layers.Conv2D(8, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.SpatialDropout2D(0.1),
        layers.Flatten(),
        layers.Dropout(0.3),
        layers.Dense(2, activation="softmax"),
    ], name="augmented_cnn")


def _gray(n: int):
    return lambda rng: rng.uniform(0, 1, (n, 16, 16, 1)).astype(np.float32)


def _gray_data(rng):
    x = _gray(48)(rng)
    return x, (x[:, :8].mean(axis=(1, 2, 3)) > x[:, 8:].mean(axis=(1, 2, 3))).astype(np.int32)


# -- float32 scores and an int64 argmax ---------------------------------------------
def _multi_dtype():
    import keras
    from keras import layers

    inp = keras.Input((6,), name="x")
    h = layers.Dense(16, activation="tanh")(inp)
    scores = layers.Dense(4, activation="softmax", name="scores")(h)
    class_id = keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int64")
    return keras.Model(inp, {"scores": scores, "class_id": class_id}, name="multi_dtype")


def _multi_data(rng):
    x = rng.normal(size=(64, 6)).astype(np.float32)
    return {"x": x, "y": {"scores": np.argmax(x[:, :4], axis=1).astype(np.int32)}}


SCENARIOS = [
    Scenario(
        name="zoo-tf-module",
        description="plain tf.Module (2-layer MLP, tf.function __call__) trained by a custom GradientTape loop",
        train=_train_module,
        probe=lambda rng: rng.normal(size=(16, 5)).astype(np.float32),
        seed=61,
    ),
    Scenario(
        name="zoo-noise-augmentation",
        description="RandomFlip/RandomRotation/RandomZoom/GaussianNoise/SpatialDropout2D/Dropout: inert at inference",
        build=_augmented_cnn,
        data=_gray_data,
        probe=_gray(16),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 2, "batch_size": 16},
        seed=62,
    ),
    Scenario(
        name="zoo-multi-output-dtypes",
        description="dict outputs of different dtypes: float32 softmax scores and an int64 argmax",
        build=_multi_dtype,
        data=_multi_data,
        probe=lambda rng: rng.normal(size=(16, 6)).astype(np.float32),
        compile={"optimizer": "adam", "loss": {"scores": "sparse_categorical_crossentropy"}},
        fit={"epochs": 3, "batch_size": 16},
        seed=63,
    ),
]
