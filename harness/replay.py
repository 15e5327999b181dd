"""Reload one artifact in one environment and compare it with the reference.

A plain function (no Ray inside): the engine runs it in the environment's
long-lived worker; tests and ``--inline`` call it directly. It never raises
for a problem with the cell: every outcome becomes a verdict.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from . import arrays, formats
from .compare import Tolerance, compare_digests, compare_outputs, impact_summary, prediction_impacts
from .records import CellResult
from .scenario import Scenario, activate
from .spec import Environment
from .storage import CorruptArtifact, Storage


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def replay(scenario: Scenario, fmt: str, artifact_path: str, storage_uri: str, environment: Environment,
           *, batch_size: int, tolerance: Tolerance = Tolerance(),
           output_tolerances: Mapping[str, Tolerance] | None = None,
           observation_path: str | None = None, manifest_sha256: str | None = None) -> CellResult:
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
        manifest_sha256: the manifest digest the training step returned; an
            artifact whose manifest was rewritten since is ``corrupt``.

    Returns:
        The cell's ``CellResult`` (its own columns: verdict, metrics,
        weights_equal, error, detail, fingerprint, node, timings); the run's
        columns are the driver's to fill.
    """
    from . import fingerprint, runtime

    start = time.time()
    cell = CellResult(scenario=scenario.name, format=fmt, environment=environment.name, started_at=start)
    try:
        runtime.configure(environment)
    except runtime.EnvironmentMismatch as exc:
        return _finish(cell, start, _safe_fingerprint(environment), verdict="error", error=str(exc))
    fp = fingerprint.collect(environment.name, jit_compile=environment.jit_compile)
    storage = Storage.open(storage_uri)
    try:
        local, _manifest = storage.get_dir(artifact_path, expected_manifest_sha256=manifest_sha256)
    except CorruptArtifact as exc:
        return _finish(cell, start, fp, verdict="corrupt", error=f"artifact failed verification: {exc}")
    except Exception as exc:  # storage unreachable, permissions...
        return _finish(cell, start, fp, verdict="error",
                       error=f"cannot fetch artifact {storage.uri_of(artifact_path)}: {exc}")
    cell = cell.replace(manifest_sha256=manifest_sha256)  # verified: this is the manifest the cell replays

    try:
        inputs, reference, info = read_reference(local)
        original_vars = {v["name"]: v for v in info["variables"]}
    except Exception as exc:  # verified against its manifest, yet unreadable: written wrong or forged
        return _finish(cell, start, fp, verdict="corrupt",
                       error=f"reference of {storage.name_of(artifact_path)} is unreadable: {runtime.error_text(exc)}")
    try:
        loaded = formats.get(fmt).load(f"{local}/{formats.MODEL_DIR}", activate(scenario), inputs)
        observed = formats.predict(loaded.fn, inputs, batch_size, jit_compile=environment.jit_compile)
        observed_vars = formats.variable_digests(loaded.variables)
    except Exception as exc:
        return _finish(cell, start, fp, verdict="error",
                       error=f"load/predict of format {fmt!r} under TF {fp.get('tf_version')} failed: {runtime.error_text(exc)}")
    del loaded

    cmp = compare_outputs(reference, observed, tolerance, output_tolerances)
    check = compare_digests(original_vars, observed_vars)
    weights_equal, problems = check.equal, check.problems
    verdict = cmp.verdict
    error = cmp.reason if verdict == "mismatch" else None
    if not weights_equal:
        # A restored variable that differs is a broken save, whatever the outputs say.
        verdict = "mismatch"
        error = "; ".join(filter(None, [f"{len(problems)} variable(s) not restored exactly: " + "; ".join(problems[:5]), error]))
    observation_uri = None
    if observation_path:
        storage.write_bytes(observation_path, arrays.to_ipc_bytes(observed, {
            "scenario": scenario.name, "format": fmt, "environment": environment.name, "verdict": verdict}))
        observation_uri = storage.uri_of(observation_path)
    atol, rtol, max_ulp = cmp.applied
    req_atol, req_rtol, req_ulp = cmp.required
    impacts = prediction_impacts(reference, observed, scenario.outputs)
    flips, flip_fraction, rank_change = impact_summary(impacts)
    detail = {"outputs": [{**o.to_dict(), "impact": impacts[o.name].to_dict() if o.name in impacts else None}
                          for o in cmp.outputs], "weight_problems": problems,
              "weight_notes": check.notes, "ignored_state": check.ignored_state,
              "variables_checked": check.checked, "reference_kind": info.get("reference_kind"),
              "batch_size": batch_size}
    return _finish(cell, start, fp, verdict=verdict, error=error, observation_uri=observation_uri,
                   max_abs_diff=_nan_to_none(cmp.max_abs_diff), max_rel_diff=_nan_to_none(cmp.max_rel_diff),
                   max_ulp_diff=_nan_to_none(cmp.max_ulp_diff), mismatch_fraction=_nan_to_none(cmp.mismatch_fraction),
                   prediction_flips=flips, prediction_flip_fraction=flip_fraction, max_rank_change=rank_change,
                   weights_equal=weights_equal, atol=_nan_to_none(atol), rtol=_nan_to_none(rtol),
                   max_ulp=_nan_to_none(max_ulp), required_atol=_nan_to_none(req_atol),
                   required_rtol=_nan_to_none(req_rtol), required_ulp=_nan_to_none(req_ulp), detail=detail)


def read_reference(local: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(probe inputs, reference outputs, reference.json)`` of a verified local artifact directory."""
    ref_arrays, meta = arrays.read_ipc(f"{local}/reference.arrow")
    with open(f"{local}/reference.json") as f:
        info = json.load(f)
    inputs = formats.unflatten_inputs({k: ref_arrays[k] for k in info["inputs"]}, meta["input_layout"])
    return inputs, {k: ref_arrays[k] for k in info["outputs"]}, {**info, "reference_kind": meta.get("reference_kind")}


def _safe_fingerprint(environment: Environment) -> dict[str, Any]:
    from . import fingerprint

    try:
        return fingerprint.collect(environment.name, jit_compile=environment.jit_compile)
    except Exception:
        return {"environment": environment.name, **fingerprint.cpu_info(), **fingerprint.ray_info()}


def _finish(cell: CellResult, start: float, fp: dict[str, Any], **values: Any) -> CellResult:
    return cell.replace(fingerprint=fp, node_id=fp.get("ray_node_id"), node_labels=fp.get("ray_node_labels"),
                        tf_version=fp.get("tf_version"), seconds=time.time() - start, **values)
