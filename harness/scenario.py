"""The Scenario type and discovery of scenario modules.

A scenario module is any ``*.py`` file (not starting with ``_``) in a scenario
directory that defines ``SCENARIO`` (one ``Scenario``) or ``SCENARIOS`` (a
list). Modules are imported by file path under private names, so user
directories need no ``__init__.py`` and nothing has to be installed on workers:
the sweep ships scenarios to Ray workers by value.

Custom Keras classes: a scenario carries its module's source text, and
``activate`` (the first thing ``train`` and ``replay`` call) executes that
module once per process and runs the scenario's ``setup`` hook once per
process. So a class registered with ``keras.saving.register_keras_serializable``
(at module level, or inside ``setup`` to keep TensorFlow out of the driver) is
registered in every worker before a model is built or loaded, even in a worker
that only unpickled the scenario.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .compare import METRICS, OUTPUT_KINDS

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "scenarios"
#: Built-in search path: the article's scenarios and the zoo of real architectures.
#: (``scenarios/sweeps/`` holds YAML only and is not searched.)
BUILTIN_DIRS = (BUILTIN_DIR, BUILTIN_DIR / "zoo")
_MODULE_PREFIX = "_harness_scenarios"
#: Callable fields of a scenario (compared by identity when pickling).
_FUNCTION_FIELDS = ("probe", "build", "data", "train", "setup", "custom_objects", "labels")


class ScenarioError(ValueError):
    """A scenario module could not be loaded or is invalid (exit code 2)."""


@dataclass(frozen=True)
class Scenario:
    """A named, seeded recipe: build a model, make data, compile, fit, probe.

    Args:
        name: unique name used in sweeps and results.
        build: ``() -> keras.Model``, uncompiled.
        data: ``(rng: np.random.Generator) -> (x, y)`` (or a dict of ``fit`` kwargs).
        probe: ``(rng) -> inputs`` every environment predicts on: an array, a
            tuple/list of arrays, or a dict for multi-input models.
        compile: keyword arguments of ``model.compile``.
        fit: keyword arguments of ``model.fit`` (``verbose`` defaults to 0).
        seed: seeds Keras/TF/numpy before ``build`` and seeds the data/probe rngs.
        train: optional ``(seed) -> model`` replacing build+compile+fit, for
            custom training loops or plain ``tf.Module``s (save those with the
            ``tf-savedmodel`` format).
        custom_objects: passed to ``keras.models.load_model``: a mapping, or a
            function ``() -> mapping`` called in the worker (so the classes can
            be defined inside functions, keeping Keras out of the driver).
        setup: optional ``() -> None`` run once per process before anything is
            built or loaded, e.g. to define and register custom Keras classes
            with ``keras.saving.register_keras_serializable``.
        description: one line for ``harness scenarios``.
        outputs: what each output is, for prediction impact, by output name
            (``output`` for a single output, ``output_0``... for a list, the
            keys of a dict): ``classes``, ``binary``, ``labels`` or
            ``regression``. Unnamed outputs are guessed (see
            ``harness.compare.output_kind``).
        labels: optional ``(probe_inputs) -> labels``: the true answer for each
            probe row, an array for a single output or a dict by output name
            (named as in ``outputs``). With ``metric``, every cell reports the
            task metric on the reference and on its observation.
        metric: the task metric of ``labels``: ``accuracy``, ``auc``, ``mse``
            or ``mae`` (see ``harness.compare.task_metric``).

    Example:
        >>> SCENARIO = Scenario(name="seed-linear-regression", build=build, data=data,
        ...                     probe=probe, compile={"optimizer": "sgd", "loss": "mse"},
        ...                     fit={"epochs": 100}, seed=0)
    """

    name: str
    probe: Callable[[Any], Any]
    build: Callable[[], Any] | None = None
    data: Callable[[Any], Any] | None = None
    compile: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    train: Callable[[int], Any] | None = None
    custom_objects: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
    setup: Callable[[], Any] | None = None
    description: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)
    labels: Callable[[Any], Any] | None = None
    metric: str | None = None
    source_file: str = ""
    source_digest: str = ""
    source_text: str = field(default="", repr=False)

    def __reduce__(self):
        """Pickle as (module source, name, changed fields), never functions by value: see ``activate``."""
        return _reduce(self)

    def resolved_custom_objects(self) -> dict[str, Any]:
        """``custom_objects`` as a dict (calling it if it is a function)."""
        objs = self.custom_objects() if callable(self.custom_objects) else self.custom_objects
        return dict(objs or {})

    def __post_init__(self):
        if self.train is None and (self.build is None or self.data is None):
            raise ScenarioError(f"scenario {self.name!r}: give build= and data= (or a train= hook)")
        if not callable(self.probe):
            raise ScenarioError(f"scenario {self.name!r}: probe= must be a function rng -> inputs")
        if not isinstance(self.outputs, Mapping):
            raise ScenarioError(f"scenario {self.name!r}: outputs= must map output names to one of "
                                f"{', '.join(OUTPUT_KINDS)}, got {type(self.outputs).__name__}")
        for out, kind in self.outputs.items():
            if kind not in OUTPUT_KINDS:
                raise ScenarioError(f"scenario {self.name!r}: outputs[{out!r}] is {kind!r}; use one of "
                                    f"{', '.join(OUTPUT_KINDS)}")
        if (self.labels is None) != (self.metric is None):
            given, missing = ("labels=", "metric=") if self.metric is None else ("metric=", "labels=")
            raise ScenarioError(f"scenario {self.name!r}: {given} needs {missing} too (probe labels and the task "
                                f"metric on them: one of {', '.join(METRICS)})")
        if self.metric is not None and self.metric not in METRICS:
            raise ScenarioError(f"scenario {self.name!r}: metric={self.metric!r}; use one of {', '.join(METRICS)}")
        if self.labels is not None and not callable(self.labels):
            raise ScenarioError(f"scenario {self.name!r}: labels= must be a function probe_inputs -> labels")


def _module_name(path: Path) -> str:
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{_MODULE_PREFIX}.m{tag}_{path.stem.replace('-', '_')}"


def _import_failure(exc: BaseException, path: Path) -> str:
    """What went wrong executing a scenario module, with the module's own line where it happened."""
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    where = f"line {lines[-1]}: " if lines else ""
    if isinstance(exc, SystemExit):
        return f"{where}it called sys.exit({exc.code!r}) at import; a scenario module must only define scenarios"
    if isinstance(exc, KeyboardInterrupt):
        return f"{where}KeyboardInterrupt raised at import"
    detail = " ".join(str(exc).split())
    return f"{where}{type(exc).__name__}" + (f": {detail}" if detail else "")


