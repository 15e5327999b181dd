"""Speed and memory benchmarks of the harness, each against a simple baseline.

Run with ``make bench`` (``.venv/bin/python benchmarks/run.py``). Every number
that is checked is a RATIO of two measurements taken side by side in this one
process (ours vs a baseline, interleaved, best of N), never an absolute time,
so the targets hold on a laptop and a loaded 2-core CI box alike. Prints a
table and exits 0 when every target is met, 1 otherwise. See
benchmarks/README.md for what each row measures and why its target is what it is.

Options:
    --only compare,arrays,storage,gc,driver,history,sweep,oracle,cluster   run some groups only
    --repeat N                      rounds per measurement (default 3; more = steadier, slower)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the benchmark modules next to this file
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # the repo, in case harness is not installed in this Python
    sys.path.append(str(HERE.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from tabulate import tabulate  # noqa: E402

import bench_arrays  # noqa: E402
import bench_cluster  # noqa: E402
import bench_compare  # noqa: E402
import bench_driver  # noqa: E402
import bench_oracle  # noqa: E402
import bench_history  # noqa: E402
import bench_gc  # noqa: E402
import bench_storage  # noqa: E402
import bench_sweep  # noqa: E402
from _util import Row, fmt_ratio  # noqa: E402

GROUPS = ("compare", "arrays", "storage", "gc", "driver", "history", "sweep", "oracle", "cluster")


def _subdir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per measurement, best is kept (default 3)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {platform.python_version()}, numpy {np.__version__}, pyarrow {pa.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load:.2f}, best of {args.repeat}+ interleaved rounds")

    started = time.perf_counter()
    rows: list[Row] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as workdir:
        for group in GROUPS:
            if group not in groups:
                continue
            t0 = time.perf_counter()
            try:
                if group == "compare":
                    rows += bench_compare.run(args.repeat)
                elif group == "arrays":
                    rows += bench_arrays.run(args.repeat, _subdir(workdir, "arrays"))
                elif group == "storage":
                    rows += bench_storage.run(args.repeat, _subdir(workdir, "storage"))
                elif group == "gc":
                    rows += bench_gc.run(args.repeat, _subdir(workdir, "gc"))
                elif group == "driver":
                    rows += bench_driver.run()
                elif group == "history":
                    rows += bench_history.run()
                elif group == "sweep":
                    rows += bench_sweep.run(min(args.repeat, 2))  # each round is two whole sweeps
                elif group == "oracle":
                    rows += bench_oracle.run(_subdir(workdir, "oracle"))  # one training per scenario
                elif group == "cluster":
                    rows += bench_cluster.run()  # one round: a rig start and two whole sweeps
            except Exception as exc:  # report the others' numbers anyway, then fail
                traceback.print_exc()
                errors.append(f"{group}: {type(exc).__name__}: {exc}")
            print(f"  {group}: {time.perf_counter() - t0:.1f} s", flush=True)

    table = [(r.name, r.ours, r.baseline, f"{fmt_ratio(r.ratio)}{r.unit}", r.target,
              "-" if r.ok is None else ("yes" if r.ok else "NO")) for r in rows]
    print()
    print(tabulate(table, headers=["benchmark", "ours", "baseline", "ratio", "target", "ok?"]))
    failed = [r for r in rows if r.ok is False]
    print()
    checked = [r for r in rows if r.ok is not None]
    print(f"{len(checked) - len(failed)} of {len(checked)} targets met ({len(rows) - len(checked)} informational rows); "
          f"{time.perf_counter() - started:.0f} s total")
    for r in failed:
        print(f"MISSED: {r.name}: {fmt_ratio(r.ratio)}{r.unit}, target {r.target}")
    for e in errors:
        print(f"ERROR (benchmark did not finish): {e}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
