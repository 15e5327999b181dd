"""Sweep, environment and tolerance specs: pydantic models, loaded from YAML, with our error messages.

Every problem raises ``SpecError`` with one line that names the file, the
field (dotted path), the bad value and the fix, e.g.::

    sweep.yaml: environments.cpu-xla.threads: expected a positive integer, got 'two'

The models check the values (``harness.spec_types`` holds the constrained
field types); ``spec_error`` turns pydantic's first error into that line.
``SweepFile`` is the file as written (its JSON Schema is ``harness schema``);
``Sweep`` is what the rest of the harness uses: the same settings, resolved
(timeouts flattened, environments named, tolerances as ``compare.Tolerance``).

No TensorFlow here, and Ray only to check label selectors and runtime_envs
the way Ray itself would; the CLI maps ``SpecError`` to exit code 2.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PlainValidator,
                      StrictStr, TypeAdapter, ValidationError, ValidationInfo, model_validator)

from . import isa
from .compare import Tolerance
from .formats import DTYPE_POLICIES
from .records import EXPECTATIONS, SAVE_EXPECTATIONS, metric_delta_bound, metric_delta_text
from .spec_types import (NAME_PATTERN, AcceleratorType, Amount, BatchSize, EnvironmentName, EnvVars, Flag, GpuAmount,
                         LabelSelector, NonNegative, Repeats, ResourceName, Retries, ScenarioName, Seconds, StorageURI,
                         SweepName, Text, Threads, Ulps, as_mapping, choice, did_you_mean, expecting, fail, mapping,
                         name_list, show)
from .spec_yaml import YamlProblem, read_document

FORMATS = ("keras", "h5", "savedmodel", "tf-savedmodel", "weights")


class SpecError(ValueError):
    """Invalid sweep input. ``str(err)`` is a one-line message for the user."""

    def __init__(self, source: str, field_path: str, message: str):
        self.source, self.field, self.message = source, field_path, message
        super().__init__(f"{source}: {field_path}: {message}" if field_path else f"{source}: {message}")


def spec_error(source: str, exc: ValidationError, prefix: tuple[str, ...] = ()) -> SpecError:
    """Pydantic's first error as our one line: file, dotted field, value, fix."""
    first = exc.errors(include_url=False)[0]
    ctx = first.get("ctx") or {}
    parts = [*prefix, *(str(p) for p in first["loc"] if p != "[key]"), *ctx.get("at", ())]
    path = [p if p and p.isprintable() and len(p) <= 80 else show(p) for p in parts]
    if first["type"] == "spec":  # ours, from harness.spec_types
        message = ctx["message"]
    elif first["type"] == "missing":
        message = "required field is missing"
    else:  # a check without our wording: pydantic's, with the value
        message = f"{first['msg'][:1].lower()}{first['msg'][1:]}, got {show(first.get('input'))}"
    return SpecError(source, ".".join(path), message)


