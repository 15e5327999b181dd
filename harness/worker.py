"""What an environment's long-lived worker does, as a plain class (no Ray inside).

The engine wraps :class:`Worker` in a Ray actor started with the environment's
``runtime_env`` (its import-time variables set before Python starts), so
TensorFlow is imported and configured once per worker, in :meth:`Worker.warm`,
and every cell of the environment is then served by the same process.
``--inline`` and tests can use the class directly.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from .compare import Tolerance
from .records import ArtifactRecord, CellNames, CellResult, JobFailed, TrainRecord
from .scenario import Scenario, activate
from .spec import Environment


@dataclass(frozen=True)
class TrainJob:
    """Train one scenario and save it in every format of the sweep."""

    scenario: str
    formats: tuple[str, ...]
    batch_size: int
    retrain: bool = False


@dataclass(frozen=True)
class ReplayJob(CellNames):
    """Reload one artifact in this worker's environment and compare it (one cell)."""

    scenario: str
    format: str
    environment: str
    artifact: ArtifactRecord
    batch_size: int
    tolerance: Tolerance = Tolerance()
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    observation_path: str | None = None


@dataclass(frozen=True)
class TraceJob:
    """Reload one artifact and record every layer's inputs and outputs on its probe (explain).

    ``dtype_policy`` serves the reload under that Keras policy, as the environment's cells
    are (``formats.under_policy``). With ``oracle_path``, the same worker also traces the
    model rebuilt in float64 (the oracle's rebuild) on the probe cast to float64, and
    writes that trace there.
    """

    scenario: str
    format: str
    artifact_path: str
    manifest_sha256: str | None
    batch_size: int
    jit_compile: bool
    output_path: str  # where the trace is written in storage (Arrow IPC)
    dtype_policy: str | None = None
    oracle_path: str | None = None


@dataclass(frozen=True)
class Traced:
    """What a trace job wrote: the layer calls traced, and why there is no float64 trace (when asked for one)."""

    layers: tuple[str, ...]
    oracle_unavailable: str | None = None


#: A finished job is reported at most this long after it finished (results finishing
#: within the window travel together, which keeps the driver's work per cell small).
REPORT_EVERY_S = 0.05


