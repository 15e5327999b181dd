"""The quick-start sweep on the multi-host rig vs the embedded local Ray: where a cluster's time goes.

``make bench`` runs it (group ``cluster``) where the rig can start (root, Linux
network namespaces: see tests/multihost/rig.py); elsewhere it prints one skip
line. It runs ``scenarios/sweeps/quickstart.yaml --retrain`` twice:

* embedded: ``harness run`` on this machine's embedded Ray, local storage
  (the same run as ``bench_sweep.run_harness``);
* rig: ``harness run --address auto`` on the rig's head host, three 1-CPU worker
  hosts that share no disk, storage on the rig's S3 server behind a
  byte-counting proxy.

and prints one JSON line::

    {"bench": "cluster", "cells": 72, "embedded_wall_s": ..., "rig_wall_s": ..., "rig_start_s": ...,
     "actor_start_s": {"train": ..., ...},     # mean, per host: actor submitted -> TensorFlow imported
     "actors": {"train": 3, ...},               # actors each host ran
     "artifact_fetch_s": ..., "artifact_bytes": ...,   # one artifact directory through S3, mean
     "s3_bytes_written_per_cell": ..., "s3_bytes_read_per_cell": ...,
     "s3_requests_per_cell": ..., "s3_connections_per_cell": ..., "s3_connections": ...}

Actor start is read from Ray's task events (the dashboard's state API): from
the submission of each actor's creation task to the end of its ``warm`` call
(worker process start, runtime_env, harness code from ``py_modules``, TensorFlow
import). Artifact transfer is measured after the run, from this machine through
the same proxy: each artifact directory the run wrote, downloaded and verified
once (``Storage.get_dir``). Bytes count everything on the wire to and from S3
(HTTP headers included) during the run, divided by the number of cells;
requests count S3 calls, connections the TCP connections clients opened (the
proxy keeps them alive as S3 does, so a process that reuses its connection
pool opens few, one that builds a new S3 client per call opens one per call).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QUICKSTART = REPO / "scenarios" / "sweeps" / "quickstart.yaml"
for path in (HERE, REPO / "tests" / "multihost"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RUN_TIMEOUT_S = 1800


def _bench_hosts():
    """Three plain 1-CPU hosts (no node-level knobs: every environment means what it says on any of them)."""
    from rig import HostSpec

    return (HostSpec("train", labels={"node-role": "train"}), HostSpec("replay-a", labels={"node-role": "replay"}),
            HostSpec("replay-b", labels={"node-role": "replay"}))


def _tasks(dashboard: str, name: str) -> list[dict]:
    url = (f"{dashboard}/api/v0/tasks?limit=10000&detail=true&filter_keys=name&filter_predicates=%3D"
           f"&filter_values={urllib.request.quote(name)}")
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())["data"]["result"]["result"]


def actor_starts(rig) -> tuple[dict[str, float], dict[str, int]]:
    """Mean seconds from actor submission to TensorFlow imported, and actor count, per host."""
    created = {t["actor_id"]: t["creation_time_ms"] for t in _tasks(rig.dashboard_url, "Worker.__init__")
               if t.get("actor_id") and t.get("creation_time_ms")}
    per_host = defaultdict(list)
    for t in _tasks(rig.dashboard_url, "Worker.warm"):
        start, end = created.get(t.get("actor_id")), t.get("end_time_ms")
        host = rig.host_of_node(t.get("node_id") or "")
        if start and end and host:
            per_host[host].append((end - start) / 1000)
    return ({h: round(statistics.mean(v), 2) for h, v in sorted(per_host.items())},
            {h: len(v) for h, v in sorted(per_host.items())})


def artifact_fetch(storage_uri: str) -> tuple[float, float]:
    """Mean seconds and bytes to download and verify one artifact directory from ``storage_uri``."""
    from harness.storage import Storage

    store = Storage.open(storage_uri)
    dirs = [f.rsplit("/", 1)[0] for f in store.walk_files("artifacts") if f.endswith("/manifest.json")]
    times, sizes = [], []
    with tempfile.TemporaryDirectory(prefix="harness-bench-fetch-") as cache:
        for rel in dirs:
            start = time.perf_counter()
            local, manifest = store.get_dir(rel, cache_root=cache)
            times.append(time.perf_counter() - start)
            sizes.append(sum(f["size"] for f in manifest["files"].values()))
    return statistics.mean(times), statistics.mean(sizes)


def measure() -> dict:
    """Both runs and the rig's breakdown (see the module docstring)."""
    import os

    import bench_sweep
    from drive import published, run_id_of
    from rig import DUMMY_AWS, Rig

    os.environ.update(DUMMY_AWS)  # this process reads from the rig's S3 (moto refuses unsigned requests)

    with tempfile.TemporaryDirectory(prefix="harness-bench-cluster-") as tmp:
        embedded_wall, _, _ = bench_sweep.run_harness(Path(tmp))
    start = time.perf_counter()
    with Rig(_bench_hosts(), s3_proxy=True, log=None) as rig:
        rig_start = time.perf_counter() - start
        before = rig.s3_bytes()
        start = time.perf_counter()
        proc = rig.run("head", ["harness", "run", str(QUICKSTART), "--retrain", "--address", "auto",
                                "--storage", rig.storage_uri("bench"), "--out", "/tmp/home/bench"],
                       timeout=RUN_TIMEOUT_S)
        rig_wall = time.perf_counter() - start
        after = rig.s3_bytes()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"harness run on the rig failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        cells = published(rig, run_id_of(proc.stdout), "bench").num_rows
        starts, actors = actor_starts(rig)
        fetch_s, fetch_bytes = artifact_fetch(rig.storage_uri("bench"))
    return {"bench": "cluster", "cells": cells, "embedded_wall_s": round(embedded_wall, 1),
            "rig_wall_s": round(rig_wall, 1), "rig_start_s": round(rig_start, 1), "actor_start_s": starts,
            "actors": actors, "artifact_fetch_s": round(fetch_s, 3), "artifact_bytes": round(fetch_bytes),
            "s3_bytes_written_per_cell": round((after["to_s3"] - before["to_s3"]) / cells),
            "s3_bytes_read_per_cell": round((after["from_s3"] - before["from_s3"]) / cells),
            "s3_requests_per_cell": round((after["requests"] - before["requests"]) / cells, 1),
            "s3_connections_per_cell": round((after["connections"] - before["connections"]) / cells, 2),
            "s3_connections": after["connections"] - before["connections"]}


def run(repeat: int = 1) -> list:
    """The JSON line, printed, and one informational row for ``benchmarks/run.py``'s table."""
    from _util import Row
    from rig import unavailable

    reason = unavailable()
    if reason:
        print(f"  cluster: skipped: {reason}", flush=True)
        return []
    result = measure()
    print(json.dumps(result), flush=True)
    return [Row("quick-start sweep: 3-host rig (S3) vs embedded Ray (info)", f"{result['rig_wall_s']:.1f} s",
                f"{result['embedded_wall_s']:.1f} s", result["rig_wall_s"] / result["embedded_wall_s"])]


if __name__ == "__main__":
    for row in run():
        print(row)