class _Spec(BaseModel):
    """A frozen model of one YAML mapping: unknown keys are errors with a "did you mean"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        data = as_mapping(data)
        allowed = tuple(cls.model_fields)
        for key in data:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f"allowed: {', '.join(allowed)}"
                raise fail(f"unknown field; {hint}", key)
        return data


# -- tolerance -------------------------------------------------------------------------------
class ToleranceSettings(_Spec):
    """How far an output may be from its reference; an unset field falls back to the dtype's default.

    An element passes when ``|obs - ref| <= atol + rtol * |ref|`` or its ULP distance is ``<= max_ulp``.
    """

    model_config = ConfigDict(title="Tolerance")

    atol: Optional[NonNegative] = Field(None, description="absolute tolerance (>= 0); unset: the dtype's default")
    rtol: Optional[NonNegative] = Field(None, description="relative tolerance, scaled by |reference| (>= 0)")
    max_ulp: Optional[Ulps] = Field(None, description="units in the last place an element may differ (whole number)")

    def tolerance(self) -> Tolerance:
        return Tolerance(atol=self.atol, rtol=self.rtol, max_ulp=None if self.max_ulp is None else float(self.max_ulp))


def _tolerance_doc(tol: Tolerance) -> dict[str, Any]:
    """A ``Tolerance`` as the mapping a sweep file would hold (``max_ulp`` a whole number)."""
    doc = {k: getattr(tol, k) for k in ("atol", "rtol", "max_ulp") if getattr(tol, k) is not None}
    if isinstance(doc.get("max_ulp"), float) and doc["max_ulp"].is_integer():
        doc["max_ulp"] = int(doc["max_ulp"])
    return doc


def _tolerance_input(value: Any) -> Any:
    return _tolerance_doc(value) if isinstance(value, Tolerance) else value


#: A tolerance mapping in the file, a ``compare.Tolerance`` once validated.
ToleranceField = Annotated[ToleranceSettings,
                           BeforeValidator(_tolerance_input, json_schema_input_type=Optional[ToleranceSettings]),
                           AfterValidator(ToleranceSettings.tolerance), PlainSerializer(_tolerance_doc)]


# -- expectations ----------------------------------------------------------------------------
class MetricDeltaExpectation(_Spec):
    """Pass when the bits differ but the scenario's task metric (on its probe labels) moves by at most this."""

    model_config = ConfigDict(title="MetricDeltaExpectation")

    metric_delta: NonNegative = Field(description="largest |observed - reference| of the scenario's task metric "
                                                  "(accuracy, auc, mse or mae on its probe labels)")

    @property
    def text(self) -> str:
        """The ``expected`` column's text: ``metric_delta<=0.001``."""
        return metric_delta_text(self.metric_delta)


def _expectation(value: Any) -> str | MetricDeltaExpectation:
    """A name (``accurate``), or a mapping ``{metric_delta: D}``; our one-line errors either way."""
    if not isinstance(value, (dict, MetricDeltaExpectation)):
        if isinstance(value, str) and value in EXPECTATIONS:
            return value
        hint = did_you_mean(value, EXPECTATIONS)
        raise fail(f"{show(value)} is not one of {', '.join(EXPECTATIONS)}, or a mapping {{metric_delta: D}}"
                   + (f" ({hint})" if hint else ""))
    try:
        return MetricDeltaExpectation.model_validate(value)
    except ValidationError as exc:
        err = spec_error("", exc)
        raise fail(err.message, *filter(None, err.field.split("."))) from None


def _expectation_doc(value: str | MetricDeltaExpectation) -> Any:
    return value.model_dump() if isinstance(value, MetricDeltaExpectation) else value


def expectation_text(value: str | MetricDeltaExpectation) -> str:
    """What the ``expected`` column says of an expectation (``accurate``, ``metric_delta<=0.001``)."""
    return value.text if isinstance(value, MetricDeltaExpectation) else value


#: An expectation in the file: a name, or ``{metric_delta: D}``.
ExpectationField = Annotated[Union[str, MetricDeltaExpectation], PlainValidator(
    _expectation, json_schema_input_type=Union[choice(EXPECTATIONS), MetricDeltaExpectation]),
    PlainSerializer(_expectation_doc)]


# -- runtime_env -----------------------------------------------------------------------------
def _local(value: str) -> bool:
    return "://" not in value


