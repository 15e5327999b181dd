"""Preprocessing layers inside the model: numeric (Normalization adapted on data,
Discretization, CategoryEncoding) and strings (adapted StringLookup and
TextVectorization in, an inverted StringLookup out: string arrays travel
through Arrow as probes and as outputs)."""

import numpy as np

from harness import Scenario


def _features(n: int):
    def make(rng):
        x = rng.normal(size=(n, 4)).astype(np.float32) * [1.0, 10.0, 0.1, 5.0] + [0.0, 50.0, -1.0, 3.0]
        return x.astype(np.float32)
    return make


def _numeric():
    import keras
    from keras import layers

    inp = keras.Input((4,), name="features")
    norm = layers.Normalization(name="normalize")
    # adapt() on a fixed sample: build() stays deterministic (the weights format calls it again).
    norm.adapt(_features(256)(np.random.default_rng(0)))
    x = norm(inp)
    # Bucketize the second raw feature and one-hot encode the bucket.
    bucket = layers.Discretization(bin_boundaries=[40.0, 48.0, 52.0, 60.0], name="bucketize")(inp[:, 1:2])
    onehot = layers.CategoryEncoding(num_tokens=5, output_mode="one_hot", name="one_hot")(bucket)
    x = layers.Concatenate()([x, onehot])
    x = layers.Dense(16, activation="relu")(x)
    return keras.Model(inp, layers.Dense(1)(x), name="numeric_preprocessing")


def _numeric_data(rng):
    x = _features(128)(rng)
    return x, (0.3 * x[:, :1] - 0.02 * x[:, 1:2]).astype(np.float32)


COLOURS = ["red", "green", "blue", "cyan", "magenta", "yellow"]
LABELS = ["warm", "cool", "neutral"]
PHRASES = ["a bright red sun", "cold blue water", "grey stone wall", "warm yellow light", "deep green forest",
           "pale cyan sky", "hot magenta neon", "plain white page"]


def _string_model():
    import keras
    from keras import layers

    words = keras.Input((3,), dtype="string", name="words")
    text = keras.Input((1,), dtype="string", name="text")
    # Both vocabularies are adapted on data (not passed to the constructor), as usual.
    lookup = layers.StringLookup(num_oov_indices=1, name="lookup")
    lookup.adapt(np.array(COLOURS, dtype=object))
    vectorize = layers.TextVectorization(max_tokens=32, output_sequence_length=5, name="vectorize")
    vectorize.adapt(np.array(PHRASES, dtype=object))
    w = layers.Flatten()(layers.Embedding(lookup.vocabulary_size(), 4)(lookup(words)))
    t = layers.GlobalAveragePooling1D()(layers.Embedding(32, 4, mask_zero=True)(vectorize(text)))
    probs = layers.Dense(len(LABELS), activation="softmax", name="probs")(layers.Concatenate()([w, t]))
    # Inverse lookup: the predicted class as a string output.
    label = layers.StringLookup(vocabulary=LABELS, num_oov_indices=0, invert=True, name="label")(
        keras.ops.argmax(probs, axis=-1))
    return keras.Model({"words": words, "text": text}, {"probs": probs, "label": label}, name="string_features")


def _strings(n: int):
    def make(rng):
        vocab = np.array(COLOURS + ["purple", "black"], dtype=object)  # two out-of-vocabulary words
        phrases = np.array(PHRASES + ["an unseen purple phrase"], dtype=object)
        return {"words": vocab[rng.integers(0, len(vocab), (n, 3))],
                "text": phrases[rng.integers(0, len(phrases), (n, 1))]}
    return make


def _string_data(rng):
    import tensorflow as tf  # fit() takes string arrays only as tensors / tf.data

    x = _strings(96)(rng)
    y = np.minimum(np.isin(x["words"], ["red", "magenta", "yellow"]).sum(axis=1), 2).astype(np.int32)
    x = {k: v.astype(str) for k, v in x.items()}
    return {"x": tf.data.Dataset.from_tensor_slices((x, {"probs": y})).batch(32)}


SCENARIOS = [
    Scenario(
        name="zoo-numeric-preprocessing",
        description="Normalization adapted on data + Discretization + CategoryEncoding(one_hot) + Dense",
        build=_numeric,
        data=_numeric_data,
        probe=_features(16),
        compile={"optimizer": "adam", "loss": "mse"},
        fit={"epochs": 3, "batch_size": 32},
        seed=51,
    ),
    Scenario(
        name="zoo-string-lookup",
        description="string inputs through adapted StringLookup + TextVectorization; class name as a string output",
        build=_string_model,
        data=_string_data,
        probe=_strings(16),
        compile={"optimizer": "adam", "loss": {"probs": "sparse_categorical_crossentropy"}},
        fit={"epochs": 3, "shuffle": False},  # a tf.data pipeline: fit() cannot shuffle it
        seed=52,
    ),
]
