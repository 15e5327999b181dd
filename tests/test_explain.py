"""harness.explain: layer traces of real Keras models and their layer-by-layer comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness import arrays
from harness.explain import compare_traces, divergence, first_divergent, most_growth
from harness.records import CellResult
from harness.tracing import arrays_to_trace, trace_layers, trace_to_arrays


def _call(name, inputs, outputs):
    return {"name": name, "inputs": inputs, "outputs": outputs}


def test_compare_traces_finds_the_start_and_the_growth():
    x = np.linspace(1, 2, 12, dtype=np.float32).reshape(3, 4)
    bumped = x.copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(9))
    big = x * np.float32(1.01)
    ref = [_call("a", [x], [x]), _call("b", [x], [x]), _call("c", [x], [x])]
    obs = [_call("a", [x], [x]), _call("b", [x], [bumped]), _call("c", [bumped], [big])]
    diffs = compare_traces(ref, obs)
    assert [d.bits for d in diffs] == ["same", "differs", "differs"]
    assert first_divergent(diffs).name == "b"
    assert diffs[1].growth == math.inf and diffs[1].max_ulp_diff == 1  # inputs bitwise: it starts here
    assert diffs[2].growth > 1e3  # 1% from a one-ULP input difference
    assert most_growth(diffs).name == "c"  # the largest finite rate of change
    assert most_growth(diffs[:2]).name == "b"  # with only a start, the start
    assert diffs[0].growth is None and diffs[0].output_divergence == 0


def test_compare_traces_refuses_different_models():
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="different layers"):
        compare_traces([_call("a", [x], [x])], [_call("b", [x], [x])])


def test_divergence_is_relative_and_zero_when_equal():
    r = np.array([1.0, -2.0, 3.0], np.float32)
    assert divergence([r], [r]) == 0.0
    assert divergence([r], [r * 1.5]) == pytest.approx(0.5)


def test_trace_round_trips_through_arrow():
    trace = [_call("dense", [np.ones((2, 3), np.float32)], [np.zeros((2, 4), np.float32)]),
             _call("nested/lookup", [np.array([1, 2])], [np.ones((2,), np.int64), np.ones((2, 2), np.float32)])]
    table_arrays, _ = arrays.read_ipc(arrays.to_ipc_bytes(trace_to_arrays(trace)))
    back = arrays_to_trace(table_arrays)
    assert [c["name"] for c in back] == ["dense", "nested/lookup"]
    assert all(np.array_equal(a, b) for c, d in zip(trace, back) for a, b in zip(c["outputs"], d["outputs"]))


def _nonfinite_trace():
    """Three layer calls: the second's outputs differ by Inf vs finite and NaN vs finite."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    bad = x.copy()
    bad[0, 0], bad[1, 1] = np.inf, np.nan
    ref = [_call("a", [x], [x]), _call("b", [x], [x]), _call("c", [x], [x])]
    obs = [_call("a", [x], [x]), _call("b", [x], [bad]), _call("c", [bad], [bad])]
    return compare_traces(ref, obs)


def test_a_layer_that_differs_by_nan_or_inf_is_stored_reloaded_and_shown():
    """'inf' strings mixed with floats in one Arrow column crashed explain (exit 3); text() and the chart too."""
    from harness import report, results
    from harness.explain import Explanation, Localisation, layers_ipc

    diffs = _nonfinite_trace()
    assert [d.bits for d in diffs] == ["same", "differs", "differs"]
    assert diffs[1].max_ulp_diff == math.inf and diffs[1].max_abs_diff == math.inf
    back, _ = arrays.read_ipc(layers_ipc(diffs))  # floats stay floats: NaN/Inf are numbers in Arrow
    assert back["max_ulp_diff"].dtype == np.float64 and back["max_ulp_diff"][1] == math.inf
    assert list(back["bits"]) == ["same", "differs", "differs"] and list(back["name"]) == ["a", "b", "c"]
    exp = Explanation("s/keras/e", "mismatch", localisation=Localisation("keras", None, tuple(diffs), "b", "b"))
    text = json.dumps(exp.to_dict(), allow_nan=False)  # strict JSON
    again = Explanation.from_dict(json.loads(text))
    assert again == exp
    shown = again.text()
    assert "inf ULP" in shown and "differs" in shown
    table = results.to_table([CellResult(run_id="r", scenario="s", format="keras", environment="e",
                                         verdict="mismatch")])
    html = report.render(table, "html", explanations={again.cell: again})
    assert html.count("<rect") == 3


