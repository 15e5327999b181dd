"""Tests of harness.history: the run history on local disk and on S3 (moto), and run diffs."""

from __future__ import annotations

import datetime as dt
import itertools
import os

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from conftest_report_helpers import NIGHT_ONE, fingerprint, make_row
from harness import history, report, results
from harness.storage import StorageError

NIGHT_TWO = NIGHT_ONE + dt.timedelta(days=1)
ENVIRONMENTS = ("cpu-avx512", "cpu-amd", "gpu-a100")
BROKEN = ("mlp", "keras", "cpu-amd")     # bitwise -> mismatch from night two on: fails
FIXED = ("cnn", "h5", "cpu-avx512")      # error -> bitwise, passes
NOISIER = ("cnn", "keras", "gpu-a100")   # mismatch (expected any), ULP x10
UPGRADED = "gpu-a100"                    # tf_version 2.21.0 -> 2.22.0 on night two
NEW3 = ("cnn", "h5", "cpu-amd")          # fails on night three only
MOVED = "cpu-amd"                        # cpu_model changes on night three


def night_rows(night: int, environments=ENVIRONMENTS) -> list[dict]:
    """Every scenario x format x environment cell of one night (1, 2 or 3), one day apart."""
    run_id, start = f"run-{night}", NIGHT_ONE + dt.timedelta(days=night - 1)
    rows = []
    for key in itertools.product(("mlp", "cnn"), ("keras", "h5"), environments):
        verdict, expected, extra = "bitwise", "tolerance", {}
        if key == BROKEN and night >= 2 or key == NEW3 and night == 3:
            verdict = "mismatch"
        if key == FIXED and night == 1:
            verdict = "error"
        if key == NOISIER:
            verdict, expected = "mismatch", "any"
            extra["max_ulp_diff"] = extra["required_ulp"] = 2100.0 * (10 if night >= 2 else 1)
        env = key[2]
        changes = {"pid": 1000 * night, "hostname": f"{env}-{night}"}  # volatile: never reported
        if env == UPGRADED and night >= 2:
            changes["tf_version"] = "2.22.0"
        if env == MOVED and night == 3:
            changes["cpu_model"] = "AMD EPYC 9R14"
        rows.append(make_row(verdict, *key, expected=expected, run_id=run_id, started_at=start,
                             fingerprint=fingerprint(env, **changes), **extra))
    return rows


def night(n: int, **kw) -> pa.Table:
    return results.to_table(night_rows(n, **kw))


def cell_keys(entries) -> list[tuple[str, str, str]]:
    return [(e["scenario"], e["format"], e["environment"]) for e in entries]


@pytest.fixture
def local_history(tmp_path):
    uri = str(tmp_path / "history")
    history.append_run(night(1), uri)
    history.append_run(night(2), uri)
    return uri


# -- storage layout ------------------------------------------------------------------
def test_append_run_partitions_by_utc_date(tmp_path):
    uri = str(tmp_path / "history")
    assert history.append_run(night(1), uri) == "date=2025-03-01/run-1.parquet"
    assert history.append_run(night(2), uri) == "date=2025-03-02/run-2.parquet"
    files = sorted(p.relative_to(tmp_path / "history").as_posix() for p in (tmp_path / "history").rglob("*") if p.is_file())
    assert files == ["date=2025-03-01/run-1.parquet", "date=2025-03-02/run-2.parquet"]


def test_append_run_is_idempotent(local_history):
    # Re-append run 1, with a later start this time: it replaces its own file, it does not move or duplicate.
    later = [{**r, "started_at": NIGHT_TWO + dt.timedelta(days=5)} for r in night_rows(1)]
    assert history.append_run(results.to_table(later), local_history) == "date=2025-03-01/run-1.parquet"
    loaded = history.load_history(local_history)
    assert loaded.num_rows == 2 * 12
    assert sorted(set(loaded["run_id"].to_pylist())) == ["run-1", "run-2"]


def test_append_run_without_start_uses_today(tmp_path):
    rows = [{**r, "started_at": None} for r in night_rows(1)]
    before = dt.datetime.now(dt.timezone.utc).date()
    rel = history.append_run(results.to_table(rows), str(tmp_path))
    after = dt.datetime.now(dt.timezone.utc).date()  # the call may straddle UTC midnight
    assert rel in {f"date={day.isoformat()}/run-1.parquet" for day in (before, after)}


