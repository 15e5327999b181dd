"""Reload one artifact in one environment and compare it with the reference.

A plain function (no Ray inside): the engine runs it in the environment's
long-lived worker; tests and ``--inline`` call it directly. It never raises
for a problem with the cell: every outcome becomes a verdict.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import arrays, formats
from .compare import (Tolerance, compare_digests, compare_outputs, impact_summary, judge_accuracy, largest_change,
                      metric_changes, prediction_impacts)
from .records import CellResult
from .scenario import Scenario, activate
from .spec import Environment
from .storage import CorruptArtifact, Storage, StorageError


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
    if environment.dtype_policy:
        fp["dtype_policy"] = environment.dtype_policy
    storage = Storage.open(storage_uri)
    try:
        local, _manifest = storage.get_dir(artifact_path, expected_manifest_sha256=manifest_sha256)
    except CorruptArtifact as exc:
        return _finish(cell, start, fp, verdict="corrupt", error=f"artifact failed verification: {exc}")
    except StorageError as exc:  # one sentence, cause first: storage full, access denied, worker cache full...
        return _finish(cell, start, fp, verdict="error", error=str(exc))
    except Exception as exc:  # storage unreachable, permissions...
        return _finish(cell, start, fp, verdict="error",
                       error=f"cannot fetch artifact {storage.uri_of(artifact_path)}: {exc}")
    cell = cell.replace(manifest_sha256=manifest_sha256)  # verified: this is the manifest the cell replays

    try:
        inputs, reference, info = read_reference(local)
        original_vars = {v["name"]: v for v in info["variables"]}
        truth = read_truth(local, info)
    except Exception as exc:  # verified against its manifest, yet unreadable: written wrong or forged
        return _finish(cell, start, fp, verdict="corrupt",
                       error=f"reference of {storage.name_of(artifact_path)} is unreadable: {runtime.error_text(exc)}")
    try:
        loaded = formats.get(fmt).load(f"{local}/{formats.MODEL_DIR}", activate(scenario), inputs)
        loaded = formats.under_policy(fmt, loaded, scenario, environment.dtype_policy)
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
        try:
            storage.write_bytes(observation_path, arrays.to_ipc_bytes(observed, {
                "scenario": scenario.name, "format": fmt, "environment": environment.name, "verdict": verdict}))
            observation_uri = storage.uri_of(observation_path)
        except StorageError as exc:  # the comparison stands (its metrics are kept); the cell says what failed
            error = "; ".join(filter(None, [f"{exc} (the outputs compared {verdict})", error]))
            verdict = "error"
    atol, rtol, max_ulp = cmp.applied
    req_atol, req_rtol, req_ulp = cmp.required
    impacts = prediction_impacts(reference, observed, scenario.outputs)
    flips, flip_fraction, rank_change = impact_summary(impacts)
    accuracy = judge_accuracy(truth.oracle, reference, observed, {o.name: o.atol for o in cmp.outputs},
                              unavailable=truth.unavailable, reason=truth.reason)
    per_output = {o.name: o for o in accuracy.outputs}
    metric = _metric(truth, reference, observed, scenario.outputs)
    detail = {"outputs": [{**o.to_dict(), "impact": impacts[o.name].to_dict() if o.name in impacts else None,
                           "accuracy": per_output[o.name].to_dict() if o.name in per_output else None}
                          for o in cmp.outputs], "weight_problems": problems,
              "weight_notes": check.notes, "ignored_state": check.ignored_state,
              "variables_checked": check.checked, "reference_kind": info.get("reference_kind"),
              "batch_size": batch_size, "accuracy": accuracy.to_dict(), "metric": metric.detail,
              # what repeats of this cell compare (harness.repeats): equal digests, identical bits
              "outputs_sha256": {name: arrays.digest(value) for name, value in observed.items()}}
    return _finish(cell, start, fp, verdict=verdict, error=error, observation_uri=observation_uri,
                   accuracy=accuracy.tier, rmse_vs_fp64=accuracy.rmse, reference_rmse_vs_fp64=accuracy.reference_rmse,
                   accuracy_note=accuracy.note or None, metric=truth.metric, reference_metric=metric.reference,
                   observed_metric=metric.observed, metric_delta=metric.delta,
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


@dataclass(frozen=True)
class Truth:
    """What an artifact records of the true answer: the float64 oracle and the probe labels."""

    oracle: dict[str, np.ndarray] | None = None  # None: no oracle (``reason`` says why)
    unavailable: dict[str, str] = field(default_factory=dict)  # output -> why it has no oracle
    reason: str | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    metric: str | None = None


def read_truth(local: str, info: Mapping[str, Any]) -> Truth:
    """The float64 oracle and the probe labels of a verified local artifact directory (``info``: its reference.json)."""
    recorded = info.get("oracle")
    if not isinstance(recorded, dict):
        return Truth(reason="the artifact was recorded without a float64 oracle (by an older harness: --retrain)")
    oracle = None
    if recorded.get("outputs"):
        values, _ = arrays.read_ipc(f"{local}/oracle.arrow")
        oracle = {k: values[k] for k in recorded["outputs"]}
    elif not recorded.get("reason"):
        oracle = {}  # no floating-point output had one: every output says why
    labels = {}
    if info.get("labels"):
        values, _ = arrays.read_ipc(f"{local}/labels.arrow")
        labels = {k: values[k] for k in info["labels"]}
    return Truth(oracle, dict(recorded.get("unavailable") or {}), recorded.get("reason"), labels, info.get("metric"))


@dataclass(frozen=True)
class _Metric:
    reference: float | None = None
    observed: float | None = None
    delta: float | None = None
    detail: dict[str, Any] | None = None


def _metric(truth: Truth, reference: Mapping[str, Any], observed: Mapping[str, Any],
            kinds: Mapping[str, str]) -> _Metric:
    """The task metric of the output that moved most; ``detail`` has every labelled output."""
    if not truth.metric or not truth.labels:
        return _Metric()
    try:
        changes = metric_changes(truth.metric, truth.labels, reference, observed, kinds)
    except (ValueError, TypeError) as exc:  # checked at training; a hand-edited scenario may still differ
        return _Metric(detail={"metric": truth.metric, "error": str(exc)})
    top = largest_change(changes)
    return _Metric(_nan_to_none(top.reference), _nan_to_none(top.observed), _nan_to_none(top.delta),
                   {"metric": truth.metric, "outputs": [c.to_dict() for c in changes]})


def _safe_fingerprint(environment: Environment) -> dict[str, Any]:
    from . import fingerprint

    try:
        return fingerprint.collect(environment.name, jit_compile=environment.jit_compile)
    except Exception:
        return {"environment": environment.name, **fingerprint.cpu_info(), **fingerprint.ray_info()}


def _finish(cell: CellResult, start: float, fp: dict[str, Any], **values: Any) -> CellResult:
    return cell.replace(fingerprint=fp, node_id=fp.get("ray_node_id"), node_labels=fp.get("ray_node_labels"),
                        tf_version=fp.get("tf_version"), seconds=time.time() - start, **values)
