"""The three examples of "Are trainable parameters saved when a TensorFlow model is saved?".

Written anew for Keras 3: the article's ``model.save('dir')`` raises on TF 2.16+
and ``load_model`` refuses a SavedModel directory, so the harness saves each
model through its formats (``.keras``, ``.h5``, ``model.export`` ...) instead.
The recipes (layers, data, optimiser, epochs) follow the article. Probes have
64 rows, not the article's single row, so that batch size matters. The linear
regression knows the true answer of its probe (y = 2x): it declares labels and
``mse``, so every cell also says how far the task metric moved.
"""

import numpy as np

from harness import Scenario

PROBE_ROWS = 64


def _dense_net(n_in: int, hidden: int):
    import keras

    return keras.Sequential([
        keras.Input((n_in,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ])


def _random_binary_data(n_in: int):
    def data(rng):
        x = rng.random((100, n_in), dtype=np.float32)
        y = rng.integers(0, 2, size=(100, 1)).astype(np.float32)
        return x, y
    return data


def _uniform_probe(n_in: int):
    return lambda rng: rng.random((PROBE_ROWS, n_in), dtype=np.float32)


def _linear():
    import keras

    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=True)])


def _y_equals_2x(rng):
    x = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    return x, 2.0 * x


def _linear_probe(rng):
    return rng.uniform(-10.0, 10.0, size=(PROBE_ROWS, 1)).astype(np.float32)


def _twice(x):
    """The true answer of the probe: y = 2x, in float64."""
    return 2.0 * x.astype(np.float64)


SCENARIOS = [
    Scenario(
        name="seed-binary-classifier",
        description="article example 1: 5-10-1 sigmoid classifier, adam, 5 epochs on 100 random rows",
        build=lambda: _dense_net(5, 10),
        data=_random_binary_data(5),
        probe=_uniform_probe(5),
        compile={"optimizer": "adam", "loss": "binary_crossentropy"},
        fit={"epochs": 5},
        seed=0,
    ),
    Scenario(
        name="seed-linear-regression",
        description="article example 2: 1-unit linear model, SGD, 100 epochs to fit y = 2x",
        build=_linear,
        data=_y_equals_2x,
        probe=_linear_probe,
        labels=_twice,  # the task metric: mean squared error against y = 2x on the probe
        metric="mse",
        compile={"optimizer": "sgd", "loss": "mean_squared_error"},
        fit={"epochs": 100},
        seed=0,
    ),
    Scenario(
        name="seed-dense-regression",
        description="article example 3: 10-64-1 network, adam, 5 epochs (saved in one environment, loaded in another)",
        build=lambda: _dense_net(10, 64),
        data=_random_binary_data(10),
        probe=_uniform_probe(10),
        compile={"optimizer": "adam", "loss": "binary_crossentropy"},
        fit={"epochs": 5},
        seed=0,
    ),
]