@pytest.mark.parametrize("rows", [[], night_rows(1) + night_rows(2)], ids=["no run", "two runs"])
def test_append_run_needs_exactly_one_run(tmp_path, rows):
    with pytest.raises(ValueError, match="exactly one run"):
        history.append_run(results.to_table(rows), str(tmp_path))


def test_load_history_schema_and_sweep_filter(local_history):
    loaded = history.load_history(local_history)
    assert loaded.schema == history.HISTORY_SCHEMA
    assert set(zip(loaded["run_id"].to_pylist(), loaded["date"].to_pylist())) == \
        {("run-1", "2025-03-01"), ("run-2", "2025-03-02")}
    assert history.load_history(local_history, sweep="nightly").num_rows == 24
    assert history.load_history(local_history, sweep="weekly").num_rows == 0


def test_load_history_of_nothing_is_empty(tmp_path):
    empty = history.load_history(str(tmp_path / "never-written"))
    assert empty.num_rows == 0 and empty.schema == history.HISTORY_SCHEMA
    assert history.list_runs(empty) == [] and history.previous_run(empty, "nightly", "run-1") is None


def test_load_history_tolerates_files_missing_newer_columns(local_history):
    old = night(1).drop_columns(["train_fingerprint", "required_ulp", "node_labels"])
    old = old.set_column(0, "run_id", pa.array(["run-0"] * old.num_rows))
    path = os.path.join(local_history, "date=2025-02-28", "run-0.parquet")
    os.makedirs(os.path.dirname(path))
    pq.write_table(old, path)
    loaded = history.load_history(local_history)
    run0 = loaded.filter(pc.equal(loaded["run_id"], "run-0"))
    assert run0.num_rows == 12 and run0["required_ulp"].null_count == 12
    assert [r["run_id"] for r in history.list_runs(loaded)] == ["run-0", "run-1", "run-2"]


# -- queries ---------------------------------------------------------------------------
def test_list_runs(local_history):
    runs = history.list_runs(history.load_history(local_history))
    assert [r["run_id"] for r in runs] == ["run-1", "run-2"]
    first, second = runs
    assert first == {"run_id": "run-1", "sweep": "nightly", "date": "2025-03-01", "started_at": NIGHT_ONE,
                     "cells": 12, "passed": 11, "failed": 1, "bitwise": 10, "within_tolerance": 0,
                     "mismatch": 1, "corrupt": 0, "error": 1, "unschedulable": 0}
    assert (second["passed"], second["failed"], second["mismatch"], second["error"]) == (11, 1, 2, 0)


def test_previous_run(local_history):
    loaded = history.load_history(local_history)
    assert set(history.previous_run(loaded, "nightly", "run-2")["run_id"].to_pylist()) == {"run-1"}
    assert history.previous_run(loaded, "nightly", "run-1") is None
    # Tonight's run, not appended yet: the latest stored run of the sweep.
    assert set(history.previous_run(loaded, "nightly", "run-3")["run_id"].to_pylist()) == {"run-2"}
    assert history.previous_run(loaded, "weekly", "run-3") is None


def test_cell_trend(local_history):
    loaded = history.load_history(local_history)
    trend = history.cell_trend(loaded, *NOISIER)
    assert [(p.run_id, p.date, p.verdict, p.passed, p.max_ulp_diff) for p in trend] == \
        [("run-1", "2025-03-01", "mismatch", True, 2100.0), ("run-2", "2025-03-02", "mismatch", True, 21000.0)]
    assert trend[0].max_abs_diff == pytest.approx(3.4e-2)
    assert [p.run_id for p in history.cell_trend(loaded, *NOISIER, last=1)] == ["run-2"]
    assert [p.verdict for p in history.cell_trend(loaded, *BROKEN)] == ["bitwise", "mismatch"]
    assert history.cell_trend(loaded, "nope", "keras", "cpu-amd") == []


# -- diffs -----------------------------------------------------------------------------
def test_diff_runs_finds_exactly_what_changed():
    changes = history.diff_runs(night(1), night(2))
    assert changes.regressed
    assert cell_keys(changes.newly_failing) == [BROKEN]
    assert (changes.newly_failing[0]["old_verdict"], changes.newly_failing[0]["new_verdict"]) == ("bitwise", "mismatch")
    assert cell_keys(changes.fixed) == [FIXED]
    diffs = {(k, d["metric"]): (d["old"], d["new"]) for k, d in zip(cell_keys(changes.diff_changes), changes.diff_changes)}
    assert diffs == {(BROKEN, "max_ulp_diff"): (0.0, 2100.0), (BROKEN, "max_abs_diff"): (0.0, 3.4e-2),
                     (NOISIER, "max_ulp_diff"): (2100.0, 21000.0)}
    assert changes.fingerprint_changes == [
        {"environment": UPGRADED, "changes": {"tf_version": {"old": "2.21.0", "new": "2.22.0"}}}]
    assert changes.new_environments == changes.vanished_environments == []
    assert changes.new_cells == changes.vanished_cells == []


