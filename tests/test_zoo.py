"""The zoo's default column, with train() and replay() as plain functions (no Ray).

For every zoo scenario x format: the save round trip (in-memory model vs its
reload in the training environment) and the ``cpu-default`` reload are bitwise
with every parameter restored -- or the cell is an ``error`` naming the
Keras/TensorFlow limitation and the format to use instead. Each scenario is
trained once per session (``zoo_trained`` in conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import arrays
from harness.replay import replay
from harness.scenario import Scenario, discover
from harness.spec import FORMATS, Environment
from harness.storage import Storage
from harness.train import train

REPO = Path(__file__).resolve().parent.parent
ZOO = yaml.safe_load((REPO / "scenarios/sweeps/zoo.yaml").read_text())["scenarios"]
DEFAULT = Environment(name="cpu-default")
TRAINING = Environment(name="training")

_H5_CALLS = "h5 (legacy HDF5) cannot reload this model in Keras 3 (its loader cannot call some layers and keras.ops"
_NOT_KERAS = "saves Keras models only: the scenario produced a TwoLayerMLP, not a keras.Model; use tf-savedmodel"
#: (scenario, format) -> the limitation the error must name (with "; use <format>"): its start, and the
#: error that really stops the load (every fragment must appear).
LIMITATIONS = {
    ("zoo-mobilenetv3-small", "h5"): (_H5_CALLS, "Only input tensors may be passed"),  # x + 3.0 in hard_sigmoid
    ("zoo-transformer-encoder", "h5"): (_H5_CALLS, "TypeError: too many positional arguments"),  # x + attention
    # the real obstacle, quoted once the unregistered classes are registered from where they are defined
    ("zoo-convnext-mini", "h5"): (_H5_CALLS, "TypeError: too many positional arguments (what stops it once "
                                  "'LayerScale', 'StochasticDepth' are registered from "
                                  "keras.src.applications.convnext.LayerScale, "
                                  "keras.src.applications.convnext.StochasticDepth"),
    ("zoo-string-lookup", "h5"): "h5 (legacy HDF5) cannot store string lookup vocabularies",
    ("zoo-noise-augmentation", "savedmodel"): "savedmodel (model.export) serves model(x) without training=False",
    **{("zoo-tf-module", f): f"{f} " + ("(legacy HDF5) " if f == "h5" else "(model.export) " if f == "savedmodel"
                                       else "(save_weights) " if f == "weights" else "") + _NOT_KERAS
       for f in ("keras", "h5", "savedmodel", "weights")},
}

#: (scenario, format) -> the classes (name: where defined) the saved model names but nothing registers
#: under that name: not a limitation; the cell says so, with the custom_objects that make it reload.
UNREGISTERED = {
    ("zoo-numeric-preprocessing", "h5"): {"GetItem": "keras.src.ops.numpy.GetItem"},  # inp[:, 1:2]
    ("zoo-multi-output-dtypes", "h5"): {"Argmax": "keras.src.ops.numpy.Argmax", "Cast": "keras.src.ops.core.Cast"},
    ("zoo-keras-hub-resnet", "h5"): {  # a keras_hub task saved under its bare class name
        "ResNetImageClassifier": "keras_hub.src.models.resnet.resnet_image_classifier.ResNetImageClassifier"},
}
#: (scenario, format) -> largest ULP of a save round trip that may not be bitwise: the restored SavedModel graph
#: of a keras_hub BERT differs from the in-memory tf.function by 1 ULP on a few elements (plain TF shows it too:
#: tests/verify_zoo_limitations.py, bert_export). Every environment is compared with the training environment's
#: reload, so the cpu-default cell itself is still bitwise.
SAVE_ULP = {("zoo-keras-hub-bert", "savedmodel"): 4, ("zoo-keras-hub-bert", "tf-savedmodel"): 4}


def test_zoo_is_discovered_and_covers_the_sweep(scenarios):
    zoo = {n for n in scenarios if n.startswith("zoo-")}
    assert set(ZOO) == zoo and len(zoo) >= 10
    assert all("/scenarios/zoo/" in scenarios[n].source_file for n in zoo)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_default_column(scenarios, zoo_store, zoo_trained, name, fmt):
    art = zoo_trained[name].artifacts[fmt]
    row = None if art.error else replay(scenarios[name], fmt, art.path, zoo_store, DEFAULT, batch_size=32)
    limitation = LIMITATIONS.get((name, fmt))
    if limitation:
        # a save that fails leaves no artifact; a reload that fails is an error in both references
        texts = [art.error] if art.error else [art.save_error, row.error]
        assert art.error or (art.save_verdict == "error" and row.verdict == "error")
        for text in texts:
            fragments = (limitation,) if isinstance(limitation, str) else limitation
            assert all(f in text for f in fragments), text
            assert text.index(fragments[0]) <= text.index(fragments[-1]), text  # the limitation, then its cause
            assert "; use " in text and "Please ensure" not in text and "UnregisteredClass" not in text, text
        return
    unregistered = UNREGISTERED.get((name, fmt))
    if unregistered:
        assert art.save_verdict == "error" and row.verdict == "error"
        fix = "custom_objects={" + ", ".join(f"{n!r}: {where}" for n, where in unregistered.items()) + "}"
        for text in (art.save_error, row.error):
            assert "UnregisteredClass" in text and "it reloads once they are" in text and fix in text, text
            assert "not a limitation of the format" in text and "FormatLimitation" not in text, text
        return
    assert art.error is None, art.error
    if (name, fmt) in SAVE_ULP:
        assert art.save_verdict in ("bitwise", "within_tolerance"), art.save_error
        assert art.save_max_ulp_diff <= SAVE_ULP[name, fmt], art.save_max_ulp_diff
    else:
        assert art.save_verdict == "bitwise", art.save_error
    assert row.verdict == "bitwise", row.error
    detail = row.detail
    assert row.weights_equal is True and detail["weight_problems"] == []
    assert detail["variables_checked"] > 0
    assert row.max_ulp_diff == 0 and row.mismatch_fraction == 0
    # the reference came from the reload in the training environment, not the in-memory fallback
    assert detail["reference_kind"] == "reload"


def _reference(zoo_store, zoo_trained, name, fmt):
    local, _ = Storage.open(zoo_store).get_dir(zoo_trained[name].artifacts[fmt].path)
    ref, _ = arrays.read_ipc(f"{local}/reference.arrow")
    info = json.loads(Path(local, "reference.json").read_text())
    return ref, info


@pytest.mark.parametrize("name, compute", [("zoo-mixed-float16", "float16"), ("zoo-mixed-bfloat16", "bfloat16")])
def test_mixed_precision_outputs_keep_their_dtype_and_the_policy_does_not_leak(
        scenarios, zoo_store, zoo_trained, name, compute):
    import keras

    for fmt in FORMATS:
        ref, info = _reference(zoo_store, zoo_trained, name, fmt)
        assert ref["logits"].dtype.name == compute and ref["probs"].dtype.name == "float32"
        # variables stay float32 under mixed precision
        assert {v["dtype"] for v in info["variables"]} == {"float32"}
    # scenarios trained after the mixed ones in this process are plain float32 models
    assert keras.config.dtype_policy().name == "float32"
    later = [n for n in list(zoo_trained)[list(zoo_trained).index(name) + 1:] if n != "zoo-tf-module"]
    assert later, "the fixture must train other scenarios after this one"
    for other in later:
        ref, info = _reference(zoo_store, zoo_trained, other, "keras")
        floats = {a.dtype.name for k, a in ref.items() if k not in info["inputs"] and a.dtype.kind == "f"}
        assert floats <= {"float32"}, (other, floats)
    # a weights reload builds under the scenario's policy, and puts the global one back
    replay(scenarios[name], "weights", zoo_trained[name].artifacts["weights"].path, zoo_store, DEFAULT,
           batch_size=32)
    assert keras.config.dtype_policy().name == "float32"


def test_string_probes_and_outputs_round_trip(scenarios, zoo_store, zoo_trained):
    ref, info = _reference(zoo_store, zoo_trained, "zoo-string-lookup", "savedmodel")
    assert ref["words"].dtype == object and ref["words"].shape == (16, 3)
    assert ref["text"].dtype == object and isinstance(ref["text"][0, 0], str)
    label = ref["output/label"] if "output/label" in ref else ref["label"]
    assert label.dtype == object and {type(x) for x in label.reshape(-1)} == {bytes}
    assert set(label.reshape(-1)) <= {b"warm", b"cool", b"neutral"}
    row = replay(scenarios["zoo-string-lookup"], "savedmodel", zoo_trained["zoo-string-lookup"].artifacts[
        "savedmodel"].path, zoo_store, DEFAULT, batch_size=5)
    outputs = {o["name"]: o for o in row.detail["outputs"]}
    assert outputs["label"]["verdict"] == "bitwise" and outputs["label"]["dtype_ref"] == "object"


def test_rng_state_of_an_export_is_reported_not_failed(scenarios, zoo_store, zoo_trained):
    art = zoo_trained["zoo-transformer-encoder"].artifacts["savedmodel"]
    row = replay(scenarios["zoo-transformer-encoder"], "savedmodel", art.path, zoo_store, DEFAULT, batch_size=32)
    detail = row.detail
    assert row.verdict == "bitwise" and row.weights_equal is True
    assert detail["ignored_state"] and all(n.endswith("seed_generator_state") for n in detail["ignored_state"])
    assert all(n.startswith("rng state ") for n in detail["weight_notes"])


def test_weights_names_do_not_depend_on_what_the_process_built_before(scenarios, zoo_store, zoo_trained):
    import keras

    for _ in range(3):  # advance Keras's auto-name counters: dense_7, sequential_3 ...
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(1), keras.layers.BatchNormalization()])
    art = zoo_trained["zoo-resnet-block"].artifacts["weights"]
    row = replay(scenarios["zoo-resnet-block"], "weights", art.path, zoo_store, DEFAULT, batch_size=32)
    assert row.verdict == "bitwise" and row.weights_equal is True
    assert row.detail["weight_notes"] == []  # every name matched exactly: no structural matching needed
    _, info = _reference(zoo_store, zoo_trained, "zoo-resnet-block", "weights")
    names = [v["name"] for v in info["variables"]]
    # fresh session: numbering starts at batch_normalization whatever the process built before
    assert [n for n in names if n.endswith("moving_mean")] == [
        "batch_normalization/moving_mean", "batch_normalization_1/moving_mean", "batch_normalization_2/moving_mean"]
    assert sum("moving_" in n for n in names) == 6  # BatchNormalization statistics are checked parameters


def _keras_train_hook(seed):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), verbose=0)
    return model


def test_weights_without_build_names_the_fix(tmp_path):
    sc = Scenario(name="hook-only", train=_keras_train_hook, probe=lambda rng: np.ones((3, 2), np.float32))
    art = train(sc, ["weights", "keras"], str(tmp_path), TRAINING).artifacts
    assert art["keras"].save_verdict == "bitwise"
    assert art["weights"].save_verdict == "error"
    assert ("weights (save_weights) needs the scenario's build() to recreate the model; this scenario has only "
            "a train hook") in art["weights"].save_error
    assert "use tf-savedmodel (or keras, for a Keras model)" in art["weights"].save_error


# -- custom classes in a process that never imported the scenario module -------------------------
_CHILD = textwrap.dedent('''
    import json, pickle, sys
    jobs = json.loads(sys.argv[1])
    out = {"imported_before": sorted(m for m in sys.modules if m.startswith("_harness_scenarios"))}
    import keras
    try:  # control: plain Keras cannot load the artifact without the scenario's registration
        keras.models.load_model(jobs[0]["keras_file"], compile=False)
        out["plain_load"] = "ok"
    except Exception as exc:
        out["plain_load"] = f"{type(exc).__name__}: {exc}"
    from harness.replay import replay
    from harness.spec import Environment
    for job in jobs:
        scenario = pickle.loads(open(job["pickle"], "rb").read())
        row = replay(scenario, "keras", job["path"], job["store"], Environment(name="cpu-default"), batch_size=32)
        out[scenario.name] = {k: getattr(row, k) for k in ("verdict", "weights_equal", "error")}
    print("RESULT " + json.dumps(out))
''')


def test_registered_custom_layers_reload_in_a_fresh_process(zoo_store, zoo_trained, tmp_path):
    """Scenarios shipped as pickles (as Ray ships them) reload their `keras` artifacts in a fresh
    process: one registered in a setup() hook, one at module level with Keras imported there."""
    from ray import cloudpickle

    keras_dir = Path(__file__).parent / "scenarios_keras"
    module_level = discover([keras_dir])["test-module-level-layer"]
    store2 = str(tmp_path / "store")
    trained = {"zoo-custom-registered": (zoo_trained["zoo-custom-registered"].artifacts["keras"], zoo_store),
               module_level.name: (train(module_level, ["keras"], store2, TRAINING).artifacts["keras"], store2)}
    scenarios = {**discover(), module_level.name: module_level}
    jobs = []
    for name, (art, st) in trained.items():
        assert art.save_verdict == "bitwise", art.save_error
        pkl = tmp_path / f"{name}.pkl"
        pkl.write_bytes(cloudpickle.dumps(scenarios[name]))
        local, _ = Storage.open(st).get_dir(art.path)
        jobs.append({"pickle": str(pkl), "path": art.path, "store": st, "keras_file": f"{local}/model/model.keras"})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[len("RESULT "):])
    assert out["imported_before"] == []
    assert "ChannelScale" in out["plain_load"], out["plain_load"]  # not registered without the harness
    for name in trained:
        assert out[name] == {"verdict": "bitwise", "weights_equal": True, "error": None}, out[name]


def test_format_order_does_not_matter(scenarios, tmp_path):
    """The weights loader starts a fresh Keras session in the training process; formats
    saved after it (from the same in-memory model) must still be exact."""
    name = "zoo-lstm-masking"  # Embedding mask + LSTM + Dropout seed state
    order = ["weights", "savedmodel", "keras", "tf-savedmodel"]
    res = train(scenarios[name], order, str(tmp_path), TRAINING)
    for fmt in order:
        art = res.artifacts[fmt]
        assert art.error is None and art.save_verdict == "bitwise", (fmt, art.error, art.save_error)


def test_xla_with_string_inputs_is_refused_before_tensorflow_aborts(scenarios, zoo_store, zoo_trained):
    """TF 2.21 raises on the first jit_compile call with tf.string inputs and aborts the process on
    the next one (tensor.cc 'Check failed: DataTypeCanUseMemcpy'): the harness must not try."""
    xla = Environment(name="cpu-xla", jit_compile=True)
    art = zoo_trained["zoo-string-lookup"].artifacts["keras"]
    for _ in range(2):  # the second attempt is the one that would kill this very process
        row = replay(scenarios["zoo-string-lookup"], "keras", art.path, zoo_store, xla, batch_size=32)
        assert row.verdict == "error"
        assert "XLA (jit_compile=True) cannot compile a model with string inputs" in row.error
        assert "use an environment without jit_compile" in row.error


# -- error causes that are true ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["zoo-keras-hub-resnet", "zoo-numeric-preprocessing", "zoo-multi-output-dtypes"])
def test_unregistered_classes_reload_bitwise_once_registered_as_the_error_advises(scenarios, zoo_store, zoo_trained,
                                                                                 name):
    """The advice of an UnregisteredClass error is true: the scenario with exactly the custom_objects the error
    names reloads its h5 artifact with the in-memory model's bits and every parameter restored."""
    import importlib

    def where(path):
        module, cls = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)

    art = zoo_trained[name].artifacts["h5"]
    fixed = dataclasses.replace(scenarios[name], custom_objects={n: where(p) for n, p in
                                                                 UNREGISTERED[name, "h5"].items()})
    row = replay(fixed, "h5", art.path, zoo_store, DEFAULT, batch_size=32)
    assert row.detail["reference_kind"] == "in_memory"  # the training reload failed: compared with the model itself
    assert row.verdict == "bitwise" and row.weights_equal is True, row.error


