"""The Scenario type and discovery of scenario modules.

A scenario module is any ``*.py`` file (not starting with ``_``) in a scenario
directory that defines ``SCENARIO`` (one ``Scenario``) or ``SCENARIOS`` (a
list). Modules are imported by file path under private names, so user
directories need no ``__init__.py`` and nothing has to be installed on workers:
the sweep ships scenarios to Ray workers by value.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "scenarios"
_MODULE_PREFIX = "_harness_scenarios"


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
        custom_objects: passed to ``keras.models.load_model``.
        description: one line for ``harness scenarios``.

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
    custom_objects: Mapping[str, Any] | None = None
    description: str = ""
    source_file: str = ""
    source_digest: str = ""

    def __post_init__(self):
        if self.train is None and (self.build is None or self.data is None):
            raise ScenarioError(f"scenario {self.name!r}: give build= and data= (or a train= hook)")
        if not callable(self.probe):
            raise ScenarioError(f"scenario {self.name!r}: probe= must be a function rng -> inputs")


def _module_name(path: Path) -> str:
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{_MODULE_PREFIX}.m{tag}_{path.stem.replace('-', '_')}"


def load_module_scenarios(path: str | os.PathLike) -> list[Scenario]:
    """Import one scenario file and return its scenarios, stamped with source info.

    Raises:
        ScenarioError: the file fails to import or defines no valid scenarios.
    """
    path = Path(path).resolve()
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(_MODULE_PREFIX, type(sys)(_MODULE_PREFIX))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ScenarioError(f"{path}: failed to import scenario module: {type(exc).__name__}: {exc}") from exc
    found = []
    if hasattr(module, "SCENARIO"):
        found.append(module.SCENARIO)
    found.extend(getattr(module, "SCENARIOS", []))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = []
    for s in found:
        if not isinstance(s, Scenario):
            raise ScenarioError(f"{path}: SCENARIO/SCENARIOS must hold harness.Scenario objects, got {type(s).__name__}")
        out.append(replace(s, source_file=str(path), source_digest=digest))
    return out


def search_path(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Built-in ``scenarios/`` plus ``extra`` directories, de-duplicated, in order."""
    seen, out = set(), []
    for d in [BUILTIN_DIR, *map(Path, extra)]:
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
            if d == BUILTIN_DIR.resolve():
                continue
            raise ScenarioError(f"{d}: scenario directory does not exist (check --scenarios-path / scenario_paths)")
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
