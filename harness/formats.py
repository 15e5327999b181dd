"""One small save/load pair per format, behind one registry.

TensorFlow is imported inside the functions only: this module is imported by
the driver, which must never import TF (env vars act only before the import).

Every loader returns a ``Loaded``: a callable taking the probe input structure
and returning the output structure, plus the restored variables, and the
object that must stay referenced while the callable is used (a SavedModel's
endpoints fail with "variables have been deleted" once the loaded object is
garbage collected).

Known limitations of the formats live in one table, ``LIMITATIONS``: when a
save or load fails with an error the table recognises, the
format's functions raise ``FormatLimitation`` whose message names the format,
the limitation in one phrase, Keras's own first line, and what to use instead.

Keras global state: every ``build()``/``train()`` runs after
``keras.backend.clear_session()`` (so auto-generated layer names, ``dense``,
``dense_1``, ..., do not depend on what the process built before), and the
global dtype policy a scenario sets (mixed precision) is put back afterwards
(``keras_scope``), so it cannot leak into later scenarios or reloads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .scenario import Scenario

MODEL_DIR = "model"
#: Version of how references are computed; part of every artifact's content
#: address, so artifacts stored by an older harness are retrained, not compared
#: against outputs computed another way. 2: fresh Keras session per build
#: (stable layer names), restored SavedModel endpoints called unwrapped.
REFERENCE_RECIPE = 2


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


def is_keras(obj: Any) -> bool:
    """Whether ``obj`` is a Keras model (not a plain ``tf.Module``)."""
    import keras

    return isinstance(obj, keras.Model)


# -- known limitations ------------------------------------------------------
class FormatLimitation(RuntimeError):
    """A format cannot save or reload this model: a known Keras/TensorFlow limitation.

    The message names the format, the limitation in one phrase, the first
    line of the underlying error, and the format(s) to use instead.
    """


class NotAKerasModel(TypeError):
    """A Keras-only format got something else (a plain ``tf.Module``)."""


class NeedsBuild(TypeError):
    """The ``weights`` format must rebuild the model, but the scenario has no ``build()``."""


class ActiveAugmentationInExport(ValueError):
    """``model.export()`` would serve random augmentation layers in training mode."""


class VocabularyNotInConfig(ValueError):
    """Legacy HDF5 would drop an adapted lookup vocabulary (it is not in the layer config)."""


class XlaStringInputs(ValueError):
    """A ``jit_compile`` prediction would be given ``tf.string`` inputs."""


@dataclass(frozen=True)
class Limitation:
    """One known limitation: which failures it explains and what to say.

    Attributes:
        formats: format names it applies to (``*``: every format).
        stages: ``save``, ``load`` and/or ``predict``.
        match: exception class, or a regex searched in ``"<Type>: <message>"``.
        phrase: the limitation in one phrase (after the label).
        instead: the format(s) or setting to use instead.
        label: what the message starts with; default: the format's label.
    """

    formats: tuple[str, ...]
    stages: tuple[str, ...]
    match: type | str
    phrase: str
    instead: str
    label: str | None = None

    def matches(self, fmt: str, stage: str, exc: BaseException) -> bool:
        if (fmt not in self.formats and "*" not in self.formats) or stage not in self.stages:
            return False
        if isinstance(self.match, type):
            return isinstance(exc, self.match)
        return re.search(self.match, f"{type(exc).__name__}: {exc}") is not None


_KERAS_ONLY = ("keras", "h5", "savedmodel", "weights")
LABELS = {"h5": "h5 (legacy HDF5)", "savedmodel": "savedmodel (model.export)",
          "tf-savedmodel": "tf-savedmodel (tf.saved_model.save)", "weights": "weights (save_weights)"}

#: Every known limitation, in one place. The first match explains the error.
LIMITATIONS: tuple[Limitation, ...] = (
    Limitation(_KERAS_ONLY, ("save",), NotAKerasModel,
               "saves Keras models only", "tf-savedmodel"),
    Limitation(("weights",), ("load",), NeedsBuild,
               "needs the scenario's build() to recreate the model; this scenario has only a train hook",
               "tf-savedmodel (or keras, for a Keras model)"),
    Limitation(("savedmodel",), ("save",), ActiveAugmentationInExport,
               "serves model(x) without training=False, so layers whose call defaults to training=True "
               "(Keras's random augmentation layers) would augment every input of the exported serve()",
               "keras, h5 or tf-savedmodel (or an ExportArchive endpoint calling the model with training=False)"),
    Limitation(("h5",), ("save",), VocabularyNotInConfig,
               "cannot store string lookup vocabularies (adapted StringLookup / IntegerLookup / TextVectorization: "
               "the reloaded lookup table is empty, 'Table not initialized')", "keras or savedmodel"),
    Limitation(("h5",), ("load",),
               r"Unknown layer: '|Only input tensors may be passed as positional arguments|"
               r"too many positional arguments|Could not locate (class|function)",
               "cannot reload this model in Keras 3 (its loader cannot rebuild the keras.ops nodes of a "
               "functional model: x + y, x + 3.0, x[:, 1:2], ops.argmax, the masks of Embedding(mask_zero=True))",
               "keras or savedmodel"),
    Limitation(("*",), ("predict",), XlaStringInputs,
               "cannot compile a model with string inputs (tf.string has no XLA type; TensorFlow 2.21 raises "
               "'Detected unsupported operations' once, then aborts the whole process on the next try with "
               "'Check failed: DataTypeCanUseMemcpy')", "an environment without jit_compile for string models",
               label="XLA (jit_compile=True)"),
)


def explain(fmt: str, stage: str, exc: BaseException) -> FormatLimitation | None:
    """The ``FormatLimitation`` that explains ``exc``, or ``None`` if no table entry does."""
    if isinstance(exc, FormatLimitation):
        return exc
    for lim in LIMITATIONS:
        if lim.matches(fmt, stage, exc):
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            label = lim.label or LABELS.get(fmt, fmt)
            if isinstance(lim.match, type):  # our own check: its message is the whole story
                return FormatLimitation(f"{label} {lim.phrase}: {first}; use {lim.instead}")
            # Keras's "Please ensure you are using a custom_object_scope ..." advice does not apply here.
            first = first.split(" Please ensure ", 1)[0]
            return FormatLimitation(f"{label} {lim.phrase}: {type(exc).__name__}: {first}; use {lim.instead}")
    return None


def _explained(fmt: str, stage: str, fn: Callable) -> Callable:
    """``fn`` raising ``FormatLimitation`` for failures the table knows (others unchanged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            lim = explain(fmt, stage, exc)
            if lim is None or lim is exc:
                raise
            raise lim from exc
    return wrapper


def _require_keras(model: Any, fmt: str) -> None:
    if not is_keras(model):
        raise NotAKerasModel(f"the scenario produced a {type(model).__name__}, not a keras.Model")


# -- Keras global state -------------------------------------------------------
@contextlib.contextmanager
def keras_scope(fresh: bool = False) -> Iterator[None]:
    """Build or load a model without leaking Keras global state.

    Args:
        fresh: start from ``keras.backend.clear_session()``: auto-generated
            layer names restart at ``dense``, the global dtype policy is the
            default, so a model built here is named as in any other process.

    The global dtype policy in force before the block is put back after it,
    whatever the block set (a scenario's ``build`` may call
    ``keras.mixed_precision.set_global_policy``).
    """
    import keras

    policy = keras.config.dtype_policy()
    if fresh:
        keras.backend.clear_session(free_memory=False)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)


