"""Explain a difference: where it starts (layer by layer), which setting causes it, what it changes.

The driver side of ``harness explain``, a client of the run (``harness.run.Run``):

* **Layer localisation**: workers of the training environment and of the
  cell's environment reload the artifact the cell replayed (the manifest digest
  the run recorded) and trace every layer call on the probe
  (``harness.tracing``, in the worker); here the two traces are compared layer
  by layer with the same comparison code as the cells. Reported: the first
  layer whose outputs' bits differ, each layer's metrics in call order, and
  the layer whose output diverges most relative to the divergence of its
  inputs (LEMON's "rate of change"). Formats that keep no layer structure
  (``savedmodel``, ``tf-savedmodel``) are localised through the ``keras`` (or
  ``h5``, ``weights``) artifact of the same scenario when the run has one.
  A layer's outputs are ``same`` or ``differs`` (bits), words kept apart from
  a cell's verdicts.
* **Setting attribution**: for each knob in which the cell's environment
  differs from the training environment, the cell runs again with that knob
  alone applied to the training settings, and with that knob alone removed
  from the cell's settings (2k replays for k knobs). These variants are
  *derived cells* of the run: they replay the run's own artifacts through
  the normal engine (``harness.sweep.execute``) and are kept in
  ``RUN_DIR/attribution`` (explaining again reuses them). A knob that alone
  reproduces the cell's bits, and whose removal alone restores the
  reference's bits, explains it. What cannot be varied here (CPU model, GPU,
  TensorFlow version without a runtime_env) is named as not attributable, and
  so is a knob that cannot be varied alone (``cpu_isa`` needs oneDNN on).
* **Prediction impact** is measured for every cell by ``replay`` (see
  ``harness.compare.prediction_impact``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .compare import LESS_ACCURATE, Accuracy, Tolerance, compare_arrays, judge_accuracy
from .records import ArtifactRecord, Cell, CellResult, json_number, jsonable

#: Formats whose reload has Keras layers to trace; the others are traced through one of these.
LAYERED_FORMATS = ("keras", "h5", "weights")
#: Below this, a divergence counts as zero (a mean relative difference).
_TINY = 1e-30
#: How a layer's outputs compare with the training environment's: bit for bit the same, or not.
SAME, DIFFERS = "same", "differs"


# -- layer by layer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDiff:
    """One layer call: how far its outputs (and inputs) are from the training environment's."""

    index: int
    name: str
    bits: str  # of the outputs: "same" | "differs"
    max_ulp_diff: float | None
    max_abs_diff: float | None
    mismatch_fraction: float | None
    input_divergence: float  # mean |obs - ref| / mean |ref| of the layer's inputs
    output_divergence: float  # the same, of its outputs
    growth: float | None  # output / input divergence (inf: the inputs were the same), None if outputs agree
    # Against the same layer of the model rebuilt in float64 (None: not judged, see Localisation.accuracy_unavailable)
    accuracy: str | None = None  # as_accurate | less_accurate | n/a, by compare.judge_accuracy's rule
    reference_rmse_vs_fp64: float | None = None  # RMSE of the training environment's outputs vs float64's
    rmse_vs_fp64: float | None = None  # RMSE of the cell's outputs vs float64's

    @property
    def differs(self) -> bool:
        return self.bits != SAME

    @property
    def less_accurate(self) -> bool:
        return self.accuracy == LESS_ACCURATE


def divergence(ref: Sequence[np.ndarray], obs: Sequence[np.ndarray]) -> float:
    """Mean absolute difference over mean absolute value, over all elements of several arrays (0 if equal)."""
    num = den = 0.0
    for r, o in zip(ref, obs):
        if r.shape != o.shape or r.dtype.kind not in "fiu" and r.dtype.name != "bfloat16":
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        finite = np.isfinite(r64) & np.isfinite(o64)
        num += float(np.abs(o64 - r64)[finite].sum())
        den += float(np.abs(r64)[finite].sum())
    return num / den if den > 0 else (math.inf if num > 0 else 0.0)


