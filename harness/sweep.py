"""Plan a sweep, run it (on Ray through the engine, or inline), collect the results.

Flow: ``plan`` the cells -> check placements against the cluster
(``precheck``) -> the engine (``harness.engine``) trains each scenario in the
training environment and replays every cell on its environment's long-lived
worker -> each finished cell is completed with the run's columns by the
``Collector`` and appended to the run journal (one line, O(1)) -> the final
``results.parquet`` is written once, from the journal, at the end.

A crash or SIGKILL loses no finished cell: ``--resume`` (or ``harness report``)
rebuilds the table from the journal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa

from . import results
from .records import ArtifactRecord, CellResult, TrainRecord
from .scenario import Scenario
from .spec import Environment, Sweep

Progress = Callable[[int, int, CellResult], None]


class SweepError(Exception):
    """The sweep could not run at all (e.g. Ray unreachable): exit code 3."""


@dataclass(frozen=True)
class Cell:
    scenario: str
    format: str
    environment: str

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.format}/{self.environment}"


def plan(sweep: Sweep, only: Iterable[str] = ()) -> list[Cell]:
    """Every (scenario, format, environment) cell, filtered by ``only``.

    Each name in ``only`` must be a scenario, format or environment of the
    sweep; a dimension that any name mentions is restricted to those names.
    Cells are ordered environment-major so consecutive cells reuse a worker.

    Raises:
        ValueError: a name in ``only`` is none of the sweep's names.
    """
    only = list(only)
    dims = {"scenario": list(sweep.scenarios), "format": list(sweep.formats),
            "environment": [e.name for e in sweep.environments]}
    chosen = {k: [v for v in vals if v in only] or vals for k, vals in dims.items()}
    unknown = [n for n in only if not any(n in vals for vals in dims.values())]
    if unknown:
        raise ValueError(f"--only: {', '.join(map(repr, unknown))} is not a scenario, format or environment "
                         f"of sweep {sweep.name!r}")
    return [Cell(s, f, e) for e in chosen["environment"] for s in chosen["scenario"] for f in chosen["format"]]


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# -- placement ---------------------------------------------------------------
def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray label selector semantics: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    for key, expr in selector.items():
        expr = expr.strip()
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            values = {v.strip() for v in body[3:-1].split(",")}
        else:
            values = {body}
        hit = labels.get(key) in values
        if hit == negate:
            return False
    return True


def missing_on_node(env: Environment, node: Mapping[str, Any]) -> str | None:
    """Why ``node`` cannot host ``env`` (``None`` if it can)."""
    res = node.get("Resources", {})
    if res.get("CPU", 0) < env.num_cpus:
        return f"CPU >= {env.num_cpus:g}"
    if env.num_gpus and res.get("GPU", 0) < env.num_gpus:
        return f"GPU >= {env.num_gpus:g}"
    if env.accelerator_type and f"accelerator_type:{env.accelerator_type}" not in res:
        return f"accelerator_type:{env.accelerator_type}"
    for name, amount in env.resources.items():
        if res.get(name, 0) < amount:
            return f"resource {name} >= {amount:g}"
    if env.label_selector and not label_matches(env.label_selector, node.get("Labels", {})):
        sel = ", ".join(f"{k}={v}" for k, v in env.label_selector.items())
        return f"labels {sel}"
    return None


def unschedulable_reason(env: Environment, nodes: list[Mapping[str, Any]]) -> str | None:
    """``None`` if some alive node can host ``env``, else a message naming what is missing."""
    alive = [n for n in nodes if n.get("Alive", True)]
    misses = [missing_on_node(env, n) for n in alive]
    if any(m is None for m in misses):
        return None
    accel = sorted({k.split(":", 1)[1] for n in alive for k in n.get("Resources", {}) if k.startswith("accelerator_type:")})
    first = misses[0] if misses else "any node at all"
    return (f"no node of the cluster ({len(alive)} alive) can host environment {env.name!r}: missing {first}"
            + (f" (accelerator types present: {', '.join(accel)})" if env.accelerator_type else ""))


def precheck(sweep: Sweep, nodes: list[Mapping[str, Any]]) -> dict[str, str]:
    """Environment name (``training`` for the training environment) -> why no alive node can host it."""
    out = {}
    for name, env in (("training", sweep.training), *((e.name, e) for e in sweep.environments)):
        reason = unschedulable_reason(env, nodes)
        if reason:
            out[name] = reason
    return out


# -- collecting ----------------------------------------------------------------
class Collector:
    """Completes each finished cell with the run's columns and journals it: O(1) per cell.

    The one place that decides ``passed`` (the verdict meets the environment's
    expectation and the save round trip meets ``expect_save``).
    """

    def __init__(self, sweep: Sweep, run_id: str, journal: results.Journal, total: int,
                 progress: Progress | None = None, done: Iterable[str] = ()):
        self.sweep, self.run_id, self.journal, self.total, self.progress = sweep, run_id, journal, total, progress
        self.done: set[str] = set(done)
        self.train_fingerprints: dict[str, str] = {}
        self.train_seconds: dict[str, float] = {}
        self._envs = {env.name: env for env in sweep.environments}
        self.harness_failures: list[str] = []  # failures of the harness itself (exit code 3)

    def harness_failed(self, message: str) -> None:
        """Record a failure of the harness itself (not of a cell): the run ends with exit code 3."""
        if message not in self.harness_failures:
            self.harness_failures.append(message)

    def training_done(self, record: TrainRecord) -> None:
        # Encoded once per scenario, not once per cell.
        self.train_fingerprints[record.scenario] = json.dumps(record.fingerprint, sort_keys=True, default=str)
        self.train_seconds[record.scenario] = record.seconds
        for art in record.artifacts.values():
            if art.repaired:
                print(f"harness: warning: replaced a damaged artifact in storage: {art.repaired}", file=sys.stderr)

    def add(self, cell: Cell, result: CellResult, artifact: ArtifactRecord | None = None,
            attempts: int | None = None) -> None:
        """Complete ``result`` with the run's columns, journal it and report progress (once per cell)."""
        if cell.key in self.done:
            return  # exactly one row per cell, whatever retried
        env = self._envs[cell.environment]
        expected = self.sweep.expectation(env)
        save = {}
        if artifact is not None:
            save = dict(artifact_digest=artifact.digest, artifact_uri=artifact.uri, save_verdict=artifact.save_verdict,
                        save_max_abs_diff=artifact.save_max_abs_diff, save_max_ulp_diff=artifact.save_max_ulp_diff)
        save_verdict = save.get("save_verdict", result.save_verdict)
        save_ok = save_verdict is None or results.meets(save_verdict, self.sweep.expect_save)
        error = result.error
        if not save_ok and result.verdict in results.NUMERIC_VERDICTS:
            note = f"save round trip is {save_verdict} (expect_save: {self.sweep.expect_save})"
            error = f"{note}; {error}" if error else note
        result = result.replace(
            run_id=self.run_id, sweep=self.sweep.name, scenario=cell.scenario, format=cell.format,
            environment=cell.environment, expected=expected, error=error,
            # An optional environment no node can host is not judged: it may not exist on every machine.
            passed=None if env.optional and result.verdict == "unschedulable"
            else result.meets(expected) and save_ok,
            train_fingerprint=self.train_fingerprints.get(cell.scenario), train_s=self.train_seconds.get(cell.scenario),
            attempts=result.attempts if attempts is None else attempts,
            # A cell that never started (unschedulable, failed save) is dated when decided.
            started_at=result.started_at or time.time(), **save)
        self.journal.append(result)
        self.done.add(cell.key)
        if self.progress:
            self.progress(len(self.done), self.total, result)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    table: Any  # pa.Table
    results_uri: str | None = None  # copy of results.parquet in shared storage
    storage_uri: str | None = None  # the storage the run used; ``publish`` puts its files in runs/<run_id>/ there
    harness_failures: list[str] = field(default_factory=list)  # the harness itself failed (exit code 3)

    @property
    def passed(self) -> bool:
        """Every cell met its expectation (a cell not judged, ``passed`` null, does not fail the run)."""
        return all(p is not False for p in self.table.column("passed").to_pylist())


