"""train() and replay() as plain functions: real TensorFlow, real files, no Ray."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from harness import arrays
from harness.spec import FORMATS, Environment
from harness.storage import Storage, build_manifest
from harness.train import train
from harness.replay import replay

TESTS = Path(__file__).parent
ARTICLE = ["seed-binary-classifier", "seed-linear-regression", "seed-dense-regression"]
TRAINING = Environment(name="training")
DEFAULT = Environment(name="cpu-default")




@pytest.fixture(scope="module")
def trained(scenarios, store):
    """Every article scenario trained once and saved in every format."""
    return {name: train(scenarios[name], list(FORMATS), store, TRAINING) for name in ARTICLE}


def _replay(scenarios, store, trained, name, fmt, env=DEFAULT, **kw):
    art = trained[name].artifacts[fmt]
    return replay(scenarios[name], fmt, art.path, store, env, batch_size=kw.pop("batch_size", 32), **kw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ARTICLE)
def test_article_claim_same_predictions_and_every_variable_restored(scenarios, store, trained, name, fmt):
    art = trained[name].artifacts[fmt]
    assert art.error is None
    assert art.save_verdict == "bitwise", art.save_error  # in-memory vs reload in the training env
    row = _replay(scenarios, store, trained, name, fmt)
    assert row.verdict == "bitwise", row.error
    assert row.weights_equal is True
    # kernel + bias per Dense layer: 2 layers, 1 layer, 2 layers
    assert row.detail["variables_checked"] == {"seed-binary-classifier": 4, "seed-linear-regression": 2,
                                                  "seed-dense-regression": 4}[name]
    assert row.max_ulp_diff == 0 and row.mismatch_fraction == 0
    if name == "seed-binary-classifier":  # one sigmoid score: decided at 0.5, and bitwise decides the same
        assert (row.prediction_flips, row.prediction_flip_fraction, row.max_rank_change) == (0, 0.0, None)
        assert row.detail["outputs"][0]["impact"] == {"kind": "binary", "positions": 64, "flips": 0, "k": None,
                                                      "max_rank_change": None, "flip_fraction": 0.0}


def test_both_references_are_recorded_apart(trained, store):
    art = trained["seed-binary-classifier"].artifacts["keras"]
    st = Storage.open(store)
    local, manifest = st.get_dir(art.path)
    assert {"reference.arrow", "in_memory.arrow", "reference.json"} <= set(manifest["files"])
    ref, meta = arrays.read_ipc(f"{local}/reference.arrow")
    mem, _ = arrays.read_ipc(f"{local}/in_memory.arrow")
    assert meta["reference_kind"] == "reload"
    assert ref["input"].shape == (64, 5) and ref["output"].shape == (64, 1)
    assert np.array_equal(ref["output"], mem["output"])
    info = json.loads(Path(local, "reference.json").read_text())
    assert info["save"]["verdict"] == "bitwise" and info["fingerprint"]["tf_version"]
    assert [v["name"] for v in info["variables"]] == [
        "sequential/dense/kernel", "sequential/dense/bias", "sequential/dense_1/kernel", "sequential/dense_1/bias"]


def test_batch_size_one_surfaces_real_differences(scenarios, store, trained):
    row = _replay(scenarios, store, trained, "seed-binary-classifier", "keras", batch_size=1)
    # On x86-64 oneDNN, batching changes the last bits of some outputs; the
    # harness must report them exactly and judge them within tolerance.
    assert row.verdict in ("bitwise", "within_tolerance")
    if row.verdict == "within_tolerance":
        assert row.max_ulp_diff >= 1 and 0 < row.mismatch_fraction <= 1
        assert row.required_ulp == row.max_ulp_diff


def test_observation_is_arrow_with_fixed_shape_tensors(scenarios, store, trained):
    row = _replay(scenarios, store, trained, "seed-dense-regression", "h5", observation_path="runs/t/obs.arrow")
    path = Path(store, "runs/t/obs.arrow")
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.num_rows == 64
    assert isinstance(table.schema.field("output").type, pa.FixedShapeTensorType)
    assert row.observation_uri.endswith("runs/t/obs.arrow")


def _copy_artifact(store, trained, name, fmt, tmp_path):
    src = Path(store, trained[name].artifacts[fmt].path)
    dst_store = tmp_path / "store"
    rel = f"artifacts/{name}/copy"
    shutil.copytree(src, dst_store / rel)
    return str(dst_store), rel


def test_flipped_byte_is_corrupt(scenarios, store, trained, tmp_path):
    st, rel = _copy_artifact(store, trained, "seed-linear-regression", "keras", tmp_path)
    model_file = Path(st, rel, "model", "model.keras")
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))
    row = replay(scenarios["seed-linear-regression"], "keras", rel, st, DEFAULT, batch_size=32)
    assert row.verdict == "corrupt"
    assert "model.keras" in row.error and "sha256" in row.error


def test_missing_manifest_is_corrupt(scenarios, store, trained, tmp_path):
    st, rel = _copy_artifact(store, trained, "seed-linear-regression", "h5", tmp_path)
    Path(st, rel, "manifest.json").unlink()
    row = replay(scenarios["seed-linear-regression"], "h5", rel, st, DEFAULT, batch_size=32)
    assert row.verdict == "corrupt" and "manifest" in row.error


def test_tampered_weights_are_caught_even_with_a_valid_manifest(scenarios, store, trained, tmp_path):
    """A saver that writes wrong weights (manifest consistent) is a mismatch, naming the variable."""
    import h5py

    st, rel = _copy_artifact(store, trained, "seed-binary-classifier", "h5", tmp_path)
    art_dir = Path(st, rel)
    with h5py.File(art_dir / "model" / "model.h5", "r+") as f:
        names = []
        f.visit(names.append)
        kernel = next(n for n in names if n.endswith("kernel") and isinstance(f[n], h5py.Dataset))
        value = f[kernel][()]
        value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))
        f[kernel][()] = value
    manifest = build_manifest(art_dir)
    (art_dir / "manifest.json").write_text(json.dumps(manifest))
    row = replay(scenarios["seed-binary-classifier"], "h5", rel, st, DEFAULT, batch_size=32)
    assert row.verdict == "mismatch"
    assert row.weights_equal is False
    assert "kernel" in row.error and "not restored exactly" in row.error


def test_multi_input_multi_output_with_non_trainable_variables(scenarios, tmp_path):
    res = train(scenarios["test-multi-io"], list(FORMATS), str(tmp_path), TRAINING)
    for fmt in FORMATS:
        art = res.artifacts[fmt]
        assert art.error is None and art.save_verdict == "bitwise", (fmt, art.error, art.save_error)
        row = replay(scenarios["test-multi-io"], fmt, art.path, str(tmp_path), DEFAULT, batch_size=7)
        assert row.verdict in ("bitwise", "within_tolerance"), (fmt, row.error)
        assert {o["name"] for o in row.detail["outputs"]} == {"cls", "reg"}
        impact = {o["name"]: o["impact"] for o in row.detail["outputs"]}
        assert impact["reg"] is None  # declared a regression: no decision to flip, whatever its values
        assert impact["cls"]["kind"] == "classes" and impact["cls"]["k"] == 2
        assert row.prediction_flips == impact["cls"]["flips"] and row.max_rank_change == impact["cls"]["max_rank_change"]
        # 3 Dense layers x 2 + BatchNorm gamma/beta/moving_mean/moving_variance
        assert row.detail["variables_checked"] == 10 and row.weights_equal


def test_plain_tf_module_saves_with_tf_savedmodel_only(scenarios, tmp_path):
    res = train(scenarios["test-tf-module"], ["tf-savedmodel", "keras"], str(tmp_path), TRAINING)
    err = res.artifacts["keras"].error
    assert "keras saves Keras models only" in err and "Affine" in err
    assert "; use tf-savedmodel" in err
    art = res.artifacts["tf-savedmodel"]
    assert art.save_verdict == "bitwise"
    row = replay(scenarios["test-tf-module"], "tf-savedmodel", art.path, str(tmp_path), DEFAULT, batch_size=4)
    assert row.verdict == "bitwise" and row.weights_equal and row.detail["variables_checked"] == 2


def test_gpu_environment_without_gpu_is_a_clear_error(scenarios, store, trained):
    env = Environment(name="gpu-a10g", num_gpus=1)
    row = _replay(scenarios, store, trained, "seed-linear-regression", "keras", env=env)
    if row.fingerprint["gpus"]:  # this process's TensorFlow really sees a GPU: the cell runs on it
        assert row.verdict in ("bitwise", "within_tolerance"), row.error
        return
    assert row.verdict == "error"
    assert "asked for 1 GPU(s) but TensorFlow" in row.error and "sees none" in row.error


def test_import_time_knobs_cannot_be_faked_in_process(scenarios, store, trained):
    # The opposite of whatever this shell has, so the variable really differs from this process's.
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0"
    row = _replay(scenarios, store, trained, "seed-linear-regression", "keras",
                  env=Environment(name="cpu-onednn-flipped", onednn=onednn))
    assert row.verdict == "error" and "TF_ENABLE_ONEDNN_OPTS" in row.error


def test_artifacts_are_content_addressed_and_reused(scenarios, store, trained):
    again = train(scenarios["seed-linear-regression"], ["keras", "h5"], store, TRAINING)
    first = trained["seed-linear-regression"].artifacts
    for fmt in ("keras", "h5"):
        assert again.artifacts[fmt].reused
        assert again.artifacts[fmt].digest == first[fmt].digest
        assert again.artifacts[fmt].save_verdict == "bitwise"
    assert first["keras"].digest != first["h5"].digest
    other_batch = train(scenarios["seed-linear-regression"], ["keras"], store, TRAINING, batch_size=8)
    assert other_batch.artifacts["keras"].digest != first["keras"].digest


def test_outputs_naming_an_unknown_output_is_refused_at_training(scenarios, tmp_path):
    from dataclasses import replace as dc_replace

    from harness.scenario import ScenarioError

    bad = dc_replace(scenarios["test-multi-io"], outputs={"cls": "classes", "score": "binary"})
    with pytest.raises(ScenarioError, match=r"outputs= names 'score', but the model's outputs are 'cls', 'reg'"):
        train(bad, ["keras"], str(tmp_path), TRAINING)
