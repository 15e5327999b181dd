"""Explain a difference: where it starts (layer by layer), which setting causes it, what it changes.

Plain functions like ``train`` and ``replay``; the Ray side is in
``run_explain`` (the engine's workers, started with the environments' own
settings). Three parts:

* **Layer localisation** (``trace_layers`` in a worker, ``compare_traces`` on
  the driver): the artifact is reloaded in the training environment and in the
  cell's environment, the probe runs with every layer's inputs and outputs
  captured (top-level layers, and the layers of nested models; a recurrent
  layer is one step), and the two traces are compared layer by layer with the
  same comparison code as the cells. Reported: the first layer whose output is
  not bitwise, each layer's metrics in call order, and the layer whose output
  diverges most relative to the divergence of its inputs (LEMON's "rate of
  change"). Formats that keep no layer structure (``savedmodel``,
  ``tf-savedmodel``) are localised through the ``keras`` (or ``h5``,
  ``weights``) artifact of the same scenario when the run has one.
* **Setting attribution** (``attribution_plan`` / ``attribute``): for each
  knob in which the cell's environment differs from the training environment,
  the cell runs again with that knob alone applied to the training settings,
  and with that knob alone removed from the cell's settings (2k reloads for k
  knobs, through the normal engine). A knob that alone reproduces the cell's
  bits, and whose removal alone restores the reference's bits, explains it.
  What cannot be varied here (CPU model, GPU, TensorFlow version without a
  runtime_env) is named as not attributable.
* **Prediction impact** is measured for every cell by ``replay`` (see
  ``harness.compare.prediction_impact``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .compare import Tolerance, compare_arrays

if TYPE_CHECKING:
    from .records import CellResult

#: Formats whose reload has Keras layers to trace; the others are traced through one of these.
LAYERED_FORMATS = ("keras", "h5", "weights")
#: Below this, a divergence counts as zero (a mean relative difference).
_TINY = 1e-30


# -- worker side -------------------------------------------------------------------------
def capture_layers(model: Any) -> list[tuple[str, Any]]:
    """``(path, layer)`` of the layers a trace records: top-level layers and those of nested models.

    A layer that is not a model (an RNN with its cell, an attention block with
    its projections) is one step: its inner layers may run inside a loop, whose
    tensors cannot leave it.
    """
    import keras

    found: list[tuple[str, Any]] = []

    def walk(container: Any, prefix: str) -> None:
        for layer in getattr(container, "layers", []):
            path = f"{prefix}{layer.name}"
            if isinstance(layer, keras.Model) and getattr(layer, "layers", None):
                walk(layer, path + "/")
            else:
                found.append((path, layer))

    walk(model, "")
    return found


def trace_layers(model: Any, inputs: Any, batch_size: int, jit_compile: bool = False) -> list[dict[str, Any]]:
    """Run ``model`` on ``inputs`` recording every captured layer call.

    Returns one dict per call, in call order: ``name``, ``inputs`` and
    ``outputs`` (lists of numpy arrays, batches concatenated). The calls run
    in one ``tf.function`` (XLA-compiled with ``jit_compile``), as predictions do.
    """
    import tensorflow as tf

    from . import formats

    layers = capture_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no Keras layers to trace")
    records: list[tuple[str, Any, Any]] = []
    originals = {}

    def hooked(name: str, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            records.append((name, args[0] if args else next(iter(kwargs.values()), None), out))
            return out
        return wrapper

    for name, layer in layers:
        originals[name] = layer.call
        object.__setattr__(layer, "call", hooked(name, layer.call))
    try:
        def run(batch):
            del records[:]  # runs while tracing: one record per layer call of this graph
            model(batch, training=False)
            return ([tf.nest.flatten(r[1]) for r in records], [tf.nest.flatten(r[2]) for r in records])

        fn = tf.function(run, jit_compile=jit_compile, reduce_retracing=True)
        flat = formats.flatten(inputs, "input")
        n = next(iter(flat.values())).shape[0]
        chunks: list[tuple[list, list]] = []
        names: list[str] = []
        for start in range(0, n, batch_size):
            batch = tf.nest.map_structure(lambda a: tf.constant(np.asarray(a)[start:start + batch_size]), inputs)
            ins, outs = fn(batch)
            names = names or [r[0] for r in records]
            chunks.append(([[np.asarray(t) for t in group] for group in ins],
                           [[np.asarray(t) for t in group] for group in outs]))
    finally:
        for name, layer in layers:
            object.__setattr__(layer, "call", originals[name])
    out = []
    for i, name in enumerate(names):
        joined = {}
        for side in (0, 1):
            groups = [c[side][i] for c in chunks]
            joined[side] = [np.concatenate([g[j] for g in groups]) if groups[0][j].ndim else groups[0][j]
                            for j in range(len(groups[0]))]
        out.append({"name": name, "inputs": joined[0], "outputs": joined[1]})
    return out


def trace_to_arrays(trace: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """A trace as named arrays (``003:dense_1/out/0``) for an Arrow file."""
    arrays = {}
    for i, call in enumerate(trace):
        for side, key in (("in", "inputs"), ("out", "outputs")):
            for j, a in enumerate(call[key]):
                if _numeric(a):  # strings (lookup layers' inputs) are compared by the cells, not traced
                    arrays[f"{i:03d}:{call['name']}/{side}/{j}"] = a
    return arrays


def _numeric(a: Any) -> bool:
    return isinstance(a, np.ndarray) and (a.dtype.kind in "fiub" or a.dtype.name in ("bfloat16", "float16"))


def arrays_to_trace(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Inverse of :func:`trace_to_arrays`."""
    calls: dict[int, dict[str, Any]] = {}
    for key, a in arrays.items():
        head, side, j = key.rsplit("/", 2)
        index, name = head.split(":", 1)
        call = calls.setdefault(int(index), {"name": name, "inputs": {}, "outputs": {}})
        call["inputs" if side == "in" else "outputs"][int(j)] = a
    return [{"name": c["name"], "inputs": [c["inputs"][j] for j in sorted(c["inputs"])],
             "outputs": [c["outputs"][j] for j in sorted(c["outputs"])]} for _, c in sorted(calls.items())]