def _exec_module(path: Path, text: str) -> list[Scenario]:
    """Execute scenario source ``text`` as the private module of ``path``; stamp its scenarios."""
    name = _module_name(path)
    module = type(sys)(name)
    module.__file__ = str(path)
    sys.modules.setdefault(_MODULE_PREFIX, type(sys)(_MODULE_PREFIX))
    sys.modules[name] = module
    try:
        exec(compile(text, str(path), "exec"), module.__dict__)
    except BaseException as exc:  # noqa: BLE001 -- sys.exit()/KeyboardInterrupt in a module must not end the run
        sys.modules.pop(name, None)
        raise ScenarioError(f"{path}: failed to import scenario module: {_import_failure(exc, path)}") from None
    found = []
    if hasattr(module, "SCENARIO"):
        found.append(module.SCENARIO)
    found.extend(getattr(module, "SCENARIOS", []))
    digest = hashlib.sha256(text.encode()).hexdigest()
    out = []
    for s in found:
        if not isinstance(s, Scenario):
            raise ScenarioError(f"{path}: SCENARIO/SCENARIOS must hold harness.Scenario objects, got {type(s).__name__}")
        out.append(replace(s, source_file=str(path), source_digest=digest, source_text=text))
    _LOADED[(name, digest)] = {s.name: s for s in out}
    return out


def load_module_scenarios(path: str | os.PathLike) -> list[Scenario]:
    """Import one scenario file and return its scenarios, stamped with source info
    (file, sha256 and text of the module, so a worker can execute it again).

    Raises:
        ScenarioError: the file fails to import or defines no valid scenarios.
    """
    path = Path(path).resolve()
    try:
        text = path.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read scenario module: {exc}") from exc
    # Once per process and source: discovering again returns the very same objects
    # (functions, registered classes); an edited file is executed anew.
    loaded = _LOADED.get((_module_name(path), hashlib.sha256(text.encode()).hexdigest()))
    return list(loaded.values()) if loaded is not None else _exec_module(path, text)


#: (module name, source digest) -> scenarios of that module as executed in this process.
_LOADED: dict[tuple[str, str], dict[str, Scenario]] = {}
#: setup hooks that already ran in this process.
_SET_UP: set = set()


def _module_scenarios(source_file: str, source_text: str, source_digest: str) -> dict[str, Scenario]:
    """The scenarios of a module source, executing it first if this process has not."""
    key = (_module_name(Path(source_file)), source_digest)
    if key not in _LOADED:
        if hashlib.sha256(source_text.encode()).hexdigest() != source_digest:
            raise ScenarioError(f"{source_file}: scenario source text does not match its digest")
        _exec_module(Path(source_file), source_text)
    return _LOADED[key]


def _restore(source_file: str, source_text: str, source_digest: str, name: str, changed: dict) -> Scenario:
    """Unpickle a scenario: its module executed in this process, then the changed fields applied."""
    own = _module_scenarios(source_file, source_text, source_digest).get(name)
    if own is None:
        raise ScenarioError(f"{source_file}: no scenario named {name!r} in this module")
    return replace(own, **changed)