def _tiers(run_id: str, tiers: dict) -> pa.Table:
    """One night of within-tolerance cells (expect any) whose accuracy tiers are ``tiers`` by cell key."""
    return results.to_table([
        make_row("within_tolerance", *key, expected="any", run_id=run_id, accuracy=tier,
                 rmse_vs_fp64=None if tier in (None, "n/a") else (5e-4 if tier == "less_accurate" else 2e-8),
                 reference_rmse_vs_fp64=None if tier in (None, "n/a") else 1.5e-8)
        for key, tier in tiers.items()])


DROPS, RECOVERS, STEADY, GAINS_TIER = (("mlp", "keras", e) for e in ("serve-bf16", "cpu-xla", "cpu-amd", "cpu-new"))


def test_diff_runs_reports_accuracy_tier_changes_even_when_the_cell_still_passes():
    before = _tiers("run-1", {DROPS: "as_accurate", RECOVERS: "less_accurate", STEADY: "as_accurate",
                              GAINS_TIER: None})
    after = _tiers("run-2", {DROPS: "less_accurate", RECOVERS: "as_accurate", STEADY: "as_accurate",
                             GAINS_TIER: "less_accurate"})
    changes = history.diff_runs(before, after)
    # the tier is the only thing that moved (same verdict, ULP, passed): the cells are still found
    assert not changes.regressed and changes.diff_changes == [] and changes.newly_failing == []
    assert {k: (e["old"], e["new"]) for k, e in zip(cell_keys(changes.accuracy_changes), changes.accuracy_changes)} \
        == {DROPS: ("as_accurate", "less_accurate"), RECOVERS: ("less_accurate", "as_accurate")}
    drop = changes.accuracy_changes[0]
    assert drop["passed"] is True and drop["rmse_vs_fp64"] == 5e-4 and drop["reference_rmse_vs_fp64"] == 1.5e-8
    md = history.render_changes_md(changes)
    assert "**Accuracy tier changed (vs float64)** (2):" in md
    assert ("`mlp/keras` @ `serve-bf16`: as_accurate -> less_accurate (rmse vs float64 0.0005, reference's "
            "1.5e-08); its expectation still passes") in md
    assert "No changes since the previous run." not in md
    assert changes.to_dict()["accuracy_changes"] == changes.accuracy_changes
    # a history written before the accuracy column existed: nothing to compare, nothing invented
    assert history.diff_runs(before.drop_columns(["accuracy"]), after).accuracy_changes == []


def test_compare_reads_accuracy_tiers_from_the_history(tmp_path):
    uri = str(tmp_path / "h")
    history.append_run(_tiers("run-1", {DROPS: "as_accurate", STEADY: "as_accurate"}), uri)
    changes = history.compare(history.History.open(uri),
                              _tiers("run-2", {DROPS: "less_accurate", STEADY: "as_accurate"}))
    assert cell_keys(changes.accuracy_changes) == [DROPS] and changes.previous_run["run_id"] == "run-1"


def test_diff_runs_factor_threshold():
    assert len(history.diff_runs(night(1), night(2), factor=20.0).diff_changes) == 2  # only the 0 -> nonzero cell
    assert len(history.diff_runs(night(1), night(2), factor=9.0).diff_changes) == 3


def test_diff_runs_new_and_vanished_environments():
    envs = ("cpu-avx512", "cpu-amd", "tpu-v5")
    changes = history.diff_runs(night(1), night(2, environments=envs))
    assert changes.new_environments == ["tpu-v5"] and changes.vanished_environments == ["gpu-a100"]
    assert {k[2] for k in cell_keys(changes.new_cells)} == {"tpu-v5"} and len(changes.new_cells) == 4
    assert {k[2] for k in cell_keys(changes.vanished_cells)} == {"gpu-a100"} and len(changes.vanished_cells) == 4
    assert changes.fingerprint_changes == []  # the upgraded environment vanished
    assert cell_keys(changes.newly_failing) == [BROKEN]


