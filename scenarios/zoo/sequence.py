"""Sequence models on integer tokens and time series: a Transformer encoder block,
an LSTM behind ``Embedding(mask_zero=True)``, and a Bidirectional LSTM + GRU stack."""

import numpy as np

from harness import Scenario

VOCAB, SEQ = 40, 12


def _tokens(n: int):
    """Token ids in [1, VOCAB) followed by zero padding (random lengths 3..SEQ)."""
    def make(rng):
        x = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int32)
        lengths = rng.integers(3, SEQ + 1, n)
        x[np.arange(SEQ)[None, :] >= lengths[:, None]] = 0
        return x
    return make


def _token_data(n: int, classes: int):
    def data(rng):
        x = _tokens(n)(rng)
        return x, (x.sum(axis=1) % classes).astype(np.int32)
    return data


# -- Transformer encoder -------------------------------------------------------
def _transformer():
    import keras
    from keras import layers

    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    # mask_zero: padding is masked in attention and in the pooling.
    x = layers.Embedding(VOCAB, 16, mask_zero=True)(tokens)
    attn = layers.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.1)(x, x)
    x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(0.1)(attn))
    ffn = layers.Dense(16)(layers.Dense(32, activation="relu")(x))
    x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(0.1)(ffn))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, layers.Dense(2, activation="softmax")(x), name="transformer_encoder")


# -- LSTM with masking -----------------------------------------------------------
def _lstm_masked():
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((SEQ,), dtype="int32"),
        layers.Embedding(VOCAB, 8, mask_zero=True),
        layers.LSTM(12, dropout=0.1),
        layers.Dense(1, activation="sigmoid"),
    ], name="lstm_masked")


def _binary_token_data(rng):
    x = _tokens(48)(rng)
    return x, (x[:, 0] > VOCAB // 2).astype(np.float32)


# -- Bidirectional LSTM + GRU on a time series ----------------------------------
def _bilstm():
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((10, 3)),
        layers.Bidirectional(layers.LSTM(8, return_sequences=True)),
        layers.GRU(8),
        layers.Dense(1),
    ], name="bilstm_gru")


def _series(n: int):
    def make(rng):
        t = np.linspace(0, 1, 10, dtype=np.float32)
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        return (np.sin(2 * np.pi * t[None, :, None] + phase * np.arange(1, 4)) +
                0.1 * rng.normal(size=(n, 10, 3))).astype(np.float32)
    return make


def _series_data(rng):
    x = _series(48)(rng)
    return x, x[:, -1, :1] * 0.5


SCENARIOS = [
    Scenario(
        name="zoo-transformer-encoder",
        description="Embedding(mask_zero) + MultiHeadAttention + LayerNormalization encoder block on padded tokens",
        build=_transformer,
        data=_token_data(48, 2),
        probe=_tokens(16),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 2, "batch_size": 16},
        seed=21,
    ),
    Scenario(
        name="zoo-lstm-masking",
        description="Embedding(mask_zero=True) -> LSTM(dropout) -> sigmoid on zero-padded tokens",
        build=_lstm_masked,
        data=_binary_token_data,
        probe=_tokens(16),
        compile={"optimizer": "adam", "loss": "binary_crossentropy"},
        fit={"epochs": 2, "batch_size": 16},
        seed=22,
    ),
    Scenario(
        name="zoo-bidirectional-lstm",
        description="Bidirectional(LSTM) -> GRU -> Dense regression on a noisy 3-channel time series",
        build=_bilstm,
        data=_series_data,
        probe=_series(16),
        compile={"optimizer": "adam", "loss": "mse"},
        fit={"epochs": 2, "batch_size": 16},
        seed=23,
    ),
]
