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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import arrays, formats, layout
from .compare import compare_digests, compare_outputs
from .records import ArtifactRecord, TrainRecord, jsonable
from .scenario import Scenario, ScenarioError, activate
from .spec import Environment
from .storage import CorruptArtifact, Storage


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
    check_probe(scenario.name, probe)
    return model, probe


def check_probe(scenario: str, probe: Any) -> None:
    """Refuse a probe that would make every comparison vacuous or silently partial.

    Raises:
        ScenarioError: no arrays, a scalar, zero rows, or arrays with different row counts.
    """
    flat = formats.flatten(probe, "input")
    fix = "probe(rng) must return an array, a tuple/list or a dict of arrays with one row per example"
    if not flat:
        raise ScenarioError(f"scenario {scenario!r}: probe() returned no arrays; {fix}")
    rows = {}
    for name, a in flat.items():
        if a.ndim == 0:
            raise ScenarioError(f"scenario {scenario!r}: probe array {name!r} is a scalar; {fix}")
        rows[name] = a.shape[0]
    if not all(rows.values()):
        empty = [n for n, r in rows.items() if not r]
        raise ScenarioError(f"scenario {scenario!r}: probe array {empty[0]!r} has 0 rows, so nothing would be "
                            f"compared; {fix}")
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{n}: {r}" for n, r in rows.items())
        raise ScenarioError(f"scenario {scenario!r}: probe arrays have different row counts ({shown}); "
                            "every input needs the same number of rows")