def sweep_order(sweep: Sweep, table: pa.Table) -> pa.Table:
    """``table`` in the sweep's own order (scenario, format, environment), the last row of a cell winning.

    Reports of the same sweep always have the same layout, whatever order cells finished in.
    """
    dims = (("scenario", sweep.scenarios), ("format", sweep.formats),
            ("environment", [e.name for e in sweep.environments]))
    rank = {dim: {name: i for i, name in enumerate(names)} for dim, names in dims}
    keys = zip(*(table.column(d).to_pylist() for d, _ in dims))
    last = {k: i for i, k in enumerate(keys)}
    order = sorted(last, key=lambda k: tuple(rank[d].get(v, len(rank[d])) for (d, _), v in zip(dims, k)))
    return table.take(pa.array([last[k] for k in order], type=pa.int64()))  # typed: an empty take has no null kernel


RUN_FILE = "run.json"


class RunDirError(ValueError):
    """``--out`` cannot be used as asked (exit code 2): the message names the directory and the fix."""


def plan_digest(sweep: Sweep) -> str:
    """What decides a run's results: cells, environments, tolerances, expectations (not names or descriptions)."""
    parts = [sweep.scenarios, sweep.formats, [repr(e) for e in sweep.environments], repr(sweep.training),
             repr(sweep.tolerance), sorted((k, repr(v)) for k, v in sweep.output_tolerances.items()),
             sweep.expect, sweep.expect_save, sweep.batch_size]
    return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()[:16]


