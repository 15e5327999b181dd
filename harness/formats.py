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
the limitation in one phrase, the error that stops it, and what to use instead.

A ``.keras``/``.h5`` load (``load_keras_file``) depends on the file only: the
Keras packages its saved config names are imported first, whatever this
process loaded before. A load failing on an unknown class is retried with the
classes registered from where they are defined, so the error says either that
the model loads once they are registered (``UnregisteredClass``, with the
``custom_objects`` to pass) or quotes the error that really stops it.

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
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .scenario import Scenario

MODEL_DIR = "model"
#: Version of how references are computed; part of every artifact's content
#: address, so artifacts stored by an older harness are retrained, not compared
#: against outputs computed another way. 2: fresh Keras session per build
#: (stable layer names), restored SavedModel endpoints called unwrapped.
#: 3: a float64 oracle (``oracle.arrow``) and the probe labels (``labels.arrow``).
REFERENCE_RECIPE = 3
#: Keras dtype policies a model can be rebuilt under: an environment's ``dtype_policy``
#: (serving a float32 model in reduced precision), and ``float64`` for the oracle.
DTYPE_POLICIES = ("mixed_bfloat16", "mixed_float16", "bfloat16", "float16", "float32", "float64")
#: Formats whose artifacts reload as a Keras model (the others are traced graphs).
KERAS_RELOADS = ("keras", "h5", "weights")


@dataclass
class Loaded:
    fn: Callable[[Any], Any]
    variables: list
    owner: Any
    served: Any = None  # the Keras model ``fn`` calls when it is not ``owner`` (a copy under a dtype policy)

    @property
    def model(self) -> Any:
        """The model that computes ``fn``'s predictions: the copy under a dtype policy, else ``owner``."""
        return self.owner if self.served is None else self.served


@dataclass(frozen=True)
class Format:
    name: str
    save: Callable[[Any, str, Any], None]  # (model, directory, probe_inputs)
    load: Callable[[str, Scenario, Any], Loaded]  # (directory, scenario, probe_inputs)
    description: str


def is_keras(obj: Any) -> bool:
    """Whether ``obj`` is a ``keras.Model`` (imports Keras)."""
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


class PolicyNeedsKeras(TypeError):
    """An environment's ``dtype_policy`` asked of an artifact that does not reload as a Keras model."""


class PolicyChangedModel(ValueError):
    """Rebuilding a model under another dtype policy gave other variables, or lost a weight's value."""


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
    # An unknown class is not in this table: it is a registration to make (see ``UnregisteredClass``);
    # these are the errors that remain once every class the model names is registered.
    Limitation(("h5",), ("load",),
               r"Only input tensors may be passed as positional arguments|too many positional arguments",
               "cannot reload this model in Keras 3 (its loader cannot call some layers and keras.ops nodes of a "
               "functional model with their saved arguments: x + 3.0, x + attention(x), ConvNeXt's blocks)",
               "keras or savedmodel"),
    Limitation(("savedmodel", "tf-savedmodel"), ("load",), PolicyNeedsKeras,
               "reloads a traced graph whose dtypes were fixed when it was saved, so a dtype_policy cannot "
               "recompute it", "keras, h5 or weights (or an environment without dtype_policy)"),
    Limitation(("*",), ("predict",), XlaStringInputs,
               "cannot compile a model with string inputs (tf.string has no XLA type; TensorFlow 2.21 raises "
               "'Detected unsupported operations' once, then aborts the whole process on the next try with "
               "'Check failed: DataTypeCanUseMemcpy')", "an environment without jit_compile for string models",
               label="XLA (jit_compile=True)"),
)


