"""Vision models: ``keras.applications`` networks and a hand-written ResNet block.

``zoo-convnext-mini`` is ConvNeXt (keras.applications' own constructor, depths 1-1-1-1, widths
8-64): its ``LayerScale`` and ``StochasticDepth`` layers are *not registered* with Keras. The
``.keras`` format finds them by module; legacy h5 knows only their bare names, and once both are
registered its loader still cannot call the blocks ("too many positional arguments"), as with
``keras.applications.ConvNeXtTiny``.

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


# -- ConvNeXt, miniature: unregistered custom layers from keras.applications ----
def _convnext_mini():
    from keras.src.applications import convnext  # ConvNeXt(depths, projection_dims, ...) is not exported

    # drop_path_rate > 0 adds StochasticDepth layers; layer_scale_init_value adds LayerScale.
    return convnext.ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 32, 64], drop_path_rate=0.1,
                             layer_scale_init_value=0.1, default_size=32, name="convnext_mini",
                             input_shape=(32, 32, 3), classes=4, weights=None)


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
        name="zoo-convnext-mini",
        description="keras.applications ConvNeXt at 32x32 (depths 1-1-1-1, widths 8-64): unregistered LayerScale "
                    "and StochasticDepth layers, 1 epoch on 16 images",
        build=_convnext_mini,
        data=_image_data(16, 32, 3, 4),
        probe=_images(8, 32, 3),
        compile={"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        fit={"epochs": 1, "batch_size": 8},
        seed=13,
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