def adopt(run_dir: Path, sweep: Sweep) -> pa.Table:
    """The finished cells ``--resume`` may keep, after checking they are this sweep's, with this plan.

    Raises:
        RunDirError: the directory holds another sweep's or another plan's run.
        results.ResultsError: its results file is not one.
    """
    try:
        stored = results.read_table(run_dir)
    except FileNotFoundError:
        return results.SCHEMA.empty_table()
    fix = "use another --out, or run without --resume to start afresh there"
    sweeps = set(stored.column("sweep").to_pylist()) - {None}
    if sweeps and sweeps != {sweep.name}:
        raise RunDirError(f"{run_dir}: --resume: it holds a run of sweep {', '.join(map(repr, sorted(sweeps)))}, "
                          f"not {sweep.name!r}; {fix}")
    try:
        meta = json.loads((run_dir / RUN_FILE).read_text())
    except FileNotFoundError:
        meta = {}
    except ValueError:
        raise RunDirError(f"{run_dir / RUN_FILE}: unreadable; {fix}") from None
    if meta.get("plan") not in (None, plan_digest(sweep)):
        raise RunDirError(f"{run_dir}: --resume: its run {meta.get('run_id')!r} was planned from another version "
                          f"of sweep {sweep.name!r} (environments, tolerances or expectations changed); {fix}")
    return stored


def check_storage(uri: str, run_id: str) -> None:
    """Write, read back and delete a small file: a storage the run cannot use fails now, not in every cell.

    Raises:
        StorageError: the storage cannot be opened, written or read (exit code 3).
    """
    from .storage import Storage, StorageError, StorageFailure

    rel = f"runs/{run_id}/.writable"
    try:
        st = Storage.open(uri)
        st.write_bytes(rel, b"ok")
        if st.read_bytes(rel) != b"ok":
            raise OSError("a file written there reads back differently")
        st.fs.delete_file(st.path(rel))
    except StorageFailure as exc:  # the cause and the place first, then what it means here
        raise StorageFailure(f"{exc}; this storage cannot be used (check the path or bucket exists and "
                             "is writable)", exc.kind, exc.transient) from None
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"storage {uri} cannot be used: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                           "(check the path or bucket exists and is writable)") from None


def _write_run_file(run_dir: Path, sweep: Sweep, run_id: str, storage_uri: str) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "sweep": sweep.name, "source": str(Path(sweep.source).resolve()),
                               "plan": plan_digest(sweep), "storage": storage_uri}, indent=1))
    os.replace(tmp, run_dir / RUN_FILE)