def explain(fmt: str, stage: str, exc: BaseException, context: str = "") -> FormatLimitation | None:
    """The ``FormatLimitation`` that explains ``exc``, or ``None`` if no table entry does.

    ``context`` (e.g. which classes had to be registered before ``exc`` showed) is put in
    parentheses after the quoted error.
    """
    if isinstance(exc, FormatLimitation):
        return exc
    for lim in LIMITATIONS:
        if lim.matches(fmt, stage, exc):
            label = lim.label or LABELS.get(fmt, fmt)
            note = f" ({context})" if context else ""
            if isinstance(lim.match, type):  # our own check: its message is the whole story
                return FormatLimitation(f"{label} {lim.phrase}: {_first_line(exc)}{note}; use {lim.instead}")
            return FormatLimitation(f"{label} {lim.phrase}: {type(exc).__name__}: {_first_line(exc)}{note}; "
                                    f"use {lim.instead}")
    return None


def _first_line(exc: BaseException) -> str:
    """The first line of an error, without Keras's generic advice (the harness says what applies instead)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split(" Please ensure ", 1)[0].split(" Make sure custom classes ", 1)[0]


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


# -- the same model under another dtype policy (the oracle, the dtype_policy knob) ----------
def _retyped(config: Any, policy: str, variable_dtype: str) -> Any:
    """A Keras model config with every floating-point layer dtype set to ``policy``.

    Layer policies (``{"class_name": "DTypePolicy", ...}`` or a dtype name) become
    ``policy``; an ``InputLayer`` takes the policy's variable dtype (a tensor dtype, not a
    policy); integer and string dtypes (token ids, lookups) and the recorded dtypes of the
    functional graph's tensors (which Keras recomputes) stay as they are.
    """
    if isinstance(config, list):
        return [_retyped(c, policy, variable_dtype) for c in config]
    if not isinstance(config, dict) or config.get("class_name") == "__keras_tensor__":
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype" and isinstance(value, str) and value in DTYPE_POLICIES:
            value = policy
        elif key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy" \
                and value.get("config", {}).get("name") in DTYPE_POLICIES:
            value = {**value, "config": {**value["config"], "name": policy}}
        elif key == "config" and config.get("class_name") == "InputLayer" and isinstance(value, dict):
            value = {**value, "dtype": variable_dtype} if value.get("dtype") in DTYPE_POLICIES else value
        else:
            value = _retyped(value, policy, variable_dtype)
        out[key] = value
    return out


def _same_variables(original: list, rebuilt: list, exact: bool) -> None:
    """Raise ``PolicyChangedModel`` unless ``rebuilt`` holds ``original``'s variables (cast back bit for bit if ``exact``)."""
    if len(original) != len(rebuilt):
        raise PolicyChangedModel(f"the rebuilt model has {len(rebuilt)} variables, the original {len(original)}")
    for old, new in zip(original, rebuilt):
        a, b = np.asarray(old.numpy()), np.asarray(new.numpy())
        name = getattr(old, "path", None) or old.name
        if a.shape != b.shape:
            raise PolicyChangedModel(f"variable {name}: shape {b.shape} != original {a.shape}")
        if (a.dtype.kind in "iub" or exact) and not np.array_equal(b.astype(a.dtype), a):
            raise PolicyChangedModel(f"variable {name}: its value did not survive the cast to {b.dtype.name}")


