"""The sweep driver at scale: a 10,000-cell sweep whose workers do no TensorFlow work.

The real driver (``harness.sweep.run_sweep`` -> engine + scheduler -> collector -> journal
-> results.parquet) runs on an embedded local Ray; only the actor body is
replaced by ``FakeWorker``, which answers every job at once with a result of
realistic size (a full fingerprint, per-output detail). So what is measured is
the driver: scheduling, Ray round trips, completing and journaling results,
and writing the final table.

Each size runs in a fresh subprocess (``python bench_driver.py --cells N``) so
its peak memory is its own. Prints one JSON line per size.
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
if str(REPO) not in sys.path:  # the repo, in case harness is not installed in this Python
    sys.path.append(str(REPO))

FORMATS = ["keras", "h5", "savedmodel", "tf-savedmodel", "weights"]
ENVIRONMENTS = 10


def _fingerprint(env: str) -> dict:
    """A fingerprint of the size a real worker reports (about 60 keys)."""
    fp = {f"key_{i:02d}": "x" * 16 for i in range(50)}
    fp.update(environment=env, tf_version="2.21.0", pid=os.getpid(), onednn=False, cpu_flags=["avx", "avx2", "fma"],
              env={"TF_CPP_MIN_LOG_LEVEL": "2"}, ray_node_id="n" * 56, ray_node_labels={"ray.io/node-id": "n" * 56})
    return fp


from _util import peak_rss_kb  # noqa: E402
from harness.worker import Worker  # noqa: E402


class FakeWorker(Worker):
    """``harness.worker.Worker`` whose jobs answer instantly, without TensorFlow."""

    def __init__(self, environments, scenarios, storage_uri):
        super().__init__(environments, scenarios, storage_uri)
        self.fp = _fingerprint(self.environment.name)

    def warm(self) -> dict:
        return {"pid": os.getpid(), "node_id": None, "seconds": 0.0}

    def train(self, job):
        from harness.records import ArtifactRecord, TrainRecord

        arts = {f: ArtifactRecord(scenario=job.scenario, format=f, digest="d" * 20, path=f"artifacts/{job.scenario}/{f}",
                                  uri=f"/store/artifacts/{job.scenario}/{f}", manifest_sha256="m" * 64,
                                  save_verdict="bitwise", save_max_abs_diff=0.0, save_max_ulp_diff=0.0)
                for f in job.formats}
        return TrainRecord(scenario=job.scenario, fingerprint=self.fp, artifacts=arts, seconds=0.0)

    def replay(self, job):
        from harness.records import CellResult

        output = {"name": "output", "verdict": "bitwise", "shape_ref": [64, 1], "shape_obs": [64, 1],
                  "dtype_ref": "float32", "dtype_obs": "float32", "max_abs_diff": 0.0, "max_ulp_diff": 0.0}
        return CellResult(scenario=job.scenario, format=job.format, environment=job.environment, verdict="bitwise",
                          max_abs_diff=0.0, max_rel_diff=0.0, max_ulp_diff=0.0, mismatch_fraction=0.0,
                          weights_equal=True, atol=1e-6, rtol=1e-5, max_ulp=0.0, required_atol=0.0,
                          required_rtol=0.0, required_ulp=0.0,
                          detail={"outputs": [output], "weight_problems": [], "variables_checked": 4},
                          fingerprint=self.fp, node_id=self.fp["ray_node_id"], node_labels={}, tf_version="2.21.0",
                          observation_uri=f"/store/{job.observation_path}", started_at=time.time(), seconds=0.0)


def measure(cells: int) -> dict:
    """Run a fake sweep of ``cells`` cells in this process; driver CPU, wall time, peak RSS."""
    from harness.scenario import Scenario
    from harness.spec import parse_sweep
    from harness.sweep import run_sweep

    n_scenarios = max(1, cells // (len(FORMATS) * ENVIRONMENTS))
    names = [f"fake-{i:04d}" for i in range(n_scenarios)]
    scenarios = {n: Scenario(name=n, probe=lambda rng: None, train=lambda seed: None) for n in names}
    with tempfile.TemporaryDirectory(prefix="harness-bench-driver-") as tmp:
        sweep = parse_sweep({
            "name": "driver-bench", "scenarios": names, "formats": FORMATS, "storage": f"{tmp}/store",
            # Each with an import-time variable of its own: ten worker processes, as with real knobs.
            "environments": {f"env-{i:02d}": {"num_cpus": 0.25, "env": {"BENCH_ENV": str(i)}}
                             for i in range(ENVIRONMENTS)},
            "training": {"num_cpus": 0.25},
        }, source="driver-bench.yaml")
        total = len(names) * len(FORMATS) * ENVIRONMENTS
        rss0 = peak_rss_kb()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        res = run_sweep(sweep, scenarios, out_dir=f"{tmp}/run", worker_cls=FakeWorker)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        rss = peak_rss_kb()
        assert res.table.num_rows == total and res.passed, (res.table.num_rows, total)
    return {"cells": total, "driver_cpu_s": cpu, "wall_s": wall, "peak_rss_mb": rss / 1024,
            "rss_growth_mb": (rss - rss0) / 1024}


def run_sizes(sizes=(1000, 10000)) -> list[dict]:
    """Each size in its own subprocess; returns their measurements."""
    out = []
    for n in sizes:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cells", str(n)],
                              capture_output=True, text=True, cwd=REPO, timeout=900,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_DEDUP_LOGS": "0"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"driver benchmark with {n} cells failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(lines[-1]))
    return out


def run(repeat: int = 1) -> list:
    from _util import Row

    small, big = run_sizes()
    per_small = small["driver_cpu_s"] / small["cells"] * 1e6
    per_big = big["driver_cpu_s"] / big["cells"] * 1e6
    return [
        Row("driver CPU, 10,000 fake cells", f"{big['driver_cpu_s']:.2f} s", "5 s budget", big["driver_cpu_s"] / 5.0,
            1.0),
        Row("driver wall, 10,000 fake cells", f"{big['wall_s']:.1f} s", "60 s budget", big["wall_s"] / 60.0, 1.0),
        Row("driver CPU per cell, 10k vs 1k cells (O(1) per cell)", f"{per_big:.0f} us", f"{per_small:.0f} us",
            per_big / per_small, 1.5),
        Row("driver peak RSS, 10k vs 1k cells", f"{big['peak_rss_mb']:.0f} MB", f"{small['peak_rss_mb']:.0f} MB",
            big["peak_rss_mb"] / small["peak_rss_mb"], 2.0),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cells":
        print(json.dumps(measure(int(sys.argv[2]))))
    else:
        for m in run_sizes():
            print(json.dumps(m))
