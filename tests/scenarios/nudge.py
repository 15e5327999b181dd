"""A model whose difference is known to start in one layer, on every CPU.

``test-batch-nudge`` is Rescaling -> ``BatchNudge`` -> Dense. ``BatchNudge``
is the identity except on a batch of one row, where it moves every value one
ULP up (``nextafter``) -- the way a kernel library's choice by problem size
changes the last bit. (An algebraic form such as ``x * 3 / 3`` would not do:
Grappler folds it back to ``x`` once the batch size is static.) So an environment predicting with
``batch_size: 1`` differs from the reference first at layer ``nudge``
(Rescaling is elementwise: the same bits at any batch size), whatever the CPU,
and ``batch_size`` is the knob that causes it.
"""

import functools

import numpy as np

from harness import Scenario


@functools.cache
def _nudge_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="harness_test")
    class BatchNudge(keras.layers.Layer):
        """Identity; one ULP up when called on a batch of one row."""

        def call(self, x):
            single = tf.equal(tf.shape(x)[0], 1)
            return tf.where(single, tf.math.nextafter(x, tf.fill(tf.shape(x), float("inf"))), x)

    return BatchNudge


def _build():
    import keras

    return keras.Sequential([keras.Input((8,)), keras.layers.Rescaling(0.5, name="scale"),
                             _nudge_class()(name="nudge"), keras.layers.Dense(3, name="head")])


SCENARIO = Scenario(
    name="test-batch-nudge", build=_build, setup=_nudge_class, seed=11,
    data=lambda rng: (rng.normal(size=(32, 8)).astype(np.float32), rng.normal(size=(32, 3)).astype(np.float32)),
    probe=lambda rng: rng.normal(size=(64, 8)).astype(np.float32),
    compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1},
    outputs={"output": "classes"},
    description="Rescaling -> BatchNudge (+1 ULP at batch size 1) -> Dense: the difference starts at 'nudge'")
