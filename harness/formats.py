"""One small save/load pair per format, behind one registry.

TensorFlow is imported inside the functions only: this module is imported by
the driver, which must never import TF (env vars act only before the import).

Every loader returns a ``Loaded``: a callable taking the probe input structure
and returning the output structure, plus the restored variables, and the
object that must stay referenced while the callable is used (a SavedModel's
endpoints fail with "variables have been deleted" once the loaded object is
garbage collected).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .scenario import Scenario

MODEL_DIR = "model"


@dataclass
class Loaded:
    fn: Callable[[Any], Any]
    variables: list
    owner: Any


@dataclass(frozen=True)
class Format:
    name: str
    save: Callable[[Any, str, Any], None]  # (model, directory, probe_inputs)
    load: Callable[[str, Scenario, Any], Loaded]  # (directory, scenario, probe_inputs)
    description: str


def _is_keras(obj: Any) -> bool:
    import keras

    return isinstance(obj, keras.Model)


def _require_keras(model: Any, fmt: str) -> None:
    if not _is_keras(model):
        raise TypeError(f"format {fmt!r} needs a Keras model but the scenario produced "
                        f"{type(model).__name__}; use format 'tf-savedmodel' for plain tf.Modules")


def call_model(model: Any, x: Any) -> Any:
    """Inference call: Keras models with ``training=False``, anything else plainly."""
    return model(x, training=False) if _is_keras(model) else model(x)


def _keras_loaded(model) -> Loaded:
    return Loaded(fn=lambda x: model(x, training=False), variables=list(model.weights), owner=model)


# -- keras / h5 ------------------------------------------------------------
def _save_keras_file(ext: str, fmt: str):
    def save(model, directory, probe):
        _require_keras(model, fmt)
        model.save(os.path.join(directory, f"model.{ext}"))
    return save


def _load_keras_file(ext: str):
    def load(directory, scenario, probe):
        import keras

        model = keras.models.load_model(os.path.join(directory, f"model.{ext}"),
                                        custom_objects=dict(scenario.custom_objects or {}), compile=False)
        return _keras_loaded(model)
    return load


# -- weights only ----------------------------------------------------------
def _save_weights(model, directory, probe):
    _require_keras(model, "weights")
    model.save_weights(os.path.join(directory, "model.weights.h5"))


def _load_weights(directory, scenario, probe):
    import keras

    if scenario.build is None:
        raise TypeError(f"format 'weights' rebuilds the model with build(); scenario {scenario.name!r} has only a train hook")
    keras.utils.set_random_seed(scenario.seed)
    model = scenario.build()
    if not model.built:
        model(probe)
    model.load_weights(os.path.join(directory, "model.weights.h5"))
    return _keras_loaded(model)


# -- model.export -> tf.saved_model.load ------------------------------------
def _save_export(model, directory, probe):
    _require_keras(model, "savedmodel")
    model.export(os.path.join(directory, "saved_model"), format="tf_saved_model", verbose=False)


def _load_saved_model(endpoint: str, var_attr: str):
    def load(directory, scenario, probe):
        import tensorflow as tf

        obj = tf.saved_model.load(os.path.join(directory, "saved_model"))
        return Loaded(fn=getattr(obj, endpoint), variables=list(getattr(obj, var_attr)), owner=obj)
    return load


# -- tf.saved_model.save ----------------------------------------------------
def _input_signature(probe):
    import tensorflow as tf

    return [tf.nest.map_structure(
        lambda a: tf.TensorSpec([None, *np.shape(a)[1:]], tf.as_dtype(np.asarray(a).dtype)), probe)]


def _save_tf_saved_model(model, directory, probe):
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    # A tracked list restores as an attribute of the loaded object, giving us
    # every variable back by the original order for the weight check.
    module.harness_variables = list(model.weights if _is_keras(model) else model.variables)
    module.serve = tf.function(lambda x: call_model(model, x), input_signature=_input_signature(probe))
    tf.saved_model.save(module, os.path.join(directory, "saved_model"),
                        signatures={"serving_default": module.serve})


REGISTRY: dict[str, Format] = {
    "keras": Format("keras", _save_keras_file("keras", "keras"), _load_keras_file("keras"),
                    "model.save('model.keras') / keras.models.load_model"),
    "h5": Format("h5", _save_keras_file("h5", "h5"), _load_keras_file("h5"),
                 "legacy HDF5: model.save('model.h5') / keras.models.load_model"),
    "savedmodel": Format("savedmodel", _save_export, _load_saved_model("serve", "variables"),
                         "model.export() / tf.saved_model.load(...).serve"),
    "tf-savedmodel": Format("tf-savedmodel", _save_tf_saved_model, _load_saved_model("serve", "harness_variables"),
                            "tf.saved_model.save(module with a serve tf.function) / tf.saved_model.load"),
    "weights": Format("weights", _save_weights, _load_weights,
                      "model.save_weights('model.weights.h5') into a freshly built model"),
}


def get(name: str) -> Format:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known: {', '.join(REGISTRY)}") from None


# -- structures, prediction, digests ---------------------------------------
def flatten(structure: Any, prefix: str) -> dict[str, np.ndarray]:
    """Flatten an array / list / tuple / dict structure into named numpy arrays.

    A single array is ``prefix``; list items ``prefix_0``...; dict entries use
    their (sorted) keys; nesting joins names with ``/``.
    """
    out: dict[str, np.ndarray] = {}

    def walk(obj, name, top):
        if isinstance(obj, dict):
            for k in sorted(obj):
                walk(obj[k], str(k) if top else f"{name}/{k}", False)
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{name}_{i}" if top else f"{name}/{i}", False)
        else:
            out[name] = np.asarray(obj)

    walk(structure, prefix, True)
    return out


def input_layout(structure: Any) -> dict:
    """How to rebuild the probe structure from its flattened names."""
    if isinstance(structure, dict):
        return {"kind": "dict", "keys": sorted(map(str, structure))}
    if isinstance(structure, (list, tuple)):
        return {"kind": type(structure).__name__, "n": len(structure)}
    return {"kind": "single"}


def unflatten_inputs(arrays: dict[str, np.ndarray], layout: dict) -> Any:
    kind = layout["kind"]
    if kind == "dict":
        return {k: arrays[k] for k in layout["keys"]}
    if kind in ("list", "tuple"):
        items = [arrays[f"input_{i}"] for i in range(layout["n"])]
        return items if kind == "list" else tuple(items)
    return arrays["input"]


def predict(fn: Callable[[Any], Any], inputs: Any, batch_size: int, jit_compile: bool = False) -> dict[str, np.ndarray]:
    """Run ``fn`` over ``inputs`` in batches of ``batch_size`` and flatten the outputs.

    ``fn`` is wrapped in one ``tf.function`` (XLA-compiled with
    ``jit_compile``), so every format and the in-memory model go through the
    same graph-mode path that ``model.predict`` uses.
    """
    import tensorflow as tf

    graph_fn = tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
    flat_inputs = flatten(inputs, "input")
    n = next(iter(flat_inputs.values())).shape[0]
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        batch = tf.nest.map_structure(lambda a: tf.constant(np.asarray(a)[start:start + batch_size]), inputs)
        out = flatten(tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, graph_fn(batch)), "output")
        for k, v in out.items():
            chunks.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) if v[0].ndim else v[0] for k, v in chunks.items()}


def variable_digests(variables: list) -> dict[str, dict]:
    """``{name: {sha256, shape, dtype}}`` of every variable's bytes.

    Keras variables are named by ``path``; tf.Variables by ``name`` without
    the ``:0`` suffix. Repeated names get ``#k`` suffixes so none collapse.
    """
    out: dict[str, dict] = {}
    for v in variables:
        name = getattr(v, "path", None) or v.name
        name = name.rsplit(":", 1)[0] if ":" in name else name
        value = np.ascontiguousarray(np.asarray(v.numpy() if hasattr(v, "numpy") else v))
        key, k = name, 1
        while key in out:
            key, k = f"{name}#{k}", k + 1
        out[key] = {"sha256": hashlib.sha256(value.tobytes()).hexdigest(),
                    "shape": list(value.shape), "dtype": value.dtype.name}
    return out