class Worker:
    """Serves the jobs of one environment in one process.

    Args:
        environments: the environments this process serves, by name: one, or
            several that differ only in prediction-time knobs (same placement,
            runtime_env and process-wide settings), so they share one
            TensorFlow import. The first one configures the process.
        scenarios: every scenario its jobs may name, by name.
        storage_uri: the shared storage root (already resolved by the driver).
    """

    def __init__(self, environments: Mapping[str, Environment], scenarios: Mapping[str, Scenario],
                 storage_uri: str):
        self.environments = dict(environments)
        self.environment = next(iter(self.environments.values()))
        self.scenarios = dict(scenarios)
        self.storage_uri = storage_uri
        self._jobs: ThreadPoolExecutor | None = None  # one thread: jobs run in order

    def where(self) -> dict[str, Any]:
        """``{"pid", "node_id"}`` of this process: answered as soon as Ray placed it, before TensorFlow is imported."""
        from . import fingerprint

        return {"pid": os.getpid(), "node_id": fingerprint.ray_info().get("ray_node_id")}

    def warm(self) -> dict[str, Any]:
        """Import TensorFlow and apply the environment's process-wide settings, once.

        Returns ``{"pid", "node_id", "seconds"}``, plus ``"unschedulable"`` when
        this node cannot be what the environment asks for (a ``cpu_isa`` above
        its CPU). A setting this process cannot honour otherwise (no GPU, wrong
        import-time variables) is not raised here: every job then returns an
        ``error`` verdict saying why, which is what the user needs to see per cell.
        """
        from . import fingerprint, runtime

        start = time.time()
        info = fingerprint.ray_info()
        out = {"pid": os.getpid(), "node_id": info.get("ray_node_id")}
        lacking = self.missing_isa()
        if lacking:
            out["unschedulable"] = lacking
            return out
        try:
            runtime.configure(self.environment)
        except runtime.EnvironmentMismatch:
            pass  # reported by each job
        return {**out, "seconds": time.time() - start}

    def missing_isa(self) -> str | None:
        """Why this node's CPU cannot emulate the environment's ``cpu_isa`` (None if it can)."""
        from . import fingerprint, isa

        level = getattr(self.environment, "cpu_isa", None)
        if not level:
            return None
        cpu = fingerprint.cpu_info()
        lacking = isa.missing_flags(level, cpu["cpu_flags"])
        if not lacking:
            return None
        return (f"cpu_isa {level!r} needs CPU flags {', '.join(lacking)} that this node's CPU "
                f"({cpu['cpu_model']}) lacks; it can emulate {', '.join(isa.supported(cpu['cpu_flags'])) or 'none'}")

    def serve(self, jobs: Sequence[TrainJob | ReplayJob]) -> Iterator[list[TrainRecord | CellResult | JobFailed]]:
        """Run ``jobs`` in order, yielding their records in chunks as they finish.

        The engine calls this as a Ray streaming generator (under Ray Client,
        which has none, it calls :meth:`run` once per job instead): one call per batch
        of cheap cells instead of one round trip per cell. Jobs run one after
        another on this worker's job thread; a finished job is reported within
        ``REPORT_EVERY_S`` even while the next one is still running (or stuck),
        so the driver always knows exactly which job is running and since when.
        """
        if self._jobs is None:
            self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-job")
        futures = [self._jobs.submit(self.run, job) for job in jobs]
        i = 0
        while i < len(futures):
            chunk = [futures[i].result()]
            i += 1
            deadline = time.monotonic() + REPORT_EVERY_S
            while i < len(futures) and (left := deadline - time.monotonic()) > 0:
                try:
                    chunk.append(futures[i].result(timeout=left))
                except FuturesTimeout:
                    break
                i += 1
            yield chunk

    def run(self, job: TrainJob | ReplayJob) -> TrainRecord | CellResult | JobFailed:
        """One job; an exception becomes a ``JobFailed`` so the rest of the batch goes on."""
        from .runtime import error_text

        try:
            if isinstance(job, TrainJob):
                return self.train(job)
            return self.replay(job).encoded()  # JSON encoded here, not on the driver
        except (Exception, SystemExit) as exc:  # a scenario's sys.exit() must not end the worker
            return JobFailed(error_text(exc))

    def trace(self, job: TraceJob) -> Traced:
        """Trace every layer of the reloaded artifact on its probe and write it to storage (and the float64 trace).

        Raises whatever stops the (first) trace; a float64 trace that cannot be made
        is no failure: ``Traced.oracle_unavailable`` says why.
        """
        from . import arrays, formats, runtime
        from .replay import read_reference, read_truth
        from .storage import Storage
        from .tracing import trace_layers, trace_to_arrays

        runtime.configure(self.environment)
        storage = Storage.open(self.storage_uri)
        local, _ = storage.get_dir(job.artifact_path, expected_manifest_sha256=job.manifest_sha256)
        inputs, _reference, info = read_reference(local)
        scenario = activate(self.scenarios[job.scenario])  # its module executed here: custom classes registered
        loaded = formats.get(job.format).load(f"{local}/{formats.MODEL_DIR}", scenario, inputs)
        meta = {"scenario": job.scenario, "format": job.format, "environment": self.environment.name}

        def write(path: str, model: Any, probe: Any, jit_compile: bool, policy: str | None) -> list[str]:
            trace = trace_layers(model, probe, job.batch_size, jit_compile)
            storage.write_bytes(path, arrays.to_ipc_bytes(trace_to_arrays(trace), {**meta, "dtype_policy": policy}))
            return [call["name"] for call in trace]

        served = formats.under_policy(job.format, loaded, scenario, job.dtype_policy)
        names = write(job.output_path, served.model, inputs, job.jit_compile, job.dtype_policy)
        if job.oracle_path is None:
            return Traced(tuple(names))
        truth = read_truth(local, info)
        if truth.oracle is None:  # the artifact says why it has no oracle (a model Keras cannot rebuild, ...)
            return Traced(tuple(names), truth.reason)
        try:
            wide = formats.under_policy(job.format, loaded, scenario, "float64")  # the oracle's own rebuild
            write(job.oracle_path, wide.model, formats.as_float64(inputs), False, "float64")
        except Exception as exc:
            return Traced(tuple(names), f"the model cannot be traced in float64: {runtime.error_text(exc)}")
        return Traced(tuple(names))

    def train(self, job: TrainJob) -> TrainRecord:
        from .train import train

        return train(self.scenarios[job.scenario], list(job.formats), self.storage_uri, self.environment,
                     batch_size=job.batch_size, retrain=job.retrain)

    def replay(self, job: ReplayJob) -> CellResult:
        from .replay import replay

        art = job.artifact
        return replay(self.scenarios[job.scenario], job.format, art.path, self.storage_uri,
                      self.environments[job.environment],
                      batch_size=job.batch_size, tolerance=job.tolerance, output_tolerances=job.output_tolerances,
                      observation_path=job.observation_path, manifest_sha256=art.manifest_sha256)