def compare_traces(ref: Sequence[Mapping[str, Any]], obs: Sequence[Mapping[str, Any]]) -> list[LayerDiff]:
    """Layer-by-layer comparison of two traces of the same model (same calls, same order).

    Raises:
        ValueError: the traces do not have the same layer calls.
    """
    if [c["name"] for c in ref] != [c["name"] for c in obs]:
        raise ValueError("the two traces called different layers; they are not of the same model")
    out = []
    exact = Tolerance(atol=0.0, rtol=0.0, max_ulp=0.0)
    for i, (r, o) in enumerate(zip(ref, obs)):
        cmps = [compare_arrays(f"{r['name']}/{j}", a, b, exact) for j, (a, b) in enumerate(zip(r["outputs"], o["outputs"]))]
        same = all(c.verdict == "bitwise" for c in cmps)
        d_in, d_out = divergence(r["inputs"], o["inputs"]), divergence(r["outputs"], o["outputs"])
        growth = None if d_out <= _TINY else (math.inf if d_in <= _TINY else d_out / d_in)

        def agg(attr: str) -> float | None:
            vals = [getattr(c, attr) for c in cmps if not math.isnan(getattr(c, attr))]
            return max(vals) if vals else None

        out.append(LayerDiff(i, r["name"], SAME if same else DIFFERS, agg("max_ulp_diff"), agg("max_abs_diff"),
                             agg("mismatch_fraction"), d_in, d_out, growth))
    return out


