"""Train a scenario once, save it in every format, record the references.

A plain function (no Ray inside): ``sweep`` runs it as a Ray task in the
training environment; tests and ``--inline`` call it directly.

Storage layout of one artifact (content-addressed; each save a version written
once, published first-writer-wins, see ``harness.storage.Storage.publish_dir``)::

    artifacts/<scenario>/<digest>/
        current.json         the pointer: which version is the artifact (written last)
        <version>/
            model/...            the saved files of this format
            reference.arrow      probe inputs + outputs after reloading here
            in_memory.arrow      outputs of the in-memory model right after training
            oracle.arrow         outputs of the model rebuilt in float64 (when it can be)
            labels.arrow         the scenario's probe labels (when it declares them)
            reference.json       variable digests, save round-trip metrics, fingerprint,
                                 the oracle's outputs (or why there is none), labels and metric
            manifest.json        sha256 of every file above (written last)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import arrays, formats, layout
from .compare import compare_digests, compare_outputs, output_kind, task_metric
from .records import ArtifactRecord, TrainRecord, jsonable
from .scenario import Scenario, ScenarioError, activate
from .spec import Environment
from .storage import ARTIFACT_LAYOUT, CorruptArtifact, Storage, StorageError


def artifact_digest(scenario: Scenario, fmt: str, tf_version: str, keras_version: str,
                    training: Environment, batch_size: int) -> str:
    """Content address: scenario (+ its source), format, seed, TF/Keras, training knobs, storage layout."""
    key = {"scenario": scenario.name, "source": scenario.source_digest, "format": fmt, "seed": scenario.seed,
           "tf": tf_version, "keras": keras_version, "training": training.env_vars() | training.knobs(),
           "batch_size": batch_size, "recipe": formats.REFERENCE_RECIPE, "layout": ARTIFACT_LAYOUT}
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
    """The record of a complete artifact found in storage (``rel``: its version), after verifying every file of it.

    Raises:
        CorruptArtifact: it does not match its manifest (or signature), or its reference is unreadable.
        StorageError: storage failed.
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
        try:
            found = None if retrain else storage.current(rels[f])
            if found is not None:
                artifacts[f] = _reference_from_storage(storage, scenario.name, f, found, digests[f])
        except CorruptArtifact as exc:  # trained again below, and a new version replaces the damaged one
            damaged[f] = str(exc)
        except StorageError as exc:  # storage failed: every cell of the format says why
            artifacts[f] = ArtifactRecord(scenario=scenario.name, format=f, digest=digests[f], error=str(exc))
    todo = [f for f in formats_ if f not in artifacts]
    if todo:
        trained = _Trained.fit(scenario, batch_size)
        for f in todo:
            artifacts[f] = trained.save(f, storage, rels[f], digests[f], fp, overwrite=retrain or f in damaged,
                                        repaired=damaged.get(f))
    oracle_seconds = trained.oracle.seconds if todo else 0.0
    return TrainRecord(scenario=scenario.name, fingerprint=fp, artifacts={f: artifacts[f] for f in formats_},
                       seconds=time.time() - start, oracle_seconds=oracle_seconds)


@dataclass(frozen=True)
class Oracle:
    """The model's outputs on the probe, rebuilt in float64 with its trained weights (the "true answer").

    ``outputs`` holds float64 arrays for the floating-point outputs; ``unavailable`` says
    why an output has none (integer or string outputs, a layer that keeps its own dtype),
    ``reason`` why there is none at all (a plain ``tf.Module``, a rebuild that failed).
    """

    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """What ``reference.json`` records of it (``oracle.arrow`` holds the arrays)."""
        return {"policy": "float64", "outputs": list(self.outputs), "unavailable": dict(self.unavailable),
                "reason": self.reason, "seconds": self.seconds}


def float64_oracle(scenario: Scenario, model: Any, probe: Any, batch_size: int,
                   reference: Mapping[str, np.ndarray]) -> Oracle:
    """Rebuild ``model`` in float64 (``formats.with_dtype_policy``), cast the weights, predict the probe.

    Never raises for a model it cannot rebuild: the ``Oracle`` says why (cells then say
    ``n/a`` with that reason).
    """
    from . import runtime

    start = time.time()
    unavailable = {n: ("string" if a.dtype.kind in "OSU" else "integer") + " output: no rounding error to measure"
                   for n, a in reference.items() if not formats.is_floating(a)}
    floats = [n for n in reference if n not in unavailable]

    def none(reason: str) -> Oracle:
        return Oracle(unavailable=unavailable, reason=reason, seconds=time.time() - start)

    if not formats.is_keras(model):
        return none(f"the scenario produced a plain {type(model).__name__}, not a Keras model: no architecture to "
                    "rebuild in float64")
    if not floats:
        return none("no floating-point output: nothing to round")
    try:
        rebuilt = formats.with_dtype_policy(model, "float64", scenario.resolved_custom_objects())
        out = formats.predict(lambda x: formats.call_model(rebuilt, x), formats.as_float64(probe), batch_size)
        del rebuilt
    except Exception as exc:
        return none(f"the model cannot be rebuilt in float64: {runtime.error_text(exc)}")
    outputs = {}
    for name in floats:
        if out[name].dtype != np.float64:
            unavailable[name] = (f"the float64 rebuild still computes it in {out[name].dtype.name} (a layer fixes "
                                 "its own dtype)")
        else:
            outputs[name] = out[name]
    return Oracle(outputs, unavailable, None, time.time() - start)


