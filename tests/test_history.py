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

from conftest_report_helpers import NIGHT_ONE, fingerprint, make_row
from harness import history, report, results

NIGHT_TWO = NIGHT_ONE + dt.timedelta(days=1)
ENVIRONMENTS = ("cpu-avx512", "cpu-amd", "gpu-a100")
BROKEN = ("mlp", "keras", "cpu-amd")     # bitwise -> mismatch, fails
FIXED = ("cnn", "h5", "cpu-avx512")      # error -> bitwise, passes
NOISIER = ("cnn", "keras", "gpu-a100")   # mismatch (expected any), ULP x10
UPGRADED = "gpu-a100"                    # tf_version 2.21.0 -> 2.22.0 on night two


def night_rows(night: int, environments=ENVIRONMENTS) -> list[dict]:
    """Every scenario x format x environment cell of one night (1 or 2)."""
    run_id, start = (f"run-{night}", NIGHT_ONE if night == 1 else NIGHT_TWO)
    rows = []
    for key in itertools.product(("mlp", "cnn"), ("keras", "h5"), environments):
        verdict, expected, extra = "bitwise", "tolerance", {}
        if key == BROKEN and night == 2:
            verdict = "mismatch"
        if key == FIXED and night == 1:
            verdict = "error"
        if key == NOISIER:
            verdict, expected = "mismatch", "any"
            extra["max_ulp_diff"] = 2100.0 * (10 if night == 2 else 1)
        env = key[2]
        changes = {"pid": 1000 * night, "hostname": f"{env}-{night}"}  # volatile: never reported
        if env == UPGRADED and night == 2:
            changes["tf_version"] = "2.22.0"
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
