"""Sweep, environment and tolerance specs, loaded from YAML and validated.

Every problem raises ``SpecError`` with one line that names the file, the
field (dotted path), the bad value and the fix, e.g.::

    sweep.yaml: environments.cpu-xla.threads: expected a positive integer, got 'two'

No TensorFlow or Ray here; the CLI maps ``SpecError`` to exit code 2.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .compare import Tolerance
from .results import EXPECTATIONS

FORMATS = ("keras", "h5", "savedmodel", "tf-savedmodel", "weights")
RUNTIME_ENV_KEYS = ("pip", "uv", "conda", "container", "image_uri", "env_vars", "py_modules",
                    "working_dir", "py_executable", "config")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# YAML 1.1 (PyYAML) reads `1e-6` (no dot) as a string; accept it as the number the user meant.
_EXP_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class SpecError(ValueError):
    """Invalid sweep input. ``str(err)`` is a one-line message for the user."""

    def __init__(self, source: str, field_path: str, message: str):
        self.source, self.field, self.message = source, field_path, message
        super().__init__(f"{source}: {field_path}: {message}" if field_path else f"{source}: {message}")


class _Ctx:
    """Where we are in the YAML document, for error messages."""

    def __init__(self, source: str, path: str = ""):
        self.source, self.path = source, path

    def at(self, key: str) -> "_Ctx":
        return _Ctx(self.source, f"{self.path}.{key}" if self.path else key)

    def fail(self, message: str) -> SpecError:
        return SpecError(self.source, self.path, message)


def _mapping(ctx: _Ctx, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(f"expected a mapping (key: value lines), got {type(value).__name__} {value!r}")
    return dict(value)


def _check_keys(ctx: _Ctx, value: Mapping, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            raise ctx.at(str(key)).fail(f"unknown field; {hint}")


def _bool(ctx: _Ctx, v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise ctx.fail(f"expected true or false, got {v!r}")


def _pos_int(ctx: _Ctx, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ctx.fail(f"expected a positive integer, got {v!r}")
    return v


def _nonneg_number(ctx: _Ctx, v: Any, *, what: str = "a number >= 0") -> float | None:
    if v is None:
        return None
    num = float(v) if isinstance(v, str) and _EXP_FLOAT_RE.match(v) else v
    if isinstance(num, bool) or not isinstance(num, (int, float)) or num != num or num < 0:
        raise ctx.fail(f"expected {what}, got {v!r}")
    try:
        return float(num)
    except OverflowError:  # an integer too large for a float
        raise ctx.fail(f"expected {what}, got an integer too large for a number") from None


def _choice(ctx: _Ctx, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        close = difflib.get_close_matches(str(v), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.fail(f"{v!r} is not one of {', '.join(choices)}{hint}")
    return v


def _str_map(ctx: _Ctx, v: Any) -> dict[str, str]:
    out = {}
    for k, val in _mapping(ctx, v).items():
        if isinstance(val, (dict, list)) or val is None:
            raise ctx.at(str(k)).fail(f"expected a string value, got {val!r}")
        out[str(k)] = "true" if val is True else "false" if val is False else str(val)
    return out


def _name_list(ctx: _Ctx, v: Any, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or (not v and not allow_empty):
        raise ctx.fail(f"expected a non-empty list of names, got {v!r}")
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise ctx.at(str(i)).fail(f"expected a name, got {item!r}")
    if len(set(v)) != len(v):
        dup = sorted({x for x in v if v.count(x) > 1})
        raise ctx.fail(f"duplicate entries {dup}")
    return tuple(v)


def parse_tolerance(ctx: _Ctx, value: Any) -> Tolerance:
    """``{atol, rtol, max_ulp}`` with non-negative numbers; missing -> dtype default."""
    m = _mapping(ctx, value)
    _check_keys(ctx, m, ("atol", "rtol", "max_ulp"))
    return Tolerance(
        atol=_nonneg_number(ctx.at("atol"), m.get("atol")),
        rtol=_nonneg_number(ctx.at("rtol"), m.get("rtol")),
        max_ulp=_nonneg_number(ctx.at("max_ulp"), m.get("max_ulp"), what="a whole number of ULPs >= 0"),
    )


@dataclass(frozen=True)
class Environment:
    """Where a reload runs: Ray placement + TensorFlow knobs + optional runtime_env.

    Knobs that TensorFlow reads at import (``onednn``, ``threads``, raw
    ``env``) become environment variables of the worker process; the others
    are applied right after import (``tf32``, ``op_determinism``,
    ``memory_growth``) or at prediction time (``jit_compile``, ``batch_size``).
    """

    name: str
    description: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    onednn: bool | None = None
    threads: int | None = None
    jit_compile: bool = False
    batch_size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    label_selector: Mapping[str, str] = field(default_factory=dict)
    tf32: bool | None = None
    op_determinism: bool = False
    memory_growth: bool = True
    runtime_env: Mapping[str, Any] = field(default_factory=dict)
    tolerance: Tolerance | None = None
    expect: str | None = None

    def env_vars(self) -> dict[str, str]:
        """Environment variables the worker needs *before* TensorFlow is imported."""
        out = {"TF_CPP_MIN_LOG_LEVEL": "2", "HARNESS_ENVIRONMENT": self.name}
        if self.onednn is not None:
            out["TF_ENABLE_ONEDNN_OPTS"] = "1" if self.onednn else "0"
        if self.threads is not None:
            n = str(self.threads)
            out.update(TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS=n, OMP_NUM_THREADS=n)
        out.update(self.runtime_env.get("env_vars", {}))
        out.update(self.env)
        return out

    def ray_runtime_env(self) -> dict[str, Any]:
        """The Ray ``runtime_env`` of this environment's workers.

        ``HARNESS_ENVIRONMENT`` is always set, so each environment gets worker
        processes of its own (Ray pools workers by runtime_env) and TF is
        imported once per worker with exactly this environment's settings.
        """
        renv = {k: v for k, v in self.runtime_env.items() if k != "env_vars"}
        renv["env_vars"] = self.env_vars()
        return renv

    def knobs(self) -> dict[str, Any]:
        """The TF knobs, as recorded in results and fingerprints."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("onednn", "threads", "jit_compile", "batch_size", "tf32",
                              "op_determinism", "memory_growth", "num_gpus")}


