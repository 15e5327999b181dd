"""``harness gc`` on a synthetic store of 1,000 runs x 50 cells: time and peak memory.

The store is local and real: every run has its ``results.parquet`` (50 cells,
each naming its artifact version as a run does) and 50 observation files; 25
scenarios x 2 formats have 3 versions each (two retrains), the older runs
naming the older versions. ``--keep-runs 100`` then removes 900 runs and the
versions only they used. Timed: a dry run (the decisions: listing, reading
the kept runs' results, judging every version; best of ``repeat``) and the
real pass (decisions + removals, once), each next to the least any gc does
(``os.walk`` + ``stat`` of the whole store). Memory: peak bytes of a dry run
(tracemalloc + the Arrow pool, see ``_util.peak_extra_bytes``).

Prints one JSON line; ``run.py`` shows the figures as informational rows (the
lead records them on a quiet machine in benchmarks/README.md).

    .venv/bin/python benchmarks/bench_gc.py [--runs 1000] [--cells 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

from _util import Row, fmt_bytes, fmt_time, peak_extra_bytes  # noqa: E402
from harness import results  # noqa: E402
from harness.records import CellResult  # noqa: E402
from harness.retention import collect  # noqa: E402
from harness.storage import MANIFEST, POINTER, new_version  # noqa: E402

RUNS, CELLS, KEEP = 1000, 50, 100
SCENARIOS, FORMATS, VERSIONS = 25, 2, 3
DAY = 86400.0


def make_store(root: str, runs: int = RUNS, cells: int = CELLS, now: float | None = None) -> dict[str, int]:
    """Write the synthetic store under ``root``; returns its size (files, bytes)."""
    now = time.time() if now is None else now
    files = size = 0

    def put(rel: str, data: bytes) -> None:
        nonlocal files, size
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        files, size = files + 1, size + len(data)

    versions: dict[tuple[int, int], list[str]] = {}
    for s in range(SCENARIOS):
        for f in range(FORMATS):
            digest = f"artifacts/scenario-{s}/{s:04d}{f:04d}{'0' * 12}"
            made = [new_version(now - (VERSIONS - v) * 30 * DAY) for v in range(VERSIONS)]
            for v in made:
                put(f"{digest}/{v}/model/model.keras", b"k" * 4096)
                put(f"{digest}/{v}/reference.arrow", b"r" * 2048)
                put(f"{digest}/{v}/reference.json", b"{}")
                put(f"{digest}/{v}/{MANIFEST}", b'{"files": {}}')
            put(f"{digest}/{POINTER}", json.dumps({"version": made[-1], "published_at": now - 30 * DAY}).encode())
            versions[s, f] = [f"{digest}/{v}" for v in made]
    observation = b"o" * 512
    for r in range(runs):
        at = now - (runs - r) * 3600.0  # one an hour, the newest an hour ago
        rid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at)) + f"-{r:06x}"
        era = min(VERSIONS - 1, r * VERSIONS // runs)  # older runs used older versions
        rows = []
        for c in range(cells):
            s, f = c % SCENARIOS, (c // SCENARIOS) % FORMATS
            rows.append(CellResult(run_id=rid, sweep="bench", scenario=f"scenario-{s}", format=f"f{f}",
                                   environment=f"env-{c}", verdict="bitwise",
                                   artifact_uri=f"{root}/{versions[s, f][era]}",
                                   observation_uri=f"{root}/runs/{rid}/observations/scenario-{s}/f{f}/env-{c}.arrow"))
            put(f"runs/{rid}/observations/scenario-{s}/f{f}/env-{c}.arrow", observation)
        put(f"runs/{rid}/results.parquet", results.to_parquet_bytes(results.to_table(rows)))
    return {"files": files, "bytes": size}


def measure(workdir: str, repeat: int = 2, runs: int = RUNS, cells: int = CELLS) -> dict:
    root = os.path.join(workdir, "gc-store")
    now = time.time()
    t0 = time.perf_counter()
    made = make_store(root, runs, cells, now)
    setup = time.perf_counter() - t0
    dry = walk = float("inf")
    for _ in range(repeat):  # interleaved with the baseline: the least any gc does, listing the store
        t0 = time.perf_counter()
        plan = collect(root, keep_runs=KEEP, dry_run=True, now=now)
        dry = min(dry, time.perf_counter() - t0)
        t0 = time.perf_counter()
        listed = sum(os.stat(os.path.join(d, n)).st_size >= 0 for d, _, names in os.walk(root) for n in names)
        walk = min(walk, time.perf_counter() - t0)
    assert listed == made["files"]
    peak, _ = peak_extra_bytes(lambda: collect(root, keep_runs=KEEP, dry_run=True, now=now))
    t0 = time.perf_counter()
    done = collect(root, keep_runs=KEEP, now=now)
    real = time.perf_counter() - t0
    assert [(r.kind, r.path) for r in done.removed] == [(r.kind, r.path) for r in plan.removed]
    assert len(done.of("run")) == runs - KEEP and done.kept_runs == KEEP, done.text()
    return {"bench": "gc", "runs": runs, "cells_per_run": cells, "store_files": made["files"],
            "store_bytes": made["bytes"], "setup_s": round(setup, 2), "walk_s": round(walk, 3),
            "dry_run_s": round(dry, 3),
            "gc_s": round(real, 3), "peak_bytes": peak, "removed_runs": len(done.of("run")),
            "removed_versions": len(done.of("artifact")), "freed_bytes": done.freed}


def run(repeat: int, workdir: str) -> list[Row]:
    """Informational rows for ``run.py`` (and the JSON line on stdout)."""
    figures = measure(workdir, repeat=min(repeat, 2))
    print(json.dumps(figures), flush=True)
    store = f"{figures['runs']} runs x {figures['cells_per_run']} cells"
    walk, files = figures["walk_s"], figures["store_files"]
    return [Row(f"gc --keep-runs {KEEP} --dry-run, {store}, vs os.walk+stat", fmt_time(figures["dry_run_s"]),
                fmt_time(walk), figures["dry_run_s"] / walk),
            Row(f"gc --keep-runs {KEEP} (removes {figures['removed_runs']} runs, {figures['removed_versions']} "
                "versions) vs os.walk+stat", fmt_time(figures["gc_s"]), fmt_time(walk), figures["gc_s"] / walk),
            Row(f"gc --dry-run peak memory per stored file ({files} files)", fmt_bytes(figures["peak_bytes"]),
                f"{files} files", figures["peak_bytes"] / files, unit=" B/file")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--cells", type=int, default=CELLS)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="harness-bench-gc-") as workdir:
        print(json.dumps(measure(workdir, args.repeat, args.runs, args.cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