class RuntimeEnvSettings(_Spec):
    """Ray ``runtime_env`` of an environment's workers; checked as Ray would check it, without a cluster."""

    model_config = ConfigDict(title="RuntimeEnv")

    pip: Optional[Annotated[Union[StrictStr, list[StrictStr], dict[StrictStr, Any]], expecting(
        "a list of requirements such as [tensorflow-cpu==2.20.0], a requirements file, or {packages: [...]}")]] = \
        Field(None, description="pip requirements installed into the workers' virtualenv")
    uv: Optional[Annotated[Union[list[StrictStr], dict[StrictStr, Any]], expecting(
        "a list of requirements or {packages: [...]}")]] = Field(None, description="like pip, installed with uv")
    conda: Optional[Annotated[Union[StrictStr, dict[StrictStr, Any]], expecting(
        "a conda environment name, an environment.yml file, or its contents as a mapping")]] = \
        Field(None, description="conda environment name, environment.yml file or its contents")
    container: Optional[Annotated[dict[StrictStr, Any], expecting("a mapping such as {image: repo/image:tag}")]] = \
        Field(None, description="container to run the workers in (Ray's older container option)")
    image_uri: Optional[Annotated[StrictStr, expecting("an image URI (a string)")]] = \
        Field(None, description="container image the workers run in")
    env_vars: Optional[EnvVars] = Field(None, description="environment variables of the workers (`env` wins)")
    py_modules: Optional[Annotated[list[StrictStr], expecting("a list of paths or URIs")]] = \
        Field(None, description="local directories or remote URIs shipped to the workers (relative to the sweep file)")
    working_dir: Optional[Annotated[StrictStr, expecting("a directory path or URI")]] = \
        Field(None, description="directory (relative to the sweep file), .zip or remote URI the workers start in")
    py_executable: Optional[Annotated[StrictStr, expecting("a command (a string)")]] = \
        Field(None, description="Python executable (or command prefix) the workers run")
    config: Optional[Annotated[dict[StrictStr, Any], expecting("a mapping such as {setup_timeout_seconds: 600}")]] = \
        Field(None, description="Ray RuntimeEnvConfig: setup_timeout_seconds, eager_install, log_files")


RUNTIME_ENV_KEYS = tuple(RuntimeEnvSettings.model_fields)


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value


def nullable(model: type[_Spec]) -> Any:
    """``model``, also written as an empty YAML block (``training:`` with nothing under it)."""
    return Annotated[model, BeforeValidator(_none_is_empty, json_schema_input_type=Optional[model])]


_PATH_KINDS = {  # what a local path in a runtime_env or scenario_paths must be: (description, check)
    "directory": ("a directory", Path.is_dir),
    "dir": ("a directory (or .zip file)", lambda p: p.is_dir() or (p.is_file() and p.suffix == ".zip")),
    "file": ("a file", Path.is_file),
    "any": ("a file or directory", Path.exists),
}


def _resolve_local(value: str, base: Path, key: str, *, kind: str, hint: str = "") -> str:
    """``value`` made absolute against the sweep file's directory; it must exist."""
    path = (base / os.path.expanduser(value)).resolve()
    want, exists = _PATH_KINDS[kind]
    if not exists(path):
        raise fail(f"{value!r} is not {want}: looked for {path} (relative paths start at the sweep file's "
                   f"directory){hint}", key)
    return str(path)