def with_dtype_policy(model: Any, policy: str, custom_objects: Any = None) -> Any:
    """A copy of Keras ``model`` computing under dtype ``policy``, holding its trained weights.

    Every floating-point layer of the copy gets ``policy`` (whatever policy it had, also a
    mixed-precision layer's own), so ``float64`` gives the model's answer with float32
    rounding out of the way, and ``mixed_bfloat16`` shows what serving it in bfloat16 does.
    The copy goes through Keras's own saving: the model is saved as an unzipped ``.keras``
    directory, its ``config.json`` retyped (see ``_retyped``) and loaded back, so Keras
    restores every weight into the new variables (cast to their dtype), the vocabularies of
    adapted lookup layers, and custom layers' own state; ``safe_mode`` stays on.

    Args:
        model: a Keras model.
        policy: one of ``DTYPE_POLICIES``.
        custom_objects: passed to ``keras.saving.load_model``.

    Raises:
        PolicyChangedModel: the copy's variables differ in number or shape, or (for a
            policy whose variables are at least as wide as the original's) a weight's
            value did not survive the cast.
        Exception: whatever Keras raises when the model cannot be saved or rebuilt.
    """
    import keras

    if policy not in DTYPE_POLICIES:
        raise ValueError(f"unknown dtype policy {policy!r}; use one of {', '.join(DTYPE_POLICIES)}")
    variable_dtype = keras.DTypePolicy(policy).variable_dtype
    with tempfile.TemporaryDirectory(prefix="harness-policy-") as tmp:
        path = os.path.join(tmp, "model")  # an unzipped .keras directory (Keras wants no .keras suffix on it)
        keras.saving.save_model(model, path, zipped=False)
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            config = _retyped(json.load(f), policy, variable_dtype)
        with open(config_file, "w") as f:
            json.dump(config, f)
        with keras_scope():
            rebuilt = keras.saving.load_model(path, custom_objects=custom_objects, compile=False)
    widths = {np.dtype(v.dtype).itemsize for v in model.weights if np.dtype(v.dtype).kind == "f"}
    exact = np.dtype(variable_dtype).itemsize >= max(widths, default=0)
    _same_variables(list(model.weights), list(rebuilt.weights), exact)
    return rebuilt


def _policy_loaded(fmt: str, loaded: Loaded, scenario: Scenario, policy: str) -> Loaded:
    if fmt not in KERAS_RELOADS or not is_keras(loaded.owner):
        raise PolicyNeedsKeras(f"dtype_policy {policy!r} needs a Keras model, and format {fmt!r} is not one")
    rebuilt = with_dtype_policy(loaded.owner, policy, scenario.resolved_custom_objects())
    # The weight check stays on the artifact's own variables: the policy is how it is served.
    return Loaded(fn=lambda x: rebuilt(x, training=False), variables=loaded.variables, owner=(loaded.owner, rebuilt),
                  served=rebuilt)


def under_policy(fmt: str, loaded: Loaded, scenario: Scenario, policy: str | None) -> Loaded:
    """``loaded`` served under dtype ``policy`` (an environment's ``dtype_policy``); as it is for ``None``.

    Raises:
        FormatLimitation: ``fmt`` does not reload as a Keras model (``savedmodel``, ``tf-savedmodel``).
    """
    if policy is None:
        return loaded
    return _explained(fmt, "load", _policy_loaded)(fmt, loaded, scenario, policy)


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


def _load_keras_file(ext: str, fmt: str):
    def load(directory, scenario, probe):
        return _keras_loaded(load_keras_file(os.path.join(directory, f"model.{ext}"), fmt,
                                             scenario.resolved_custom_objects()))
    return load


# -- what a saved Keras config names, and unknown classes -------------------------
#: Packages whose modules Keras itself imports when a saved config names them (keras.saving's own
#: rule for ``.keras`` files); the only packages the harness imports on an artifact's behalf.
KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp")
#: At most this many unknown classes are registered, one after another, to find what stops a load.
MAX_REGISTRATIONS = 8
_UNKNOWN = re.compile(r"Unknown [\w ]+: '([^']+)'|Could not locate (?:class|function) '([^']+)'")


class UnregisteredClass(ValueError):
    """A model names a class that is not registered where it is loaded (not a format limitation).

    The message names the class, where it is defined when that is known, whether the model
    then loads, and the fix: ``custom_objects`` in the scenario, or a ``setup`` hook.
    """


@dataclass(frozen=True)
class ClassRef:
    """One class a saved config names: ``class_name``, and the ``module``/``registered_name`` Keras saved with it."""

    name: str
    module: str | None = None
    registered_name: str | None = None


def saved_config(path: str) -> Any:
    """The model config saved in a ``.keras`` file (``config.json`` in the zip) or a legacy ``.h5`` file
    (its ``model_config`` attribute); None when there is none or it is unreadable (the load then says why)."""
    import json
    import zipfile

    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            text = f.attrs.get("model_config")
        return json.loads(text) if text is not None else None
    except Exception:  # noqa: BLE001 -- a damaged file is Keras's to report, in the load itself
        return None