def first_divergent(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The first layer whose outputs' bits differ."""
    return next((d for d in diffs if d.differs), None)


def layer_accuracy(ref: Sequence[Mapping[str, Any]], obs: Sequence[Mapping[str, Any]],
                   oracle: Sequence[Mapping[str, Any]], tolerance: Tolerance = Tolerance()) -> list[Accuracy]:
    """Per layer call: are the cell's outputs as close to the float64 trace's as the reference's?

    The rule that judges a cell's outputs (``compare.judge_accuracy``, PyTorch's
    ``res_error <= m * ref_error + tol / 10``), applied to each layer call's outputs,
    ``tol`` being ``tolerance``'s atol for the reference output's dtype. An output the
    float64 rebuild still computes in another dtype (a layer that fixes its own) is ``n/a``.

    Args:
        ref, obs: the training environment's and the cell's traces.
        oracle: the trace of the model rebuilt in float64, on the probe cast to float64.
        tolerance: the cell's tolerance (the sweep's with the environment's on top).

    Raises:
        ValueError: the float64 trace did not call the same layers.
    """
    from .formats import is_floating

    if [c["name"] for c in oracle] != [c["name"] for c in ref]:
        raise ValueError("the float64 rebuild called other layers than the reloaded model")
    out = []
    for r, o, t in zip(ref, obs, oracle):
        truth, unavailable, tols = {}, {}, {}
        for j, (a, wide) in enumerate(zip(r["outputs"], t["outputs"])):
            name = f"out/{j}"  # as the trace files name a layer's outputs
            if wide.dtype != np.float64 and is_floating(a):
                unavailable[name] = f"the float64 rebuild still computes it in {wide.dtype.name}"
            else:
                truth[name] = wide
            tols[name] = tolerance.for_dtype(a.dtype)[0]
        out.append(judge_accuracy(truth, {f"out/{j}": a for j, a in enumerate(r["outputs"])},
                                  {f"out/{j}": a for j, a in enumerate(o["outputs"])}, tols, unavailable=unavailable))
    return out


def with_accuracy(diffs: Sequence[LayerDiff], accuracies: Sequence[Accuracy]) -> list[LayerDiff]:
    """``diffs`` with each layer's tier and RMSEs against float64 (from :func:`layer_accuracy`)."""
    return [dataclasses.replace(d, accuracy=a.tier, reference_rmse_vs_fp64=a.reference_rmse, rmse_vs_fp64=a.rmse)
            for d, a in zip(diffs, accuracies, strict=True)]


def first_less_accurate(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The first layer whose outputs are less accurate than the reference's (against float64)."""
    return next((d for d in diffs if d.less_accurate), None)


def most_growth(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The layer whose outputs diverge most relative to its already diverging inputs (LEMON's rate of change).

    Layers whose inputs are the same (where a difference starts) have no
    finite rate; they count only when no other layer diverges.
    """
    finite = [d for d in diffs if d.growth is not None and math.isfinite(d.growth)]
    if finite:
        return max(finite, key=lambda d: (d.growth, d.output_divergence))
    return next((d for d in diffs if d.growth is not None), None)


def layers_ipc(layers: Sequence[LayerDiff]) -> bytes:
    """The layer-by-layer comparison as an Arrow IPC file (one row per layer call; NaN/Inf stay numbers)."""
    from . import arrays

    def floats(attr: str) -> np.ndarray:
        return np.array([math.nan if getattr(d, attr) is None else getattr(d, attr) for d in layers], np.float64)

    columns = {"index": np.array([d.index for d in layers], np.int64),
               "name": np.array([d.name for d in layers], object), "bits": np.array([d.bits for d in layers], object)}
    columns.update({attr: floats(attr) for attr in ("max_ulp_diff", "max_abs_diff", "mismatch_fraction",
                                                    "input_divergence", "output_divergence", "growth")})
    columns["accuracy"] = np.array([d.accuracy or "" for d in layers], object)
    columns.update({attr: floats(attr) for attr in ("reference_rmse_vs_fp64", "rmse_vs_fp64")})
    return arrays.to_ipc_bytes(columns, {"nulls": "NaN in max_ulp_diff, max_abs_diff, mismatch_fraction: no "
                                                  "numeric output; in growth: the outputs are the same; "
                                                  "'' in accuracy, NaN in *_rmse_vs_fp64: not judged against float64"})


# -- setting attribution -----------------------------------------------------------------------
#: Environment fields that are knobs the harness can vary on any node.
KNOB_FIELDS = ("onednn", "threads", "cpu_isa", "jit_compile", "batch_size", "tf32", "op_determinism", "dtype_policy")
#: Fingerprint keys that differ between machines, not settings: not attributable by re-running.
HARDWARE_KEYS = ("cpu_model", "cpu_flags", "gpus", "gpu_driver", "tf_version", "cuda_version", "cudnn_version")


@dataclass(frozen=True)
class Knob:
    """One setting in which the cell's environment differs from the training environment."""

    name: str  # an environment field, "env:NAME" for one import-time variable, or "runtime_env"
    training: Any
    cell: Any

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name.replace(":", "-"))

    @property
    def label(self) -> str:
        value = self.cell
        if self.name == "onednn":
            return f"oneDNN {'on' if value else 'off' if value is False else 'default'}"
        if self.name == "jit_compile":
            return "XLA" if value else "no XLA"
        if self.name == "cpu_isa":
            return f"oneDNN ISA capped at {value}" if value else "no ISA cap"
        if self.name == "dtype_policy":
            return f"dtype policy {value}" if value else "no dtype policy"
        if self.name.startswith("env:"):
            return f"{self.name[4:]}={value}" if value is not None else f"without {self.name[4:]}"
        return f"{self.name.replace('_', ' ')} {value}"


def _env_vars(env: Any) -> dict[str, str]:
    return {**dict(env.runtime_env.get("env_vars", {}) if env.runtime_env else {}), **dict(env.env)}


def knob_differences(sweep: Any, env: Any) -> list[Knob]:
    """The knobs in which ``env`` differs from the sweep's training environment (effective batch sizes)."""
    training = sweep.training
    knobs = []
    for name in KNOB_FIELDS:
        if name == "batch_size":
            before, after = sweep.batch_size, sweep.batch_size_for(env)
        else:
            before, after = getattr(training, name, None), getattr(env, name, None)
        if before != after:
            knobs.append(Knob(name, before, after))
    before_vars, after_vars = _env_vars(training), _env_vars(env)
    for key in sorted(set(before_vars) | set(after_vars)):
        if before_vars.get(key) != after_vars.get(key):
            knobs.append(Knob(f"env:{key}", before_vars.get(key), after_vars.get(key)))
    strip = lambda renv: {k: v for k, v in dict(renv or {}).items() if k != "env_vars"}  # noqa: E731
    if strip(training.runtime_env) != strip(env.runtime_env):
        knobs.append(Knob("runtime_env", strip(training.runtime_env), strip(env.runtime_env)))
    return knobs


def not_attributable(train_fp: Mapping[str, Any], cell_fp: Mapping[str, Any], knobs: Sequence[Knob]) -> list[str]:
    """What differs between the two workers that no knob here can vary (hardware, TF build), in words."""
    varied_tf = any(k.name == "runtime_env" for k in knobs)
    out = []
    for key in HARDWARE_KEYS:
        if key == "tf_version" and varied_tf:
            continue
        if train_fp.get(key) != cell_fp.get(key):
            out.append(f"{key}: {train_fp.get(key)!r} -> {cell_fp.get(key)!r}")
    return out


@dataclass(frozen=True)
class Variant:
    """One derived environment of the attribution: the training settings plus one knob (``only``), or the
    cell's settings minus one knob (``without``); ``error`` when that combination is not a valid environment."""

    knob: Knob
    kind: str  # "only" | "without"
    env: Any = None  # harness.spec.Environment
    error: str | None = None


def _with(env: Any, name: str, knob: Knob, value: Any) -> Any:
    """``env`` renamed ``name`` with ``knob`` set to ``value`` (judged as ``expect: any``).

    Raises:
        SpecError: the combination is not a valid environment (``cpu_isa`` with ``onednn: false``).
    """
    changes: dict[str, Any] = {"expect": "any", "description": f"{knob.label}: attribution variant of {env.name}"}
    if knob.name.startswith("env:"):
        key = knob.name[4:]
        variables = dict(env.env)
        variables.pop(key, None)
        renv = dict(env.runtime_env or {})
        if "env_vars" in renv:
            renv["env_vars"] = {k: v for k, v in renv["env_vars"].items() if k != key}
        if value is not None:
            variables[key] = value
        changes.update(env=variables, runtime_env=renv)
    elif knob.name == "runtime_env":
        changes["runtime_env"] = {**dict(value or {}), **({"env_vars": env.runtime_env["env_vars"]}
                                                         if env.runtime_env and "env_vars" in env.runtime_env else {})}
    else:
        changes[knob.name] = value
    return env.derive(name, **changes)


def attribution_environments(sweep: Any, env: Any, knobs: Sequence[Knob]) -> list[Variant]:
    """For each knob: the training environment plus the knob (``only``) and ``env`` minus the knob (``without``).

    The "only" variant keeps the training environment's placement, the
    "without" variant the cell's, so hardware stays what it was in each. A
    knob that cannot be varied alone (``cpu_isa`` needs oneDNN on, so it
    cannot be added to ``onednn: false`` or keep it when oneDNN is turned off)
    gives a variant with an ``error`` instead of failing the whole explanation.
    """
    from .spec import SpecError

    out = []
    for knob in knobs:
        for kind, base, value in (
                ("only", sweep.training, sweep.batch_size_for(env) if knob.name == "batch_size" else knob.cell),
                ("without", env, sweep.batch_size if knob.name == "batch_size" else knob.training)):
            try:
                out.append(Variant(knob, kind, env=_with(base, f"{env.name}.{kind}-{knob.slug}", knob, value)))
            except SpecError as exc:
                out.append(Variant(knob, kind, error=f"it cannot be varied alone ({exc.message})"))
    return out


@dataclass(frozen=True)
class KnobFinding:
    """What re-running the cell with one knob changed showed."""

    knob: Knob
    only_reproduces: bool | None  # training + this knob gives the cell's exact bits
    only_ulp: float | None  # ... its max ULP from the reference
    without_restores: bool | None  # the cell minus this knob gives the reference's exact bits
    without_ulp: float | None
    error: str | None = None  # a variant that did not run

    @property
    def explains(self) -> bool:
        return bool(self.only_reproduces and self.without_restores)

    def sentence(self) -> str:
        label = self.knob.label
        if self.error:
            return f"{label}: could not be varied ({self.error})"
        only = ("alone reproduces it bit for bit" if self.only_reproduces
                else "alone gives 0 ULP" if self.only_ulp == 0 else f"alone gives {_ulp_text(self.only_ulp)}, "
                "not the cell's bits")
        without = ("without it the reference's bits come back" if self.without_restores
                   else f"without it {_ulp_text(self.without_ulp)} remain")
        return f"{label} {only}; {without}"


def _ulp_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g} ULP"


def summarize_attribution(findings: Sequence[KnobFinding], unattributable: Sequence[str]) -> str:
    """One line: which knob(s) explain the difference, or why none does."""
    explaining = [f.knob.label for f in findings if f.explains]
    if explaining:
        return f"explained by {' and, equally, '.join(explaining)}"
    tail = f"; what could not be varied here also differs: {'; '.join(unattributable)}" if unattributable else ""
    if not findings:
        return "no knob differs from the training environment" + tail
    return "no single knob explains it (they act together, or the cause is not a knob)" + tail


# -- the whole explanation of one cell -----------------------------------------------------------
@dataclass(frozen=True)
class Localisation:
    """Where the difference starts: the layer-by-layer comparison, or why there is none."""

    format: str | None = None  # the artifact traced (the cell's, or a layered one of the same scenario)
    note: str | None = None
    layers: tuple[LayerDiff, ...] = ()
    first: str | None = None  # first layer whose outputs' bits differ
    growth: str | None = None  # layer whose output diverges most relative to its inputs
    error: str | None = None  # why it could not be localised
    accuracy_lost_at: str | None = None  # first layer less accurate than the reference against float64
    accuracy_note: str | None = None  # the rule with that layer's numbers
    accuracy_unavailable: str | None = None  # why the layers are not judged against float64

    def accuracy_fact(self) -> tuple[str, str] | None:
        """``(label, text)``: where the cell loses accuracy against float64, that no layer does, or why not judged.

        None for an explanation stored before layers were judged against float64.
        """
        if self.accuracy_unavailable:
            return "accuracy vs float64", f"not judged: {self.accuracy_unavailable}"
        if self.accuracy_lost_at:
            return "loses accuracy at layer", f"{self.accuracy_lost_at} ({self.accuracy_note})"
        if any(d.accuracy is not None for d in self.layers):
            return "loses accuracy at layer", "none (every layer is as accurate as the reference against float64)"
        return None


def _rmse_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _accuracy_columns(layer: LayerDiff) -> str:
    if layer.accuracy is None:
        return ""
    return (f"  {layer.accuracy:<13} rmse vs fp64 {_rmse_text(layer.rmse_vs_fp64)}"
            f" (reference {_rmse_text(layer.reference_rmse_vs_fp64)})")


@dataclass(frozen=True)
class Explanation:
    """Everything ``harness explain`` found out about one cell."""

    cell: str  # scenario/format/environment
    verdict: str | None
    message: str | None = None  # nothing to explain, or why it cannot be explained
    localisation: Localisation | None = None
    findings: tuple[KnobFinding, ...] = ()
    unattributable: tuple[str, ...] = ()
    summary: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON data (``harness.records.jsonable``: NaN/Inf as text)."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Explanation":
        """Inverse of :meth:`to_dict` (numbers written as ``"inf"``/``"nan"`` are numbers again).

        Raises:
            KeyError / TypeError / ValueError: ``d`` is not an explanation (or is of another version).
        """
        loc = d.get("localisation")
        if loc is not None:
            layers = tuple(_layer_from_dict(layer) for layer in loc.get("layers", ()))
            loc = Localisation(**{**loc, "layers": layers})
        findings = tuple(KnobFinding(**{**{k: json_number(v) for k, v in f.items()}, "knob": Knob(**f["knob"])})
                         for f in d.get("findings", ()))
        return cls(**{**d, "localisation": loc, "findings": findings,
                      "unattributable": tuple(d.get("unattributable", ()))})

    def text(self) -> str:
        """The explanation for a terminal (several lines)."""
        from . import text as text_

        lines = [f"{text_.one_line(self.cell)}: {self.verdict}"]
        if self.message:
            return "\n".join(lines + [f"  {text_.one_line(self.message)}"])
        loc = self.localisation
        if loc is not None:
            if loc.error:
                lines.append(f"  layers: cannot localise: {text_.one_line(loc.error)}")
            else:
                if loc.note:
                    lines.append(f"  layers: {text_.one_line(loc.note)}")
                grown = next((d for d in loc.layers if d.name == loc.growth), None)
                rate = f" (x{grown.growth:.3g} its inputs' divergence)" if grown and grown.growth and \
                    math.isfinite(grown.growth) else ""
                lines.append(f"  starts at layer: {text_.one_line(loc.first or '(every layer the same)')}; "
                             f"grows most at: {text_.one_line(loc.growth or '-')}{rate}")
                fact = loc.accuracy_fact()
                if fact is not None:
                    lines.append(f"  {fact[0]}: {text_.one_line(fact[1])}")
                for layer in loc.layers:
                    lines.append(f"    {layer.index:>3} {text_.one_line(layer.name):<32} {layer.bits:<8} "
                                 f"max {_ulp_text(layer.max_ulp_diff):>10}  divergence {layer.output_divergence:.2e}"
                                 f"{_accuracy_columns(layer)}")
        for finding in self.findings:
            lines.append(f"  {text_.one_line(finding.sentence())}")
        if self.unattributable:
            lines.append(f"  not attributable here: {text_.one_line('; '.join(self.unattributable))}")
        if self.summary:
            lines.append(f"  => {text_.one_line(self.summary)}")
        return "\n".join(lines)


def _layer_from_dict(layer: Mapping[str, Any]) -> LayerDiff:
    values = {k: json_number(v) for k, v in layer.items()}
    if "verdict" in values:  # written before layers had their own words
        values["bits"] = SAME if values.pop("verdict") == "bitwise" else DIFFERS
    return LayerDiff(**values)


def load_explanations(run_dir: Any) -> dict[str, Explanation]:
    """Every explanation stored in a run directory, by cell (``scenario/format/environment``)."""
    import json

    from .run import explanation_files

    out = {}
    for path in explanation_files(run_dir):
        try:
            exp = Explanation.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            continue  # not ours, or from another version
        out[exp.cell] = exp
    return out


# -- finding cells in a run -------------------------------------------------------------------------
class UnknownCell(ValueError):
    """The cell named is not in the run (exit code 2): the message lists close names."""


def find_cell(table: Any, cell: str) -> CellResult:
    """The typed result of cell ``scenario/format/environment`` in a results table (its last row).

    Raises:
        UnknownCell: it is malformed or not in the run.
        results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    from . import results

    return _lookup({c.name: c for c in results.cells(results.last_row_per_cell(table))}, cell)


def _lookup(by_name: Mapping[str, CellResult], cell: str) -> CellResult:
    import difflib

    if cell.count("/") != 2:
        raise UnknownCell(f"{cell!r}: name a cell as SCENARIO/FORMAT/ENVIRONMENT")
    if cell not in by_name:
        close = difflib.get_close_matches(cell, list(by_name), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; the run has {len(by_name)} cells"
        raise UnknownCell(f"{cell!r} is not a cell of this run{hint}")
    return by_name[cell]


def cells_to_explain(table: Any) -> list[str]:
    """The cells of a run that have a difference to explain: numeric verdicts other than bitwise.

    Raises:
        results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    from . import results

    return [c.name for c in results.cells(results.last_row_per_cell(table))
            if c.verdict in ("within_tolerance", "mismatch")]


@dataclass(frozen=True)
class TraceSource:
    """The artifact a cell's layers are traced from: its own, or a layered format's of the same scenario."""

    format: str | None
    path: str | None = None  # artifact directory in storage
    manifest_sha256: str | None = None  # the manifest the run replayed (None: an older run's, read from storage)
    note: str | None = None  # why another format's artifact, or why none


def _replayed_path(row: CellResult) -> str:
    """The artifact version a row replayed (its ``artifact_uri``); rows of older runs name only the digest."""
    from . import layout

    return layout.artifact_of_uri(row.artifact_uri) or layout.artifact_dir(row.scenario, row.artifact_digest)


def layered_artifact(run_cells: Sequence[CellResult], cell: CellResult) -> TraceSource:
    """Which artifact localises ``cell``: its own if its format keeps layers, else one of the same scenario that does."""
    if cell.format in LAYERED_FORMATS:
        return TraceSource(cell.format, _replayed_path(cell), cell.manifest_sha256)
    others = {c.format: c for c in run_cells
              if c.scenario == cell.scenario and c.format in LAYERED_FORMATS and c.artifact_digest}
    for fmt in LAYERED_FORMATS:
        if fmt in others:
            note = (f"format {cell.format} keeps no layer structure: localised through the {fmt} artifact of "
                    f"the same scenario, reloaded in the same two environments")
            return TraceSource(fmt, _replayed_path(others[fmt]), others[fmt].manifest_sha256, note)
    return TraceSource(None, note=(f"format {cell.format} keeps no layer structure and this run has no "
                                   f"{'/'.join(LAYERED_FORMATS)} artifact of scenario {cell.scenario!r} to trace "
                                   "instead; add format keras to the sweep to localise it"))


# -- orchestration (driver side) --------------------------------------------------------------------
def run_explain(run: Any, sweep: Any, scenarios: Mapping[str, Any], cell: str, *, address: str = "local",
                attribution: bool = True, verbose: bool = False) -> Explanation:
    """Explain one cell of a finished run, store the explanation, and return it (see ``explain_cells``)."""
    return explain_cells(run, sweep, scenarios, [cell], address=address, attribution=attribution,
                         verbose=verbose)[0]


def explain_cells(run: Any, sweep: Any, scenarios: Mapping[str, Any], cells: Sequence[str], *,
                  address: str = "local", attribution: bool = True, verbose: bool = False) -> list[Explanation]:
    """Explain cells of a finished run, store each explanation, and return them in the order asked.

    Args:
        run: the run (``harness.run.Run``); ``run.check(sweep, scenarios)`` is the caller's to make.
        sweep: the sweep the run was planned from.
        scenarios: name -> Scenario.
        cells: ``scenario/format/environment`` names.

    Layer traces run on workers of the training and of each cell's
    environment (the engine's worker class, placement and runtime_env).
    Attribution replays the cells in derived environments, all of them in one
    engine run, as derived cells of ``run`` (reused when explained again).

    Raises:
        UnknownCell: a cell is not in the run (checked before anything runs).
        FileNotFoundError / results.ResultsError: the run holds no results, or a damaged table.
        engine.RayUnavailable: Ray could not be started or reached.
    """
    from . import engine, results
    from .records import json_object

    run_cells = run.cells()  # decoded once, for every cell asked
    by_name = {c.name: c for c in run_cells}
    asked = {cell: _lookup(by_name, cell) for cell in cells}
    done: dict[str, Explanation] = {}
    for cell, result in asked.items():
        if result.verdict == "bitwise":
            done[cell] = _store(run, Explanation(cell, "bitwise", message=(
                "bitwise: the environment reproduced the reference exactly, there is nothing to explain")))
        elif result.verdict not in results.NUMERIC_VERDICTS:
            done[cell] = _store(run, Explanation(cell, result.verdict, message=(
                f"{result.verdict}: the cell produced no outputs to explain ({result.error})")))
    todo = {cell: result for cell, result in asked.items() if cell not in done}
    if todo:
        knobs_of = {name: knob_differences(sweep, sweep.environment(name))
                    for name in dict.fromkeys(result.environment for result in todo.values())}
        with engine.session(address, verbose):
            engine.register_scenarios(scenarios.values())
            locs = {cell: _localise(run, sweep, scenarios, run_cells, result) for cell, result in todo.items()}
            findings = _attribute(run, sweep, scenarios, list(todo.values()), knobs_of, address, verbose) \
                if attribution else {}
        from .storage import Storage

        st = Storage.open(run.storage)
        for cell, result in todo.items():
            unattributable = tuple(not_attributable(json_object(result.train_fingerprint),
                                                    json_object(result.fingerprint), knobs_of[result.environment]))
            found = tuple(findings.get(cell, ()))
            loc = locs[cell]
            if loc.layers:
                st.write_bytes(run.explain_path(result), layers_ipc(loc.layers))
            done[cell] = _store(run, Explanation(
                cell, result.verdict, localisation=loc, findings=found, unattributable=unattributable,
                summary=summarize_attribution(found, unattributable) if attribution else None))
    return [done[cell] for cell in cells]


def _store(run: Any, explanation: Explanation) -> Explanation:
    from .records import to_json
    from .run import write_file

    write_file(run.explanation_file(explanation.cell), to_json(explanation.to_dict(), indent=1).encode())
    return explanation


def _localise(run: Any, sweep: Any, scenarios: Mapping[str, Any], run_cells: Sequence[CellResult],
              cell: CellResult) -> Localisation:
    from . import arrays
    from .engine import call_in_environments, ray_error_text
    from .storage import Storage
    from .tracing import arrays_to_trace
    from .worker import TraceJob

    source = layered_artifact(run_cells, cell)
    if source.format is None:
        return Localisation(error=source.note)
    fmt, note = source.format, source.note
    st = Storage.open(run.storage)
    sha = source.manifest_sha256 or st.manifest_sha256(source.path)
    env = sweep.environment(cell.environment)
    # The training environment's worker also traces the float64 rebuild (the oracle's), at the reference's batch size.
    jobs = [(sweep.training, TraceJob(cell.scenario, fmt, source.path, sha, sweep.batch_size, False,
                                      run.explain_path(cell, "training"),
                                      oracle_path=run.explain_path(cell, "float64"))),
            (env, TraceJob(cell.scenario, fmt, source.path, sha, sweep.batch_size_for(env), env.jit_compile,
                           run.explain_path(cell, "cell"), dtype_policy=env.dtype_policy))]
    answers = call_in_environments([(e, "trace", job) for e, job in jobs], scenarios, run.storage,
                                   timeout_s=sweep.cell_timeout_s + sweep.schedule_timeout_s)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        return Localisation(fmt, note, error=f"a layer trace failed: {ray_error_text(failed[0])}")

    def read(path: str) -> list[dict[str, Any]]:
        return arrays_to_trace(arrays.read_ipc(st.read_bytes(path))[0])

    ref, obs = (read(job.output_path) for _, job in jobs)
    try:
        diffs = compare_traces(ref, obs)
    except ValueError as exc:  # the two reloads called different layers (a model that depends on its environment)
        return Localisation(fmt, note, error=f"cannot compare the layer traces: {exc}")
    first, grown = first_divergent(diffs), most_growth(diffs)
    unavailable, lost, rule = answers[0].oracle_unavailable, None, None
    if unavailable is None:
        try:
            accuracies = layer_accuracy(ref, obs, read(jobs[0][1].oracle_path), sweep.tolerance_for(env))
        except ValueError as exc:
            unavailable = str(exc)
        else:
            diffs = with_accuracy(diffs, accuracies)
            lost_at = first_less_accurate(diffs)
            if lost_at is not None:
                lost, rule = lost_at.name, accuracies[lost_at.index].note
    return Localisation(fmt, note, tuple(diffs), first.name if first else None, grown.name if grown else None,
                        accuracy_lost_at=lost, accuracy_note=rule, accuracy_unavailable=unavailable)


def _artifact_of(row: CellResult) -> ArtifactRecord | None:
    """The artifact a run's row replayed, to replay again without training (older rows lack its manifest)."""
    if not (row.artifact_digest and row.manifest_sha256):
        return None
    return ArtifactRecord(scenario=row.scenario, format=row.format, digest=row.artifact_digest,
                          path=_replayed_path(row), uri=row.artifact_uri,
                          manifest_sha256=row.manifest_sha256, save_verdict=row.save_verdict,
                          save_max_abs_diff=row.save_max_abs_diff, save_max_ulp_diff=row.save_max_ulp_diff)


def _attribute(run: Any, sweep: Any, scenarios: Mapping[str, Any], cells: Sequence[CellResult],
               knobs_of: Mapping[str, Sequence[Knob]], address: str, verbose: bool) -> dict[str, list[KnobFinding]]:
    """Findings per cell: every variant of every cell's environment runs as a derived cell of ``run``, in one go."""
    from . import arrays, results
    from .storage import Storage
    from .sweep import Collector, execute

    variants = {name: attribution_environments(sweep, sweep.environment(name), knobs)
                for name, knobs in knobs_of.items() if knobs}
    derived = {v.env.name: v.env for vs in variants.values() for v in vs if v.env is not None}
    wanted = {Cell(c.scenario, c.format, v.env.name): c for c in cells for v in variants.get(c.environment, ())
              if v.env is not None}
    have = {c.name: c for c in run.derived_cells(list(derived.values()))}
    missing = [cell for cell in wanted if cell.name not in have]
    if missing:
        envs = tuple({cell.environment: derived[cell.environment] for cell in missing}.values())
        derived_sweep = sweep.model_copy(update={"environments": envs, "expect": "any", "expect_save": "any"})
        artifacts = {cell.name: art for cell, row in wanted.items() if (art := _artifact_of(row)) is not None}
        with results.Journal(run.derived_dir) as journal:
            sink = Collector(derived_sweep, run.run_id, journal, total=len(missing))
            execute(run, derived_sweep, scenarios, missing, sink, address=address, verbose=verbose,
                    artifacts=artifacts, derived=True)
        results.write_table(results.last_row_per_cell(results.read_table(run.derived_dir)),
                            run.derived_dir / "results.parquet")
        results.Journal.remove(run.derived_dir)
        run.record_derived_environments(envs)
        have = {c.name: c for c in run.derived_cells(list(derived.values()))}
    st = Storage.open(run.storage)
    out: dict[str, list[KnobFinding]] = {}
    for cell in cells:
        cell_outputs = arrays.read_ipc(st.read_bytes(run.observation_path(cell)))[0]
        findings = out.setdefault(cell.name, [])
        for knob in knobs_of.get(cell.environment, ()):
            pair = {v.kind: v for v in variants[cell.environment] if v.knob == knob}
            rows = {kind: have.get(Cell(cell.scenario, cell.format, v.env.name).name) if v.env is not None else None
                    for kind, v in pair.items()}
            # the first variant that cannot be built, is missing or has no outputs says why the knob cannot be judged
            problem = next((pair[kind].error or (row.error if row is not None else None) or "the variant did not run"
                            for kind, row in rows.items()
                            if row is None or row.verdict not in results.NUMERIC_VERDICTS), None)
            if problem is not None:
                findings.append(KnobFinding(knob, None, None, None, None, error=problem))
                continue
            only, without = rows["only"], rows["without"]
            only_outputs = arrays.read_ipc(st.read_bytes(run.observation_path(only, derived=True)))[0]
            same = set(only_outputs) == set(cell_outputs) and all(
                _bits_equal(only_outputs[k], cell_outputs[k]) for k in cell_outputs)
            findings.append(KnobFinding(knob, same, only.max_ulp_diff, without.verdict == "bitwise",
                                        without.max_ulp_diff))
    return out


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    from .compare import bits_equal

    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        return a.shape == b.shape and bool(np.all(a == b))
    return bits_equal(a, b)