def test_diff_runs_without_previous_run_is_not_a_regression():
    changes = history.diff_runs(None, night(2))
    assert not changes.regressed
    assert changes.new_environments == list(ENVIRONMENTS) and len(changes.new_cells) == 12
    assert changes.newly_failing == changes.fixed == changes.diff_changes == changes.fingerprint_changes == []
    assert changes.vanished_cells == changes.vanished_environments == []


def test_diff_runs_survives_missing_and_broken_fingerprints():
    before = [{**r, "fingerprint": None} for r in night_rows(1)]
    after = night_rows(2)
    after[0]["fingerprint"] = "not json"
    after[1]["fingerprint"] = "[1, 2]"
    after[2]["fingerprint"] = {"tf_version": None}
    changes = history.diff_runs(results.to_table(before), results.to_table(after))
    assert changes.fingerprint_changes == []  # nothing to compare against
    partial = [{**r, "fingerprint": {"tf_version": "2.21.0"}} for r in night_rows(1)]
    changes = history.diff_runs(results.to_table(partial), night(2))
    cuda = [c for c in changes.fingerprint_changes if c["environment"] == "gpu-a100"][0]["changes"]
    assert cuda["cuda_version"] == {"old": None, "new": "12.5"}


def test_diff_runs_reports_training_fingerprint_changes():
    after = [{**r, "train_fingerprint": fingerprint("train", numpy="2.2.0")} for r in night_rows(2)]
    changes = history.diff_runs(night(1), results.to_table(after))
    training = [c for c in changes.fingerprint_changes if c["environment"] == history.TRAINING]
    assert training == [{"environment": history.TRAINING, "changes": {"numpy": {"old": "2.1.3", "new": "2.2.0"}}}]


def test_changes_to_dict_and_markdown():
    changes = history.diff_runs(night(1), night(2))
    as_dict = changes.to_dict()
    assert as_dict["regressed"] is True and cell_keys(as_dict["newly_failing"]) == [BROKEN]
    md = history.render_changes_md(changes)
    assert "Regressed: **yes**" in md
    assert "`mlp/keras` @ `cpu-amd`: bitwise -> mismatch" in md
    assert "`cnn/h5` @ `cpu-avx512`: error -> bitwise" in md
    assert "max_ulp_diff 2.1e+03 -> 2.1e+04" in md
    assert "`gpu-a100`: tf_version: 2.21.0 -> 2.22.0" in md
    quiet = history.Changes(previous_run={"run_id": "run-1", "date": "2025-03-01"})
    assert "No changes since the previous run." in history.render_changes_md(quiet)
    assert "No previous run" in history.render_changes_md(history.Changes())


def test_changes_markdown_caps_long_lists():
    md = history.render_changes_md(history.diff_runs(None, night(1)))
    assert "**New cells** (12):" in md and "- ... and" not in md
    many = history.Changes(new_environments=[f"env{i}" for i in range(25)])
    assert "- ... and 5 more" in history.render_changes_md(many)


def test_describe_change_lists_only_the_difference():
    assert history.describe_change(["avx", "avx2", "sse"], ["avx", "avx512f", "sse"]) == "+avx512f, -avx2"
    assert history.describe_change(None, "12.5") == "(missing) -> 12.5"


def test_report_with_history_and_changes(local_history):
    loaded = history.load_history(local_history)
    current = night(2)
    changes = history.diff_runs(history.previous_run(loaded, "nightly", "run-2"), current)
    md = report.render(current, "md", history=loaded, changes=changes)
    assert "## What changed" in md and "**New failures** (1):" in md
    assert md.index("## What changed") < md.index("## Matrix")  # the report opens with it
    html = report.render(current, "html", history=loaded, changes=changes)
    assert html.count('class="spark"') == 12 and 'id="changes"' in html


# -- S3 (moto server from conftest) ---------------------------------------------------
def test_history_on_s3(s3_server):
    s3_server.make_bucket("bucket")
    uri = s3_server.uri("bucket", "history")
    assert history.append_run(night(1), uri) == "date=2025-03-01/run-1.parquet"
    assert history.append_run(night(2), uri) == "date=2025-03-02/run-2.parquet"
    assert history.append_run(night(2), uri) == "date=2025-03-02/run-2.parquet"  # idempotent
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server.url)
            .list_objects_v2(Bucket="bucket", Prefix="history/")["Contents"]]
    assert sorted(k for k in keys if k.endswith(".parquet")) == \
        ["history/date=2025-03-01/run-1.parquet", "history/date=2025-03-02/run-2.parquet"]
    loaded = history.load_history(uri, sweep="nightly")
    assert loaded.num_rows == 24
    previous = history.previous_run(loaded, "nightly", "run-2")
    assert set(previous["run_id"].to_pylist()) == {"run-1"}
    assert history.diff_runs(previous, night(2)).regressed