def class_refs(config: Any) -> list[ClassRef]:
    """Every class a saved config names, in the order it names them (duplicates kept once)."""
    refs: dict[ClassRef, None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str):
                module, registered = node.get("module"), node.get("registered_name")
                refs[ClassRef(node["class_name"], module if isinstance(module, str) else None,
                              registered if isinstance(registered, str) else None)] = None
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return list(refs)


def _package(ref: ClassRef) -> str | None:
    """The Keras package (other than keras itself) a class ref belongs to, by module or ``pkg>Name``."""
    for source in (ref.module and ref.module.split(".", 1)[0],
                   ref.registered_name and ">" in ref.registered_name and ref.registered_name.split(">", 1)[0],
                   ">" in ref.name and ref.name.split(">", 1)[0]):
        if source in KERAS_PACKAGES and source != "keras":
            return source
    return None


def packages_named(config: Any) -> list[str]:
    """The Keras packages (keras_hub, keras_cv, keras_nlp) whose classes a saved config names."""
    return sorted({p for p in map(_package, class_refs(config)) if p})


def import_packages(packages: list[str]) -> list[str]:
    """Import each package (registering its classes, as loading a ``.keras`` file naming it would).

    Done before *every* load of a Keras file, so a load never depends on what this
    process loaded before (a legacy ``.h5`` load imports nothing itself).
    Returns the packages that are not installed here.
    """
    import importlib

    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _unknown_class(exc: BaseException) -> str | None:
    """The class an "Unknown layer: 'X'" / "Could not locate class 'X'" error names, else None."""
    match = _UNKNOWN.search(str(exc))
    return (match.group(1) or match.group(2)) if match else None


@dataclass(frozen=True)
class _Found:
    cls: type
    path: str  # where it is defined: module.qualname


def _find_class(name: str, config: Any) -> _Found | None:
    """Where class ``name`` (bare, or ``package>Name``) of a saved config is defined, without running new code:
    the module the config names for it (within :data:`KERAS_PACKAGES`), Keras's registry, then the modules
    already imported of keras and of the packages the config names. None if nowhere."""
    import importlib
    import sys

    import keras
    from keras.src.saving.keras_saveable import KerasSaveable  # the base Keras itself checks (no public alias)

    bare = name.split(">")[-1]

    def found(cls: Any) -> _Found | None:
        ok = isinstance(cls, type) and issubclass(cls, KerasSaveable)
        return _Found(cls, f"{cls.__module__}.{cls.__qualname__}") if ok else None

    for ref in class_refs(config):
        if name in (ref.name, ref.registered_name) and ref.module and ref.module.split(".")[0] in KERAS_PACKAGES:
            try:
                hit = found(getattr(importlib.import_module(ref.module), bare, None))
            except ImportError:
                hit = None
            if hit:
                return hit
    registry = keras.saving.get_custom_objects()
    for key in sorted(registry):
        if key == name or key.split(">")[-1] == bare:
            if hit := found(registry[key]):
                return hit
    packages = {"keras", *packages_named(config)}
    for module_name in sorted(m for m in list(sys.modules) if m.split(".")[0] in packages):
        if hit := found(getattr(sys.modules[module_name], bare, None)):
            return hit
    return None


def load_keras_file(path: str, fmt: str, custom_objects: Mapping[str, Any]) -> Any:
    """``keras.models.load_model(path)`` whose outcome depends on the file only, with true error causes.

    Before loading, the Keras packages the file's config names are imported (so the
    load never depends on what this process loaded before). When the load fails on an
    unknown class, the classes the model names are registered one by one from where
    they are defined and the load is retried: the error then says either that the
    model loads once they are registered (:class:`UnregisteredClass`: register them
    with ``custom_objects`` or a ``setup`` hook), or quotes the error that really stops
    it (a :class:`FormatLimitation` only when the known-limitations table explains it).
    """
    import keras

    config = saved_config(path)
    missing = import_packages(packages_named(config))

    def load(objects: Mapping[str, Any]) -> Any:
        with keras_scope():
            return keras.models.load_model(path, custom_objects=dict(objects), compile=False)

    try:
        return load(custom_objects)
    except Exception as exc:
        if _unknown_class(exc) is None:
            raise
        raise _diagnose(fmt, exc, config, custom_objects, missing, load) from exc


