"""Vision models: a ``keras.applications`` network and a hand-written ResNet block.

Small on purpose: 32x32 / 16x16 images, a handful of rows, one or two epochs,
``weights=None`` (nothing is downloaded).
"""

import numpy as np

from harness import Scenario


# -- MobileNetV3Small from keras.applications ---------------------------------
def _mobilenet():
    import keras

    # include_preprocessing adds a Rescaling layer; the top has Dropout (RNG state).
    return keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=4,
                                               include_preprocessing=True)


def _images(n: int, size: int, channels: int):
    def make(rng):
        return rng.uniform(0, 255, (n, size, size, channels)).astype(np.float32)
    return make


def _image_data(n: int, size: int, channels: int, classes: int):
    def data(rng):
        return _images(n, size, channels)(rng), rng.integers(0, classes, n)
    return data


# -- a ResNet basic block with BatchNormalization ------------------------------
def _resnet_block():
    import keras
    from keras import layers

    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Rescaling(1 / 255)(inp)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    shortcut = x
    y = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(8, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, activation="softmax")(x), name="resnet_block")


SCENARIOS = [
    Scenario(
        name="zoo-mobilenetv3-small",
        description="keras.applications.MobileNetV3Small at 32x32, weights=None, 4 classes, 1 epoch on 16 images",
        build=_mobilenet,
        data=_image_data(16, 32, 3, 4),
        probe=_images(8, 32, 3),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 1, "batch_size": 8},
        seed=11,
    ),
    Scenario(
        name="zoo-resnet-block",
        description="Conv2D/BatchNormalization residual block (moving statistics are parameters), 2 epochs",
        build=_resnet_block,
        data=_image_data(32, 16, 3, 3),
        probe=_images(16, 16, 3),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 2, "batch_size": 16},
        seed=12,
    ),
]