def _reference_from_storage(storage: Storage, scenario: str, fmt: str, rel: str, digest: str) -> ArtifactRecord:
    """The record of a complete artifact found in storage, after verifying every file of it.

    Raises:
        CorruptArtifact: it does not match its manifest (or signature), or its reference is unreadable.
    """
    local, _manifest = storage.get_dir(rel)
    try:
        info = json.loads(Path(local, "reference.json").read_text())
        save = info["save"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptArtifact(f"{storage.name_of(rel)}/reference.json: unreadable ({type(exc).__name__})") from None
    return ArtifactRecord(scenario=scenario, format=fmt, digest=digest, path=rel, uri=storage.uri_of(rel), reused=True,
                          manifest_sha256=storage.manifest_sha256(rel), save_verdict=save.get("verdict"),
                          save_max_abs_diff=save.get("max_abs_diff"), save_max_ulp_diff=save.get("max_ulp_diff"),
                          save_error=save.get("error"))


def train(scenario: Scenario, formats_: list[str], storage_uri: str, training: Environment,
          batch_size: int = 32, retrain: bool = False) -> TrainRecord:
    """Train ``scenario``, save it in each format to storage, record references.

    Args:
        scenario: the recipe.
        formats_: format names (see ``harness.formats.REGISTRY``).
        storage_uri: shared storage root.
        training: the training environment (its knobs are part of the digest).
        batch_size: prediction batch size of the reference outputs.
        retrain: ignore complete artifacts already in storage.

    Returns:
        A ``TrainRecord``; a format whose save or reload fails is recorded in
        its ``ArtifactRecord`` instead of raising, so other formats still run.
    """
    from . import fingerprint, runtime

    start = time.time()
    runtime.configure(training)
    scenario = activate(scenario)  # its module executed here once: custom Keras classes registered
    import keras
    import tensorflow as tf

    storage = Storage.open(storage_uri)
    fp = fingerprint.collect("training")
    digests = {f: artifact_digest(scenario, f, tf.__version__, keras.__version__, training, batch_size)
               for f in formats_}
    rels = {f: layout.artifact_dir(scenario.name, d) for f, d in digests.items()}
    artifacts, damaged = {}, {}
    for f in formats_:
        if retrain or not storage.exists(rels[f]):
            continue
        try:
            artifacts[f] = _reference_from_storage(storage, scenario.name, f, rels[f], digests[f])
        except CorruptArtifact as exc:  # trained again below, and the damaged copy replaced
            damaged[f] = str(exc)
    todo = [f for f in formats_ if f not in artifacts]
    if todo:
        trained = _Trained.fit(scenario, batch_size)
        for f in todo:
            artifacts[f] = trained.save(f, storage, rels[f], digests[f], fp,
                                        overwrite=retrain or f in damaged or storage.exists(rels[f]),
                                        repaired=damaged.get(f))
    return TrainRecord(scenario=scenario.name, fingerprint=fp, artifacts={f: artifacts[f] for f in formats_},
                       seconds=time.time() - start)


class _Trained:
    """A freshly trained model with its probe and in-memory outputs, saved format by format."""

    def __init__(self, scenario: Scenario, model: Any, probe: Any, batch_size: int):
        self.scenario, self.model, self.probe, self.batch_size = scenario, model, probe, batch_size
        self.in_memory = formats.predict(lambda x: formats.call_model(model, x), probe, batch_size)
        unknown = sorted(set(scenario.outputs) - set(self.in_memory))
        if unknown:
            raise ScenarioError(f"scenario {scenario.name!r}: outputs= names {', '.join(map(repr, unknown))}, but the "
                                f"model's outputs are {', '.join(map(repr, self.in_memory))}")
        self.variables = formats.variable_digests(model.weights if formats.is_keras(model) else model.variables)

    @classmethod
    def fit(cls, scenario: Scenario, batch_size: int) -> "_Trained":
        model, probe = fit_scenario(scenario)
        return cls(scenario, model, probe, batch_size)

    def save(self, fmt: str, storage: Storage, rel: str, digest: str, fp: dict[str, Any], *,
             overwrite: bool = False, repaired: str | None = None) -> ArtifactRecord:
        """Save in ``fmt``, reload here, and store the artifact with its references.

        ``overwrite`` swaps out a stored copy (``--retrain``, or damaged: ``repaired`` says how).
        """
        from . import runtime

        record = ArtifactRecord(scenario=self.scenario.name, format=fmt, digest=digest, path=rel,
                                uri=storage.uri_of(rel), repaired=repaired)
        with tempfile.TemporaryDirectory(prefix=f"harness-{self.scenario.name}-{fmt}-") as tmp:
            model_dir = Path(tmp) / formats.MODEL_DIR
            model_dir.mkdir()
            try:
                formats.get(fmt).save(self.model, str(model_dir), self.probe)
            except Exception as exc:
                return replace(record, path=None, uri=None, error=f"save in format {fmt!r} failed: {runtime.error_text(exc)}")
            save, reload_outputs = self._round_trip(fmt, str(model_dir))
            # The environment reference is the reload here; if that failed, fall
            # back to the in-memory outputs (recorded, so the report can say so).
            reference = reload_outputs if reload_outputs is not None else self.in_memory
            meta = {"scenario": self.scenario.name, "format": fmt, "digest": digest, "batch_size": self.batch_size,
                    "input_layout": formats.input_layout(self.probe),
                    "reference_kind": "reload" if reload_outputs is not None else "in_memory"}
            probe_arrays = formats.flatten(self.probe, "input")
            (Path(tmp) / "reference.arrow").write_bytes(arrays.to_ipc_bytes({**probe_arrays, **reference}, meta))
            (Path(tmp) / "in_memory.arrow").write_bytes(arrays.to_ipc_bytes(self.in_memory, meta))
            (Path(tmp) / "reference.json").write_text(json.dumps(
                {**meta, "variables": [{"name": k, **v} for k, v in self.variables.items()], "save": save,
                 "fingerprint": fp, "inputs": list(probe_arrays), "outputs": list(reference)},
                indent=1, sort_keys=True, default=jsonable))
            storage.put_dir(tmp, rel, replace=overwrite)
        return replace(record, manifest_sha256=storage.manifest_sha256(rel), save_verdict=save["verdict"],
                       save_error=save.get("error"), save_max_abs_diff=save.get("max_abs_diff"),
                       save_max_ulp_diff=save.get("max_ulp_diff"))

    def _round_trip(self, fmt: str, model_dir: str) -> tuple[dict[str, Any], dict | None]:
        """Reload in this process and compare with the in-memory model: ``(save metrics, reloaded outputs)``."""
        from . import runtime

        try:
            loaded = formats.get(fmt).load(model_dir, self.scenario, self.probe)
            outputs = formats.predict(loaded.fn, self.probe, self.batch_size)
            cmp = compare_outputs(self.in_memory, outputs)
            check = compare_digests(self.variables, formats.variable_digests(loaded.variables))
            del loaded
        except Exception as exc:
            return {"verdict": "error", "error": f"reload in the training environment failed: {runtime.error_text(exc)}"}, None
        verdict = cmp.verdict if check.equal else "mismatch"
        return {"verdict": verdict, "max_abs_diff": cmp.max_abs_diff, "max_ulp_diff": cmp.max_ulp_diff,
                "weights_equal": check.equal, "weight_problems": check.problems[:20],
                "weight_notes": check.notes[:20], "ignored_state": check.ignored_state,
                "error": None if verdict == "bitwise" else (cmp.reason or "; ".join(check.problems[:5]))}, outputs