def _scenario_paths(value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    """Scenario directories made absolute against the sweep file's directory; each must exist."""
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    return tuple(_resolve_local(p, base, str(i), kind="directory") for i, p in enumerate(value))


def _runtime_env(value: RuntimeEnvSettings, info: ValidationInfo) -> dict[str, Any]:
    """The runtime_env as a plain dict: local paths resolved and checked, then offered to Ray's ``RuntimeEnv``."""
    renv = {k: v for k, v in value.model_dump(exclude_unset=True).items() if v is not None}
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    if isinstance(renv.get("working_dir"), str) and _local(renv["working_dir"]):
        renv["working_dir"] = _resolve_local(renv["working_dir"], base, "working_dir", kind="dir")
    if "py_modules" in renv:
        renv["py_modules"] = [_resolve_local(m, base, f"py_modules.{i}", kind="any") if _local(m) else m
                              for i, m in enumerate(renv["py_modules"])]
    if isinstance(renv.get("pip"), str):
        renv["pip"] = _resolve_local(renv["pip"], base, "pip", kind="file",
                                     hint=f"; for one requirement write a list: [{renv['pip']}]")
    if isinstance(renv.get("conda"), str) and renv["conda"].endswith((".yml", ".yaml")):
        renv["conda"] = _resolve_local(renv["conda"], base, "conda", kind="file")
    if isinstance(renv.get("config"), dict):
        from ray.runtime_env import RuntimeEnvConfig

        known = sorted(RuntimeEnvConfig.known_fields)
        for key in renv["config"]:
            if key not in known:  # Ray only warns and ignores it: the setting the user meant would not apply
                hint = did_you_mean(key, known)
                raise fail(f"Ray's runtime_env config has no setting {key!r}" + (f" ({hint})" if hint else "")
                           + f"; known: {', '.join(known)}", "config", key)
    if set(renv) - {"env_vars"}:
        from ray.runtime_env import RuntimeEnv

        sent = {**renv, "env_vars": {**renv.get("env_vars", {}), "HARNESS_ENVIRONMENT": "x"}}  # as ray_runtime_env()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                RuntimeEnv(**sent)
            except Exception as exc:  # Ray raises TypeError / ValueError with its own wording
                reason = " ".join(str(exc).split()) or type(exc).__name__
                if len(reason) > 200 and ". " in reason:  # Ray's longer messages go on to explain; keep the verdict
                    reason = reason.split(". ", 1)[0] + "."
                raise fail(f"Ray rejects this runtime_env: {reason}")
    return renv


RuntimeEnvField = Annotated[nullable(RuntimeEnvSettings), AfterValidator(_runtime_env), PlainSerializer(copy.deepcopy)]


# -- environment -----------------------------------------------------------------------------
class EnvironmentSettings(_Spec):
    """Where a reload runs: Ray placement + TensorFlow knobs + optional runtime_env.

    Knobs that TensorFlow reads at import (``onednn``, ``threads``, ``cpu_isa``,
    raw ``env``) become environment variables of the worker process; the
    others are applied right after import (``tf32``, ``op_determinism``,
    ``memory_growth``) or at prediction time (``jit_compile``, ``batch_size``).
    """

    model_config = ConfigDict(title="Environment")

    description: Text = Field("", description="shown in reports")
    env: EnvVars = Field(default_factory=dict, description="raw environment variables set before TensorFlow is "
                                                           "imported (TF_XLA_FLAGS, TF_USE_LEGACY_KERAS, ...)")
    onednn: Optional[Flag] = Field(None, description="TF_ENABLE_ONEDNN_OPTS: false sets 0, true sets 1; unset: TF's default")
    threads: Optional[Threads] = Field(None, description="TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS and OMP_NUM_THREADS")
    jit_compile: Flag = Field(False, description="predict through tf.function(jit_compile=True) (XLA)")
    batch_size: Optional[BatchSize] = Field(None, description="prediction batch size; unset: the sweep's")
    num_cpus: Amount = Field(1.0, description="Ray placement: CPUs per worker")
    num_gpus: GpuAmount = Field(0.0, description="Ray placement: GPUs per worker (whole, or a fraction below 1)")
    accelerator_type: Optional[AcceleratorType] = Field(None, description="Ray accelerator type, e.g. A10G, L4, H100")
    resources: mapping(ResourceName, Amount) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Ray custom resources, e.g. {train: 1} (not CPU/GPU: use num_cpus/num_gpus)")
    label_selector: LabelSelector = Field(default_factory=dict, description="Ray node label selector: "
                                          "{cpu-family: amd}, {gpu: 'in(a10g,l4)'}, {gpu: '!a10g'}")
    tf32: Optional[Flag] = Field(None, description="enable_tensor_float_32_execution(...); unset: TF's default")
    op_determinism: Flag = Field(False, description="tf.config.experimental.enable_op_determinism()")
    memory_growth: Flag = Field(True, description="GPU memory growth")
    runtime_env: RuntimeEnvField = Field(default_factory=dict, description="passed to Ray: pip, uv, conda, "
                                         "container/image_uri, env_vars, py_modules, working_dir, ...")
    tolerance: Optional[ToleranceField] = Field(None, description="overrides the sweep's tolerance, field by field")
    expect: Optional[ExpectationField] = Field(
        None, description="bitwise, tolerance, accurate, any or {metric_delta: D}; unset: the sweep's expect")
    dtype_policy: Optional[choice(DTYPE_POLICIES)] = Field(  # type: ignore[valid-type]
        None, description="reload Keras artifacts (keras, h5, weights) with every floating-point layer under this "
                          "Keras dtype policy, e.g. mixed_bfloat16: serving the model in reduced precision")
    cpu_isa: Optional[choice(isa.ISA_LEVELS)] = Field(  # type: ignore[valid-type]
        None, description="cap oneDNN (ONEDNN_MAX_CPU_ISA) and XLA's CPU code generation at this instruction set; "
                          "turns oneDNN on")
    optional: Flag = Field(False, description="this environment may not exist on every machine (e.g. an ISA level "
                                              "above the CPU's)")
    repeats: Optional[Repeats] = Field(
        None, description="replay each cell this many times (1-100), each time in a different worker process; the "
                          "cell is flaky when the repeats' outputs differ in any bit. Unset: the sweep's repeats")

    @model_validator(mode="after")
    def _cpu_isa_consistent(self) -> "EnvironmentSettings":
        if self.cpu_isa is None:
            return self
        if self.onednn is False:
            raise fail(f"{self.cpu_isa} caps oneDNN's instruction set, but onednn: false turns oneDNN off, so the "
                       "cap would mean nothing; remove cpu_isa or onednn: false", "cpu_isa")
        for where, values in (("env", self.env), ("runtime_env.env_vars", self.runtime_env.get("env_vars", {}))):
            at = where.split(".")
            if values.get("TF_ENABLE_ONEDNN_OPTS", "1").lower() not in ("1", "true"):
                raise fail(f"TF_ENABLE_ONEDNN_OPTS={values['TF_ENABLE_ONEDNN_OPTS']} turns oneDNN off, but cpu_isa: "
                           f"{self.cpu_isa} needs it on; remove one of them", *at, "TF_ENABLE_ONEDNN_OPTS")
            if "ONEDNN_MAX_CPU_ISA" in values:
                raise fail(f"cpu_isa: {self.cpu_isa} sets ONEDNN_MAX_CPU_ISA; remove it from {where}",
                           *at, "ONEDNN_MAX_CPU_ISA")
            if "--xla_cpu_max_isa" in values.get("XLA_FLAGS", ""):
                raise fail(f"cpu_isa: {self.cpu_isa} sets --xla_cpu_max_isa; remove it from XLA_FLAGS", *at, "XLA_FLAGS")
        return self


ENVIRONMENT_FIELDS = tuple(EnvironmentSettings.model_fields)
_KNOBS = ("onednn", "threads", "jit_compile", "batch_size", "num_gpus", "tf32", "op_determinism", "memory_growth",
          "cpu_isa")


class Environment(EnvironmentSettings):
    """A named environment: ``Environment(name="cpu-xla", jit_compile=True)``.

    Frozen and picklable (sent to Ray workers); ``repr`` is deterministic
    (``harness.sweep.plan_digest`` hashes it).
    """

    name: EnvironmentName = Field(description="the environment's name (its key under environments:)")

    def __repr_args__(self):  # name first, as in the sweep file
        yield "name", self.name
        yield from ((k, v) for k, v in super().__repr_args__() if k != "name")

    def env_vars(self) -> dict[str, str]:
        """Environment variables the worker needs *before* TensorFlow is imported.

        ``runtime_env.env_vars`` override the knobs, and ``env`` overrides both;
        ``cpu_isa`` comes last (validation refuses variables that contradict it).
        """
        out = {"TF_CPP_MIN_LOG_LEVEL": "2", "HARNESS_ENVIRONMENT": self.name}
        if self.onednn is not None:
            out["TF_ENABLE_ONEDNN_OPTS"] = "1" if self.onednn else "0"
        if self.threads is not None:
            n = str(self.threads)
            out.update(TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS=n, OMP_NUM_THREADS=n)
        out.update(self.runtime_env.get("env_vars", {}))
        out.update(self.env)
        if self.cpu_isa is not None:
            out["TF_ENABLE_ONEDNN_OPTS"] = "1"  # a cap means nothing with oneDNN off
            out["ONEDNN_MAX_CPU_ISA"] = isa.onednn_value(self.cpu_isa)
            flag = f"--xla_cpu_max_isa={isa.xla_value(self.cpu_isa)}"
            out["XLA_FLAGS"] = f"{out['XLA_FLAGS']} {flag}" if out.get("XLA_FLAGS") else flag
        return out

    def ray_runtime_env(self) -> dict[str, Any]:
        """The Ray ``runtime_env`` of this environment's workers.

        ``HARNESS_ENVIRONMENT`` is always set, so each environment gets worker
        processes of its own (Ray pools workers by runtime_env) and TF is
        imported once per worker with exactly this environment's settings.
        """
        renv = {k: copy.deepcopy(v) for k, v in self.runtime_env.items() if k != "env_vars"}
        renv["env_vars"] = self.env_vars()
        return renv

    def knobs(self) -> dict[str, Any]:
        """The TF knobs, as recorded in results and fingerprints (and in training's content address)."""
        return {k: getattr(self, k) for k in _KNOBS}

    def derive(self, name: str, **changes: Any) -> "Environment":
        """A validated copy named ``name`` with some fields changed: ``env.derive("cpu-1t", threads=1)``.

        Raises:
            SpecError: a change is not a valid environment field value.
        """
        data = {**{k: getattr(self, k) for k in ENVIRONMENT_FIELDS}, **changes, "name": name}
        try:
            return Environment.model_validate(data)
        except ValidationError as exc:
            raise spec_error(f"environment {self.name!r} derived as {name!r}", exc) from None


def environment_document(env: EnvironmentSettings) -> dict[str, Any]:
    """The YAML-able mapping of ``env`` (without its name): the fields that differ from their defaults.

    ``parse_sweep`` of a sweep holding ``{env.name: environment_document(env)}`` gives an equal environment.
    """
    doc: dict[str, Any] = {}
    for name, field in EnvironmentSettings.model_fields.items():
        value = getattr(env, name)
        if value == field.get_default(call_default_factory=True):
            continue
        if isinstance(value, Tolerance):
            doc[name] = _tolerance_doc(value)
        elif name == "expect":
            doc[name] = _expectation_doc(value)
        else:
            doc[name] = copy.deepcopy(value)
    return doc


# -- sweep -----------------------------------------------------------------------------------
class TimeoutSettings(_Spec):
    """How long a sweep waits (seconds, > 0, at most 30 days)."""

    model_config = ConfigDict(title="Timeouts")

    cell_timeout_s: Seconds = Field(600.0, description="a running reload past this is cancelled: error")
    schedule_timeout_s: Seconds = Field(300.0, description="a cell not started by then is unschedulable "
                                                           "(counts runtime_env setup too)")
    train_timeout_s: Seconds = Field(1800.0, description="training of one scenario, all formats")


TIMEOUT_FIELDS = tuple(TimeoutSettings.model_fields)


#: The training environment's name: results, precheck and worker processes key it apart from the sweep's.
TRAINING = "training"


def _environments(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise fail(f"expected a non-empty mapping of environment name -> settings, got {show(value)}")
    if TRAINING in value:
        raise fail(f"{TRAINING!r} is the name of the training environment (set under training:); "
                   f"rename this environment, e.g. cpu-{TRAINING}", TRAINING)
    return value


_NAMES = {"minItems": 1, "uniqueItems": True}


class SweepFile(_Spec):
    """A sweep file as written: scenarios x formats x environments, plus run settings."""

    model_config = ConfigDict(title="tf-repro-harness sweep")

    name: Optional[SweepName] = Field(None, description="default: the file name without .yaml; letters, digits, - _ .")
    description: Text = Field("", description="free text")
    storage: StorageURI = Field(".harness/store", description="pyarrow.fs URI: path, file://, s3://, gs://, hdfs://, "
                                                              "abfs://")
    scenario_paths: Annotated[name_list(Annotated[str, Field(min_length=1), expecting("a directory path")],  # type: ignore
                                        allow_empty=True, what="a list of directories"),
                              AfterValidator(_scenario_paths)] = Field(
        (), description="extra scenario directories, relative to this file; each must exist")
    scenarios: name_list(ScenarioName) = Field(  # type: ignore[valid-type]
        description="scenario names (required)", json_schema_extra=_NAMES)
    formats: name_list(choice(FORMATS)) = Field(  # type: ignore[valid-type]
        ("keras",), description="save formats", json_schema_extra=_NAMES)
    training: nullable(EnvironmentSettings) = Field(default_factory=EnvironmentSettings,  # type: ignore[valid-type]
                                          description="the training environment (same fields as an environment)")
    environments: Annotated[dict[EnvironmentName, EnvironmentSettings], BeforeValidator(
        _environments, json_schema_input_type=dict[str, Optional[EnvironmentSettings]])] = Field(
        description="environment name -> settings (required)",
        json_schema_extra={"minProperties": 1, "propertyNames": {"pattern": NAME_PATTERN}})
    tolerance: ToleranceField = Field(default_factory=Tolerance, description="tolerance of every output; "
                                                                             "missing fields: per-dtype defaults")
    output_tolerances: mapping(StrictStr, ToleranceField) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="per output name, on top of tolerance")
    expect: ExpectationField = Field("tolerance", description="default expectation of every environment: bitwise, "
                                                              "tolerance, accurate, any or {metric_delta: D}")
    expect_save: choice(SAVE_EXPECTATIONS) = Field(  # type: ignore[valid-type]
        "bitwise", description="expectation for the save round trip: bitwise, tolerance or any")
    batch_size: BatchSize = Field(32, description="prediction batch size of the references")
    timeouts: nullable(TimeoutSettings) = Field(default_factory=TimeoutSettings,  # type: ignore[valid-type]
                                                description="seconds")
    retries: Retries = Field(2, description="Ray retries of tasks lost with their worker or node (at most 1000)")
    repeats: Repeats = Field(1, description="replay every cell this many times (1-100), each time in a different "
                                            "worker process; an environment's own repeats wins")
    precheck: Flag = Field(True, description="check placements against the cluster's nodes first")
    explain: Flag = Field(False, description="explain mismatches: per-layer traces and knob attribution")

    @model_validator(mode="after")
    def _training_in_full_precision(self) -> "SweepFile":
        if self.training.dtype_policy is not None:
            raise fail(f"{self.training.dtype_policy} is a way to serve the trained model, and the references are "
                       "the model as trained; remove it here and set dtype_policy on an environment",
                       "training", "dtype_policy")
        if self.training.repeats is not None:
            raise fail(f"a scenario is trained once (its artifacts are content-addressed), so repeats: "
                       f"{self.training.repeats} means nothing here; set repeats on the sweep or on an environment",
                       "training", "repeats")
        return self


SWEEP_FIELDS = tuple(SweepFile.model_fields)


class Sweep(BaseModel):
    """A validated sweep as the harness uses it: environments named, timeouts flattened, paths resolved."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    source: str
    scenarios: tuple[str, ...]
    formats: tuple[str, ...]
    environments: tuple[Environment, ...]
    training: Environment
    storage: str = ".harness/store"
    scenario_paths: tuple[str, ...] = ()
    tolerance: Tolerance = Tolerance()
    output_tolerances: dict[str, Tolerance] = {}
    expect: str = "tolerance"  # as the expected column says it: a name, or metric_delta<=D
    expect_save: str = "bitwise"
    batch_size: int = 32
    cell_timeout_s: float = 600.0
    schedule_timeout_s: float = 300.0
    train_timeout_s: float = 1800.0
    retries: int = 2
    repeats: int = 1
    precheck: bool = True
    description: str = ""
    explain: bool = False

    def environment(self, name: str) -> Environment:
        """The environment called ``name`` (``KeyError`` if there is none)."""
        for env in self.environments:
            if env.name == name:
                return env
        raise KeyError(name)

    def expectation(self, env: Environment) -> str:
        """``env``'s own expect, else the sweep's, as the ``expected`` column says it (``metric_delta<=D``)."""
        return expectation_text(env.expect) if env.expect is not None else self.expect

    def tolerance_for(self, env: Environment) -> Tolerance:
        """The sweep's tolerance with ``env``'s fields on top."""
        return self.tolerance.merged(env.tolerance)

    def batch_size_for(self, env: Environment) -> int:
        """``env``'s prediction batch size, else the sweep's."""
        return env.batch_size or self.batch_size

    def repeats_for(self, env: Environment) -> int:
        """How often each cell of ``env`` is replayed, each time in its own worker process: ``env``'s, else the sweep's."""
        return env.repeats or self.repeats

    def repeated(self) -> dict[str, int]:
        """Environment name -> repeats, for the environments whose cells are replayed more than once."""
        return {env.name: n for env in self.environments if (n := self.repeats_for(env)) > 1}


def _named(name: str, settings: EnvironmentSettings) -> Environment:
    """``settings`` (validated) under ``name`` (validated as a key of environments)."""
    return Environment.model_construct(name=name, **{k: getattr(settings, k) for k in ENVIRONMENT_FIELDS})


_SWEEP_NAME = TypeAdapter(SweepName)


def parse_sweep(data: Any, source: str = "<sweep>", base_dir: str | os.PathLike | None = None) -> Sweep:
    """Validate a sweep document (already parsed from YAML).

    Args:
        data: the YAML document.
        source: file name used in error messages (its stem is the default sweep name; "sweep" for "<sweep>").
        base_dir: directory that relative ``scenario_paths`` and runtime_env paths are resolved against
            (default: the current directory).

    Raises:
        SpecError: one line naming the file, field and fix.
    """
    if not isinstance(data, dict):
        raise SpecError(source, "", "a sweep file is a YAML mapping with at least 'scenarios' and 'environments'; "
                                    f"got {type(data).__name__}")
    base = Path(base_dir) if base_dir else Path.cwd()
    try:
        doc = SweepFile.model_validate(data, context={"base_dir": base})
    except ValidationError as exc:
        raise spec_error(source, exc) from None
    name = doc.name
    if name is None:
        try:
            name = _SWEEP_NAME.validate_python(Path(source).stem if source != "<sweep>" else "sweep")
        except ValidationError as exc:
            err = spec_error(source, exc, prefix=("name",))
            raise SpecError(source, "name", f"{err.message} (taken from the file name); add a name: line") from None
    return Sweep(
        name=name,
        source=source,
        description=doc.description,
        scenarios=doc.scenarios,
        formats=doc.formats,
        environments=tuple(_named(n, s) for n, s in doc.environments.items()),
        training=_named(TRAINING, doc.training),
        storage=doc.storage,
        scenario_paths=doc.scenario_paths,  # absolute, checked to exist
        tolerance=doc.tolerance,
        output_tolerances=dict(doc.output_tolerances),
        expect=expectation_text(doc.expect),
        expect_save=doc.expect_save,
        batch_size=doc.batch_size,
        cell_timeout_s=doc.timeouts.cell_timeout_s,
        schedule_timeout_s=doc.timeouts.schedule_timeout_s,
        train_timeout_s=doc.timeouts.train_timeout_s,
        retries=doc.retries,
        repeats=doc.repeats,
        precheck=doc.precheck,
        explain=doc.explain,
    )


def check_scenarios(sweep: Sweep, scenarios: Mapping[str, Any]) -> None:
    """Refuse expectations the chosen scenarios cannot be judged by: ``{metric_delta: D}`` needs probe labels.

    Raises:
        SpecError: an environment expects ``metric_delta`` and a scenario declares no
            ``labels=`` / ``metric=`` (its cells could only ever pass bitwise).
    """
    unlabelled = [name for name, scenario in scenarios.items() if getattr(scenario, "metric", None) is None]
    if not unlabelled:
        return
    for env in sweep.environments:
        if metric_delta_bound(sweep.expectation(env)) is None:
            continue
        where = f"environments.{env.name}.expect" if env.expect is not None else "expect"
        raise SpecError(sweep.source, where, f"metric_delta judges a scenario's task metric on its probe labels, but "
                                             f"scenario {unlabelled[0]!r} declares none; give it labels= and metric= "
                                             "(accuracy, auc, mse, mae), or expect accurate")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep YAML file.

    Raises:
        SpecError: the file is missing, unreadable, too large, not UTF-8, empty, not safe YAML
            (repeated keys, runaway nesting or aliases), or fails validation.
    """
    source = str(path)
    try:
        data = read_document(path)
    except YamlProblem as exc:
        raise SpecError(source, exc.field, exc.message) from None
    return parse_sweep(data, source=source, base_dir=Path(path).parent)


def sweep_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a sweep file, from the same models that validate it."""
    schema = SweepFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(sweep_schema(), indent=2) + "\n"