ENVIRONMENT_FIELDS = tuple(f.name for f in fields(Environment) if f.name != "name")


def parse_environment(ctx: _Ctx, name: str, value: Any) -> Environment:
    """Validate one environment mapping (``ctx`` points at it)."""
    if not _NAME_RE.match(str(name)):
        raise ctx.fail("environment names use letters, digits, '-', '_' and '.' only")
    m = _mapping(ctx, value)
    _check_keys(ctx, m, ENVIRONMENT_FIELDS)
    resources = {}
    for k, v in _mapping(ctx.at("resources"), m.get("resources")).items():
        resources[str(k)] = _nonneg_number(ctx.at("resources").at(str(k)), v)
    runtime_env = _mapping(ctx.at("runtime_env"), m.get("runtime_env"))
    _check_keys(ctx.at("runtime_env"), runtime_env, RUNTIME_ENV_KEYS)
    if "env_vars" in runtime_env:
        runtime_env["env_vars"] = _str_map(ctx.at("runtime_env").at("env_vars"), runtime_env["env_vars"])
    if "pip" in runtime_env and not isinstance(runtime_env["pip"], (list, dict, str)):
        raise ctx.at("runtime_env").at("pip").fail("expected a list of requirements, e.g. [tensorflow-cpu==2.20.0]")
    accel = m.get("accelerator_type")
    if accel is not None and not isinstance(accel, str):
        raise ctx.at("accelerator_type").fail(f"expected a string such as A10G or H100, got {accel!r}")
    num_gpus = _nonneg_number(ctx.at("num_gpus"), m.get("num_gpus")) or 0.0
    tf32 = _bool(ctx.at("tf32"), m.get("tf32"))
    desc = m.get("description", "")
    if not isinstance(desc, str):
        raise ctx.at("description").fail(f"expected a string, got {desc!r}")
    num_cpus = _nonneg_number(ctx.at("num_cpus"), m.get("num_cpus"))
    return Environment(
        name=str(name),
        description=desc,
        env=_str_map(ctx.at("env"), m.get("env")),
        onednn=_bool(ctx.at("onednn"), m.get("onednn")),
        threads=_pos_int(ctx.at("threads"), m.get("threads")),
        jit_compile=bool(_bool(ctx.at("jit_compile"), m.get("jit_compile"))),
        batch_size=_pos_int(ctx.at("batch_size"), m.get("batch_size")),
        num_cpus=1.0 if num_cpus is None else num_cpus,
        num_gpus=num_gpus,
        accelerator_type=accel,
        resources=resources,
        label_selector=_str_map(ctx.at("label_selector"), m.get("label_selector")),
        tf32=tf32,
        op_determinism=bool(_bool(ctx.at("op_determinism"), m.get("op_determinism"))),
        memory_growth=_bool(ctx.at("memory_growth"), m.get("memory_growth")) is not False,
        runtime_env=runtime_env,
        tolerance=parse_tolerance(ctx.at("tolerance"), m["tolerance"]) if "tolerance" in m else None,
        expect=_choice(ctx.at("expect"), m["expect"], EXPECTATIONS) if "expect" in m else None,
    )


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: scenarios x formats x environments, plus run settings."""

    name: str
    source: str
    scenarios: tuple[str, ...]
    formats: tuple[str, ...]
    environments: tuple[Environment, ...]
    training: Environment
    storage: str = ".harness/store"
    scenario_paths: tuple[str, ...] = ()
    tolerance: Tolerance = Tolerance()
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    expect: str = "tolerance"
    expect_save: str = "bitwise"
    batch_size: int = 32
    cell_timeout_s: float = 600.0
    schedule_timeout_s: float = 300.0
    train_timeout_s: float = 1800.0
    retries: int = 2
    precheck: bool = True
    description: str = ""

    def environment(self, name: str) -> Environment:
        for env in self.environments:
            if env.name == name:
                return env
        raise KeyError(name)

    def expectation(self, env: Environment) -> str:
        return env.expect or self.expect

    def tolerance_for(self, env: Environment) -> Tolerance:
        return self.tolerance.merged(env.tolerance)

    def batch_size_for(self, env: Environment) -> int:
        return env.batch_size or self.batch_size


SWEEP_FIELDS = ("name", "description", "storage", "scenario_paths", "scenarios", "formats", "training",
                "environments", "tolerance", "output_tolerances", "expect", "expect_save", "batch_size",
                "timeouts", "retries", "precheck")
TIMEOUT_FIELDS = ("cell_timeout_s", "schedule_timeout_s", "train_timeout_s")


def parse_sweep(data: Any, source: str = "<sweep>", base_dir: str | os.PathLike | None = None) -> Sweep:
    """Validate a sweep document (already parsed from YAML).

    Args:
        data: the YAML document.
        source: file name used in error messages.
        base_dir: directory that relative ``scenario_paths`` are resolved against.

    Raises:
        SpecError: one line naming the file, field and fix.
    """
    ctx = _Ctx(source)
    if not isinstance(data, Mapping):
        raise ctx.fail(f"a sweep file is a YAML mapping with at least 'scenarios' and 'environments'; got {type(data).__name__}")
    m = dict(data)
    _check_keys(ctx, m, SWEEP_FIELDS)
    for required in ("scenarios", "environments"):
        if required not in m:
            raise ctx.at(required).fail("required field is missing")
    scenarios = _name_list(ctx.at("scenarios"), m["scenarios"])
    formats = _name_list(ctx.at("formats"), m.get("formats", ["keras"]))
    for i, f in enumerate(formats):
        _choice(ctx.at("formats").at(str(i)), f, FORMATS)
    envs_raw = m["environments"]
    if not isinstance(envs_raw, Mapping) or not envs_raw:
        raise ctx.at("environments").fail("expected a non-empty mapping of environment name -> settings")
    environments = tuple(parse_environment(ctx.at("environments").at(str(k)), str(k), v) for k, v in envs_raw.items())
    training = parse_environment(ctx.at("training"), "training", m.get("training"))
    base = Path(base_dir) if base_dir else Path.cwd()
    paths = _name_list(ctx.at("scenario_paths"), m.get("scenario_paths", []), allow_empty=True)
    timeouts = _mapping(ctx.at("timeouts"), m.get("timeouts"))
    _check_keys(ctx.at("timeouts"), timeouts, TIMEOUT_FIELDS)
    tvals = {k: _nonneg_number(ctx.at("timeouts").at(k), timeouts[k], what="a number of seconds > 0")
             for k in TIMEOUT_FIELDS if k in timeouts}
    for k, v in tvals.items():
        if v == 0:
            raise ctx.at("timeouts").at(k).fail("expected a number of seconds > 0, got 0")
    out_tols = {str(k): parse_tolerance(ctx.at("output_tolerances").at(str(k)), v)
                for k, v in _mapping(ctx.at("output_tolerances"), m.get("output_tolerances")).items()}
    retries = m.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ctx.at("retries").fail(f"expected a whole number >= 0, got {retries!r}")
    storage = m.get("storage", ".harness/store")
    if not isinstance(storage, str) or not storage:
        raise ctx.at("storage").fail(f"expected a path or URI (s3://bucket/prefix), got {storage!r}")
    name = m.get("name", Path(source).stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ctx.at("name").fail(f"expected a name of letters, digits, '-', '_', '.', got {name!r}")
    return Sweep(
        name=name,
        source=source,
        description=str(m.get("description", "")),
        scenarios=scenarios,
        formats=formats,
        environments=environments,
        training=training,
        storage=storage,
        scenario_paths=tuple(str((base / p).resolve()) for p in paths),
        tolerance=parse_tolerance(ctx.at("tolerance"), m.get("tolerance")),
        output_tolerances=out_tols,
        expect=_choice(ctx.at("expect"), m.get("expect", "tolerance"), EXPECTATIONS),
        expect_save=_choice(ctx.at("expect_save"), m.get("expect_save", "bitwise"), EXPECTATIONS),
        batch_size=_pos_int(ctx.at("batch_size"), m.get("batch_size", 32)),
        retries=retries,
        precheck=bool(_bool(ctx.at("precheck"), m.get("precheck", True))),
        **tvals,
    )


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep YAML file.

    Raises:
        SpecError: the file is missing, is not valid YAML, or fails validation.
    """
    p = Path(path)
    source = str(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(source, "", f"cannot read sweep file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(source, "", f"not a UTF-8 text file (byte {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an int over 4300 digits
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(source, "", f"invalid YAML at {where}{problem}") from None
    return parse_sweep(data, source=source, base_dir=p.parent)
