"""Reload one artifact in one environment and compare it with the reference.

A plain function (no Ray inside): ``sweep`` runs it as a Ray task in the
environment's worker; tests and ``--inline`` call it directly. It never
raises for a problem with the cell: every outcome becomes a verdict.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from . import arrays, formats
from .compare import Tolerance, compare_digests, compare_outputs
from .scenario import Scenario, activate
from .spec import Environment
from .storage import CorruptArtifact, Storage


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def replay(scenario: Scenario, fmt: str, artifact_path: str, storage_uri: str, environment: Environment,
           *, batch_size: int, tolerance: Tolerance = Tolerance(),
           output_tolerances: Mapping[str, Tolerance] | None = None,
           observation_path: str | None = None) -> dict[str, Any]:
    """Reload ``artifact_path`` in this process as ``environment`` and compare.

    Args:
        scenario: the scenario (needed by the ``weights`` format to rebuild).
        fmt: format name.
        artifact_path: artifact directory, relative to the storage root.
        storage_uri: shared storage root.
        environment: the environment this process was started for.
        batch_size: prediction batch size.
        tolerance: sweep tolerance merged with the environment's.
        output_tolerances: per-output overrides.
        observation_path: where to write this cell's outputs (Arrow IPC),
            relative to the storage root; skipped if ``None``.

    Returns:
        A dict of result columns (see ``harness.results.COLUMNS``): verdict,
        metrics, weights_equal, error, detail, fingerprint, node, timings.
    """
    from . import fingerprint, runtime

    start = time.time()
    row: dict[str, Any] = {"scenario": scenario.name, "format": fmt, "environment": environment.name}
    try:
        runtime.configure(environment)
    except runtime.EnvironmentMismatch as exc:
        return _finish(row, start, verdict="error", error=str(exc), fp=_safe_fingerprint(environment))
    fp = fingerprint.collect(environment.name, jit_compile=environment.jit_compile)
    row.update(fingerprint=fp, node_id=fp.get("ray_node_id"), node_labels=fp.get("ray_node_labels"),
               tf_version=fp.get("tf_version"))
    storage = Storage.open(storage_uri)
    try:
        local, _manifest = storage.get_dir(artifact_path)
    except CorruptArtifact as exc:
        return _finish(row, start, verdict="corrupt", error=f"artifact failed verification: {exc}")
    except Exception as exc:  # storage unreachable, permissions...
        return _finish(row, start, verdict="error", error=f"cannot fetch artifact {storage.uri_of(artifact_path)}: {exc}")

    ref_arrays, meta = arrays.read_ipc(f"{local}/reference.arrow")
    info = json.loads(open(f"{local}/reference.json").read())
    inputs = formats.unflatten_inputs({k: ref_arrays[k] for k in info["inputs"]}, meta["input_layout"])
    reference = {k: ref_arrays[k] for k in info["outputs"]}
    try:
        loaded = formats.get(fmt).load(f"{local}/{formats.MODEL_DIR}", activate(scenario), inputs)
        observed = formats.predict(loaded.fn, inputs, batch_size, jit_compile=environment.jit_compile)
        observed_vars = formats.variable_digests(loaded.variables)
    except Exception as exc:
        return _finish(row, start, verdict="error",
                       error=f"load/predict of format {fmt!r} under TF {fp.get('tf_version')} failed: {runtime.error_text(exc)}")
    del loaded

    cmp = compare_outputs(reference, observed, tolerance, output_tolerances)
    # A list, not a dict: JSON key sorting would lose the variables' order.
    original_vars = {v["name"]: v for v in info["variables"]}
    check = compare_digests(original_vars, observed_vars)
    weights_equal, problems = check.equal, check.problems
    verdict = cmp.verdict
    error = cmp.reason if verdict == "mismatch" else None
    if not weights_equal:
        # A restored variable that differs is a broken save, whatever the outputs say.
        verdict = "mismatch"
        error = "; ".join(filter(None, [f"{len(problems)} variable(s) not restored exactly: " + "; ".join(problems[:5]), error]))
    if observation_path:
        storage.write_bytes(observation_path, arrays.to_ipc_bytes(observed, {
            "scenario": scenario.name, "format": fmt, "environment": environment.name, "verdict": verdict}))
        row["observation_uri"] = storage.uri_of(observation_path)
    atol, rtol, max_ulp = cmp.applied
    req_atol, req_rtol, req_ulp = cmp.required
    detail = {"outputs": [o.to_dict() for o in cmp.outputs], "weight_problems": problems,
              "weight_notes": check.notes, "ignored_state": check.ignored_state,
              "variables_checked": check.checked, "reference_kind": meta.get("reference_kind"),
              "batch_size": batch_size}
    return _finish(row, start, verdict=verdict, error=error,
                   max_abs_diff=_nan_to_none(cmp.max_abs_diff), max_rel_diff=_nan_to_none(cmp.max_rel_diff),
                   max_ulp_diff=_nan_to_none(cmp.max_ulp_diff), mismatch_fraction=_nan_to_none(cmp.mismatch_fraction),
                   weights_equal=weights_equal, atol=_nan_to_none(atol), rtol=_nan_to_none(rtol),
                   max_ulp=_nan_to_none(max_ulp), required_atol=_nan_to_none(req_atol),
                   required_rtol=_nan_to_none(req_rtol), required_ulp=_nan_to_none(req_ulp), detail=detail)


def _safe_fingerprint(environment: Environment) -> dict[str, Any]:
    from . import fingerprint

    try:
        return fingerprint.collect(environment.name, jit_compile=environment.jit_compile)
    except Exception:
        return {"environment": environment.name, **fingerprint.cpu_info(), **fingerprint.ray_info()}


def _finish(row: dict[str, Any], start: float, *, fp: dict | None = None, **values: Any) -> dict[str, Any]:
    if fp is not None:
        row.update(fingerprint=fp, node_id=fp.get("ray_node_id"), node_labels=fp.get("ray_node_labels"),
                   tf_version=fp.get("tf_version"))
    row.update(values)
    row["seconds"] = time.time() - start
    return row