# -- statuses, new vs known, streaks (pure) ------------------------------------------------
STATUSES = (history.PASSING, history.FAILING, history.FLAKY, history.UNJUDGED)
statuses = st.sampled_from(STATUSES)
keys = st.tuples(st.sampled_from("ab"), st.sampled_from("kh"), st.sampled_from("xyz"))


def point(passed, flaky=None, run_id="r", verdict="bitwise"):
    return history.TrendPoint(run_id, "2025-03-01", verdict, passed, 0.0, 0.0, flaky=flaky)


def test_cell_status_reads_passed_and_a_future_flaky_attribute():
    assert [history.cell_status(point(p)) for p in (True, False, None)] == \
        [history.PASSING, history.FAILING, history.UNJUDGED]
    assert history.cell_status(point(False, flaky=True)) == history.FLAKY  # flaky wins: never a failure
    assert history.cell_status(point(True, flaky=False)) == history.PASSING
    cell = results.cells(results.to_table([make_row("mismatch")]))[0]  # no flaky field today: not flaky
    assert history.cell_status(cell) == history.FAILING


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, statuses), st.dictionaries(keys, statuses))
def test_classify_partitions_tonights_cells(previous, current):
    groups = history.classify(previous, current)
    failing = [k for k, s in current.items() if s == history.FAILING]
    assert sorted(groups["new"] + groups["known"]) == sorted(failing)  # each failing cell exactly once
    assert all(previous.get(k) == history.FAILING for k in groups["known"])
    assert all(previous.get(k) != history.FAILING for k in groups["new"])
    assert groups["fixed"] == [k for k, s in current.items() if s == history.PASSING
                               and previous.get(k) == history.FAILING]
    assert groups["flaky"] == [k for k, s in current.items() if s == history.FLAKY]
    flaky = set(groups["flaky"])
    assert not flaky & set(groups["new"] + groups["known"] + groups["fixed"])  # flaky is never a regression
    for group in groups.values():  # tonight's order
        assert group == [k for k in current if k in set(group)]


@settings(max_examples=300, deadline=None)
@given(st.lists(statuses, min_size=0, max_size=12))
def test_failing_streak_matches_a_plain_reading(sequence):
    runs = [history.RunRef(f"run-{i}", f"2025-03-{i + 1:02d}") for i in range(len(sequence))]  # newest first
    streak = history.failing_streak(list(zip(runs, sequence)))
    if not sequence or sequence[0] != history.FAILING:
        assert streak is None
        return
    good = next((i for i, s in enumerate(sequence) if s == history.PASSING), None)
    window = sequence[:good] if good is not None else sequence
    assert streak.last_good == (runs[good] if good is not None else None)
    assert streak.failing_runs == window.count(history.FAILING)
    oldest_bad = max(i for i, s in enumerate(window) if s == history.FAILING)
    assert streak.first_bad == runs[oldest_bad]


def test_cell_streak_skips_flaky_and_unjudged_runs():
    statuses_ = [(True, None), (False, None), (False, True), (None, None), (False, None)]  # oldest first
    points = [point(p, flaky=f, run_id=f"run-{i}") for i, (p, f) in enumerate(statuses_)]
    streak = history.cell_streak(points)
    assert (streak.first_bad.run_id, streak.last_good.run_id, streak.failing_runs) == ("run-1", "run-0", 2)
    assert history.cell_streak(points[:1]) is None and history.cell_streak([]) is None
    assert history.cell_streak(points[:3]) is None  # the latest run is flaky: no failing streak


def test_fingerprint_delta_compares_reload_and_training_fingerprints():
    old = results.cells(results.to_table([make_row()]))[0]
    new = results.cells(results.to_table([make_row(fingerprint=fingerprint("cpu-avx512", numpy="2.2.0", pid=9),
                                                   train_fingerprint=fingerprint("train", onednn=False))]))[0]
    assert history.fingerprint_delta(old, new) == {"numpy": {"old": "2.1.3", "new": "2.2.0"},
                                                   f"{history.TRAINING} onednn": {"old": True, "new": False}}
    assert history.fingerprint_delta(old, old) == {}
    unran = results.cells(results.to_table([make_row("unschedulable", fingerprint=None, train_fingerprint=None)]))[0]
    assert history.fingerprint_delta(old, unran) is None  # nothing to compare: not "nothing changed"


