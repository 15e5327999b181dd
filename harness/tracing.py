"""Layer traces of a reloaded Keras model, in a worker (TensorFlow only; no Ray, no driver code).

``trace_layers`` runs the probe with every layer call's inputs and outputs
recorded; ``trace_to_arrays`` / ``arrays_to_trace`` carry a trace through an
Arrow IPC file in storage (``harness.arrays``), where the driver
(``harness.explain``) reads both traces of a cell and compares them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


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
