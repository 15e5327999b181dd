"""Damaged and tampered artifacts, on local disk and on S3 (moto): detected as ``corrupt``, repaired by training.

Real TensorFlow through the plain ``train()`` / ``replay()`` functions (no Ray):
each damage is done to a stored artifact between training and replay.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from harness import arrays
from harness.spec import Environment
from harness.storage import MANIFEST, POINTER, Storage, build_manifest
from harness.replay import replay
from harness.train import train

SCENARIO = "test-slow-build"  # a one-unit Dense model: trains in a blink
FORMAT = "keras"
TRAINING = Environment(name="training")
DEFAULT = Environment(name="cpu-default")
BUCKET = "harness-tamper"


@pytest.fixture(params=["local", "s3"])
def storage_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3_server")
    s3.make_bucket(BUCKET)
    return s3.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}")


def _rewrite_manifest(st: Storage, rel: str) -> None:
    """What a careful attacker does: recompute the manifest after changing a file."""
    copy = Path(tempfile.mkdtemp(prefix="tamper-"))
    for f in st.walk_files(rel):
        name = f[len(rel) + 1:]
        if name != MANIFEST:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(st.read_bytes(f))
    st.write_bytes(f"{rel}/{MANIFEST}", json.dumps(build_manifest(copy)).encode())


def _plus_one_ulp(st: Storage, rel: str) -> None:
    ref, meta = arrays.read_ipc(st.read_bytes(f"{rel}/reference.arrow"))
    out = ref["output"].copy()
    out.reshape(-1)[0] = np.nextafter(out.reshape(-1)[0], np.float32(np.inf))
    st.write_bytes(f"{rel}/reference.arrow", arrays.to_ipc_bytes({**ref, "output": out}, meta))
    _rewrite_manifest(st, rel)


DAMAGES = {
    # name: (damage(storage, rel), fragment of the corrupt message)
    "delete-manifest": (lambda st, rel: st.fs.delete_file(st.path(f"{rel}/{MANIFEST}")), "manifest.json: missing"),
    "truncate-reference-json": (lambda st, rel: st.write_bytes(f"{rel}/reference.json",
                                                               st.read_bytes(f"{rel}/reference.json")[:20]),
                                "reference.json: size"),
    "unparseable-manifest": (lambda st, rel: st.write_bytes(f"{rel}/{MANIFEST}", b'{"files": {'),
                             "manifest.json: not valid JSON"),
    "manifest-missing-field": (lambda st, rel: st.write_bytes(f"{rel}/{MANIFEST}", b'{"file": {}}'),
                               "manifest.json: no 'files' mapping"),
    "file-not-in-manifest": (lambda st, rel: st.write_bytes(f"{rel}/model/extra.py", b"import os"),
                             "model/extra.py: file is not in the manifest"),
    "flip-model-byte": (lambda st, rel: st.write_bytes(f"{rel}/model/model.keras",
                                                       b"X" + st.read_bytes(f"{rel}/model/model.keras")[1:]),
                        "model/model.keras: sha256"),
    "reference-plus-one-ulp-rewritten-manifest": (_plus_one_ulp, "not the manifest the training step of this run"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_is_corrupt_then_repaired_by_training(scenarios, storage_uri, damage, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    scenario = scenarios[SCENARIO]
    art = train(scenario, [FORMAT], storage_uri, TRAINING).artifacts[FORMAT]
    st = Storage.open(storage_uri)
    hurt, fragment = DAMAGES[damage]
    hurt(st, art.path)

    cell = replay(scenario, FORMAT, art.path, storage_uri, DEFAULT, batch_size=8,
                  manifest_sha256=art.manifest_sha256)
    assert cell.verdict == "corrupt", (cell.verdict, cell.error)
    assert fragment in cell.error and "Traceback" not in cell.error

    again = train(scenario, [FORMAT], storage_uri, TRAINING).artifacts[FORMAT]
    if damage.endswith("rewritten-manifest"):
        # Consistent in itself: without HARNESS_SIGNING_KEY a later run cannot tell it was forged.
        assert again.reused and again.repaired is None
        return
    assert not again.reused and again.repaired and fragment.split(":")[0] in again.repaired
    fixed = replay(scenario, FORMAT, again.path, storage_uri, DEFAULT, batch_size=8,
                   manifest_sha256=again.manifest_sha256)
    assert fixed.verdict == "bitwise" and fixed.weights_equal, fixed.error


def test_forged_artifact_is_refused_across_runs_with_a_signing_key(scenarios, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_SIGNING_KEY", "team-secret")
    store = str(tmp_path / "store")
    scenario = scenarios[SCENARIO]
    art = train(scenario, [FORMAT], store, TRAINING).artifacts[FORMAT]
    _plus_one_ulp(Storage.open(store), art.path)  # rewritten manifest, but the signature is stale
    again = train(scenario, [FORMAT], store, TRAINING).artifacts[FORMAT]
    assert not again.reused and "does not match manifest.json under HARNESS_SIGNING_KEY" in again.repaired
    cell = replay(scenario, FORMAT, again.path, store, DEFAULT, batch_size=8, manifest_sha256=again.manifest_sha256)
    assert cell.verdict == "bitwise", cell.error


def test_retrain_publishes_a_new_version_and_never_deletes_the_old(scenarios, tmp_path):
    store = str(tmp_path / "store")
    scenario = scenarios[SCENARIO]
    first = train(scenario, [FORMAT], store, TRAINING).artifacts[FORMAT]
    again = train(scenario, [FORMAT], store, TRAINING, retrain=True).artifacts[FORMAT]
    parent = first.path.rsplit("/", 1)[0]
    assert not again.reused and again.path != first.path and again.path.rsplit("/", 1)[0] == parent
    st = Storage.open(store)
    assert st.listdir(parent) == sorted([POINTER, first.path.rsplit("/", 1)[1], again.path.rsplit("/", 1)[1]])
    assert st.current(parent) == again.path  # later runs use the retrained one
    reused = train(scenario, [FORMAT], store, TRAINING).artifacts[FORMAT]
    assert reused.reused and (reused.path, reused.manifest_sha256) == (again.path, again.manifest_sha256)
    # A run still replaying the first version (a concurrent one) reads it whole: nothing was deleted under it.
    cell = replay(scenario, FORMAT, first.path, store, DEFAULT, batch_size=8, manifest_sha256=first.manifest_sha256)
    assert cell.verdict == "bitwise", cell.error


# -- nothing passes vacuously: probes that would compare nothing are refused at training --------------
@pytest.mark.parametrize("probe, fragment", [
    (lambda rng: np.zeros((0, 2), np.float32), "has 0 rows, so nothing would be compared"),
    (lambda rng: [np.zeros((8, 2), np.float32), np.zeros((5, 2), np.float32)],
     "different row counts (input_0: 8, input_1: 5)"),
    (lambda rng: {}, "returned no arrays"),
    (lambda rng: np.float32(1.0), "is a scalar"),
])
def test_vacuous_probe_is_a_training_error_naming_the_scenario(scenarios, tmp_path, probe, fragment):
    from dataclasses import replace as dc_replace

    from harness.scenario import ScenarioError

    scenario = dc_replace(scenarios[SCENARIO], probe=probe)
    with pytest.raises(ScenarioError, match="scenario 'test-slow-build': probe") as info:
        train(scenario, [FORMAT], str(tmp_path / "store"), TRAINING)
    assert fragment in str(info.value)
