"""harness.explain: layer traces of real Keras models and their layer-by-layer comparison."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

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


# -- accuracy per layer against the float64 rebuild -------------------------------------------------
def _float_trace(layers: dict) -> list[dict]:
    """A trace of layer calls ``name -> output`` (each layer's input: the previous output)."""
    calls, previous = [], None
    for name, out in layers.items():
        calls.append(_call(name, [previous if previous is not None else out], [out]))
        previous = out
    return calls


def _three_traces():
    """float64 truth, the reference (truth in float32), and a cell: the reference until layer b, bf16 from b on."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    truth = {name: rng.normal(size=(16, 8)) for name in ("a", "b", "c")}
    ref = {k: v.astype(np.float32) for k, v in truth.items()}
    obs = {"a": ref["a"], "b": truth["b"].astype(ml_dtypes.bfloat16), "c": truth["c"].astype(ml_dtypes.bfloat16)}
    return _float_trace(ref), _float_trace(obs), _float_trace(truth)


def test_layer_accuracy_is_the_cells_rule_applied_to_each_layer():
    from harness.compare import Tolerance, judge_accuracy
    from harness.explain import first_less_accurate, layer_accuracy, with_accuracy

    ref, obs, truth = _three_traces()
    accs = layer_accuracy(ref, obs, truth, Tolerance())
    assert [a.tier for a in accs] == ["as_accurate", "less_accurate", "less_accurate"]
    for r, o, t, acc in zip(ref, obs, truth, accs):  # one owner: exactly what judge_accuracy says of those arrays
        direct = judge_accuracy({"out/0": t["outputs"][0]}, {"out/0": r["outputs"][0]}, {"out/0": o["outputs"][0]},
                                {"out/0": 1e-6})
        assert (acc.tier, acc.rmse, acc.reference_rmse, acc.note) == (direct.tier, direct.rmse,
                                                                        direct.reference_rmse, direct.note)
    diffs = with_accuracy(compare_traces(ref, obs), accs)
    assert first_divergent(diffs).name == "b" and first_less_accurate(diffs).name == "b"
    assert diffs[0].rmse_vs_fp64 == diffs[0].reference_rmse_vs_fp64 > 0  # same bits, same error
    assert diffs[1].rmse_vs_fp64 > 100 * diffs[1].reference_rmse_vs_fp64
    assert accs[1].note.startswith("out/0: rmse vs float64 ") and " > 3 x reference's " in accs[1].note


def test_layer_accuracy_says_what_it_cannot_judge():
    from harness.compare import Tolerance
    from harness.explain import layer_accuracy

    ids = np.arange(6).reshape(3, 2)
    x = np.ones((3, 2), np.float32)
    ref = [_call("lookup", [ids], [ids]), _call("fixed", [x], [x])]
    truth = [_call("lookup", [ids], [ids]), _call("fixed", [x], [x])]  # a layer that keeps float32 in the rebuild
    accs = layer_accuracy(ref, ref, truth, Tolerance())
    assert accs[0].tier == "n/a" and "integer output" in accs[0].note
    assert accs[1].tier == "n/a" and "the float64 rebuild still computes it in float32" in accs[1].note
    with pytest.raises(ValueError, match="float64 rebuild called other layers"):
        layer_accuracy(ref, ref, truth[:1], Tolerance())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5), st.integers(0, 4))
def test_a_layer_with_the_references_bits_is_never_less_accurate(seeds, noisy_from):
    """Whatever the float64 truth, bits equal to the reference's are as accurate; the loss is found where it starts."""
    from harness.compare import Tolerance
    from harness.explain import first_less_accurate, layer_accuracy, with_accuracy

    truth = {f"l{i}": np.random.default_rng(s).normal(size=(4, 3)) * 10.0 ** (s % 7 - 3) for i, s in enumerate(seeds)}
    ref = {k: v.astype(np.float32) for k, v in truth.items()}
    obs = {k: (v if i < noisy_from else (truth[k] + 1e3 * np.abs(truth[k]).max() + 1).astype(np.float32))
           for i, (k, v) in enumerate(ref.items())}
    r, o, t = _float_trace(ref), _float_trace(obs), _float_trace(truth)
    diffs = with_accuracy(compare_traces(r, o), layer_accuracy(r, o, t, Tolerance()))
    assert all(d.accuracy == "as_accurate" for d in diffs[:noisy_from])
    lost = first_less_accurate(diffs)
    assert (lost.index if lost else None) == (noisy_from if noisy_from < len(seeds) else None)


def test_an_explanation_with_layer_accuracy_round_trips_and_reads():
    from harness import report, results
    from harness.compare import Tolerance
    from harness.explain import Explanation, Localisation, layer_accuracy, layers_ipc, with_accuracy

    ref, obs, truth = _three_traces()
    accs = layer_accuracy(ref, obs, truth, Tolerance())
    diffs = tuple(with_accuracy(compare_traces(ref, obs), accs))
    exp = Explanation("s/keras/serve-bf16", "mismatch", localisation=Localisation(
        "keras", None, diffs, "b", "b", accuracy_lost_at="b", accuracy_note=accs[1].note))
    again = Explanation.from_dict(json.loads(json.dumps(exp.to_dict(), allow_nan=False)))
    assert again == exp
    text = again.text()
    assert f"loses accuracy at layer: b ({accs[1].note})" in text
    layer_lines = [line for line in text.splitlines() if line.startswith("    ")]
    assert "as_accurate" in layer_lines[0] and "less_accurate" in layer_lines[1]
    stored, _ = arrays.read_ipc(layers_ipc(diffs))  # the Arrow per-layer file
    assert list(stored["accuracy"]) == ["as_accurate", "less_accurate", "less_accurate"]
    assert stored["rmse_vs_fp64"].tolist() == [d.rmse_vs_fp64 for d in diffs]
    assert stored["reference_rmse_vs_fp64"].tolist() == [d.reference_rmse_vs_fp64 for d in diffs]
    table = results.to_table([CellResult(run_id="r", scenario="s", format="keras", environment="serve-bf16",
                                         verdict="mismatch")])
    md = report.render(table, "md", explanations={again.cell: again})
    assert "- loses accuracy at layer: b (out/0: rmse vs float64" in md
    assert "| vs float64 | rmse vs fp64 | reference's rmse vs fp64 |" in md and "| less_accurate |" in md
    html = report.render(table, "html", explanations={again.cell: again})
    assert "loses accuracy at layer" in html and "less_accurate" in html
    # none lost; not judged (and why); stored before layers were judged: no claim either way
    fine = Localisation("keras", None, diffs[:1], None, None)
    assert fine.accuracy_fact() == ("loses accuracy at layer",
                                    "none (every layer is as accurate as the reference against float64)")
    why = Localisation("keras", None, diffs, "b", "b", accuracy_unavailable="the model cannot be rebuilt in float64")
    assert "  accuracy vs float64: not judged: the model cannot be rebuilt in float64" in \
        Explanation("s/keras/e", "mismatch", localisation=why).text()
    old = Localisation("keras", None, tuple(dataclasses.replace(d, accuracy=None) for d in diffs), "b", "b")
    assert old.accuracy_fact() is None and "accuracy" not in Explanation("s/keras/e", "mismatch",
                                                                         localisation=old).text()


def test_dtype_policy_is_a_knob_whose_variants_are_valid_environments():
    from harness.explain import attribution_environments, knob_differences
    from harness.spec import parse_sweep

    sweep = parse_sweep({"scenarios": ["s"], "environments": {"serve-bf16": {"dtype_policy": "mixed_bfloat16"}}})
    env = sweep.environment("serve-bf16")
    (knob,) = knob_differences(sweep, env)
    assert (knob.name, knob.training, knob.cell, knob.label) == ("dtype_policy", None, "mixed_bfloat16",
                                                                 "dtype policy mixed_bfloat16")
    by = {v.kind: v for v in attribution_environments(sweep, env, [knob])}
    assert by["only"].error is None and by["only"].env.dtype_policy == "mixed_bfloat16"
    assert by["only"].env.name == "serve-bf16.only-dtype_policy" and by["only"].env.expect == "any"
    assert by["without"].error is None and by["without"].env.dtype_policy is None
    # the variants are environments a sweep accepts (a training environment with a policy is refused)
    from harness.spec import environment_document

    doc = {"scenarios": ["s"], "environments": {v.env.name: environment_document(v.env) for v in by.values()}}
    assert {e.name: e.dtype_policy for e in parse_sweep(doc).environments} == {
        "serve-bf16.only-dtype_policy": "mixed_bfloat16", "serve-bf16.without-dtype_policy": None}


# -- traces in a worker: the environment's dtype policy, the float64 rebuild, a model without an oracle ------
def _unrebuildable_layer():
    import keras

    class Shift(keras.layers.Layer):
        """Takes a function: Keras cannot save its config, so the model has no float64 rebuild."""

        def __init__(self, fn, **kwargs):
            super().__init__(**kwargs)
            self.fn = fn

        def call(self, x):
            return self.fn(x)

    return Shift


def _unrebuildable_model():
    import keras

    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"),
                             _unrebuildable_layer()(lambda x: x + 0.5, name="shift")])