def _diagnose(fmt: str, exc: BaseException, config: Any, custom_objects: Mapping[str, Any], missing: list[str],
              load: Callable[[Mapping[str, Any]], Any]) -> Exception:
    """Why a load that failed on an unknown class really fails (see :func:`load_keras_file`)."""
    label = LABELS.get(fmt, fmt)
    registered: dict[str, _Found] = {}
    error: BaseException | None = exc
    while error is not None and len(registered) < MAX_REGISTRATIONS:
        name = _unknown_class(error)
        where = _find_class(name, config) if name and name not in registered else None
        if where is None:
            break
        registered[name] = where
        try:
            load({**custom_objects, **{n: f.cls for n, f in registered.items()}})
            error = None
        except Exception as retry:  # noqa: BLE001 -- the next obstacle is what we are after
            error = retry
    fix = ", ".join(f"{n!r}: {f.path}" for n, f in registered.items())
    names = ", ".join(map(repr, registered))
    if error is None:
        return UnregisteredClass(
            f"{label}: the model names class(es) {names} that are not registered under those names here "
            f"(first error: {type(exc).__name__}: {_first_line(exc)}); it reloads once they are: pass "
            f"custom_objects={{{fix}}} in the Scenario, or register them in its setup hook; "
            "not a limitation of the format")
    after = (f"what stops it once {names} {'is' if len(registered) == 1 else 'are'} registered from "
             f"{', '.join(f.path for f in registered.values())}; the first error was only the missing "
             f"registration: {_first_line(exc)}") if registered else ""
    name = _unknown_class(error)
    if name is not None:  # a class defined nowhere this process can see
        hint = f" (package {', '.join(missing)} is not installed here)" if missing else ""
        return UnregisteredClass(
            f"{label}: the model names class {name!r}, which is not registered or importable here{hint}: "
            f"{type(error).__name__}: {_first_line(error)}{f' ({after})' if after else ''}; register it: "
            "custom_objects={" + repr(name.split(">")[-1]) + ": <the class>} in the Scenario, or a setup hook "
            "that imports or defines it (keras.saving.register_keras_serializable)")
    lim = explain(fmt, "load", error, after)
    if lim is not None:
        return lim
    return RuntimeError(f"{label}: {type(error).__name__}: {_first_line(error)}" + (f" ({after})" if after else ""))


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
    "keras": _format("keras", _save_keras_file("keras", "keras"), _load_keras_file("keras", "keras"),
                     "model.save('model.keras') / keras.models.load_model"),
    "h5": _format("h5", _save_keras_file("h5", "h5"), _load_keras_file("h5", "h5"),
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


def map_arrays(fn: Callable[[np.ndarray], Any], structure: Any) -> Any:
    """``structure`` (an array, or dicts / lists / tuples of them) with ``fn`` applied to every array."""
    if isinstance(structure, dict):
        return {k: map_arrays(fn, v) for k, v in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_arrays(fn, v) for v in structure)
    return fn(np.asarray(structure))


def is_floating(a: np.ndarray) -> bool:
    """Whether ``a`` holds floating-point numbers (bfloat16 included)."""
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def as_float64(structure: Any) -> Any:
    """``structure`` with every floating-point array cast to float64 (exact), the others as they are.

    What a model rebuilt under the ``float64`` policy is fed: the oracle at training, its layer trace in explain.
    """
    return map_arrays(lambda a: a.astype(np.float64) if is_floating(a) else a, structure)


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