# -- the dataset: projection, pushdown, damaged and foreign files --------------------------
def _write(uri_dir, rel, data: bytes) -> None:
    path = os.path.join(uri_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _parquet(table: pa.Table) -> bytes:
    return results.to_parquet_bytes(table) if table.schema == results.SCHEMA else _raw_parquet(table)


def _raw_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_read_projects_columns_and_prunes_files(local_history):
    _write(local_history, "date=2025-03-02/run-x.parquet", b"not parquet at all")
    past = history.History.open(local_history)
    table = past.read(["verdict"], run_ids={"run-1"})
    assert table.column_names == ["verdict", "date"] and table.num_rows == 12
    assert past.problems == []  # run-x's file was never opened: run ids prune files by name
    assert past.read(["run_id"], since="2025-03-02", until="2025-03-02", run_ids={"run-2"}).num_rows == 12
    assert past.read(["run_id"], until="2025-03-01")["run_id"].to_pylist() == ["run-1"] * 12
    one = past.read(["run_id", "verdict"], cells=[BROKEN], sweep="nightly")
    assert sorted(zip(one["run_id"].to_pylist(), one["verdict"].to_pylist())) == \
        [("run-1", "bitwise"), ("run-2", "mismatch")]
    assert past.read(["run_id"], sweep="weekly").num_rows == 0
    with pytest.raises(ValueError, match="unknown history column"):
        past.read(["nope"])


def test_runs_newest_first_and_before(local_history):
    past = history.History.open(local_history)
    assert [r.run_id for r in past.runs("nightly")] == ["run-2", "run-1"]
    assert past.runs("nightly").__next__().started_at == NIGHT_TWO
    tonight = history.RunRef("run-2", "2025-03-02", NIGHT_TWO)
    assert [r.run_id for r in past.runs("nightly", before=tonight)] == ["run-1"]
    assert list(past.runs("weekly")) == []
    assert [r["run_id"] for r in past.summaries("nightly", last=1)] == ["run-2"]


def damage(uri_dir) -> dict[str, str]:
    """Write one file of each kind a history must survive; returns {relative path: what the message says}."""
    foreign = pa.table({"x": [1, 2]})
    weird = results.to_table([make_row(run_id="run-w")]).set_column(
        results.COLUMN_NAMES.index("verdict"), "verdict", pa.array(["great"]))
    files = {"date=2025-03-01/garbage.parquet": (b"\x00garbage" * 10, "unreadable"),
             "date=2025-03-01/empty.parquet": (b"", "unreadable"),
             "date=2025-03-02/foreign.parquet": (_raw_parquet(foreign), "no column 'run_id'"),
             "date=2025-03-02/run-w.parquet": (_raw_parquet(weird), "unknown verdict 'great'")}
    for rel, (data, _) in files.items():
        _write(uri_dir, rel, data)
    return {rel: why for rel, (_, why) in files.items()}


def assert_reported(problems: list[str], expected: dict[str, str]) -> None:
    assert len(problems) == len(expected), problems
    for rel, why in expected.items():
        (line,) = [p for p in problems if rel in p]
        assert why in line and "skipped" in line and "\n" not in line


def test_damaged_and_foreign_files_are_reported_and_skipped(local_history):
    expected = damage(local_history)
    past = history.History.open(local_history)
    table = past.read()
    assert sorted(set(table["run_id"].to_pylist())) == ["run-1", "run-2"] and table.num_rows == 24
    assert_reported(past.problems, expected)
    assert history.load_history(local_history).num_rows == 24
    changes = history.compare(past, night(3))
    assert changes.previous_run == {"run_id": "run-2", "date": "2025-03-02"}
    assert cell_keys(changes.known_failing) == [BROKEN] and cell_keys(changes.newly_failing) == [NEW3]
    assert_reported(changes.skipped_files, expected)
    md = history.render_changes_md(changes)
    assert "**Skipped history files** (4):" in md and "garbage.parquet" in md
    # Tonight is appended whatever the history holds, even over a damaged file of its own name.
    _write(local_history, "date=2025-03-03/run-3.parquet", b"half a file")
    assert history.append_run(night(3), local_history) == "date=2025-03-03/run-3.parquet"
    again = history.History.open(local_history)
    assert again.read(["run_id"], run_ids={"run-3"}).num_rows == 12
    assert_reported(again.problems, {})  # problems are only found by reading
    again.read()
    assert_reported(again.problems, expected)


# -- the nightly comparison -------------------------------------------------------------------
def test_compare_classifies_and_finds_streaks(local_history):
    past = history.History.open(local_history)
    changes = history.compare(past, night(3))
    assert changes.regressed and changes.counts == {"new": 1, "known": 1, "fixed": 0, "flaky": 0}
    (known,) = changes.known_failing
    assert (known["old_verdict"], known["new_verdict"]) == ("mismatch", "mismatch")
    assert known["first_bad"] == {"run_id": "run-2", "date": "2025-03-02"}
    assert known["last_good"] == {"run_id": "run-1", "date": "2025-03-01"} and known["failing_runs"] == 2
    assert known["changed_since_good"] == {"cpu_model": {"old": "AMD EPYC 7R13", "new": "AMD EPYC 9R14"}}
    (new,) = changes.newly_failing
    assert new["first_bad"] == {"run_id": "run-3", "date": "2025-03-03"}  # tonight, not appended yet
    assert new["last_good"] == {"run_id": "run-2", "date": "2025-03-02"} and new["failing_runs"] == 1
    assert set(new["changed_since_good"]) == {"cpu_model"}
    assert [(n["run_id"], n["non_bitwise"], n["failed"], n["cells"]) for n in changes.nights] == \
        [("run-1", 2, 1, 12), ("run-2", 2, 1, 12), ("run-3", 3, 2, 12)]
    (drift,) = changes.drifting
    assert cell_keys([drift]) == [NOISIER] and drift["required_ulp"] == [2100.0, 21000.0, 21000.0]
    assert drift["runs"] == ["run-1", "run-2", "run-3"]
    assert changes.to_dict()["counts"] == changes.counts


def test_compare_after_append_gives_the_same_answer(local_history):
    before = history.compare(history.History.open(local_history), night(3))
    history.append_run(night(3), local_history)
    after = history.compare(history.History.open(local_history), night(3))
    assert after == before


def test_compare_a_cell_that_never_passed_and_the_first_night(tmp_path):
    uri = str(tmp_path / "h")
    first = history.compare(history.History.open(uri), night(1))
    assert first.previous_run is None and not first.regressed and first.counts["new"] == 0
    assert len(first.new_cells) == 12 and [n["run_id"] for n in first.nights] == ["run-1"]
    history.append_run(night(1), uri)
    changes = history.compare(history.History.open(uri), night(2))
    (new,) = changes.newly_failing  # BROKEN passed on night 1
    assert new["last_good"]["run_id"] == "run-1"
    rows = night_rows(2)
    for row in rows:
        row["run_id"] = "run-0"
    history.append_run(results.to_table([{**r, "started_at": NIGHT_ONE - dt.timedelta(days=1)} for r in rows]), uri)
    history.append_run(night(2), uri)
    tonight = results.to_table([{**r, "run_id": "run-3", "started_at": NIGHT_TWO + dt.timedelta(days=1)}
                                for r in night_rows(2)])
    changes = history.compare(history.History.open(uri), tonight)
    (known,) = changes.known_failing  # run-0 failed, run-1 passed, run-2 and tonight fail
    assert known["first_bad"]["run_id"] == "run-2" and known["last_good"]["run_id"] == "run-1"


def test_compare_markdown_opens_with_counts_and_names_first_bad(local_history):
    md = history.render_changes_md(history.compare(history.History.open(local_history), night(3)))
    head = md.split("\n\n")
    assert head[0] == "Regressed: **yes**"
    assert head[1] == "Compared with the previous run `run-2` (2025-03-02)."
    assert head[2] == "**1 new failure(s), 1 known failure(s), 0 fixed, 0 flaky**"
    assert md.index("**New failures** (1):") < md.index("**Known failures** (1):") < md.index("**Trends**")
    assert ("- `mlp/keras` @ `cpu-amd`: mismatch -> mismatch; first bad: `run-2` (2025-03-02), failing 2 run(s); "
            "last good: `run-1` (2025-03-01); since then: cpu_model: AMD EPYC 7R13 -> AMD EPYC 9R14") in md
    assert "- non-bitwise cells per night: ▁▁█ 2 -> 3 (of 12)" in md
    assert "**Drifting required tolerance** (1):" in md


# -- retention ---------------------------------------------------------------------------------
def test_retention_deletes_old_partitions_only(local_history):
    old = [{**r, "run_id": "run-0", "started_at": NIGHT_ONE - dt.timedelta(days=60)} for r in night_rows(1)]
    history.append_run(results.to_table(old), local_history)
    _write(local_history, "date=2024-12-30/garbage.parquet", b"junk")
    past = history.History.open(local_history)
    sizes = sum(os.path.getsize(os.path.join(local_history, rel)) for rel in past.listing
                if rel.startswith(("date=2024-12-31/", "date=2024-12-30/")))
    dry = past.retain(30, today=NIGHT_TWO.date(), dry_run=True)
    assert (dry.partitions, dry.files, dry.bytes, dry.cutoff) == (("2024-12-30", "2024-12-31"), 2, sizes, "2025-01-31")
    assert "would free 2 partition(s)" in dry.text() and f"({sizes} bytes)" in dry.text()
    assert len(history.History.open(local_history).files) == 4  # a dry run deletes nothing
    freed = past.retain(30, today=NIGHT_TWO.date())
    assert freed.text().startswith("history retention: freed 2 partition(s)")
    assert sorted(os.listdir(local_history)) == ["date=2025-03-01", "date=2025-03-02"]
    assert [f.run_id for f in past.files] == [f.run_id for f in history.History.open(local_history).files]
    # keep_days 0 keeps today's partition, and a protected run's wherever it is
    kept = past.retain(0, today=NIGHT_TWO.date(), protect={"run-1"})
    assert kept.partitions == () and sorted(os.listdir(local_history)) == ["date=2025-03-01", "date=2025-03-02"]
    assert past.retain(0, today=NIGHT_TWO.date()).partitions == ("2025-03-01",)
    with pytest.raises(ValueError, match="keep_days"):
        past.retain(-1, today=NIGHT_TWO.date())


def test_damaged_files_and_retention_on_s3(s3_server):
    s3_server.make_bucket("damaged")
    uri = s3_server.uri("damaged", "history")
    history.append_run(night(1), uri)
    history.append_run(night(2), uri)
    client = boto3.client("s3", endpoint_url=s3_server.url)
    client.put_object(Bucket="damaged", Key="history/date=2025-03-02/garbage.parquet", Body=b"\x00" * 64)
    client.put_object(Bucket="damaged", Key="history/date=2025-03-01/foreign.parquet",
                      Body=_raw_parquet(pa.table({"x": [1]})))
    past = history.History.open(uri)
    changes = history.compare(past, night(3))
    assert cell_keys(changes.known_failing) == [BROKEN] and changes.previous_run["run_id"] == "run-2"
    assert len(changes.skipped_files) == 2
    assert any(p.startswith("s3://damaged/history/date=2025-03-02/garbage.parquet: unreadable") for p in
               changes.skipped_files), changes.skipped_files
    assert all("endpoint_override" not in p for p in changes.skipped_files)  # names without the query
    freed = past.retain(0, today=NIGHT_TWO.date())
    assert freed.partitions == ("2025-03-01",) and freed.files == 2 and freed.bytes > 0
    left = [o["Key"] for o in client.list_objects_v2(Bucket="damaged", Prefix="history/")["Contents"]
            if o["Key"].endswith(".parquet")]
    assert sorted(left) == ["history/date=2025-03-02/garbage.parquet", "history/date=2025-03-02/run-2.parquet"]


def test_unreachable_history_is_a_storage_error(s3_server, monkeypatch):
    # Nothing listens on port 9 (discard): the storage's retries of a transient failure give up after 1 s here.
    monkeypatch.setenv("HARNESS_STORAGE_RETRY_S", "1")
    with pytest.raises(StorageError, match=r"^storage unreachable: .* on s3://nowhere/history \(still failing"):
        history.History.open("s3://nowhere/history?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")


def test_a_file_with_unknown_verdicts_is_skipped_by_every_query(local_history):
    weird = night(2).set_column(results.COLUMN_NAMES.index("verdict"), "verdict", pa.array(["great"] * 12))
    weird = weird.set_column(0, "run_id", pa.array(["run-9"] * 12))
    _write(local_history, "date=2025-03-02/run-9.parquet", _raw_parquet(weird))
    past = history.History.open(local_history)
    assert [r.run_id for r in past.runs("nightly")] == ["run-2", "run-1"]  # though runs() reads no verdict
    assert len(past.problems) == 1 and "unknown verdict 'great'" in past.problems[0]