def build_model(scenario: Scenario) -> Any:
    """``scenario.train(seed)`` or ``scenario.build()`` in a fresh, seeded Keras session."""
    import keras

    with keras_scope(fresh=True):
        keras.utils.set_random_seed(scenario.seed)
        return scenario.train(scenario.seed) if scenario.train is not None else scenario.build()


def call_model(model: Any, x: Any) -> Any:
    """Inference call: Keras models with ``training=False``, anything else plainly."""
    return model(x, training=False) if is_keras(model) else model(x)


def _keras_loaded(model) -> Loaded:
    return Loaded(fn=lambda x: model(x, training=False), variables=list(model.weights), owner=model)


# -- keras / h5 ------------------------------------------------------------
def _adapted_lookups(model) -> list[str]:
    """Lookup layers whose vocabulary came from ``adapt()``, not from their config."""
    from keras import layers

    kinds = (layers.StringLookup, layers.IntegerLookup, layers.TextVectorization)
    found = [layer for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, kinds) and layer.get_config().get("vocabulary") is None]
    # A TextVectorization's own inner StringLookup is part of it: name the outer layer only.
    inner = {id(sub) for layer in found if isinstance(layer, layers.TextVectorization)
             for sub in layer._flatten_layers(include_self=False)}
    return [f"{layer.name} ({type(layer).__name__})" for layer in found if id(layer) not in inner]


def _save_keras_file(ext: str, fmt: str):
    def save(model, directory, probe):
        _require_keras(model, fmt)
        if fmt == "h5":
            lost = _adapted_lookups(model)
            if lost:
                raise VocabularyNotInConfig(f"{', '.join(lost)} would reload without a vocabulary")
        model.save(os.path.join(directory, f"model.{ext}"))
    return save


def _load_keras_file(ext: str):
    def load(directory, scenario, probe):
        import keras

        with keras_scope():
            model = keras.models.load_model(os.path.join(directory, f"model.{ext}"),
                                            custom_objects=scenario.resolved_custom_objects(), compile=False)
        return _keras_loaded(model)
    return load


# -- weights only ----------------------------------------------------------
def _save_weights(model, directory, probe):
    _require_keras(model, "weights")
    model.save_weights(os.path.join(directory, "model.weights.h5"))


