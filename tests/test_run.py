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
