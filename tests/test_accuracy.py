"""Worse, or just different? The float64 oracle, accuracy tiers, task metrics and dtype_policy.

Pure parts (``meets`` and its expectation texts) are unit/property tests; the rest is real
TensorFlow: the article models and a labelled classifier trained once per module, replayed
in this process (batch size 1, XLA, served under a dtype policy) and, for oneDNN off
(an import-time knob), through a real sweep on an embedded Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings, strategies as st

from harness import arrays, formats, results
from harness.records import EXPECTATIONS, CellResult, meets, metric_delta_bound, metric_delta_text
from harness.replay import read_reference, replay
from harness.spec import Environment, parse_sweep
from harness.storage import Storage
from harness.train import train

# -- expectations (pure) ---------------------------------------------------------------------------
NUMERIC = ("bitwise", "within_tolerance", "mismatch")


@pytest.mark.parametrize("verdict,accuracy,weights,passes", [
    ("bitwise", None, True, True),                    # identical bits: as accurate, oracle or not
    ("bitwise", "n/a", True, True),
    ("within_tolerance", "as_accurate", True, True),
    ("within_tolerance", "less_accurate", True, False),  # "fails less_accurate", tolerance or not
    ("within_tolerance", "n/a", True, True),          # no oracle: the tolerance is all there is to judge by
    ("mismatch", "as_accurate", True, True),          # different bits, equally accurate
    ("mismatch", "less_accurate", True, False),
    ("mismatch", "n/a", True, False),
    ("mismatch", "as_accurate", False, False),         # a parameter not restored is a broken save
    ("error", None, None, False),
    ("unschedulable", None, None, False),
])
def test_accurate_expectation(verdict, accuracy, weights, passes):
    assert meets(verdict, "accurate", accuracy=accuracy, weights_equal=weights) is passes


@pytest.mark.parametrize("verdict,delta,weights,passes", [
    ("bitwise", None, True, True),
    ("within_tolerance", 0.0, True, True),
    ("mismatch", -0.001, True, True),                 # the bound is on |delta|, either way
    ("mismatch", 0.0011, True, False),
    ("mismatch", None, True, False),                  # no metric: cannot be judged
    ("mismatch", math.nan, True, False),
    ("mismatch", 0.0, False, False),
    ("corrupt", 0.0, None, False),
])
def test_metric_delta_expectation(verdict, delta, weights, passes):
    assert meets(verdict, metric_delta_text(0.001), metric_delta=delta, weights_equal=weights) is passes


def test_expectations_are_a_ladder_and_unknown_ones_are_refused():
    for verdict in NUMERIC:
        for accuracy in ("as_accurate", "less_accurate", "n/a", None):
            kw = dict(accuracy=accuracy, weights_equal=True)
            if meets(verdict, "bitwise", **kw):
                assert meets(verdict, "tolerance", **kw)
            if meets(verdict, "accurate", **kw):
                assert meets(verdict, "any", **kw)
    assert EXPECTATIONS == ("bitwise", "tolerance", "accurate", "any")
    with pytest.raises(ValueError, match="metric_delta: D"):
        meets("bitwise", "roughly")
    cell = CellResult(verdict="mismatch", expected="accurate", accuracy="as_accurate", weights_equal=True)
    assert cell.meets() and not cell.meets("tolerance")
    with pytest.raises(ValueError, match="unknown accuracy tier"):
        CellResult(accuracy="better")


@settings(max_examples=80, deadline=None)
@given(st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_metric_delta_text_round_trips_exactly(bound):
    text = metric_delta_text(bound)
    assert metric_delta_bound(text) == bound and text.startswith("metric_delta<=")
    assert metric_delta_bound("accurate") is None and metric_delta_bound("metric_delta<=x") is None


# -- the oracle, recorded at training ---------------------------------------------------------------
ARTICLE = ["seed-binary-classifier", "seed-linear-regression", "seed-dense-regression"]
FORMATS = ["keras", "savedmodel", "weights"]
TRAINING = Environment(name="training")


@pytest.fixture(scope="module")
def trained(scenarios, store):
    """The article models and the labelled classifier, trained once, saved as keras, savedmodel and weights."""
    return {name: train(scenarios[name], FORMATS, store, TRAINING) for name in [*ARTICLE, "test-labelled"]}


def _local(store: str, path: str) -> tuple[str, dict, dict]:
    local, manifest = Storage.open(store).get_dir(path)
    return local, manifest, json.loads(Path(local, "reference.json").read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_artifact_holds_the_float64_oracle(trained, store, fmt):
    for name in ARTICLE:
        record = trained[name]
        assert record.oracle_seconds > 0 and record.oracle_seconds < record.seconds
        local, manifest, info = _local(store, record.artifacts[fmt].path)
        assert "oracle.arrow" in manifest["files"]  # checked against its sha256 like every other file
        assert info["oracle"]["outputs"] == ["output"] and info["oracle"]["reason"] is None
        oracle, _ = arrays.read_ipc(f"{local}/oracle.arrow")
        _, reference, _ = read_reference(local)
        assert oracle["output"].dtype == np.float64 and oracle["output"].shape == reference["output"].shape
        # The same function, with float32 rounding out of the way: close to the reference, not equal to it.
        assert np.abs(oracle["output"] - reference["output"]).max() < 1e-5
        assert not np.array_equal(oracle["output"], reference["output"].astype(np.float64))


def test_rebuilding_under_float32_gives_the_reference_bit_for_bit(scenarios, trained, store):
    """The rebuild path itself changes nothing: the same policy gives the same bits (so float64 differs by dtype only)."""
    local, _, _ = _local(store, trained["seed-dense-regression"].artifacts["keras"].path)
    inputs, reference, _ = read_reference(local)
    loaded = formats.get("keras").load(f"{local}/{formats.MODEL_DIR}", scenarios["seed-dense-regression"], inputs)
    same = formats.with_dtype_policy(loaded.owner, "float32")
    out = formats.predict(lambda x: formats.call_model(same, x), inputs, 32)
    assert out["output"].tobytes() == reference["output"].tobytes()
    wide = formats.with_dtype_policy(loaded.owner, "float64")
    assert {v.dtype for v in wide.weights} == {"float64"}
    for old, new in zip(loaded.owner.weights, wide.weights):  # every weight cast exactly
        assert np.array_equal(np.asarray(new.numpy()).astype(np.float32), np.asarray(old.numpy()))


def test_labels_are_stored_and_checked_at_training(scenarios, trained, store):
    local, manifest, info = _local(store, trained["test-labelled"].artifacts["keras"].path)
    assert "labels.arrow" in manifest["files"] and info["labels"] == ["output"] and info["metric"] == "accuracy"
    labels, _ = arrays.read_ipc(f"{local}/labels.arrow")
    inputs, _, _ = read_reference(local)
    assert np.array_equal(labels["output"], np.argmax(inputs[:, :3], axis=1))
    from dataclasses import replace

    from harness.scenario import ScenarioError

    bad = replace(scenarios["test-labelled"], labels=lambda x: {"logits": np.zeros(len(x))})
    with pytest.raises(ScenarioError, match="labels\\(\\) names 'logits', but the model's outputs are 'output'"):
        train(bad, ["keras"], store, TRAINING, retrain=True)
    wrong = replace(scenarios["seed-dense-regression"], labels=lambda x: np.zeros(len(x)), metric="auc")
    with pytest.raises(ScenarioError, match="metric 'auc' on output 'output': auc needs both positive and negative"):
        train(wrong, ["keras"], store, TRAINING, retrain=True)


# -- cells judged against the oracle, in this process ---------------------------------------------
def _replay(scenarios, store, trained, name, fmt, env, batch_size=32):
    art = trained[name].artifacts[fmt]
    return replay(scenarios[name], fmt, art.path, store, env, batch_size=batch_size)


BATCH_1 = Environment(name="cpu-batch-1", batch_size=1)
XLA = Environment(name="cpu-xla", jit_compile=True)
BF16 = Environment(name="serve-bf16", dtype_policy="mixed_bfloat16")


@pytest.mark.parametrize("name", ARTICLE)
def test_other_settings_change_bits_but_not_accuracy(scenarios, store, trained, name):
    """Batch size 1 and XLA change the last bits of some outputs on some CPUs; never the accuracy."""
    for env, batch in ((BATCH_1, 1), (XLA, 32)):
        cell = _replay(scenarios, store, trained, name, "keras", env, batch)
        assert cell.verdict in ("bitwise", "within_tolerance"), cell.error
        assert cell.accuracy == "as_accurate", cell.accuracy_note
        assert cell.rmse_vs_fp64 <= 3 * cell.reference_rmse_vs_fp64 + cell.atol / 10
        assert cell.meets("accurate")
        out = cell.detail["outputs"][0]["accuracy"]
        assert out["name"] == "output" and out["multiplier"] == 3.0 and out["elements"] == 64  # 64 < 1,000: m = 3


@pytest.mark.parametrize("fmt", ["keras", "weights"])
@pytest.mark.parametrize("name", ARTICLE)
def test_serving_the_article_models_in_bfloat16_is_less_accurate(scenarios, store, trained, name, fmt):
    cell = _replay(scenarios, store, trained, name, fmt, BF16)
    assert cell.verdict == "mismatch" and "dtype bfloat16 != reference float32" in cell.error
    assert cell.accuracy == "less_accurate" and cell.rmse_vs_fp64 > 100 * cell.reference_rmse_vs_fp64
    assert cell.accuracy_note.startswith("output: rmse vs float64 ") and " > 3 x reference's " in cell.accuracy_note
    assert cell.weights_equal is True  # the artifact restored every parameter; the policy is how it is served
    assert cell.fingerprint["dtype_policy"] == "mixed_bfloat16"
    assert not cell.meets("accurate") and cell.meets("any")


def test_dtype_policy_float64_serves_the_oracle_itself(scenarios, store, trained):
    cell = _replay(scenarios, store, trained, "seed-binary-classifier", "keras",
                   Environment(name="serve-f64", dtype_policy="float64"))
    assert cell.accuracy == "as_accurate" and cell.rmse_vs_fp64 == 0.0 and cell.verdict == "mismatch"


def test_a_graph_artifact_cannot_take_a_dtype_policy(scenarios, store, trained):
    cell = _replay(scenarios, store, trained, "seed-binary-classifier", "savedmodel", BF16)
    assert cell.verdict == "error" and cell.accuracy is None
    assert "savedmodel (model.export) reloads a traced graph whose dtypes were fixed" in cell.error
    assert "use keras, h5 or weights" in cell.error


def test_task_metric_is_reported_for_every_cell(scenarios, store, trained):
    same = _replay(scenarios, store, trained, "test-labelled", "keras", Environment(name="cpu-default"))
    assert same.verdict == "bitwise" and same.metric == "accuracy"
    assert same.reference_metric == same.observed_metric and same.metric_delta == 0.0
    assert 0.5 < same.reference_metric <= 1.0  # a learnable task: far better than chance (1/3)
    assert same.meets(metric_delta_text(0.0))
    served = _replay(scenarios, store, trained, "seed-linear-regression", "keras", BF16)
    assert served.metric == "mse" and served.metric_delta is not None and served.metric_delta != 0.0
    assert served.detail["metric"]["outputs"][0]["output"] == "output"
    assert served.meets(metric_delta_text(abs(served.metric_delta)))
    assert not served.meets(metric_delta_text(abs(served.metric_delta) / 2))
    no_metric = _replay(scenarios, store, trained, "seed-dense-regression", "keras", BF16)
    assert no_metric.metric is None and no_metric.metric_delta is None


# -- the zoo: mixed precision, preprocessing, what cannot have an oracle ----------------------------
def test_zoo_oracles_say_what_they_cover_and_why_not(zoo_trained, zoo_store):
    def info(name, fmt):
        return _local(zoo_store, zoo_trained[name].artifacts[fmt].path)[2]["oracle"]

    module = info("zoo-tf-module", "tf-savedmodel")
    assert module["outputs"] == [] and "plain TwoLayerMLP, not a Keras model" in module["reason"]
    mixed = info("zoo-mixed-float16", "keras")  # float16 logits, float32 probabilities: both in float64
    assert sorted(mixed["outputs"]) == ["logits", "probs"] and mixed["reason"] is None
    strings = info("zoo-string-lookup", "keras")  # adapted vocabularies come back through Keras's own saving
    assert strings["outputs"] == ["probs"] and strings["unavailable"] == {
        "label": "string output: no rounding error to measure"}
    dtypes = info("zoo-multi-output-dtypes", "savedmodel")
    assert dtypes["outputs"] == ["scores"] and "integer output" in dtypes["unavailable"]["class_id"]
    assert info("zoo-numeric-preprocessing", "weights")["outputs"] == ["output"]


@pytest.mark.parametrize("name,fmt,tier", [
    ("zoo-mixed-bfloat16", "keras", "as_accurate"),
    ("zoo-numeric-preprocessing", "weights", "as_accurate"),
    ("zoo-string-lookup", "keras", "as_accurate"),
    ("zoo-tf-module", "tf-savedmodel", "n/a"),
])
def test_zoo_cells_in_the_training_settings(scenarios, zoo_trained, zoo_store, name, fmt, tier):
    art = zoo_trained[name].artifacts[fmt]
    cell = replay(scenarios[name], fmt, art.path, zoo_store, Environment(name="cpu-default"), batch_size=32)
    assert cell.verdict == "bitwise" and cell.accuracy == tier
    if tier == "n/a":
        assert "not a Keras model" in cell.accuracy_note and cell.rmse_vs_fp64 is None
        assert cell.meets("accurate")  # identical bits need no oracle
    else:
        assert cell.rmse_vs_fp64 == cell.reference_rmse_vs_fp64 > 0


# -- through the engine: oneDNN off is an import-time knob (its own worker process) -----------------
SWEEP = {
    "name": "accuracy-tiers",
    "scenarios": ["seed-linear-regression", "test-labelled"],
    "formats": ["keras", "savedmodel"],
    "expect": "accurate",
    "environments": {
        "cpu-default": {"expect": "bitwise"},
        "cpu-onednn-off": {"onednn": False},
        "cpu-onednn-on": {"onednn": True},
        "cpu-xla": {"jit_compile": True},
        "cpu-batch-1": {"batch_size": 1},
        "serve-bf16": {"dtype_policy": "mixed_bfloat16"},
        "serve-bf16-metric": {"dtype_policy": "mixed_bfloat16", "expect": {"metric_delta": 0.2}},
    },
    "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180},
}


@pytest.fixture(scope="module")
def tier_run(trained, scenarios, store, tmp_path_factory):
    import ray

    from harness.sweep import run_sweep

    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0, log_to_driver=False,
             logging_level="ERROR")
    try:
        sweep = parse_sweep(yaml.safe_load(yaml.safe_dump(SWEEP)), source="accuracy-tiers.yaml")
        res = run_sweep(sweep, scenarios, out_dir=tmp_path_factory.mktemp("tiers"), storage=store)
        yield {(r.scenario, r.format, r.environment): r for r in results.cells(res.table)}
    finally:
        ray.shutdown()


def test_sweep_judges_knobs_as_accurate_and_bfloat16_serving_as_less(tier_run):
    for (scenario, fmt, env), cell in tier_run.items():
        if env.startswith("serve-"):
            continue
        assert cell.verdict in ("bitwise", "within_tolerance"), (cell.name, cell.error)
        assert cell.accuracy == "as_accurate" and cell.passed is True, (cell.name, cell.accuracy_note)
    for scenario in SWEEP["scenarios"]:
        keras_cell = tier_run[(scenario, "keras", "serve-bf16")]
        assert keras_cell.accuracy == "less_accurate" and keras_cell.expected == "accurate"
        assert keras_cell.passed is False
        graph = tier_run[(scenario, "savedmodel", "serve-bf16")]
        assert graph.verdict == "error" and "dtype_policy" in graph.error and graph.passed is False
        metric_cell = tier_run[(scenario, "keras", "serve-bf16-metric")]
        assert metric_cell.expected == "metric_delta<=0.2" and metric_cell.metric_delta is not None
        assert metric_cell.passed is (abs(metric_cell.metric_delta) <= 0.2)
    # The classifier in bfloat16: less accurate, yet its decisions barely move.
    assert tier_run[("test-labelled", "keras", "serve-bf16-metric")].passed is True


def test_dtype_policy_environments_share_the_default_worker(tier_run):
    """dtype_policy changes the loaded model, not the process: no TensorFlow import of its own."""
    pid = {env: cell.fingerprint["pid"] for (s, f, env), cell in tier_run.items() if f == "keras"}
    assert pid["serve-bf16"] == pid["serve-bf16-metric"] == pid["cpu-default"] == pid["cpu-xla"]
    assert pid["cpu-onednn-off"] != pid["cpu-default"]
    bf16 = tier_run[("test-labelled", "keras", "serve-bf16")]
    assert bf16.fingerprint["dtype_policy"] == "mixed_bfloat16"
    assert "dtype_policy" not in tier_run[("test-labelled", "keras", "cpu-default")].fingerprint
