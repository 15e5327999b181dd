"""keras-hub models, built from config with random weights (nothing is downloaded).

``zoo-keras-hub-bert``: a functional classifier around a tiny ``keras_hub.models.BertBackbone``.
Legacy h5 saves the backbone as ``keras_hub>BertBackbone``, a name Keras knows only once
keras_hub is imported: the harness imports the packages a saved config names before every
load, so the cell does not depend on what the worker loaded before.

``zoo-keras-hub-resnet``: a tiny ``keras_hub.models.ResNetImageClassifier``. Legacy h5 saves
the task under its bare class name, which no import registers: the cell says the model
reloads once ``ResNetImageClassifier`` is registered (custom_objects or a setup hook).

keras-hub is installed without its declared dependencies (see the Makefile): its
``tensorflow-text`` dependency would replace ``tensorflow-cpu`` by ``tensorflow``, and
backbones and classifiers do not need it.
"""

import numpy as np

from harness import Scenario

_SEQ, _VOCAB = 8, 50


def _bert_classifier():
    import keras
    import keras_hub

    backbone = keras_hub.models.BertBackbone(vocabulary_size=_VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=_SEQ, dropout=0.1)
    inputs = {name: keras.Input((_SEQ,), dtype="int32", name=name)
              for name in ("token_ids", "segment_ids", "padding_mask")}
    pooled = backbone(inputs)["pooled_output"]
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(pooled), name="bert_classifier")


def _tokens(n: int):
    def make(rng):
        lengths = rng.integers(2, _SEQ + 1, n)
        mask = (np.arange(_SEQ)[None, :] < lengths[:, None]).astype(np.int32)
        return {"token_ids": rng.integers(1, _VOCAB, (n, _SEQ)).astype(np.int32) * mask,
                "segment_ids": np.zeros((n, _SEQ), np.int32), "padding_mask": mask}
    return make


def _resnet_classifier():
    import keras_hub

    # The smallest ResNet keras-hub accepts: one basic block of 64 filters on 16x16 images.
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64], stackwise_num_blocks=[1],
        stackwise_num_strides=[1], block_type="basic_block", use_pre_activation=False, image_shape=(16, 16, 3))
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=3)


def _images(n: int):
    return lambda rng: rng.uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)


SCENARIOS = [
    Scenario(
        name="zoo-keras-hub-bert",
        description="keras_hub BertBackbone (1 layer, hidden 8) under a Dense head, random init, 2 epochs",
        build=_bert_classifier,
        data=lambda rng: (_tokens(48)(rng), rng.integers(0, 3, 48)),
        probe=_tokens(16),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 2, "batch_size": 16},
        seed=71,
    ),
    Scenario(
        name="zoo-keras-hub-resnet",
        description="keras_hub ResNetImageClassifier (one 64-filter basic block, 16x16), random init, 1 epoch",
        build=_resnet_classifier,
        data=lambda rng: (_images(16)(rng), rng.integers(0, 3, 16)),
        probe=_images(8),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 1, "batch_size": 8},
        seed=72,
    ),
]
