"""Mixed precision: float16 and bfloat16 compute with float32 variables.

Each build sets the *global* policy, as the Keras guide does; the harness
resets it afterwards, so it must not leak into later scenarios or reloads in
the same process. The first output stays in the compute dtype (float16 /
bfloat16 arrays go through Arrow and the ULP code), the second is float32.
"""

import numpy as np

from harness import Scenario


def _mlp(policy: str):
    def build():
        import keras
        from keras import layers

        keras.mixed_precision.set_global_policy(policy)
        inp = keras.Input((8,), name="features")
        x = layers.Dense(32, activation="relu")(inp)
        x = layers.Dense(16, activation="relu")(x)
        logits = layers.Dense(3, name="logits")(x)  # compute dtype (float16 / bfloat16)
        probs = layers.Activation("softmax", dtype="float32", name="probs")(logits)
        return keras.Model(inp, {"logits": logits, "probs": probs}, name=f"mlp_{policy}")
    return build


def _conv1d(policy: str):
    def build():
        import keras
        from keras import layers

        keras.mixed_precision.set_global_policy(policy)
        inp = keras.Input((16, 2), name="signal")
        x = layers.Conv1D(8, 3, activation="relu")(inp)
        x = layers.LayerNormalization()(x)
        x = layers.GlobalAveragePooling1D()(x)
        logits = layers.Dense(3, name="logits")(x)
        probs = layers.Activation("softmax", dtype="float32", name="probs")(logits)
        return keras.Model(inp, {"logits": logits, "probs": probs}, name=f"conv1d_{policy}")
    return build


def _tabular(rng):
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return {"x": x, "y": {"probs": y}}


def _signal(n):
    return lambda rng: rng.normal(size=(n, 16, 2)).astype(np.float32)


def _signal_data(rng):
    x = _signal(64)(rng)
    return {"x": x, "y": {"probs": (x[:, :, 0].mean(axis=1) > 0).astype(np.int32)}}


_LOSS = {"probs": "sparse_categorical_crossentropy"}

SCENARIOS = [
    Scenario(
        name="zoo-mixed-float16",
        description="mixed_float16 policy (LossScaleOptimizer), float16 logits + float32 probabilities",
        build=_mlp("mixed_float16"),
        data=_tabular,
        probe=lambda rng: rng.normal(size=(16, 8)).astype(np.float32),
        compile={"optimizer": "adam", "loss": _LOSS},
        fit={"epochs": 2, "batch_size": 16},
        seed=41,
    ),
    Scenario(
        name="zoo-mixed-bfloat16",
        description="mixed_bfloat16 policy, Conv1D + LayerNormalization, bfloat16 logits + float32 probabilities",
        build=_conv1d("mixed_bfloat16"),
        data=_signal_data,
        probe=_signal(16),
        compile={"optimizer": "adam", "loss": _LOSS},
        fit={"epochs": 2, "batch_size": 16},
        seed=42,
    ),
]