# -- driver side: layer by layer ------------------------------------------------------------
@dataclass(frozen=True)
class LayerDiff:
    """One layer call: how far its outputs (and inputs) are from the training environment's."""

    index: int
    name: str
    verdict: str  # of the outputs, exact comparison: bitwise | within_tolerance | mismatch
    max_ulp_diff: float | None
    max_abs_diff: float | None
    mismatch_fraction: float | None
    input_divergence: float  # mean |obs - ref| / mean |ref| of the layer's inputs
    output_divergence: float  # the same, of its outputs
    growth: float | None  # output / input divergence (inf: the inputs were bitwise), None if outputs agree


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
        verdict = max((c.verdict for c in cmps), key=("bitwise", "within_tolerance", "mismatch").index,
                      default="bitwise")
        d_in, d_out = divergence(r["inputs"], o["inputs"]), divergence(r["outputs"], o["outputs"])
        growth = None if d_out <= _TINY else (math.inf if d_in <= _TINY else d_out / d_in)

        def agg(attr: str) -> float | None:
            vals = [getattr(c, attr) for c in cmps if not math.isnan(getattr(c, attr))]
            return max(vals) if vals else None

        out.append(LayerDiff(i, r["name"], verdict, agg("max_ulp_diff"), agg("max_abs_diff"),
                             agg("mismatch_fraction"), d_in, d_out, growth))
    return out


