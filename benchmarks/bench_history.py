"""The nightly history at scale: 30 nights x 10,000 cells, through ``harness.history``.

A history of ``NIGHTS`` runs of a 200 scenarios x 5 formats x 10 environments
sweep is synthesised on local disk in the layout ``harness nightly`` writes
(``date=YYYY-MM-DD/<run_id>.parquet``), with realistic columns: a 60-key
fingerprint per environment, per-cell detail JSON, a few failing cells that
come and go, accuracy tiers against float64 that drop and recover, a streak
of failures that started ten nights ago, and a TensorFlow upgrade on one
environment the last night.

Then, in a fresh process (so its peak memory is its own):

* ``compare_cpu_s``: CPU seconds of :func:`harness.history.compare` (the
  nightly's whole question: previous run, diff, failing streaks, fingerprint
  keys changed since each last good run, and the trends of the last 30 runs)
  for the last night, whose table is in memory as ``harness nightly`` has it.
* ``cell_trend_s``: wall seconds of one cell's trend over every night
  (``harness history URI --cell S/F/E``), opening the history included.
* ``peak_rss_mb``: the measuring process's own peak RSS (``VmHWM``) after those queries.
* ``html_report_s`` / ``html_report_mb``: then, wall seconds and size of the nightly's
  ``report.html`` (the trend window read, every cell's sparkline, at most
  200 required-tolerance charts, What changed), informational.

Prints one JSON line. ``python bench_history.py [--nights N] [--cells N]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

NIGHTS = 30
CELLS = 10_000
FORMATS = ("keras", "h5", "savedmodel", "tf-savedmodel", "weights")
ENVIRONMENTS = 10
FIRST_NIGHT = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)
STREAK = 25  # cells failing since night NIGHTS - 10
UPGRADED = "env-03"  # tf_version changes on the last night
TREND_CELL = ("fake-0000", "keras", "env-00")


def _fingerprint(env: str, tf_version: str = "2.21.0") -> dict:
    """A fingerprint of the size a real worker reports (about 60 keys)."""
    fp = {f"key_{i:02d}": "x" * 16 for i in range(50)}
    fp.update(environment=env, tf_version=tf_version, pid=1000 + len(env), onednn=False,
              cpu_flags=["avx", "avx2", "fma"], env={"TF_CPP_MIN_LOG_LEVEL": "2"}, ray_node_id="n" * 56,
              cpu_model="AMD EPYC 7R13", ray_node_labels={"ray.io/node-id": "n" * 56})
    return fp


def _template(cells: int):
    """One night's results table (night 0), every cell bitwise."""
    from harness import results
    from harness.records import CellResult

    n_scenarios = max(1, cells // (len(FORMATS) * ENVIRONMENTS))
    envs = [f"env-{i:02d}" for i in range(ENVIRONMENTS)]
    fps = {e: _fingerprint(e) for e in envs}
    train = _fingerprint("train")
    rows = []
    for s in range(n_scenarios):
        for f in FORMATS:
            for e in envs:
                output = {"name": "output", "verdict": "bitwise", "shape_ref": [64, 1], "max_ulp_diff": 0.0,
                          "cell": f"fake-{s:04d}/{f}/{e}"}
                rows.append(CellResult(
                    run_id="night-00", sweep="history-bench", scenario=f"fake-{s:04d}", format=f, environment=e,
                    verdict="bitwise", expected="tolerance", passed=True, max_abs_diff=0.0, max_rel_diff=0.0,
                    max_ulp_diff=0.0, mismatch_fraction=0.0, weights_equal=True, save_verdict="bitwise",
                    atol=1e-6, rtol=1e-5, max_ulp=0.0, required_atol=0.0, required_rtol=0.0, required_ulp=0.0,
                    detail={"outputs": [output], "weight_problems": [], "variables_checked": 4},
                    fingerprint=fps[e], train_fingerprint=train, node_id="n" * 56, node_labels={},
                    tf_version="2.21.0", artifact_digest="d" * 20, attempts=1, started_at=FIRST_NIGHT.timestamp(),
                    accuracy="as_accurate", rmse_vs_fp64=1e-8, reference_rmse_vs_fp64=1e-8,
                    seconds=0.1))
    return results.to_table(rows)


def _night(template, night: int, nights: int):
    """Night ``night``'s table: its run id and start, a few failures, drift and the last night's upgrade."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = template.num_rows
    rng = np.random.default_rng(night)
    failing = rng.random(n) < 0.002  # failures that come and go
    failing[:STREAK] = night >= nights - 10  # a known failure: first bad ten nights ago
    ulp = np.where(failing, rng.integers(1, 5000, n), np.where(rng.random(n) < 0.05, rng.integers(1, 8, n), 0))
    verdict = np.where(failing, "mismatch", np.where(ulp > 0, "within_tolerance", "bitwise"))
    less_accurate = rng.random(n) < 0.002  # tier drops that come and go (drawn last: the draws above stay)
    start = FIRST_NIGHT + dt.timedelta(days=night)
    columns = {
        "accuracy": pa.array(np.where(less_accurate, "less_accurate", "as_accurate")),
        "run_id": pa.array([f"night-{night:02d}"] * n),
        "started_at": pa.array([start] * n, pa.timestamp("us", tz="UTC")),
        "verdict": pa.array(verdict), "passed": pa.array(~failing),
        "max_ulp_diff": pa.array(ulp.astype(float)), "required_ulp": pa.array(ulp.astype(float)),
        "required_atol": pa.array(ulp * 1e-8),
    }
    table = template
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    if night == nights - 1:
        old = json.dumps(_fingerprint(UPGRADED), sort_keys=True)
        new = json.dumps(_fingerprint(UPGRADED, "2.22.0"), sort_keys=True)
        fps = pc.if_else(pc.equal(table["fingerprint"], old), new, table["fingerprint"])
        table = table.set_column(table.schema.get_field_index("fingerprint"), "fingerprint", fps)
    return table, int(failing.sum())


def synthesise(uri: str, nights: int, cells: int) -> dict:
    """Write ``nights`` runs of ``cells`` cells into the history at ``uri``; what the last night should show."""
    from harness import history

    import pyarrow.compute as pc

    template = _template(cells)
    failing, tiers = [], []
    for night in range(nights):
        table, n_failing = _night(template, night, nights)
        history.append_run(table, uri)
        failing.append(n_failing)
        tiers = [*tiers[-1:], table["accuracy"]]
    changed = pc.sum(pc.not_equal(*tiers)).as_py() if len(tiers) == 2 else 0
    return {"failing_last_night": failing[-1], "tier_changes_last_night": changed}


def measure(uri: str, nights: int) -> dict:
    """In this process: the nightly comparison of the last night, and one cell's trend."""
    import pyarrow.parquet as pq

    from _util import peak_rss_kb
    from harness import history

    last = f"night-{nights - 1:02d}"
    files = list(Path(uri).glob(f"date=*/{last}.parquet"))
    tonight = pq.read_table(files[0])  # in memory, as `harness nightly` holds its run's table
    rss_before = peak_rss_kb()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    past = history.History.open(uri)
    changes = history.compare(past, tonight)
    compare_cpu, compare_wall = time.process_time() - cpu0, time.perf_counter() - wall0

    wall0 = time.perf_counter()
    points = history.History.open(uri).cell_points(TREND_CELL)
    trend_wall = time.perf_counter() - wall0

    peak_queries = peak_rss_kb()

    from harness import report

    wall0 = time.perf_counter()  # the nightly's HTML report, as `harness nightly` writes it
    recent = past.recent(tonight["sweep"][0].as_py(), history.TREND_RUNS, tonight)
    html = report.render(tonight, "html", history=recent, changes=changes)
    html_wall = time.perf_counter() - wall0

    streaks = [e for e in changes.known_failing if e.get("first_bad", {}).get("run_id") == f"night-{nights - 10:02d}"]
    upgraded = [c for c in changes.fingerprint_changes if c["environment"] == UPGRADED]
    return {"compare_cpu_s": round(compare_cpu, 3), "compare_wall_s": round(compare_wall, 3),
            "cell_trend_s": round(trend_wall, 3), "peak_rss_mb": round(peak_queries / 1024, 1),
            "html_report_s": round(html_wall, 1), "html_report_mb": round(len(html.encode()) / 2**20, 1),
            "html_trend_charts": html.count('class="trend"') - 1,  # the cells per night chart is one of them
            "rss_before_mb": round(rss_before / 1024, 1), "trend_points": len(points),
            "counts": changes.counts, "streaks_found": len(streaks), "upgrade_found": bool(upgraded),
            "tier_changes": len(changes.accuracy_changes),
            "nights_in_trend": len(changes.nights), "skipped_files": len(changes.skipped_files)}


def run_once(nights: int = NIGHTS, cells: int = CELLS) -> dict:
    """Synthesise a history in a temporary directory, measure it in a fresh subprocess; the JSON line's dict."""
    with tempfile.TemporaryDirectory(prefix="harness-bench-history-") as tmp:
        uri = os.path.join(tmp, "history")
        t0 = time.perf_counter()
        expected = synthesise(uri, nights, cells)
        made = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(uri).rglob("*.parquet"))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", uri,
                               "--nights", str(nights)], capture_output=True, text=True, cwd=REPO, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"history benchmark measurement failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(lines[-1])
    if measured["streaks_found"] != STREAK or not measured["upgrade_found"] or measured["skipped_files"]:
        raise AssertionError(f"the comparison missed what was synthesised: {measured}")
    if measured["counts"]["new"] + measured["counts"]["known"] != expected["failing_last_night"]:
        raise AssertionError(f"{expected['failing_last_night']} cells fail the last night; compare found {measured}")
    if measured["tier_changes"] != expected["tier_changes_last_night"]:
        raise AssertionError(f"{expected['tier_changes_last_night']} cells change accuracy tier the last night; "
                             f"compare found {measured}")
    return {"nights": nights, "cells_per_night": cells, **measured, "history_mb": round(size / 2**20, 1),
            "synthesise_s": round(made, 1)}


