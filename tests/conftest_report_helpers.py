"""Hand-made results rows for the report and history tests.

Shared by tests/test_report.py and tests/test_history.py (both build tables
with realistic fingerprints); not a conftest, so it only acts when imported.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pyarrow as pa

from harness import results

NIGHT_ONE = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.timezone.utc)

_CPU_FLAGS = ["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"]

_FINGERPRINTS: dict[str, dict[str, Any]] = {
    "train": {"tf_version": "2.21.0", "cpu_model": "Intel(R) Xeon(R) Platinum 8375C", "gpus": [],
              "onednn": True, "hostname": "train-0", "pid": 101},
    "cpu-avx512": {"tf_version": "2.21.0", "cpu_model": "Intel(R) Xeon(R) Platinum 8375C", "gpus": [],
                   "onednn": True, "hostname": "cpu-1", "pid": 202},
    "cpu-amd": {"tf_version": "2.21.0", "cpu_model": "AMD EPYC 7R13", "gpus": [], "onednn": False,
                "cpu_flags": _CPU_FLAGS[:9], "hostname": "cpu-2", "pid": 303},
    "gpu-a100": {"tf_version": "2.21.0", "cpu_model": "AMD EPYC 7R13", "cuda_version": "12.5",
                 "cudnn_version": "9", "gpu_driver": "550.54",
                 "gpus": [{"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0", "memory": 40960}],
                 "tf32": True, "hostname": "gpu-1", "pid": 404},
}


def fingerprint(environment: str, **changes: Any) -> dict[str, Any]:
    """A realistic fingerprint of ``environment`` (or ``train``), with ``changes`` applied."""
    base = copy.deepcopy(_FINGERPRINTS.get(environment, _FINGERPRINTS["cpu-avx512"]))
    base.setdefault("cpu_flags", list(_CPU_FLAGS))
    base.update({"keras_version": "3.12.0", "python": "3.11.7", "numpy": "2.1.3", "platform": "Linux-6.1-x86_64",
                 "intra_op_threads": 8, "inter_op_threads": 2, "op_determinism": True, "jit_compile": False,
                 "environment": environment, "ray_node_id": f"node-{environment}",
                 "ray_node_labels": {"ray.io/node-type": environment}})
    base.update(changes)
    return base


_METRICS = {
    "bitwise": dict(max_abs_diff=0.0, max_rel_diff=0.0, max_ulp_diff=0.0, mismatch_fraction=0.0, weights_equal=True),
    "within_tolerance": dict(max_abs_diff=1.2e-6, max_rel_diff=3.1e-7, max_ulp_diff=14.0, mismatch_fraction=0.25,
                             weights_equal=True, required_atol=1.2e-6, required_rtol=3.1e-7, required_ulp=14.0),
    "mismatch": dict(max_abs_diff=3.4e-2, max_rel_diff=8.8e-3, max_ulp_diff=2100.0, mismatch_fraction=0.9,
                     weights_equal=True, required_atol=3.4e-2, required_rtol=8.8e-3, required_ulp=2100.0),
}
_ERRORS = {
    "error": "ValueError: Unknown layer: 'CustomDense'.\nPlease ensure custom objects are registered.",
    "corrupt": "CorruptArtifact: model.keras: sha256 3f2a... != manifest 9b1c...",
    "unschedulable": "no node satisfies {'GPU': 1, 'accelerator_type:H100': 0.001} within 600 s",
}


def make_row(verdict: str = "bitwise", scenario: str = "mlp", format: str = "keras",
             environment: str = "cpu-avx512", *, expected: str = "tolerance", run_id: str = "run-1",
             started_at: dt.datetime = NIGHT_ONE, **overrides: Any) -> dict[str, Any]:
    """One results row of ``verdict`` with metrics, tolerances and fingerprints that fit it.

    ``passed`` follows ``results.meets(verdict, expected)`` unless overridden.
    """
    row = dict(run_id=run_id, sweep="nightly", scenario=scenario, format=format, environment=environment,
               verdict=verdict, expected=expected, passed=results.meets(verdict, expected),
               save_verdict="bitwise", save_max_abs_diff=0.0, save_max_ulp_diff=0.0,
               atol=1e-5, rtol=1e-6, max_ulp=16.0, error=_ERRORS.get(verdict),
               detail={"outputs": {"dense_1": _METRICS.get(verdict, {})}},
               fingerprint=fingerprint(environment), train_fingerprint=fingerprint("train"),
               node_id=f"node-{environment}", node_labels={"ray.io/node-type": environment},
               tf_version="2.21.0", artifact_digest="sha256-abc123", attempts=1,
               started_at=started_at, seconds=2.5)
    row.update(_METRICS.get(verdict, {}))
    row.update(overrides)
    return row


#: One cell per verdict kind, plus a bitwise expectation missed within tolerance.
VERDICT_CELLS = [
    ("bitwise", "mlp", "keras", "cpu-avx512", "bitwise"),
    ("within_tolerance", "mlp", "keras", "cpu-amd", "tolerance"),
    ("within_tolerance", "mlp", "h5", "cpu-amd", "bitwise"),  # missed bitwise: a failure
    ("mismatch", "mlp", "keras", "gpu-a100", "tolerance"),
    ("error", "cnn", "savedmodel", "cpu-avx512", "tolerance"),
    ("corrupt", "cnn", "savedmodel", "cpu-amd", "any"),
    ("unschedulable", "cnn", "savedmodel", "gpu-a100", "any"),
    ("bitwise", "mlp", "h5", "cpu-avx512", "bitwise"),
]


def verdict_rows(**overrides: Any) -> list[dict[str, Any]]:
    """The rows of :data:`VERDICT_CELLS`."""
    return [make_row(v, s, f, e, expected=x, **overrides) for v, s, f, e, x in VERDICT_CELLS]


def verdict_table(**overrides: Any) -> pa.Table:
    """A results table with every verdict kind (see :data:`VERDICT_CELLS`)."""
    return results.to_table(verdict_rows(**overrides))
