"""The quick-start sweep through ``harness run --retrain`` vs the for-loop a user would write.

The baseline (``plain_sweep.py``, run as a script) does the same work with
plain TensorFlow and numpy, sequentially: train each scenario once in one
process, save it in every format, record the in-memory outputs and the
reload in the training process (the harness's two references), then one
fresh Python process per environment (its knobs set as environment variables
before TensorFlow is imported) that reloads every artifact, predicts and
compares with numpy. Both run here, interleaved, best of N.

Also counted: how many processes imported TensorFlow in the harness's run
(target: one per environment, plus one for training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SWEEP = REPO / "scenarios" / "sweeps" / "quickstart.yaml"


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    return env


def run_harness(work: Path) -> tuple[float, int, int]:
    """``harness run --retrain``: (wall seconds, TensorFlow imports, environments)."""
    out, store = work / "harness-run", work / "harness-store"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(SWEEP), "--retrain", "--out", str(out), "--storage", str(store)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"harness run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "results.parquet").to_pylist()
    pids = {json.loads(r["fingerprint"])["pid"] for r in rows if r["fingerprint"]}
    pids |= {json.loads(r["train_fingerprint"])["pid"] for r in rows if r["train_fingerprint"]}
    return wall, len(pids), len({r["environment"] for r in rows})


def run_plain(work: Path) -> float:
    """The sequential script: wall seconds."""
    cmd = [sys.executable, str(HERE / "plain_sweep.py"), str(SWEEP), str(work / "plain")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"plain sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run(repeat: int = 2) -> list:
    from _util import Row

    best_h = best_p = float("inf")
    imports = envs = 0
    with tempfile.TemporaryDirectory(prefix="harness-bench-sweep-") as tmp:
        for i in range(max(1, repeat)):
            work = Path(tmp) / f"round-{i}"
            work.mkdir()
            best_p = min(best_p, run_plain(work))
            wall, imports, envs = run_harness(work)
            best_h = min(best_h, wall)
    return [
        Row("quick-start sweep: harness run --retrain vs plain script", f"{best_h:.1f} s", f"{best_p:.1f} s",
            best_h / best_p, 0.7),
        Row("TensorFlow imports in the harness run (environments + 1)", str(imports), str(envs + 1),
            imports / (envs + 1), 1.0),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for row in run(1):
        print(row)