def run_sweep(sweep: Sweep, scenarios: Mapping[str, Scenario], *, out_dir: str | os.PathLike,
              address: str = "local", storage: str | None = None, only: Iterable[str] = (),
              retrain: bool = False, inline: bool = False, resume: bool = False,
              progress: Progress | None = None, run_id: str | None = None, verbose: bool = False,
              worker_cls: type | None = None) -> RunResult:
    """Run every cell of ``sweep`` and write ``out_dir/results.parquet``.

    Args:
        sweep: the validated sweep.
        scenarios: name -> Scenario for (at least) the sweep's scenarios.
        out_dir: run directory on the driver (journal, results.parquet, reports).
        address: ``local`` (embedded Ray), ``auto`` or ``ray://host:port``. If
            Ray is already initialised in this process it is used as is.
        storage: overrides the sweep's ``storage`` URI.
        only: restrict cells (see ``plan``).
        retrain: ignore complete artifacts already in storage.
        inline: run everything in this process, without Ray (debugging). An
            environment needing import-time env vars this process lacks gets
            an ``error`` verdict saying so.
        resume: keep the cells an earlier run finished in ``out_dir`` and run
            only the missing ones, under the same run id.
        progress: called as ``progress(done, total, result)`` after each cell.
        worker_cls: the actor body (benchmarks replace TensorFlow work with it).

    Returns:
        A ``RunResult``; ``passed`` is true iff every cell met its expectation.

    Raises:
        SweepError: Ray could not be started or reached.
    """
    from .storage import RunLease, Storage, StorageError, normalize_uri

    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = adopt(run_dir, sweep) if resume else results.SCHEMA.empty_table()
    if previous.num_rows:
        run_id = run_id or previous["run_id"][0].as_py()
    else:
        results.Journal.remove(run_dir)  # a fresh run never mixes in an old journal
    cells = plan(sweep, only)
    # Resolved once, here: workers must never resolve a relative path in their own cwd.
    storage_uri = normalize_uri(storage or sweep.storage)
    run_id = run_id or new_run_id()
    check_storage(storage_uri, run_id)
    _write_run_file(run_dir, sweep, run_id, storage_uri)
    done = {"/".join(k) for k in zip(*(previous.column(d).to_pylist() for d in ("scenario", "format", "environment")))}
    todo = [c for c in cells if c.key not in done]
    with results.Journal(run_dir) as journal, RunLease(storage_uri, run_id):  # gc honours the lease
        collector = Collector(sweep, run_id, journal, total=len(cells), progress=progress,
                              done=[c.key for c in cells if c.key in done])
        observation = lambda cell: f"runs/{run_id}/observations/{cell.scenario}/{cell.format}/{cell.environment}.arrow"
        try:
            if inline:
                _run_inline(sweep, scenarios, storage_uri, collector, todo, retrain, observation)
            else:
                _run_ray(sweep, scenarios, storage_uri, collector, todo, address, retrain, verbose, observation,
                         worker_cls)
        finally:
            table = sweep_order(sweep, pa.concat_tables([previous, results.Journal.table(run_dir)]))
            results.write_table(table, run_dir / "results.parquet")
    results.Journal.remove(run_dir)  # every line is in results.parquet now
    # Also publish next to the observations in shared storage: on a cluster
    # the driver's disk may not outlive the run.
    results_uri = None
    try:
        publish(storage_uri, run_id, {"results.parquet": results.to_parquet_bytes(table),
                                      RUN_FILE: (run_dir / RUN_FILE).read_bytes()})
        results_uri = Storage.open(storage_uri).uri_of(f"runs/{run_id}/results.parquet")
    except StorageError as exc:  # one sentence that starts with the cause and the place
        collector.harness_failed(f"{exc}; the results are in {run_dir / 'results.parquet'}")
    except Exception as exc:
        collector.harness_failed(f"results could not be published to storage {storage_uri}: {exc}; "
                                 f"they are in {run_dir / 'results.parquet'}")
    return RunResult(run_id=run_id, run_dir=run_dir, table=table, results_uri=results_uri,
                     storage_uri=storage_uri,
                     harness_failures=collector.harness_failures)