def _from_fields(values: dict) -> Scenario:
    return Scenario(**values)


def _same_definition(a: Any, b: Any) -> bool:
    """Two functions made by the same source line of the same scenario module (another
    execution of that module, or another call of a factory)."""
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_b is None:
        a, b = getattr(a, "__wrapped__", None), getattr(b, "__wrapped__", None)  # functools.cache
        code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_b is None or getattr(a, "__module__", None) != getattr(b, "__module__", 0):
        return False
    if (code_a.co_filename, code_a.co_firstlineno, code_a.co_name) != (code_b.co_filename, code_b.co_firstlineno,
                                                                       code_b.co_name):
        return False
    # closures of one factory differ by what they captured: _images(8, 32, 3) is not _images(16, 16, 3)
    cells_a = [c.cell_contents for c in a.__closure__ or ()] + list(a.__defaults__ or ())
    cells_b = [c.cell_contents for c in b.__closure__ or ()] + list(b.__defaults__ or ())
    return len(cells_a) == len(cells_b) and all(_same_value(x, y) for x, y in zip(cells_a, cells_b))


def _same_value(x: Any, y: Any) -> bool:
    if x is y or (callable(x) and callable(y) and _same_definition(x, y)):
        return True
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:  # arrays and other values without a plain truth value
        return False


def _reduce(scenario: Scenario):
    values = {f.name: getattr(scenario, f.name) for f in fields(scenario)}
    if not scenario.source_text:
        return _from_fields, (values,)
    own = _module_scenarios(scenario.source_file, scenario.source_text, scenario.source_digest).get(scenario.name)
    changed = {}
    for k, v in values.items():
        if k in ("name", "source_file", "source_text", "source_digest") or own is None:
            continue
        mine = getattr(own, k)
        if v is mine or (k not in _FUNCTION_FIELDS and v == mine) or _same_definition(v, mine):
            continue
        changed[k] = v  # e.g. replace(scenario, seed=7): travels as a value
    return _restore, (scenario.source_file, scenario.source_text, scenario.source_digest, scenario.name, changed)


def activate(scenario: Scenario) -> Scenario:
    """Make ``scenario`` ready to build or load models in this process; call it first.

    Executes the scenario's module in this process unless it already ran here
    (from the source text the scenario carries: the file need not exist on
    this node), so classes registered at module level with
    ``keras.saving.register_keras_serializable`` are registered; then runs the
    scenario's ``setup`` hook once per process. Returns the scenario.

    Scenarios pickle as (module source, name, changed fields) and unpickle by
    executing that module once per process, so a worker builds models from
    the very classes its module registered, never from by-value copies.

    Raises:
        ScenarioError: the module fails to execute here or no longer defines
            the scenario.
    """
    if scenario.source_text:
        _module_scenarios(scenario.source_file, scenario.source_text, scenario.source_digest)
    if scenario.setup is not None and scenario.setup not in _SET_UP:
        scenario.setup()
        _SET_UP.add(scenario.setup)
    return scenario


def search_path(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Built-in ``scenarios/`` and ``scenarios/zoo/`` plus ``extra`` directories, de-duplicated, in order."""
    seen, out = set(), []
    for d in [*BUILTIN_DIRS, *map(Path, extra)]:
        d = d.resolve()
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def discover(extra: Iterable[str | os.PathLike] = ()) -> dict[str, Scenario]:
    """All scenarios in the built-in directory and in ``extra`` directories.

    Raises:
        ScenarioError: a directory is missing, a module fails to import, or two
            modules define the same scenario name.
    """
    scenarios: dict[str, Scenario] = {}
    for d in search_path(extra):
        if not d.is_dir():
            if d in {b.resolve() for b in BUILTIN_DIRS}:
                continue
            # a sweep's scenario_paths were checked when it was loaded (naming the file and field)
            raise ScenarioError(f"{d}: scenario directory does not exist (check --scenarios-path)")
        for f in sorted(d.glob("*.py")):
            if f.name.startswith("_"):
                continue
            for s in load_module_scenarios(f):
                if s.name in scenarios and scenarios[s.name].source_file != s.source_file:
                    raise ScenarioError(f"scenario {s.name!r} is defined twice: {scenarios[s.name].source_file} and {f}; rename one")
                scenarios[s.name] = s
    return scenarios


def select(available: Mapping[str, Scenario], names: Iterable[str], source: str = "sweep") -> list[Scenario]:
    """Pick scenarios by name, raising a ``ScenarioError`` that lists the known ones."""
    import difflib

    out = []
    for n in names:
        if n not in available:
            close = difflib.get_close_matches(n, list(available), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ScenarioError(f"{source}: scenarios: unknown scenario {n!r}; {hint}known: {', '.join(sorted(available)) or '(none)'}")
        out.append(available[n])
    return out