def test_worker_trace_without_an_oracle_says_why_and_still_traces_the_bits(tmp_path):
    from harness import Scenario
    from harness.spec import Environment
    from harness.train import train
    from harness.worker import TraceJob, Worker

    scenario = Scenario(name="test-no-float64", build=_unrebuildable_model, seed=1,
                        data=lambda rng: (rng.normal(size=(16, 4)).astype(np.float32),
                                          rng.normal(size=(16, 3)).astype(np.float32)),
                        probe=lambda rng: rng.normal(size=(8, 4)).astype(np.float32),
                        compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 1})
    store = str(tmp_path / "store")
    art = train(scenario, ["weights"], store, Environment(name="training")).artifacts["weights"]
    worker = Worker({"training": Environment(name="training")}, {scenario.name: scenario}, store)
    traced = worker.trace(TraceJob(scenario.name, "weights", art.path, art.manifest_sha256, 32, False, "t/ref.arrow",
                                   oracle_path="t/f64.arrow"))
    assert traced.layers == ("d", "shift")
    assert traced.oracle_unavailable.startswith("the model cannot be rebuilt in float64: NotImplementedError")
    st_ = Storage.open(store)
    assert st_.exists("t/ref.arrow") and not st_.exists("t/f64.arrow")


# -- end to end: an article model served in bfloat16, and under XLA -----------------------------------
# The question of issue 19: where does the bf16 environment lose accuracy? Every expectation below
# is read from what the arbiter computed on this machine (the cells' accuracy tiers, the oracle).
DENSE = "seed-dense-regression"
SERVING = {
    "name": "explain-serving", "scenarios": [DENSE], "formats": ["keras"], "expect": "any",
    "environments": {"cpu-default": {}, "cpu-xla": {"jit_compile": True},
                     "serve-bf16": {"dtype_policy": "mixed_bfloat16"}},
    "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180},
}