def test_layers_say_same_or_differs_never_a_cell_verdict():
    from harness.explain import Explanation, Localisation

    diffs = _nonfinite_trace()
    exp = Explanation("s/keras/e", "mismatch", localisation=Localisation("keras", None, tuple(diffs), "b", "b"))
    layer_lines = [line for line in exp.text().splitlines() if line.startswith("    ")]
    assert len(layer_lines) == 3
    for line in layer_lines:
        assert ("same" in line or "differs" in line) and not any(
            v in line for v in ("bitwise", "within_tolerance", "mismatch"))
    stored = exp.to_dict()["localisation"]["layers"]
    assert [layer["bits"] for layer in stored] == ["same", "differs", "differs"] and "verdict" not in stored[0]


def test_an_explanation_stored_with_layer_verdicts_still_loads():
    from harness.explain import Explanation

    old = {"cell": "s/keras/e", "verdict": "within_tolerance",
           "localisation": {"format": "keras", "note": None, "first": "b", "growth": "b", "error": None,
                            "layers": [{"index": 0, "name": "a", "verdict": "bitwise", "max_ulp_diff": 0.0,
                                        "max_abs_diff": 0.0, "mismatch_fraction": 0.0, "input_divergence": 0.0,
                                        "output_divergence": 0.0, "growth": None},
                                       {"index": 1, "name": "b", "verdict": "mismatch", "max_ulp_diff": 2.0,
                                        "max_abs_diff": 1e-7, "mismatch_fraction": 0.5, "input_divergence": 0.0,
                                        "output_divergence": 1e-8, "growth": "inf"}]}}
    exp = Explanation.from_dict(old)
    assert [d.bits for d in exp.localisation.layers] == ["same", "differs"]
    assert exp.localisation.layers[1].growth == math.inf


def test_attribution_of_a_cpu_isa_cell_when_training_turns_onednn_off():
    """Deriving 'without onednn' (onednn: false + cpu_isa) used to fail the whole explain with exit 2."""
    from harness.explain import attribution_environments, knob_differences
    from harness.spec import parse_sweep

    sweep = parse_sweep({"scenarios": ["s"], "training": {"onednn": False},
                         "environments": {"isa": {"cpu_isa": "avx2", "threads": 2}}})
    env = sweep.environment("isa")
    knobs = knob_differences(sweep, env)
    assert {k.name for k in knobs} == {"onednn", "threads", "cpu_isa"}
    variants = attribution_environments(sweep, env, knobs)
    assert len(variants) == 2 * len(knobs)
    by = {(v.knob.name, v.kind): v for v in variants}
    # cpu_isa needs oneDNN on: it cannot be added to training's onednn: false alone
    assert by[("cpu_isa", "only")].env is None and "cannot be varied alone" in by[("cpu_isa", "only")].error
    assert "onednn: false" in by[("cpu_isa", "only")].error
    # the other variants are real environments, judged as expect: any
    threads = by[("threads", "only")].env
    assert threads.threads == 2 and threads.onednn is False and threads.expect == "any"
    assert by[("cpu_isa", "without")].env.cpu_isa is None and by[("cpu_isa", "without")].env.threads == 2


def test_results_tables_are_read_as_typed_cells():
    from harness import results
    from harness.explain import UnknownCell, cells_to_explain, find_cell, layered_artifact
    def cell(fmt, env, verdict, **kw):
        return CellResult(run_id="r1", scenario="s", format=fmt, environment=env, verdict=verdict, **kw)

    table = results.to_table([cell("keras", "a", "bitwise", artifact_digest="k1"),
                              cell("savedmodel", "a", "mismatch", artifact_digest="sm"),
                              cell("keras", "b", "error", error="boom"),
                              cell("keras", "a", "within_tolerance", artifact_digest="k2",
                                   fingerprint={"cpu_model": "x"})])  # a later row of a cell wins
    found = find_cell(table, "s/keras/a")
    assert isinstance(found, CellResult) and found.verdict == "within_tolerance"
    assert found.fingerprint == {"cpu_model": "x"}
    assert cells_to_explain(table) == ["s/savedmodel/a", "s/keras/a"]
    source = layered_artifact(results.cells(table), find_cell(table, "s/savedmodel/a"))
    assert (source.format, source.path) == ("keras", "artifacts/s/k2") and "keeps no layer structure" in source.note
    with pytest.raises(UnknownCell, match="is not a cell of this run; did you mean"):
        find_cell(table, "s/keras/c")
    with pytest.raises(UnknownCell, match="name a cell as SCENARIO/FORMAT/ENVIRONMENT"):
        find_cell(table, "s")