def first_divergent(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The first layer whose output is not bitwise."""
    return next((d for d in diffs if d.verdict != "bitwise"), None)


def most_growth(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The layer whose outputs diverge most relative to its already diverging inputs (LEMON's rate of change).

    Layers with bitwise inputs (where a difference starts) have no finite
    rate; they count only when no other layer diverges.
    """
    finite = [d for d in diffs if d.growth is not None and math.isfinite(d.growth)]
    if finite:
        return max(finite, key=lambda d: (d.growth, d.output_divergence))
    return next((d for d in diffs if d.growth is not None), None)


# -- setting attribution -----------------------------------------------------------------------
#: Environment fields that are knobs the harness can vary on any node.
KNOB_FIELDS = ("onednn", "threads", "cpu_isa", "jit_compile", "batch_size", "tf32", "op_determinism")
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


def _with(env: Any, name: str, knob: Knob, value: Any) -> Any:
    """``env`` renamed ``name`` with ``knob`` set to ``value``."""
    if knob.name.startswith("env:"):
        key = knob.name[4:]
        variables = dict(env.env)
        variables.pop(key, None)
        renv = dict(env.runtime_env or {})
        if "env_vars" in renv:
            renv["env_vars"] = {k: v for k, v in renv["env_vars"].items() if k != key}
        if value is not None:
            variables[key] = value
        return _derive(env, name, env=variables, runtime_env=renv)
    if knob.name == "runtime_env":
        renv = {**dict(value or {}), **({"env_vars": env.runtime_env["env_vars"]}
                                         if env.runtime_env and "env_vars" in env.runtime_env else {})}
        return _derive(env, name, runtime_env=renv)
    return _derive(env, name, **{knob.name: value})


def _derive(env: Any, name: str, **changes: Any) -> Any:
    return env.derive(name, **changes)


def attribution_environments(sweep: Any, env: Any, knobs: Sequence[Knob]) -> list[tuple[Knob, str, Any]]:
    """For each knob: ``(knob, "only", training + knob)`` and ``(knob, "without", env - knob)``.

    The "only" variant keeps the training environment's placement, the
    "without" variant the cell's, so hardware stays what it was in each.
    """
    out = []
    for knob in knobs:
        only = _with(sweep.training, f"{env.name}.only-{knob.slug}", knob,
                     sweep.batch_size_for(env) if knob.name == "batch_size" else knob.cell)
        without = _with(env, f"{env.name}.without-{knob.slug}", knob,
                        sweep.batch_size if knob.name == "batch_size" else knob.training)
        out += [(knob, "only", only), (knob, "without", without)]
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
    first: str | None = None  # first layer whose output is not bitwise
    growth: str | None = None  # layer whose output diverges most relative to its inputs
    error: str | None = None  # why it could not be localised


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
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Explanation":
        loc = d.get("localisation")
        if loc is not None:
            layers = tuple(LayerDiff(**{**layer, "growth": _number(layer.get("growth"))}) for layer in loc.get("layers", ()))
            loc = Localisation(**{**loc, "layers": layers})
        findings = tuple(KnobFinding(**{**f, "knob": Knob(**f["knob"])}) for f in d.get("findings", ()))
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
                lines.append(f"  starts at layer: {text_.one_line(loc.first or '(every layer bitwise)')}; "
                             f"grows most at: {text_.one_line(loc.growth or '-')}{rate}")
                for layer in loc.layers:
                    lines.append(f"    {layer.index:>3} {text_.one_line(layer.name):<32} {layer.verdict:<16} "
                                 f"max {_ulp_text(layer.max_ulp_diff):>10}  divergence {layer.output_divergence:.2e}")
        for finding in self.findings:
            lines.append(f"  {text_.one_line(finding.sentence())}")
        if self.unattributable:
            lines.append(f"  not attributable here: {text_.one_line('; '.join(self.unattributable))}")
        if self.summary:
            lines.append(f"  => {text_.one_line(self.summary)}")
        return "\n".join(lines)


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def explanation_path(run_dir: Any, cell: str) -> Any:
    """Where a cell's explanation is kept in a run directory (JSON)."""
    from pathlib import Path

    scenario, fmt, env = cell.split("/")
    return Path(run_dir) / "explain" / scenario / fmt / f"{env}.json"


def load_explanations(run_dir: Any) -> dict[str, Explanation]:
    """Every explanation stored in a run directory, by cell (``scenario/format/environment``)."""
    from pathlib import Path

    out = {}
    for path in sorted((Path(run_dir) / "explain").glob("*/*/*.json")):
        try:
            exp = Explanation.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            continue  # not ours, or from another version
        out[exp.cell] = exp
    return out


class UnknownCell(ValueError):
    """The cell named is not in the run (exit code 2): the message lists close names."""


def find_cell(table: Any, cell: str) -> CellResult:
    """The typed result of cell ``scenario/format/environment`` in a results table (its last row).

    Raises:
        UnknownCell: it is malformed or not in the run.
        results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    from . import results

    return _lookup(_by_name(results.cells(table)), cell)


def _by_name(cells: Sequence[CellResult]) -> dict[str, CellResult]:
    """Cells by ``scenario/format/environment``, in first-appearance order; a later duplicate wins."""
    return {c.name: c for c in cells}


def _lookup(by_name: Mapping[str, CellResult], cell: str) -> CellResult:
    import difflib

    if cell.count("/") != 2:
        raise UnknownCell(f"{cell!r}: name a cell as SCENARIO/FORMAT/ENVIRONMENT")
    if cell not in by_name:
        close = difflib.get_close_matches(cell, list(by_name), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; the run has {len(by_name)} cells"
        raise UnknownCell(f"{cell!r} is not a cell of this run{hint}")
    return by_name[cell]


def run_explain(sweep: Any, scenarios: Mapping[str, Any], run_dir: Any, cell: str, *, address: str = "local",
                storage: str | None = None, attribution: bool = True, verbose: bool = False) -> Explanation:
    """Explain one cell of a finished run, store the explanation, and return it (see ``explain_cells``)."""
    return explain_cells(sweep, scenarios, run_dir, [cell], address=address, storage=storage,
                         attribution=attribution, verbose=verbose)[0]


def cells_to_explain(table: Any) -> list[str]:
    """The cells of a run that have a difference to explain: numeric verdicts other than bitwise.

    Raises:
        results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    from . import results

    return [c.name for c in results.cells(table) if c.verdict in ("within_tolerance", "mismatch")]


def explain_cells(sweep: Any, scenarios: Mapping[str, Any], run_dir: Any, cells: Sequence[str], *,
                  address: str = "local", storage: str | None = None, attribution: bool = True,
                  verbose: bool = False) -> list[Explanation]:
    """Explain cells of a finished run, store each explanation, and return them in the order asked.

    Layer traces run on workers of the training and of each cell's
    environment (the engine's worker class, placement and runtime_env).
    Attribution re-runs the cells through the normal engine in derived
    environments: one derived sweep per environment covers every cell of it
    asked for, in a run directory of its own under ``RUN_DIR/attribution``
    (asking again resumes it: a cache by content).

    Raises:
        UnknownCell: a cell is not in the run (checked before anything runs).
        FileNotFoundError / results.ResultsError: ``run_dir`` holds no results, or a damaged table.
    """
    from pathlib import Path

    from . import results
    from .records import json_object
    from .storage import Storage, normalize_uri

    run_dir = Path(run_dir)
    run_cells = results.cells(results.read_table(run_dir))  # decoded once, for every cell asked
    by_name = _by_name(run_cells)
    asked = {cell: _lookup(by_name, cell) for cell in cells}
    done: dict[str, Explanation] = {}
    for cell, result in asked.items():
        if result.verdict == "bitwise":
            done[cell] = _store(run_dir, Explanation(cell, "bitwise", message=(
                "bitwise: the environment reproduced the reference exactly, there is nothing to explain")))
        elif result.verdict not in results.NUMERIC_VERDICTS:
            done[cell] = _store(run_dir, Explanation(cell, result.verdict, message=(
                f"{result.verdict}: the cell produced no outputs to explain ({result.error})")))
    todo = {cell: result for cell, result in asked.items() if cell not in done}
    if todo:
        storage_uri = normalize_uri(storage or _run_storage(run_dir) or sweep.storage)
        from .sweep import _init_ray, _register_scenarios_by_value, _shutdown_ray

        knobs_of = {name: knob_differences(sweep, sweep.environment(name))
                    for name in dict.fromkeys(result.environment for result in todo.values())}
        owned = _init_ray(address, verbose)
        try:
            _register_scenarios_by_value(scenarios.values())
            locs = {cell: _localise(sweep, scenarios, run_cells, result, sweep.environment(result.environment),
                                    storage_uri)
                    for cell, result in todo.items()}
            findings: dict[str, list[KnobFinding]] = {}
            for env_name, knobs in knobs_of.items() if attribution else ():
                if knobs:
                    group = [result for result in todo.values() if result.environment == env_name]
                    findings.update(_attribute(sweep, scenarios, group, sweep.environment(env_name), knobs, run_dir,
                                               storage_uri, address, verbose))
        finally:
            if owned:
                _shutdown_ray()
        st = Storage.open(storage_uri)
        for cell, result in todo.items():
            unattributable = tuple(not_attributable(json_object(result.train_fingerprint),
                                                    json_object(result.fingerprint), knobs_of[result.environment]))
            found = tuple(findings.get(cell, ()))
            loc = locs[cell]
            if loc.layers:
                st.write_bytes(f"runs/{result.run_id}/explain/{cell}.arrow", _layers_ipc(loc.layers))
            done[cell] = _store(run_dir, Explanation(
                cell, result.verdict, localisation=loc, findings=found, unattributable=unattributable,
                summary=summarize_attribution(found, unattributable) if attribution else None))
    return [done[cell] for cell in cells]


def _run_storage(run_dir: Any) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("storage")
    except (OSError, ValueError):
        return None


def _store(run_dir: Any, explanation: Explanation) -> Explanation:
    path = explanation_path(run_dir, explanation.cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(explanation.to_dict(), indent=1))
    tmp.replace(path)
    return explanation


def _layers_ipc(layers: Sequence[LayerDiff]) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pylist([_jsonable(dataclasses.asdict(d)) | {"growth": d.growth} for d in layers])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _layered_artifact(run_cells: Sequence[CellResult],
                      cell: CellResult) -> tuple[str | None, str | None, str | None]:
    """``(format, artifact path, note)`` of an artifact of the cell's scenario that keeps its layers."""
    if cell.format in LAYERED_FORMATS:
        return cell.format, f"artifacts/{cell.scenario}/{cell.artifact_digest}", None
    others = {c.format: c for c in run_cells
              if c.scenario == cell.scenario and c.format in LAYERED_FORMATS and c.artifact_digest}
    for fmt in LAYERED_FORMATS:
        if fmt in others:
            note = (f"format {cell.format} keeps no layer structure: localised through the {fmt} artifact of "
                    f"the same scenario, reloaded in the same two environments")
            return fmt, f"artifacts/{cell.scenario}/{others[fmt].artifact_digest}", note
    return None, None, (f"format {cell.format} keeps no layer structure and this run has no "
                        f"{'/'.join(LAYERED_FORMATS)} artifact of scenario {cell.scenario!r} to trace instead; "
                        "add format keras to the sweep to localise it")


def _localise(sweep: Any, scenarios: Mapping[str, Any], run_cells: Sequence[CellResult], cell: CellResult,
              env: Any, storage_uri: str) -> Localisation:
    from .engine import call_in_environments
    from .storage import Storage
    from .worker import TraceJob

    fmt, path, note = _layered_artifact(run_cells, cell)
    if fmt is None:
        return Localisation(error=note)
    st = Storage.open(storage_uri)
    base = f"runs/{cell.run_id}/explain/{cell.name}"
    sha = st.manifest_sha256(path)
    jobs = [(sweep.training, TraceJob(cell.scenario, fmt, path, sha, sweep.batch_size, False, f"{base}.training.arrow")),
            (env, TraceJob(cell.scenario, fmt, path, sha, sweep.batch_size_for(env), env.jit_compile,
                           f"{base}.cell.arrow"))]
    answers = call_in_environments([(e, "trace", job) for e, job in jobs], scenarios, storage_uri,
                                   timeout_s=sweep.cell_timeout_s + sweep.schedule_timeout_s)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        from .engine import ray_error_text

        return Localisation(fmt, note, error=f"a layer trace failed: {ray_error_text(failed[0])}")
    from . import arrays

    ref, obs = (arrays_to_trace(arrays.read_ipc(st.read_bytes(job.output_path))[0]) for _, job in jobs)
    try:
        diffs = compare_traces(ref, obs)
    except ValueError as exc:  # the two reloads called different layers (a model that depends on its environment)
        return Localisation(fmt, note, error=f"cannot compare the layer traces: {exc}")
    first, grown = first_divergent(diffs), most_growth(diffs)
    return Localisation(fmt, note, tuple(diffs), first.name if first else None, grown.name if grown else None)


def _attribute(sweep: Any, scenarios: Mapping[str, Any], cells: Sequence[CellResult], env: Any,
               knobs: Sequence[Knob], run_dir: Any, storage_uri: str, address: str,
               verbose: bool) -> dict[str, list[KnobFinding]]:
    """Findings per cell for ``cells`` (cells of ``env``), from one derived sweep over their scenarios and formats."""
    import hashlib

    from . import arrays, results
    from .history import index_cells
    from .spec import parse_sweep
    from .storage import Storage
    from .sweep import run_sweep

    variants = attribution_environments(sweep, env, knobs)
    names = sorted({f"{c.scenario}/{c.format}" for c in cells})
    doc = {"name": f"explain-{sweep.name}", "scenarios": sorted({c.scenario for c in cells}),
           "formats": sorted({c.format for c in cells}),
           "training": _env_doc(sweep.training), "batch_size": sweep.batch_size, "expect": "any",
           "expect_save": "any", "precheck": sweep.precheck, "retries": sweep.retries,
           "timeouts": {"cell_timeout_s": sweep.cell_timeout_s, "schedule_timeout_s": sweep.schedule_timeout_s,
                        "train_timeout_s": sweep.train_timeout_s},
           "environments": {variant.name: {**_env_doc(variant), "expect": "any"} for _, _, variant in variants}}
    derived = parse_sweep(doc, source=f"attribution of environment {env.name} for {', '.join(names)}")
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    out_dir = run_dir / "attribution" / env.name / key
    res = run_sweep(derived, scenarios, out_dir=out_dir, address=address, storage=storage_uri,
                    resume=_reusable(out_dir, derived), verbose=verbose)
    st = Storage.open(storage_uri)
    by_key = index_cells(results.cells(res.table))
    out: dict[str, list[KnobFinding]] = {}
    for cell in cells:
        cell_outputs = arrays.read_ipc(st.read_bytes(_rel(st, cell.observation_uri)))[0]
        findings = out.setdefault(cell.name, [])
        for knob in knobs:
            only = by_key.get((cell.scenario, cell.format, f"{env.name}.only-{knob.slug}"))
            without = by_key.get((cell.scenario, cell.format, f"{env.name}.without-{knob.slug}"))
            # the first variant that is missing or has no outputs says why the knob cannot be judged
            problem = next(((v.error if v is not None else None) or "the variant did not run"
                            for v in (only, without) if v is None or v.verdict not in results.NUMERIC_VERDICTS), None)
            if problem is not None:
                findings.append(KnobFinding(knob, None, None, None, None, error=problem))
                continue
            only_outputs = arrays.read_ipc(st.read_bytes(_rel(st, only.observation_uri)))[0]
            same = set(only_outputs) == set(cell_outputs) and all(
                _bits_equal(only_outputs[k], cell_outputs[k]) for k in cell_outputs)
            findings.append(KnobFinding(knob, same, only.max_ulp_diff, without.verdict == "bitwise",
                                        without.max_ulp_diff))
    return out


def _reusable(out_dir: Any, derived: Any) -> bool:
    """Whether an earlier attribution of this cell, with the same plan, can be resumed (a cache by content)."""
    from . import results
    from .sweep import RunDirError, adopt

    try:
        return adopt(out_dir, derived).num_rows > 0
    except (RunDirError, results.ResultsError):
        return False


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    from .compare import bits_equal

    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        return a.shape == b.shape and bool(np.all(a == b))
    return bits_equal(a, b)


def _rel(st: Any, uri: str) -> str:
    """A URI under the storage root, relative to it."""
    base = st.uri_of("").split("?", 1)[0].rstrip("/")
    return uri.split("?", 1)[0][len(base):].lstrip("/")


def _env_doc(env: Any) -> dict[str, Any]:
    """The YAML-able mapping of an environment (what a sweep file would say)."""
    from .spec import environment_document

    return environment_document(env)