@pytest.fixture(scope="module")
def served(scenarios, tmp_path_factory):
    """The run's cells and its explanations of every cell that is not bitwise (one embedded Ray)."""
    import ray
    import yaml

    from harness.explain import cells_to_explain, explain_cells
    from harness.spec import parse_sweep
    from harness.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("served")
    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0, log_to_driver=False,
             logging_level="ERROR")
    try:
        sweep = parse_sweep(yaml.safe_load(yaml.safe_dump(SERVING)), source=str(tmp / "serving.yaml"))
        res = run_sweep(sweep, scenarios, out_dir=tmp / "run", storage=str(tmp / "store"))
        asked = cells_to_explain(res.table)
        served_cells = [c for c in asked if c.endswith("/serve-bf16")]  # attributed; the others only localised
        others = [c for c in asked if c not in served_cells]
        explained = {**dict(zip(served_cells, explain_cells(res.run, sweep, scenarios, served_cells))),
                     **dict(zip(others, explain_cells(res.run, sweep, scenarios, others, attribution=False)))}
    finally:
        ray.shutdown()
    cells = {c.environment: c for c in results.cells(res.table)}
    return res, cells, explained


def _traces(res, cell):
    st_ = Storage.open(res.storage_uri)
    return {part: arrays_to_trace(arrays.read_ipc(st_.read_bytes(res.run.explain_path(cell, part)))[0])
            for part in ("training", "cell", "float64")}