# A cell's verdict is a function of the artifact and the environment: the same h5 cell alone in a fresh
# worker process, and after a keras cell of the same model that imported keras_hub (loading .keras does).
_WORKER_CHILD = textwrap.dedent('''
    import json, pickle, sys
    from harness.spec import Environment
    from harness.worker import ReplayJob, Worker
    scenarios, artifacts, store = pickle.loads(open(sys.argv[1], "rb").read())
    worker = Worker({"cpu-default": Environment(name="cpu-default")}, scenarios, store)
    worker.warm()
    verdicts = []
    for name, fmt in json.loads(sys.argv[2]):
        result = worker.run(ReplayJob(name, fmt, "cpu-default", artifacts[name, fmt], batch_size=32))
        verdicts.append([fmt, result.verdict, result.error])
    print("RESULT " + json.dumps({"verdicts": verdicts,
                                  "keras_hub_imported": "keras_hub" in sys.modules}))
''')


def _in_a_fresh_worker(tmp_path, scenarios, artifacts, store, cells):
    from ray import cloudpickle

    blob = tmp_path / "jobs.pkl"
    blob.write_bytes(cloudpickle.dumps((scenarios, artifacts, store)))
    proc = subprocess.run([sys.executable, "-c", _WORKER_CHILD, str(blob), json.dumps(cells)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[len("RESULT "):])


def test_a_cell_gives_the_same_verdict_first_or_after_its_siblings_in_a_worker(scenarios, zoo_store, zoo_trained,
                                                                               tmp_path):
    name = "zoo-keras-hub-bert"
    artifacts = {(name, f): zoo_trained[name].artifacts[f] for f in ("keras", "h5")}
    chosen = {name: scenarios[name]}
    alone = _in_a_fresh_worker(tmp_path, chosen, artifacts, zoo_store, [[name, "h5"]])
    after = _in_a_fresh_worker(tmp_path, chosen, artifacts, zoo_store, [[name, "keras"], [name, "h5"]])
    assert alone["verdicts"][0] == after["verdicts"][1] == ["h5", "bitwise", None], (alone, after)
    # the h5 file names keras_hub>BertBackbone: its package is imported before the load, in both orders
    assert alone["keras_hub_imported"] and after["keras_hub_imported"]


def test_keras_hub_left_tensorflow_cpu_and_keras_as_they_were():
    """keras-hub is installed without its declared dependencies (Makefile): its tensorflow-text requirement
    would pull in ``tensorflow`` over ``tensorflow-cpu``. The install must leave one TensorFlow, the CPU build,
    and the Keras that TensorFlow's own import reports."""
    import importlib.metadata as md

    import keras
    import keras_hub
    import tensorflow as tf

    def installed(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    assert installed("tensorflow-cpu") == tf.__version__
    assert installed("tensorflow") is None and installed("tensorflow-text") is None
    assert installed("keras") == keras.__version__ and tf.keras.__version__ == keras.__version__
    assert installed("keras-hub") == keras_hub.__version__
