"""True error causes of Keras loads (harness.formats.load_keras_file): packages a saved config names,
unknown classes registered one by one to find what really stops a load. Real Keras, tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from harness import formats

BERT_IN_FUNCTIONAL_H5 = {  # how legacy h5 saves a keras_hub backbone inside a functional model
    "class_name": "Functional", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"name": "token_ids"}},
        {"class_name": "keras_hub>BertBackbone", "config": {"name": "bert_backbone"}},
        {"class_name": "Dense", "config": {"name": "head", "kernel_initializer": {
            "module": "keras.initializers", "class_name": "GlorotUniform", "config": {}, "registered_name": None}}}]}}
TASK_KERAS = {  # how .keras saves a keras_hub task: module and registered name on every object
    "module": "keras_hub.src.models.resnet.resnet_image_classifier", "class_name": "ResNetImageClassifier",
    "registered_name": "keras_hub>ResNetImageClassifier", "config": {"backbone": {
        "module": "keras_cv.models", "class_name": "Backbone", "registered_name": None, "config": {}}}}


def test_packages_a_saved_config_names():
    assert formats.packages_named(BERT_IN_FUNCTIONAL_H5) == ["keras_hub"]  # from "pkg>Name"
    assert formats.packages_named(TASK_KERAS) == ["keras_cv", "keras_hub"]  # from module paths
    refs = formats.class_refs(BERT_IN_FUNCTIONAL_H5)
    assert [r.name for r in refs] == ["Functional", "InputLayer", "keras_hub>BertBackbone", "Dense", "GlorotUniform"]
    # anything else a config names is never imported on its behalf: only Keras's own packages
    hostile = {"class_name": "X", "module": "os.path", "registered_name": "subprocess>Popen", "config": {}}
    assert formats.packages_named(hostile) == [] and formats.packages_named(None) == []


@pytest.mark.parametrize("message, name", [
    ("Unknown layer: 'LayerScale'. Please ensure you are using a `keras.utils.custom_object_scope`", "LayerScale"),
    ("Unknown layer: 'keras_hub>BertBackbone'. Please ensure", "keras_hub>BertBackbone"),
    ("Could not locate class 'Gate'. Make sure custom classes and functions are decorated", "Gate"),
    ("too many positional arguments", None)])
def test_unknown_class_errors_are_recognised(message, name):
    assert formats._unknown_class(ValueError(message)) == name


def _scale_class():
    import keras

    class Scale(keras.layers.Layer):  # deliberately unregistered, in a module Keras will not import
        def call(self, x):
            return x * 2.0

    return Scale


@pytest.fixture(scope="module")
def unregistered_h5(tmp_path_factory):
    import keras

    cls = _scale_class()
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(cls()(inp)))
    path = str(tmp_path_factory.mktemp("h5") / "model.h5")
    model.save(path)
    return path, cls, model


def test_a_class_found_nowhere_must_be_registered_and_registering_it_works(unregistered_h5):
    path, cls, model = unregistered_h5
    with pytest.raises(formats.UnregisteredClass) as info:
        formats.load_keras_file(path, "h5", {})
    text = str(info.value)
    assert text.startswith("h5 (legacy HDF5): the model names class 'Scale', which is not registered or importable")
    assert "custom_objects={'Scale': <the class>}" in text and "setup hook" in text
    assert "Please ensure" not in text and "limitation" not in text
    loaded = formats.load_keras_file(path, "h5", {"Scale": cls})  # the advice is true
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_limitation_messages_quote_the_error_and_the_context():
    lim = formats.explain("h5", "load", TypeError("too many positional arguments"), "what stops it once 'A' is registered")
    assert isinstance(lim, formats.FormatLimitation)
    assert str(lim).startswith("h5 (legacy HDF5) cannot reload this model in Keras 3")
    assert str(lim).endswith("TypeError: too many positional arguments (what stops it once 'A' is registered); "
                             "use keras or savedmodel")
    # an unknown class alone is never a limitation: it is a registration to make
    assert formats.explain("h5", "load", ValueError("Unknown layer: 'NotEqual'.")) is None