def test_bf16_serving_loses_accuracy_where_the_arbiter_says_and_the_policy_is_the_cause(served):
    res, cells, explained = served
    cell = cells["serve-bf16"]
    assert cell.accuracy == "less_accurate", cell.accuracy_note  # the cell itself, judged at replay
    exp = explained[cell.name]
    loc = exp.localisation
    assert loc.error is None and loc.accuracy_unavailable is None, loc
    tiers = [d.accuracy for d in loc.layers]
    assert loc.accuracy_lost_at == next(d.name for d in loc.layers if d.accuracy == "less_accurate"), tiers
    assert tiers[-1] == cell.accuracy  # the last layer's outputs are the model's: the same verdict as the cell's
    lost = next(d for d in loc.layers if d.name == loc.accuracy_lost_at)
    assert lost.rmse_vs_fp64 > 3 * lost.reference_rmse_vs_fp64
    assert loc.accuracy_note.startswith("out/0: rmse vs float64")
    # the cell's trace ran under the policy, the third trace in float64 on the probe cast to float64
    traces = _traces(res, cell)
    assert {o.dtype.name for c in traces["cell"] for o in c["outputs"]} == {"bfloat16"}
    assert {a.dtype.name for c in traces["float64"] for a in c["inputs"] + c["outputs"]} == {"float64"}
    assert exp.summary == "explained by dtype policy mixed_bfloat16", exp.text()
    (finding,) = exp.findings
    assert finding.knob.name == "dtype_policy" and finding.only_reproduces and finding.without_restores
    assert f"loses accuracy at layer: {loc.accuracy_lost_at} (" in exp.text()


def test_the_float64_trace_is_the_oracle_the_cells_were_judged_by(served):
    res, cells, _ = served
    cell = cells["serve-bf16"]
    from harness import layout

    local, _ = Storage.open(res.storage_uri).get_dir(layout.artifact_of_uri(cell.artifact_uri),
                                                     expected_manifest_sha256=cell.manifest_sha256)
    oracle, _ = arrays.read_ipc(f"{local}/oracle.arrow")
    last = _traces(res, cell)["float64"][-1]["outputs"][0]
    np.testing.assert_allclose(last, oracle["output"], rtol=1e-12, atol=0)  # the same rebuild, traced


def test_xla_changes_bits_but_no_layer_loses_accuracy(served):
    _, cells, explained = served
    cell = cells["cpu-xla"]
    if cell.verdict == "bitwise":  # XLA reproduced oneDNN's bits on this CPU: nothing to explain
        assert cell.name not in explained
        return
    assert cell.accuracy == "as_accurate", cell.accuracy_note
    loc = explained[cell.name].localisation
    assert all(d.accuracy == "as_accurate" for d in loc.layers), loc.layers
    assert loc.accuracy_lost_at is None and loc.first is not None
    assert "loses accuracy at layer: none" in explained[cell.name].text()


def test_per_layer_accuracy_is_stored_in_json_and_arrow(served):
    res, cells, explained = served
    cell = cells["serve-bf16"]
    stored = json.loads(res.run.explanation_file(cell.name).read_text())
    assert stored["localisation"]["accuracy_lost_at"] == explained[cell.name].localisation.accuracy_lost_at
    layers, _ = arrays.read_ipc(Storage.open(res.storage_uri).read_bytes(res.run.explain_path(cell)))
    assert list(layers["accuracy"]) == [d["accuracy"] for d in stored["localisation"]["layers"]]
    assert layers["rmse_vs_fp64"].tolist() == [d["rmse_vs_fp64"] for d in stored["localisation"]["layers"]]
