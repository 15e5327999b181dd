"""harness.run: a run's identity (run.json), its plan digest, its layout, and its results table."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from harness import layout, results
from harness.records import Cell, CellResult
from harness.run import Run, RunDirError, environment_digest, plan_digest
from harness.scenario import Scenario
from harness.spec import parse_sweep

DOC = {"name": "plan", "scenarios": ["s1", "s2"], "formats": ["keras", "h5"],
       "training": {"threads": 1, "description": "the trainer"},
       "environments": {"cpu": {"description": "plain"}, "xla": {"jit_compile": True, "expect": "any"}}}


def scenarios(digest: str = "a") -> dict:
    return {n: replace(Scenario(name=n, probe=lambda rng: None, train=lambda seed: None), source_digest=digest + n)
            for n in ("s1", "s2")}


def sweep(**changes):
    doc = json.loads(json.dumps(DOC))
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = doc
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return parse_sweep(doc, source="plan.yaml")


# -- plan digest ---------------------------------------------------------------------------------
def test_descriptions_do_not_change_the_plan():
    """Editing only a description used to make --resume refuse the run."""
    base = plan_digest(sweep(), scenarios())
    assert plan_digest(sweep(**{"environments.cpu.description": "edited"}), scenarios()) == base
    assert plan_digest(sweep(**{"training.description": "edited"}), scenarios()) == base
    assert plan_digest(sweep(description="a sweep", explain=True, retries=5,
                             **{"timeouts.cell_timeout_s": 9}), scenarios()) == base


@pytest.mark.parametrize("change", [
    {"environments.xla.jit_compile": False}, {"environments.cpu.threads": 2}, {"training.threads": 2},
    {"environments.cpu.expect": "bitwise"}, {"tolerance": {"max_ulp": 4}}, {"formats": ["keras"]},
    {"batch_size": 8}, {"expect_save": "any"}, {"output_tolerances": {"y": {"atol": 1e-3}}},
    {"environments.cpu.optional": True}, {"repeats": 3}, {"environments.cpu.repeats": 2},
])
def test_what_decides_results_changes_the_plan(change):
    assert plan_digest(sweep(**change), scenarios()) != plan_digest(sweep(), scenarios())


def test_repeats_1_keeps_the_plan_of_runs_made_before_repeats_existed():
    # (--resume of such a run must not be refused): the default adds nothing to the digest
    assert plan_digest(sweep(repeats=1), scenarios()) == plan_digest(sweep(), scenarios())


def test_a_renamed_environment_or_a_changed_scenario_source_changes_the_plan():
    renamed = parse_sweep({**DOC, "environments": {"cpu2": {}, "xla": {"jit_compile": True, "expect": "any"}}},
                          source="plan.yaml")
    assert plan_digest(renamed, scenarios()) != plan_digest(sweep(), scenarios())
    assert plan_digest(sweep(), scenarios("b")) != plan_digest(sweep(), scenarios("a"))


def test_environment_digest_ignores_the_description_only():
    env = sweep().environment("cpu")
    assert environment_digest(env.derive("cpu", description="other")) == environment_digest(env)
    assert environment_digest(env.derive("cpu", threads=3)) != environment_digest(env)
    assert environment_digest(env.derive("cpu2")) != environment_digest(env)


# -- identity: run.json ----------------------------------------------------------------------------
def test_a_run_round_trips_through_run_json(tmp_path):
    run = Run.create(tmp_path / "r", sweep(), scenarios(), "/store", scenario_paths=[str(tmp_path)])
    run.save()
    back = Run.load(tmp_path / "r")
    assert back == run and back.scenario_paths == (str(tmp_path.resolve()),)
    assert not list((tmp_path / "r").glob(".*tmp"))  # written atomically: no temporary file left


def test_load_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run here"):
        Run.load(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable or not written by `harness run`"):
        Run.load(tmp_path)


def test_check_refuses_a_sweep_file_changed_since_the_run(tmp_path):
    run = Run.create(tmp_path, sweep(), scenarios(), "/store")
    run.check(sweep(**{"environments.cpu.description": "edited"}), scenarios())  # not a change of plan
    with pytest.raises(RunDirError, match="changed since run"):
        run.check(sweep(**{"environments.cpu.threads": 4}), scenarios())
    with pytest.raises(RunDirError, match="changed since run"):
        run.check(sweep(), scenarios("b"))
    with pytest.raises(RunDirError, match="not 'other'"):
        run.check(sweep(name="other"), scenarios())


def _row(env: str, verdict: str = "bitwise", run_id: str = "r1", sweep_name: str = "plan", **kw) -> CellResult:
    return CellResult(run_id=run_id, sweep=sweep_name, scenario="s1", format="keras", environment=env,
                      verdict=verdict, **kw)


def test_resume_keeps_the_run_id_and_refuses_another_plan(tmp_path):
    first = Run.create(tmp_path, sweep(), scenarios(), "/store")
    first.save()
    results.write_table(results.to_table([_row("cpu", run_id=first.run_id)]), first.results_file)
    again, stored = Run.resume(tmp_path, sweep(**{"environments.cpu.description": "edited"}), scenarios(), "/store")
    assert again.run_id == first.run_id and stored.num_rows == 1
    with pytest.raises(RunDirError, match="planned from another version of sweep 'plan'"):
        Run.resume(tmp_path, sweep(**{"environments.cpu.threads": 4}), scenarios(), "/store")
    with pytest.raises(RunDirError, match="it holds a run of sweep 'plan', not 'other'"):
        Run.resume(tmp_path, sweep(name="other"), scenarios(), "/store")


def test_resume_of_a_run_that_finished_no_cell_keeps_its_id(tmp_path):
    first = Run.create(tmp_path, sweep(), scenarios(), "/store")
    first.save()
    again, stored = Run.resume(tmp_path, sweep(), scenarios(), "/store")
    assert again.run_id == first.run_id and stored.num_rows == 0


# -- layout ----------------------------------------------------------------------------------------
def test_every_path_of_a_run_comes_from_one_layout(tmp_path):
    run = Run.create(tmp_path, sweep(), scenarios(), "/store", run_id="R")
    cell = Cell("s1", "keras", "cpu")
    assert run.observation_path(cell) == "runs/R/observations/s1/keras/cpu.arrow"
    assert run.observation_path(cell, derived=True) == "runs/R/attribution/s1/keras/cpu.arrow"
    assert run.observation_path(cell, repeat=0) == run.observation_path(cell)  # the first repeat: the cell's file
    assert run.observation_path(cell, repeat=2) == "runs/R/observations/s1/keras/cpu.repeat-3.arrow"
    assert run.explain_path(cell) == "runs/R/explain/s1/keras/cpu.arrow"
    assert run.explain_path(cell, "training") == "runs/R/explain/s1/keras/cpu.training.arrow"
    assert run.results_path == "runs/R/results.parquet"
    assert run.explanation_file("s1/keras/cpu") == tmp_path / "explain" / "s1" / "keras" / "cpu.json"
    assert layout.artifact_dir("s1", "abc") == "artifacts/s1/abc"


# -- results: the last row of a cell, in the sweep's order -----------------------------------------
def test_ordered_results_of_an_empty_table():
    """A failed run with no row used to crash here (Arrow's take of an untyped empty list)."""
    run = Run(None, "r1", "plan", "plan.yaml", "", "/store")
    table = run.ordered(results.SCHEMA.empty_table(), sweep())
    assert table.num_rows == 0 and table.schema == results.SCHEMA


def test_ordered_results_follow_the_sweep_with_the_last_row_winning():
    rows = [_row("xla", "mismatch"), _row("cpu", "error"), _row("xla", "bitwise"), _row("zzz-unknown")]
    run = Run(None, "r1", "plan", "plan.yaml", "", "/store")
    table = run.ordered(results.to_table(rows), sweep())
    assert table.column("environment").to_pylist() == ["cpu", "xla", "zzz-unknown"]
    assert table.column("verdict").to_pylist() == ["error", "bitwise", "bitwise"]


KEYS = st.tuples(st.sampled_from(["s1", "s2"]), st.sampled_from(["keras", "h5"]), st.sampled_from(["a", "b", "c"]))


@settings(max_examples=100, deadline=None)
@given(st.lists(KEYS, max_size=20))
def test_last_row_per_cell_keeps_exactly_the_last_row_of_each_cell(keys):
    table = pa.table({"scenario": [k[0] for k in keys], "format": [k[1] for k in keys],
                      "environment": [k[2] for k in keys], "row": list(range(len(keys)))})
    out = results.last_row_per_cell(table)
    expected = {k: i for i, k in enumerate(keys)}
    got = {(s, f, e): r for s, f, e, r in zip(*(out.column(c).to_pylist() for c in ("scenario", "format",
                                                                                   "environment", "row")))}
    assert got == expected and out.num_rows == len(expected)
    assert out.column("row").to_pylist() == sorted(expected.values())
    ordered = results.last_row_per_cell(table, order=(["s2", "s1"], ["h5", "keras"], ["c", "b", "a"]))
    rank = lambda k: (["s2", "s1"].index(k[0]), ["h5", "keras"].index(k[1]), ["c", "b", "a"].index(k[2]))  # noqa: E731
    assert list(zip(*(ordered.column(c).to_pylist() for c in ("scenario", "format", "environment")))) == \
        sorted(expected, key=rank)


# -- derived cells (explain's attribution variants) ------------------------------------------------
def test_derived_cells_are_reused_only_while_their_environment_is_unchanged(tmp_path):
    run = Run.create(tmp_path, sweep(), scenarios(), "/store", run_id="R")
    env = sweep().environment("cpu").derive("cpu.only-threads", threads=1)
    results.write_table(results.to_table([_row("cpu.only-threads", run_id="R")]),
                        run.derived_dir / "results.parquet")
    assert run.derived_cells([env]) == []  # never recorded: not trusted
    run.record_derived_environments([env])
    assert [c.environment for c in run.derived_cells([env])] == ["cpu.only-threads"]
    assert run.derived_cells([env.derive(env.name, threads=2)]) == []  # derived differently now: run again


# -- resuming from storage: run.json and the journal's segments in runs/<id>/ ---------------------
def _published_run(store, rows_per_segment: list[list[str]], with_results: list[str] = ()) -> Run:
    """A run whose driver died: run.json and journal segments in ``store`` (rows by environment), no driver dir."""
    run = Run.create(store / "driver-gone", sweep(), scenarios(), str(store))
    run.save()
    run.publish({"run.json": (run.run_dir / "run.json").read_bytes()})
    if with_results:
        run.publish({"results.parquet": results.to_parquet_bytes(
            results.to_table([_row(e, run_id=run.run_id) for e in with_results]))})
    for envs in rows_per_segment:
        lines = [json.dumps(_row(e, run_id=run.run_id, started_at=1.5).to_row(epoch=True)) + "\n" for e in envs]
        run.publish_journal("".join(lines).encode())
    return run


def test_fetch_rebuilds_the_run_directory_from_storage(tmp_path):
    store = tmp_path / "store"
    run = _published_run(store, [["cpu"], ["xla"]])
    assert len(list((store / layout.journal_dir(run.run_id)).glob("*.jsonl"))) == 2
    assert results.read_table(store / layout.run_root(run.run_id)).num_rows == 2  # a published run, read as it is
    out = tmp_path / "elsewhere"
    again, stored = Run.resume(out, sweep(), scenarios(), str(store), run_id=run.run_id)
    assert again.run_id == run.run_id and again.run_dir == out and again.storage == str(store)
    assert sorted(stored.column("environment").to_pylist()) == ["cpu", "xla"]
    assert Run.load(out).run_id == run.run_id and results.read_table(out).num_rows == 2


def test_fetch_merges_published_results_segments_and_the_local_directory(tmp_path):
    store = tmp_path / "store"
    run = _published_run(store, [["xla"]], with_results=["cpu"])
    out = tmp_path / "out"
    Run.fetch(out, str(store), run.run_id)
    with results.Journal(out) as journal:  # a cell this directory finished after the storage's copy of it
        journal.append(_row("cpu", verdict="mismatch", run_id=run.run_id))
    Run.fetch(out, str(store), run.run_id)
    table = results.read_table(out)
    by_env = dict(zip(table.column("environment").to_pylist(), table.column("verdict").to_pylist()))
    assert by_env == {"cpu": "mismatch", "xla": "bitwise"}


def test_fetch_refuses_what_it_cannot_resume_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    run = _published_run(store, [["cpu"]])
    out = tmp_path / "out"
    with pytest.raises(RunDirError, match=r"no run 'nope' in this storage .*check --run-id and --storage"):
        Run.resume(out, sweep(), scenarios(), str(store), run_id="nope")
    with pytest.raises(RunDirError, match="planned from another version of sweep 'plan'"):
        Run.resume(out, sweep(**{"environments.cpu.threads": 4}), scenarios(), str(store), run_id=run.run_id)
    with pytest.raises(RunDirError, match="it holds a run of sweep 'plan', not 'other'"):
        Run.resume(out, sweep(name="other"), scenarios(), str(store), run_id=run.run_id)
    assert not out.exists()
    other = Run.create(out, sweep(), scenarios(), str(store))
    other.save()
    with pytest.raises(RunDirError, match=rf"it holds run '{other.run_id}'; use another --out"):
        Run.resume(out, sweep(), scenarios(), str(store), run_id=run.run_id)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and Run.load(out).run_id == other.run_id
    (store / layout.run_root(run.run_id) / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="run.json: unreadable"):
        Run.resume(tmp_path / "fresh", sweep(), scenarios(), str(store), run_id=run.run_id)


def test_published_segments_are_read_from_s3_and_removed_once_the_results_are_there(s3_server, tmp_path):
    s3_server.make_bucket("harness-run")
    uri = s3_server.uri("harness-run", f"fetch-{tmp_path.name}")
    run = Run.create(tmp_path / "driver", sweep(), scenarios(), uri)
    run.save()
    run.publish({"run.json": (run.run_dir / "run.json").read_bytes()})
    run.publish_journal((json.dumps(_row("cpu", run_id=run.run_id).to_row(epoch=True)) + "\n").encode())
    run.publish_journal(json.dumps(_row("xla", run_id=run.run_id).to_row(epoch=True)).encode())  # no last newline
    base, query = uri.split("?", 1)
    published = f"{base}/runs/{run.run_id}?{query}"
    assert sorted(results.read_table(published).column("environment").to_pylist()) == ["cpu", "xla"]
    Run.fetch(tmp_path / "out", uri, run.run_id)
    assert results.read_table(tmp_path / "out").num_rows == 2
    run.publish({"results.parquet": results.to_parquet_bytes(results.read_table(tmp_path / "out"))})
    run.remove_journal()
    from harness.storage import Storage

    assert Storage.open(uri).listdir(layout.journal_dir(run.run_id)) == []
    assert results.read_table(published).num_rows == 2


# -- the journal's lines, published in batches ----------------------------------------------------
def test_journal_publishes_in_batches_from_a_thread_and_the_rest_when_closed(tmp_path):
    import threading

    batches: list[bytes] = []
    first = threading.Event()

    def publish(data: bytes) -> None:
        batches.append(data)
        first.set()

    journal = results.Journal(tmp_path, publish=publish, every_s=0.05)
    try:
        for env in ("cpu", "xla"):
            journal.append(_row(env))
        assert first.wait(30), "the publisher thread never published"
        journal.append(_row("late"))
    finally:
        journal.close()
    published = results.journal_table(b"".join(batches))
    assert published.column("environment").to_pylist() == ["cpu", "xla", "late"]  # each once, in order
    assert results.Journal.table(tmp_path).column("environment").to_pylist() == ["cpu", "xla", "late"]


def test_journal_publishing_costs_one_call_per_batch_not_per_cell(tmp_path):
    calls = []
    with results.Journal(tmp_path, publish=calls.append, every_s=3600) as journal:
        for i in range(2000):
            journal.append(_row(f"e{i}"))
    assert len(calls) == 1 and results.journal_table(calls[0]).num_rows == 2000


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["append", "publish", "fail"]), max_size=30))
def test_journal_batches_carry_every_line_exactly_once_in_order_whatever_fails(ops):
    import tempfile

    delivered: list[bytes] = []
    failing = [False]

    def publish(data: bytes) -> None:
        if failing[0]:
            raise OSError("storage down")
        delivered.append(data)

    appended = []
    with tempfile.TemporaryDirectory() as tmp:
        journal = results.Journal(tmp, publish=publish, every_s=3600)
        for op in ops:
            if op == "append":
                appended.append(f"e{len(appended)}")
                journal.append(_row(appended[-1]))
            else:
                failing[0] = op == "fail"
                done = journal.publish_pending()
                assert done or failing[0]
        failing[0] = False
        journal.close()
    got = results.journal_table(b"".join(delivered)).column("environment").to_pylist()
    assert got == appended


def test_journal_batches_are_bounded_and_end_on_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "PUBLISH_BATCH_BYTES", 3000)
    calls = []
    with results.Journal(tmp_path, publish=calls.append, every_s=3600) as journal:
        for i in range(20):
            journal.append(_row(f"e{i}", error="x" * (5000 if i == 7 else 10)))  # one line longer than a batch
    assert len(calls) > 5 and all(c.endswith(b"\n") for c in calls)
    assert all(len(c) <= 3000 for c in calls if b"x" * 5000 not in c)
    assert results.journal_table(b"".join(calls)).column("environment").to_pylist() == [f"e{i}" for i in range(20)]