def run(repeat: int = 1) -> list:
    """The rows of ``benchmarks/run.py``: budgets from the issue (compare <= 5 CPU s, one cell's trend <= 1 s)."""
    from _util import Row

    m = run_once()
    print(f"    {json.dumps(m)}", flush=True)
    return [
        Row(f"history compare, {m['nights']} nights x {m['cells_per_night']:,} cells (CPU)",
            f"{m['compare_cpu_s']:.2f} s", "5 s budget", m["compare_cpu_s"] / 5.0, 1.0),
        Row(f"history one cell's {m['nights']}-night trend (wall)", f"{m['cell_trend_s']:.2f} s", "1 s budget",
            m["cell_trend_s"] / 1.0, 1.0),
        Row("history peak RSS: after the queries vs before them", f"{m['peak_rss_mb']:.0f} MB",
            f"{m['rss_before_mb']:.0f} MB", m["peak_rss_mb"] / m["rss_before_mb"]),
        Row(f"nightly report.html, {m['nights']} nights x {m['cells_per_night']:,} cells (wall / size)",
            f"{m['html_report_s']:.1f} s", f"{m['html_report_mb']:.0f} MB",
            m["html_report_mb"] * 1000 / m["cells_per_night"], unit=" MB per 1k cells"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=NIGHTS)
    parser.add_argument("--cells", type=int, default=CELLS)
    parser.add_argument("--measure", metavar="URI", help=argparse.SUPPRESS)  # the fresh measuring process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.nights)))
    else:
        print(json.dumps(run_once(args.nights, args.cells)))