def _load_weights(directory, scenario, probe):
    import keras

    if scenario.build is None:
        raise NeedsBuild(f"scenario {scenario.name!r} defines train= but no build=")
    with keras_scope(fresh=True):
        keras.utils.set_random_seed(scenario.seed)
        model = scenario.build()
        if not model.built:
            model(probe)
    model.load_weights(os.path.join(directory, "model.weights.h5"))
    return _keras_loaded(model)


# -- model.export -> tf.saved_model.load ------------------------------------
def _training_default_true(model) -> list[str]:
    """Layers whose ``call`` defaults to ``training=True`` (Keras random augmentation layers)."""
    names = []
    for layer in model._flatten_layers(include_self=False):
        param = inspect.signature(layer.call).parameters.get("training")
        if param is not None and param.default is True:
            names.append(f"{layer.name} ({type(layer).__name__})")
    return names


def _save_export(model, directory, probe):
    _require_keras(model, "savedmodel")
    active = _training_default_true(model)
    if active:
        raise ActiveAugmentationInExport(f"{', '.join(active)} would run in training mode")
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

    def spec(a):
        a = np.asarray(a)
        dtype = tf.string if a.dtype.kind in "OSU" else tf.as_dtype(a.dtype)
        return tf.TensorSpec([None, *a.shape[1:]], dtype)

    return [tf.nest.map_structure(spec, probe)]


def _save_tf_saved_model(model, directory, probe):
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    # A tracked list restores as an attribute of the loaded object, giving us
    # every variable back by the original order for the weight check.
    module.harness_variables = list(model.weights if is_keras(model) else model.variables)
    if is_keras(model):
        # Non-parameter state the traced call may capture (Keras SeedGenerator
        # states of Dropout / noise / augmentation layers) must be tracked too,
        # or saving fails with "captures tensor ... seed_generator_state".
        weights = {id(v) for v in model.weights}
        module.harness_state = [v for v in model.variables if id(v) not in weights]
    module.serve = tf.function(lambda x: call_model(model, x), input_signature=_input_signature(probe))
    tf.saved_model.save(module, os.path.join(directory, "saved_model"),
                        signatures={"serving_default": module.serve})


def _format(name: str, save: Callable, load: Callable, description: str) -> Format:
    return Format(name, _explained(name, "save", save), _explained(name, "load", load), description)


REGISTRY: dict[str, Format] = {
    "keras": _format("keras", _save_keras_file("keras", "keras"), _load_keras_file("keras"),
                     "model.save('model.keras') / keras.models.load_model"),
    "h5": _format("h5", _save_keras_file("h5", "h5"), _load_keras_file("h5"),
                  "legacy HDF5: model.save('model.h5') / keras.models.load_model"),
    "savedmodel": _format("savedmodel", _save_export, _load_saved_model("serve", "variables"),
                          "model.export() / tf.saved_model.load(...).serve"),
    "tf-savedmodel": _format("tf-savedmodel", _save_tf_saved_model, _load_saved_model("serve", "harness_variables"),
                             "tf.saved_model.save(module with a serve tf.function) / tf.saved_model.load"),
    "weights": _format("weights", _save_weights, _load_weights,
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

    Every model runs as one graph function, the way users run it: a Keras
    model's call is wrapped in one ``tf.function`` (the graph-mode path of
    ``model.predict``); a function that already is one (the ``serve``
    endpoint of a reloaded SavedModel) is called as it is. Wrapping a
    restored SavedModel function in a second ``tf.function`` inlines it into
    a new graph that Grappler optimises differently: on a Transformer block
    that changed up to 3 ULP of the outputs against both the in-memory model
    and ``obj.serve(x)`` itself. With ``jit_compile`` everything is wrapped
    in an XLA-compiled ``tf.function``.
    """
    import tensorflow as tf

    flat_inputs = flatten(inputs, "input")
    strings = [k for k, a in flat_inputs.items() if a.dtype.kind in "OSU"]
    if jit_compile and strings:  # never let TensorFlow try: the second attempt aborts the process
        raise explain("*", "predict", XlaStringInputs(f"string probe inputs {', '.join(strings)}"))
    if isinstance(fn, tf.types.experimental.GenericFunction) and not jit_compile:
        graph_fn = fn
    else:
        graph_fn = tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
    n = next(iter(flat_inputs.values())).shape[0]
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        batch = tf.nest.map_structure(lambda a: tf.constant(np.asarray(a)[start:start + batch_size]), inputs)
        out = flatten(tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, graph_fn(batch)), "output")
        for k, v in out.items():
            chunks.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) if v[0].ndim else v[0] for k, v in chunks.items()}


def _sha256(value: np.ndarray) -> str:
    """sha256 of an array's bytes; string arrays hash each element, length-prefixed
    (``tobytes()`` of an object array would hash pointers)."""
    if value.dtype.kind != "O":
        return hashlib.sha256(value.tobytes()).hexdigest()
    h = hashlib.sha256()
    for item in value.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


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
        out[key] = {"sha256": _sha256(value), "shape": list(value.shape), "dtype": value.dtype.name}
    return out
