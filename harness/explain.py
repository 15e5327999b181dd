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
from typing import Any, Mapping, Sequence

import numpy as np

from .compare import Tolerance, compare_arrays

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
    """The layer whose outputs diverge most relative to its inputs (a start, with bitwise inputs, first)."""
    grown = [d for d in diffs if d.growth is not None]
    return max(grown, key=lambda d: (d.growth, d.output_divergence), default=None)
