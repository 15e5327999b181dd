"""Train a scenario once, save it in every format, record the references.

A plain function (no Ray inside): ``sweep`` runs it as a Ray task in the
training environment; tests and ``--inline`` call it directly.

Storage layout of one artifact (content-addressed, written once)::

    artifacts/<scenario>/<digest>/
        model/...            the saved files of this format
        reference.arrow      probe inputs + outputs after reloading here
        in_memory.arrow      outputs of the in-memory model right after training
        reference.json       variable digests, save round-trip metrics, fingerprint
        manifest.json        sha256 of every file above (written last)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import arrays, formats
from .compare import compare_digests, compare_outputs
from .scenario import Scenario, activate
from .spec import Environment
from .storage import Storage


@dataclass
class ArtifactInfo:
    """What the driver needs to know about one saved format."""

    format: str
    digest: str | None = None
    path: str | None = None  # relative to the storage root
    uri: str | None = None
    error: str | None = None  # save failed: no artifact
    save_verdict: str | None = None  # in-memory vs reload here (or "error")
    save_max_abs_diff: float | None = None
    save_max_ulp_diff: float | None = None
    save_error: str | None = None
    reused: bool = False


@dataclass
class TrainResult:
    scenario: str
    fingerprint: dict[str, Any]
    artifacts: dict[str, ArtifactInfo] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def artifact_digest(scenario: Scenario, fmt: str, tf_version: str, keras_version: str,
                    training: Environment, batch_size: int) -> str:
    """Content address: scenario (+ its source), format, seed, TF/Keras, training knobs."""
    key = {"scenario": scenario.name, "source": scenario.source_digest, "format": fmt, "seed": scenario.seed,
           "tf": tf_version, "keras": keras_version, "training": training.env_vars() | training.knobs(),
           "batch_size": batch_size, "recipe": formats.REFERENCE_RECIPE}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fit_scenario(scenario: Scenario) -> tuple[Any, Any]:
    """Seed everything, train, and return ``(model, probe_inputs)``."""
    model = formats.build_model(scenario)  # fresh Keras session, seeded; dtype policy scoped to the build
    if scenario.train is None:
        model.compile(**dict(scenario.compile))
        data = scenario.data(np.random.default_rng([scenario.seed, 0]))
        fit_kwargs = {"verbose": 0, **dict(scenario.fit)}
        if isinstance(data, dict):
            model.fit(**data, **fit_kwargs)
        else:
            model.fit(*data, **fit_kwargs)
    probe = scenario.probe(np.random.default_rng([scenario.seed, 1]))
    return model, probe


def _reference_from_storage(storage: Storage, rel: str, fmt: str, digest: str) -> ArtifactInfo:
    info = storage.read_json(f"{rel}/reference.json")
    save = info.get("save", {})
    return ArtifactInfo(format=fmt, digest=digest, path=rel, uri=storage.uri_of(rel), reused=True,
                        save_verdict=save.get("verdict"), save_max_abs_diff=save.get("max_abs_diff"),
                        save_max_ulp_diff=save.get("max_ulp_diff"), save_error=save.get("error"))


def train(scenario: Scenario, formats_: list[str], storage_uri: str, training: Environment,
          batch_size: int = 32, retrain: bool = False) -> TrainResult:
    """Train ``scenario``, save it in each format to storage, record references.

    Args:
        scenario: the recipe.
        formats_: format names (see ``harness.formats.REGISTRY``).
        storage_uri: shared storage root.
        training: the training environment (its knobs are part of the digest).
        batch_size: prediction batch size of the reference outputs.
        retrain: ignore complete artifacts already in storage.

    Returns:
        A ``TrainResult``; a format whose save or reload fails is recorded in
        its ``ArtifactInfo`` instead of raising, so other formats still run.
    """
    from . import fingerprint, runtime

    start = time.time()
    runtime.configure(training)
    scenario = activate(scenario)  # its module executed here once: custom Keras classes registered
    import keras
    import tensorflow as tf

    storage = Storage.open(storage_uri)
    fp = fingerprint.collect("training")
    result = TrainResult(scenario=scenario.name, fingerprint=fp)
    digests = {f: artifact_digest(scenario, f, tf.__version__, keras.__version__, training, batch_size)
               for f in formats_}
    rels = {f: f"artifacts/{scenario.name}/{d}" for f, d in digests.items()}
    todo = [f for f in formats_ if retrain or not storage.is_complete(rels[f])]
    for f in formats_:
        if f not in todo:
            result.artifacts[f] = _reference_from_storage(storage, rels[f], f, digests[f])
    if not todo:
        result.seconds = time.time() - start
        return result

    model, probe = fit_scenario(scenario)
    in_memory = formats.predict(lambda x: formats.call_model(model, x), probe, batch_size)
    original_vars = formats.variable_digests(model.weights if formats._is_keras(model) else model.variables)
    probe_arrays = formats.flatten(probe, "input")
    layout = formats.input_layout(probe)

    for f in todo:
        info = ArtifactInfo(format=f, digest=digests[f], path=rels[f], uri=storage.uri_of(rels[f]))
        result.artifacts[f] = info
        with tempfile.TemporaryDirectory(prefix=f"harness-{scenario.name}-{f}-") as tmp:
            model_dir = Path(tmp) / formats.MODEL_DIR
            model_dir.mkdir()
            try:
                formats.get(f).save(model, str(model_dir), probe)
            except Exception as exc:
                info.error = f"save in format {f!r} failed: {runtime.error_text(exc)}"
                continue
            save: dict[str, Any]
            reload_outputs = None
            try:
                loaded = formats.get(f).load(str(model_dir), scenario, probe)
                reload_outputs = formats.predict(loaded.fn, probe, batch_size)
                cmp = compare_outputs(in_memory, reload_outputs)
                check = compare_digests(original_vars, formats.variable_digests(loaded.variables))
                verdict = cmp.verdict if check.equal else "mismatch"
                save = {"verdict": verdict, "max_abs_diff": cmp.max_abs_diff, "max_ulp_diff": cmp.max_ulp_diff,
                        "weights_equal": check.equal, "weight_problems": check.problems[:20],
                        "weight_notes": check.notes[:20], "ignored_state": check.ignored_state,
                        "error": None if verdict == "bitwise" else (cmp.reason or "; ".join(check.problems[:5]))}
                del loaded
            except Exception as exc:
                save = {"verdict": "error", "error": f"reload in the training environment failed: {runtime.error_text(exc)}"}
            info.save_verdict, info.save_error = save["verdict"], save.get("error")
            info.save_max_abs_diff, info.save_max_ulp_diff = save.get("max_abs_diff"), save.get("max_ulp_diff")
            # The environment reference is the reload here; if that failed, fall
            # back to the in-memory outputs (recorded, so the report can say so).
            reference = reload_outputs if reload_outputs is not None else in_memory
            meta = {"scenario": scenario.name, "format": f, "digest": digests[f], "batch_size": batch_size,
                    "input_layout": layout, "reference_kind": "reload" if reload_outputs is not None else "in_memory"}
            (Path(tmp) / "reference.arrow").write_bytes(arrays.to_ipc_bytes({**probe_arrays, **reference}, meta))
            (Path(tmp) / "in_memory.arrow").write_bytes(arrays.to_ipc_bytes(in_memory, meta))
            (Path(tmp) / "reference.json").write_text(json.dumps(
                {**meta, "variables": [{"name": k, **v} for k, v in original_vars.items()], "save": save, "fingerprint": fp,
                 "inputs": list(probe_arrays), "outputs": list(reference)},
                indent=1, sort_keys=True, default=_json_default))
            storage.put_dir(tmp, rels[f])
    result.seconds = time.time() - start
    return result


def _json_default(o):
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