@pytest.fixture(scope="module")
def keras_models():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    functional = keras.Model(inp, keras.layers.Dense(4, name="d2")(h), name="functional")  # not numbered by history
    nested = keras.Sequential([keras.Input((8,)), functional, keras.layers.Dense(1, name="head")])
    recurrent = keras.Sequential([keras.Input((6,)), keras.layers.Embedding(20, 4, mask_zero=True, name="emb"),
                                  keras.layers.LSTM(3, name="lstm"), keras.layers.Dense(2, name="out")])
    return functional, nested, recurrent


@pytest.mark.parametrize("jit", [False, True])
def test_trace_layers_of_functional_nested_and_recurrent_models(keras_models, jit):
    functional, nested, recurrent = keras_models
    x = np.random.default_rng(0).random((10, 8)).astype(np.float32)
    trace = trace_layers(nested, x, batch_size=4, jit_compile=jit)
    assert [c["name"] for c in trace] == ["functional/d1", "functional/d2", "head"]
    assert trace[0]["inputs"][0].shape == (10, 8) and trace[-1]["outputs"][0].shape == (10, 1)
    np.testing.assert_allclose(trace[-1]["outputs"][0], nested.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    tokens = np.random.default_rng(1).integers(0, 20, (5, 6))
    names = [c["name"] for c in trace_layers(recurrent, tokens, batch_size=5, jit_compile=jit)]
    assert names == ["emb", "lstm", "out"]  # the LSTM is one step: its cell runs inside a loop
    # The model's own call is untouched afterwards.
    assert "wrapper" not in repr(functional.layers[1].call)


# -- end to end: a difference known to start at one layer, caused by one knob ------------------
# tests/scenarios/nudge.py: Rescaling -> BatchNudge (+1 ULP at batch size 1) -> Dense.
# ``two-knobs`` sets batch_size 1 *and* threads 1; the single-knob environments are run alongside,
# so the attribution is checked against what each knob really does on this machine.
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from test_cli import RUN_TIMEOUT, explain as explain_proc, rows_by_cell, run_cli, write_sweep  # noqa: E402

from harness import results  # noqa: E402
from harness.storage import Storage  # noqa: E402

TESTS = Path(__file__).parent
NUDGE = "test-batch-nudge"


@pytest.fixture(scope="module")
def nudged(tmp_path_factory):
    """A CLI run with ``explain: true``: (run dir, its process, its cells)."""
    tmp = tmp_path_factory.mktemp("explain")
    doc = {"name": "explain-nudge", "storage": str(tmp / "store"), "scenarios": [NUDGE], "formats": ["keras"],
           "explain": True, "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180},
           "environments": {"same": {}, "two-knobs": {"batch_size": 1, "threads": 1, "expect": "any"},
                            "only-batch": {"batch_size": 1, "expect": "any"},
                            "only-threads": {"threads": 1, "expect": "any"}}}
    write_sweep(tmp, "sweep.yaml", doc)
    proc = run_cli("run", "sweep.yaml", "--scenarios-path", TESTS / "scenarios", "--out", tmp / "run",
                   cwd=tmp, timeout=2 * RUN_TIMEOUT)
    assert proc.returncode == 0, explain_proc(proc)
    return tmp / "run", proc, {env: row for (_, _, env), row in rows_by_cell(tmp / "run").items()}


def _outputs(row: dict) -> dict[str, np.ndarray]:
    uri = row["observation_uri"]
    base = str(Path(uri.split("://", 1)[-1]))
    return arrays.read_ipc(Path(base).read_bytes())[0]


def _same_bits(a: dict, b: dict) -> bool:
    from harness.compare import bits_equal

    return set(a) == set(b) and all(bits_equal(a[k], b[k]) for k in a)


def test_localisation_names_the_layer_where_the_difference_starts(nudged):
    run_dir, proc, rows = nudged
    assert rows["two-knobs"]["verdict"] in ("within_tolerance", "mismatch"), rows["two-knobs"]
    exp = json.loads((run_dir / "explain" / NUDGE / "keras" / "two-knobs.json").read_text())
    loc = exp["localisation"]
    names = [layer["name"] for layer in loc["layers"]]
    assert names == ["scale", "nudge", "head"], names
    assert [layer["bits"] for layer in loc["layers"]][0] == "same"  # elementwise: same bits at any batch
    assert loc["first"] == "nudge" and loc["layers"][1]["bits"] == "differs"
    assert loc["layers"][1]["growth"] == "inf"  # its inputs were bitwise: the difference starts here
    assert f"{NUDGE}/keras/two-knobs: starts at nudge" in proc.stderr
    # the per-layer comparison is also stored as Arrow next to the cell's observation
    store = Storage.open(str(run_dir.parent / "store"))
    assert store.exists(f"runs/{rows['two-knobs']['run_id']}/explain/{NUDGE}/keras/two-knobs.arrow")


def test_attribution_agrees_with_the_single_knob_environments(nudged):
    run_dir, _, rows = nudged
    exp = json.loads((run_dir / "explain" / NUDGE / "keras" / "two-knobs.json").read_text())
    findings = {f["knob"]["name"]: f for f in exp["findings"]}
    assert set(findings) == {"batch_size", "threads"}, findings
    cell = _outputs(rows["two-knobs"])
    for knob, env in (("batch_size", "only-batch"), ("threads", "only-threads")):
        alone = _outputs(rows[env])  # run independently, in the sweep itself
        assert findings[knob]["only_reproduces"] == _same_bits(alone, cell), (knob, findings[knob])
    # by construction batch size 1 changes layer `nudge` on every CPU: batch_size alone gives the cell's bits
    assert findings["batch_size"]["only_reproduces"] is True
    if rows["only-threads"]["verdict"] == "bitwise":  # threads 1 changed nothing here: batch_size explains it all
        assert findings["batch_size"]["without_restores"] is True  # the cell minus batch size 1 = threads 1 alone
        assert findings["threads"]["only_ulp"] == 0 and findings["threads"]["without_restores"] is False
        assert exp["summary"] == "explained by batch size 1"


def test_reports_show_the_explanation(nudged):
    run_dir, _, _ = nudged
    md = (run_dir / "report.md").read_text()
    assert "## Explanations" in md and "starts at layer: nudge" in md
    assert "| 1 | nudge |" in md  # the per-layer table
    proc = run_cli("report", run_dir, "--format", "html")
    assert proc.returncode == 0, explain_proc(proc)
    assert '<section id="explanations">' in proc.stdout and '<svg class="depth"' in proc.stdout
    assert proc.stdout.count("<rect") >= 3  # one bar per layer call


def test_explain_command_reuses_the_attribution_and_prints_json(nudged):
    run_dir, _, _ = nudged
    proc = run_cli("explain", run_dir, f"{NUDGE}/keras/two-knobs", "--scenarios-path", TESTS / "scenarios",
                   "--json", timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain_proc(proc)
    again = json.loads(proc.stdout)
    stored = json.loads((run_dir / "explain" / NUDGE / "keras" / "two-knobs.json").read_text())
    assert again == stored and again["localisation"]["first"] == "nudge"


def test_a_bitwise_cell_has_nothing_to_explain(nudged):
    run_dir, _, rows = nudged
    assert rows["same"]["verdict"] == "bitwise"
    proc = run_cli("explain", run_dir, f"{NUDGE}/keras/same", "--scenarios-path", TESTS / "scenarios")
    assert proc.returncode == 0, explain_proc(proc)
    assert "nothing to explain" in proc.stdout


@pytest.mark.parametrize("cell, fragment", [
    (f"{NUDGE}/keras/two-knob", "did you mean"),
    ("not-a-cell", "name a cell as SCENARIO/FORMAT/ENVIRONMENT"),
])
def test_bad_cell_names_are_exit_2(nudged, cell, fragment):
    run_dir, _, _ = nudged
    proc = run_cli("explain", run_dir, cell, "--scenarios-path", TESTS / "scenarios")
    assert proc.returncode == 2, explain_proc(proc)
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_explain_finds_the_runs_scenarios_without_scenarios_path(nudged):
    """The run remembers where its scenarios came from (run.json): --scenarios-path is not needed again."""
    run_dir, _, _ = nudged
    recorded = json.loads((run_dir / "run.json").read_text())
    assert str((TESTS / "scenarios").resolve()) in recorded["scenario_paths"]
    proc = run_cli("explain", run_dir, f"{NUDGE}/keras/two-knobs", "--no-attribution", timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain_proc(proc)
    assert "starts at layer: nudge" in proc.stdout


def test_explain_refuses_a_run_whose_sweep_file_changed_since(nudged, tmp_path):
    run_dir, _, _ = nudged
    source = Path(json.loads((run_dir / "run.json").read_text())["source"])
    original = source.read_text()
    try:
        source.write_text(original.replace("threads: 1", "threads: 2", 1))
        proc = run_cli("explain", run_dir, f"{NUDGE}/keras/two-knobs")
        assert proc.returncode == 2, explain_proc(proc)
        assert "changed since run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        source.write_text(original)