def publish(storage_uri: str, run_id: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into the run's directory in storage, ``runs/<run_id>/``.

    ``harness report URI`` reads a run from there, on any machine that reaches the storage.
    """
    from .storage import Storage

    st = Storage.open(storage_uri)
    for name, data in files.items():
        st.write_bytes(f"runs/{run_id}/{name}", data)


def _run_inline(sweep: Sweep, scenarios: Mapping[str, Scenario], storage_uri: str, collector: Collector,
                todo: list[Cell], retrain: bool, observation: Callable[[Cell], str]) -> None:
    from .replay import replay
    from .train import train

    for name in dict.fromkeys(c.scenario for c in todo):
        record = train(scenarios[name], list(sweep.formats), storage_uri, sweep.training,
                       batch_size=sweep.batch_size, retrain=retrain)
        collector.training_done(record)
        for cell in [c for c in todo if c.scenario == name]:
            art = record.artifacts[cell.format]
            if art.error:
                collector.add(cell, CellResult(verdict="error", error=art.error), art)
                continue
            env = sweep.environment(cell.environment)
            result = replay(scenarios[name], cell.format, art.path, storage_uri, env,
                            batch_size=sweep.batch_size_for(env), tolerance=sweep.tolerance_for(env),
                            output_tolerances=dict(sweep.output_tolerances), observation_path=observation(cell),
                            manifest_sha256=art.manifest_sha256)
            collector.add(cell, result, art, attempts=1)


#: Room the embedded local Ray gets beyond the machine's cores, in CPUs: at most one more
#: per core, and at most this many. A worker that has imported TensorFlow and waits for
#: its scenario to finish training holds its environment's CPU in Ray's accounting but
#: uses none, so the next environments can import on the core training leaves free; the
#: engine keeps at most one core's worth of workers *busy* (importing TensorFlow or
#: running jobs) per core (``Engine(busy_cpus=...)``). Capped because every waiting
#: worker keeps TensorFlow in memory. Placement checks still use the real core count.
LOCAL_WAITING_CPUS = 4

_local_cores: float | None = None  # cores of the machine, while this process runs an embedded Ray


def _host_cores() -> float:
    """The cores Ray would give an embedded local cluster (cgroup quota and affinity aware)."""
    try:
        from ray._private.utils import get_num_cpus  # what ray.init uses when num_cpus is not given

        return float(get_num_cpus())
    except Exception:  # a private helper: fall back to the process's CPU affinity
        return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _init_ray(address: str, verbose: bool) -> bool:
    """Start or connect to Ray; returns whether we own the connection."""
    global _local_cores
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    cores = None
    if address == "local":
        # No idle default-env workers (neither prestarted nor started for the first driver): every
        # worker of ours has its environment's runtime_env, and each idle one costs ~1 s of CPU.
        cores = _host_cores()
        kwargs.update(address="local", include_dashboard=False,
                      num_cpus=math.ceil(cores + min(cores, LOCAL_WAITING_CPUS)),
                      _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    else:
        # Workers of a real cluster get this very harness code through Ray,
        # so a node needs only Python, Ray and TensorFlow installed.
        kwargs.update(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        ray.init(**kwargs)
    except Exception as exc:
        raise SweepError(f"cannot start/connect to Ray at {address!r}: {type(exc).__name__}: {exc}") from exc
    _local_cores = cores
    return True


def cluster_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()``, with the embedded local Ray's node showing the machine's real cores as ``CPU``."""
    import ray

    nodes = ray.nodes()
    if _local_cores is None:
        return nodes
    return [{**n, "Resources": {**n.get("Resources", {}), "CPU": _local_cores}} for n in nodes]


def _shutdown_ray() -> None:
    """Stop the Ray this process started (see ``_init_ray``)."""
    global _local_cores
    import ray

    if _local_cores is not None:
        _stop_autoscaler_monitor()
    ray.shutdown()
    _local_cores = None


def _stop_autoscaler_monitor() -> None:
    """SIGKILL the embedded Ray's autoscaler monitor (a single machine has nothing to scale).

    ``ray.shutdown()`` stops the GCS first; the monitor then answers SIGTERM by
    trying to report its own end to that GCS and is killed after Ray's 1 s
    grace period: a second lost at the end of every local run. Best effort
    (Ray's process table is private): anything unexpected leaves it to Ray.
    """
    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        for info in ray_worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:
        pass


def _register_scenarios_by_value(scenarios: Iterable[Scenario]) -> None:
    """Ship user scenario modules to workers by value (nothing to install there)."""
    from ray import cloudpickle

    for s in scenarios:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) == s.source_file and mod.__name__.startswith("_harness_scenarios."):
                try:
                    cloudpickle.register_pickle_by_value(mod)
                except ValueError:
                    pass  # already registered


def _run_ray(sweep: Sweep, scenarios: Mapping[str, Scenario], storage_uri: str, collector: Collector,
             todo: list[Cell], address: str, retrain: bool, verbose: bool, observation: Callable[[Cell], str],
             worker_cls: type | None) -> None:
    import ray

    from .engine import Engine
    from .worker import Worker

    owned = _init_ray(address, verbose)
    try:
        if _local_cores is None:  # a cluster: can its hosts read this storage? (exit 2 if not)
            from .reach import check_storage_reach

            for host in check_storage_reach(storage_uri, sweep, cluster_nodes()):
                print(f"harness: warning: {host} did not answer the storage probe in time", file=sys.stderr)
        needed = {c.scenario for c in todo}
        _register_scenarios_by_value(scenarios[n] for n in needed)
        unschedulable = precheck(sweep, cluster_nodes()) if sweep.precheck else {}
        engine = Engine(sweep, {n: scenarios[n] for n in needed}, storage_uri, collector, retrain=retrain,
                        worker_cls=worker_cls or Worker, observation_path=observation, busy_cpus=_local_cores)
        engine.run(todo, unschedulable)
    finally:
        if owned:
            _shutdown_ray()
