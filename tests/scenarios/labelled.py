"""A classifier with probe labels and a task metric: the MLPerf-style tier (``metric_delta``).

Three classes, learnable: a row's class is its largest of the first three features.
``labels`` gives the true class of every probe row, ``metric="accuracy"`` the metric
each cell reports on the reference and on its own outputs.
"""

import numpy as np

from harness import Scenario


def _rows(n: int):
    return lambda rng: rng.normal(size=(n, 6)).astype(np.float32)


def _classes(x: np.ndarray) -> np.ndarray:
    return np.argmax(x[:, :3], axis=1).astype(np.int64)


def _build():
    import keras

    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3, activation="softmax")])


def _data(rng):
    x = _rows(256)(rng)
    return x, _classes(x)


SCENARIO = Scenario(
    name="test-labelled", build=_build, data=_data, probe=_rows(64), seed=5,
    compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"}, fit={"epochs": 20},
    labels=_classes, metric="accuracy",
    description="6-16-3 softmax classifier with probe labels (class = largest of the first 3 features), accuracy")