def probe_labels(scenario: Scenario, probe: Any, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scenario's probe labels by output name, checked against the outputs and the metric.

    Raises:
        ScenarioError: a label names no output, has another number of rows than the
            probe, or does not fit the metric (``harness.compare.task_metric``'s reason).
    """
    if scenario.labels is None:
        return {}
    labels = formats.flatten(scenario.labels(probe), "output")
    unknown = sorted(set(labels) - set(outputs))
    if unknown:
        raise ScenarioError(f"scenario {scenario.name!r}: labels() names {', '.join(map(repr, unknown))}, but the "
                            f"model's outputs are {', '.join(map(repr, outputs))}; return an array for a single "
                            "output or a dict by output name")
    rows = next(iter(formats.flatten(probe, "input").values())).shape[0]
    for name, lab in labels.items():
        if lab.ndim == 0 or lab.shape[0] != rows:
            raise ScenarioError(f"scenario {scenario.name!r}: labels for output {name!r} have shape {lab.shape}; "
                                f"give one label per probe row ({rows} rows)")
        try:
            task_metric(scenario.metric, outputs[name], lab, output_kind(outputs[name], scenario.outputs.get(name)))
        except (ValueError, TypeError) as exc:
            raise ScenarioError(f"scenario {scenario.name!r}: metric {scenario.metric!r} on output {name!r}: "
                                f"{exc}") from None
    return labels


class _Trained:
    """A freshly trained model with its probe, in-memory outputs, float64 oracle and labels, saved format by format."""

    def __init__(self, scenario: Scenario, model: Any, probe: Any, batch_size: int):
        self.scenario, self.model, self.probe, self.batch_size = scenario, model, probe, batch_size
        self.in_memory = formats.predict(lambda x: formats.call_model(model, x), probe, batch_size)
        unknown = sorted(set(scenario.outputs) - set(self.in_memory))
        if unknown:
            raise ScenarioError(f"scenario {scenario.name!r}: outputs= names {', '.join(map(repr, unknown))}, but the "
                                f"model's outputs are {', '.join(map(repr, self.in_memory))}")
        self.variables = formats.variable_digests(model.weights if formats.is_keras(model) else model.variables)
        self.labels = probe_labels(scenario, probe, self.in_memory)
        # Once per scenario: every format holds these weights (the save round trip checks them).
        self.oracle = float64_oracle(scenario, model, probe, batch_size, self.in_memory)

    @classmethod
    def fit(cls, scenario: Scenario, batch_size: int) -> "_Trained":
        model, probe = fit_scenario(scenario)
        return cls(scenario, model, probe, batch_size)

    def save(self, fmt: str, storage: Storage, rel: str, digest: str, fp: dict[str, Any], *,
             overwrite: bool = False, repaired: str | None = None) -> ArtifactRecord:
        """Save in ``fmt``, reload here, and publish the artifact with its references as a new version.

        ``overwrite`` makes it the artifact even if one is published (``--retrain``, or damaged:
        ``repaired`` says how); otherwise a version another run published first is used instead.
        A storage failure is the record's ``error`` (one sentence, cause first).
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
            if self.oracle.outputs:
                (Path(tmp) / "oracle.arrow").write_bytes(arrays.to_ipc_bytes(self.oracle.outputs, meta))
            if self.labels:
                (Path(tmp) / "labels.arrow").write_bytes(arrays.to_ipc_bytes(self.labels, meta))
            (Path(tmp) / "reference.json").write_text(json.dumps(
                {**meta, "variables": [{"name": k, **v} for k, v in self.variables.items()], "save": save,
                 "fingerprint": fp, "inputs": list(probe_arrays), "outputs": list(reference),
                 "oracle": self.oracle.info(), "labels": list(self.labels), "metric": self.scenario.metric},
                indent=1, sort_keys=True, default=jsonable))
            try:
                published = storage.publish_dir(tmp, rel, replace=overwrite)
                if not published.ours:  # another run published this digest first: everyone uses that one
                    return _reference_from_storage(storage, self.scenario.name, fmt, published.path, digest)
            except (StorageError, CorruptArtifact) as exc:
                return replace(record, path=None, uri=None, error=str(exc))
        return replace(record, path=published.path, uri=storage.uri_of(published.path),
                       manifest_sha256=published.manifest_sha256, save_verdict=save["verdict"],
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
