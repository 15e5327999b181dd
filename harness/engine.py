"""The Ray adapter: drives :mod:`harness.scheduler` with what Ray reports, and the Ray connection itself.

The scheduler decides everything (see its docstring); this module only
translates. Each scheduler worker is a Ray actor (:class:`harness.worker.Worker`
started with its environment's placement and ``runtime_env``); the loop waits
on every actor's next outstanding call at once and turns each outcome into an
event:

==================================  =======================================
Ray                                 event
==================================  =======================================
``where()`` returns (placed)        ``Placed(node)``
``warm()`` returns                  ``Warmed`` (``unschedulable``: cpu_isa)
``warm()``/``where()`` raise        ``WarmFailed`` (``setup``: runtime_env)
a chunk of a batch                  ``Reported(values)``
an actor died                       ``WorkerDied`` (+ ``NodesChanged`` when its node is gone)
another error of a call             ``BatchFailed``
every ``POLL_S``                    ``Tick`` (Ray's CPUs every ``RESOURCE_REFRESH_S``)
==================================  =======================================

Jobs travel two ways. With streaming generators (a driver on the cluster: the
default), a batch of jobs is one call and finished jobs come back in chunks as
they end. Under Ray Client (``ray://``), which refuses streaming actor calls,
every job is one plain call (``Settings.max_batch = 1``): a call's result
arrives when its job ends, so the scheduler still knows which job runs and
since when, and timeouts stay exact.

Repeats (``repeats: N``) are the scheduler's: each repeat of a cell is an
ordinary job on a worker of its repeat's slot, and a repeated cell's ``Emit``
carries every repeat's result to the sink, which makes them one row.

Driver work per finished cell is O(1): a scheduler step and one journal line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from . import placement
from .records import ArtifactRecord, Cell, CellResult, TrainRecord
from .scenario import Scenario
from .scheduler import (MAX_BATCH, BatchFailed, Emit, HarnessFailed, Job, Kill, LaneSpec, NodesChanged, Placed, Reported,
                        Scheduler, Settings, StartFailed, StartWorker, Submit, Tick, Trained, WarmFailed, Warmed,
                        WorkerDied)
from .spec import Environment, Sweep
from .worker import ReplayJob, TrainJob, Worker

POLL_S = 0.5
RESOURCE_REFRESH_S = 5.0
#: The scheduler's key of the training lane (process keys are JSON lists: no environment can collide).
TRAINING_LANE = "<training>"
#: Ray's own label of every node: its id (used to keep a worker off nodes ruled out).
NODE_ID_LABEL = "ray.io/node-id"


class Sink(Protocol):
    """Where finished cells go (``harness.sweep.Collector``)."""

    def add(self, cell: Cell, result: CellResult, artifact: ArtifactRecord | None = None,
            attempts: int | None = None, repeats: Sequence[CellResult] = ()) -> None: ...

    def training_done(self, record: TrainRecord) -> None: ...

    def harness_failed(self, message: str) -> None: ...


# -- what a worker of an environment is ---------------------------------------------------------
def ray_options(env: Environment, avoid: Iterable[str] = ()) -> dict[str, Any]:
    """``.options(...)`` of an actor serving ``env``: placement and runtime_env, kept off the nodes in ``avoid``."""
    opts: dict[str, Any] = {"num_cpus": env.num_cpus, "num_gpus": env.num_gpus,
                            "runtime_env": env.ray_runtime_env(), "max_restarts": 0, "max_task_retries": 0,
                            "max_concurrency": 1}
    if env.resources:
        opts["resources"] = dict(env.resources)
    if env.accelerator_type:
        opts["accelerator_type"] = env.accelerator_type
    selector = dict(env.label_selector)
    avoid = sorted(avoid)
    if avoid and NODE_ID_LABEL not in selector:  # (a selector of its own on node ids already decides)
        selector[NODE_ID_LABEL] = f"!in({','.join(avoid)})"
    if selector:
        opts["label_selector"] = selector
    return opts


def process_key(env: Environment) -> str:
    """What a worker process is: placement, runtime_env (import-time variables) and process-wide TF settings.

    Environments with the same key differ only in prediction-time knobs
    (``jit_compile``, ``batch_size``), tolerances or expectations, so one
    worker process can serve them all: TensorFlow is imported once for them.
    """
    renv = env.ray_runtime_env()
    renv["env_vars"] = {k: v for k, v in renv.get("env_vars", {}).items() if k != "HARNESS_ENVIRONMENT"}
    opts = {k: v for k, v in ray_options(env).items() if k != "runtime_env"}
    process = {"memory_growth": env.memory_growth, "tf32": env.tf32, "op_determinism": env.op_determinism}
    return json.dumps([renv, opts, process], sort_keys=True, default=str)


def placement_text(env: Environment) -> str:
    """``environment 'x' (num_cpus=1, label a=b)``: what an environment asks of a node."""
    parts = [f"num_cpus={env.num_cpus:g}"]
    if env.num_gpus:
        parts.append(f"num_gpus={env.num_gpus:g}")
    if env.accelerator_type:
        parts.append(f"accelerator_type={env.accelerator_type}")
    parts += [f"{k}={v:g}" for k, v in env.resources.items()]
    parts += [f"label {k}={v}" for k, v in env.label_selector.items()]
    return f"environment {env.name!r} ({', '.join(parts)})"


def demands(env: Environment) -> frozenset[str]:
    """The non-CPU resources a worker of ``env`` holds while it lives."""
    out = set(env.resources)
    if env.num_gpus:
        out.add("GPU")
    if env.accelerator_type:
        out.add(f"accelerator_type:{env.accelerator_type}")
    return frozenset(out)


def ray_error_text(exc: BaseException, attempts: int | None = None) -> str:
    """One line for an exception Ray raised: its type and last meaningful line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    after = f" after {attempts} attempt(s)" if attempts is not None else ""
    return f"{type(exc).__name__}{after}: {lines[-1].strip()[:500] if lines else ''}"


# -- the Ray connection ----------------------------------------------------------------------------
class RayUnavailable(Exception):
    """Ray could not be started or reached (exit code 3)."""


#: Room the embedded local Ray gets beyond the machine's cores, in CPUs: at most one more
#: per core, and at most this many. A worker that has imported TensorFlow and waits for
#: its scenario to finish training holds its environment's CPU in Ray's accounting but
#: uses none, so the next environments can import on the core training leaves free; the
#: scheduler keeps at most one core's worth of workers *busy* (importing TensorFlow or
#: running jobs) per core (``Settings.busy_cpus``). Capped because every waiting worker
#: keeps TensorFlow in memory. Placement checks still use the real core count.
LOCAL_WAITING_CPUS = 4

_local_cores: float | None = None  # cores of the machine, while this process runs an embedded Ray


def host_cores() -> float:
    """The cores Ray would give an embedded local cluster (cgroup quota and affinity aware)."""
    try:
        from ray._private.utils import get_num_cpus  # what ray.init uses when num_cpus is not given

        return float(get_num_cpus())
    except Exception:  # a private helper: fall back to the process's CPU affinity
        return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def local_cores() -> float | None:
    """The machine's cores while this process runs the embedded local Ray it started, else ``None``."""
    return _local_cores


def connect(address: str, verbose: bool = False) -> bool:
    """Start or connect to Ray; returns whether this call made the connection (then :func:`disconnect` it).

    ``local`` starts an embedded Ray with room for warm workers beyond the
    cores (``LOCAL_WAITING_CPUS``); any other address (``auto``,
    ``ray://host:10001``) connects and ships this harness's code to the
    workers (``py_modules``), so a node needs only Python, Ray and TensorFlow.

    Raises:
        RayUnavailable: Ray could not be started or reached.
    """
    global _local_cores
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    cores = None
    if address == "local":
        # No idle default-env workers (neither prestarted nor started for the first driver): every
        # worker of ours has its environment's runtime_env, and each idle one costs ~1 s of CPU.
        cores = host_cores()
        kwargs.update(address="local", include_dashboard=False,
                      num_cpus=math.ceil(cores + min(cores, LOCAL_WAITING_CPUS)),
                      _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    else:
        kwargs.update(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        ray.init(**kwargs)
    except Exception as exc:  # its last line says why (Ray Client puts the server's traceback in the message)
        raise RayUnavailable(f"cannot start/connect to Ray at {address!r}: {ray_error_text(exc)}") from exc
    _local_cores = cores
    return True


def disconnect() -> None:
    """Stop the Ray this process started, or leave the cluster it connected to (see :func:`connect`)."""
    global _local_cores
    import ray

    if _local_cores is not None:
        stop_autoscaler_monitor()
    ray.shutdown()
    _local_cores = None


@contextlib.contextmanager
def session(address: str, verbose: bool = False) -> Iterator[None]:
    """Ray for the duration of a ``with`` block: connected if needed, and left again only if connected here."""
    owned = connect(address, verbose)
    try:
        yield
    finally:
        if owned:
            disconnect()


def client_mode() -> bool:
    """Whether this process talks to Ray through Ray Client (``ray://``)."""
    try:
        from ray.util.client import ray as client

        return bool(client.is_connected())
    except Exception:
        return False


def cluster_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()``, with the embedded local Ray's node showing the machine's real cores as ``CPU``."""
    import ray

    nodes = ray.nodes()
    if _local_cores is None:
        return nodes
    return [{**n, "Resources": {**n.get("Resources", {}), "CPU": _local_cores}} for n in nodes]


def stop_autoscaler_monitor() -> None:
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


def register_scenarios(scenarios: Iterable[Scenario]) -> None:
    """Ship user scenario modules to workers by value (nothing to install there)."""
    from ray import cloudpickle

    for s in scenarios:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) == s.source_file and mod.__name__.startswith("_harness_scenarios."):
                try:
                    cloudpickle.register_pickle_by_value(mod)
                except ValueError:
                    pass  # already registered


# -- the adapter -----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Call:
    """One outstanding call of a batch: a streaming generator, or a plain call's ref (one job)."""

    batch: int
    ref: Any
    jobs: int
    reported: int = 0


@dataclass(eq=False)
class _Actor:
    handle: Any
    node: str | None = None
    startup: deque = field(default_factory=deque)  # ("where" | "warm", ref), answered in order
    calls: deque = field(default_factory=deque)

    def next_ref(self) -> Any:
        if self.startup:
            return self.startup[0][1]
        return self.calls[0].ref if self.calls else None


class Engine:
    """Runs cells on Ray actors, as the scheduler decides, and hands every result to ``sink``.

    Args:
        sweep: the validated sweep (limits, tolerances, batch sizes, the training environment).
        scenarios: name -> Scenario (shipped once to each actor).
        storage_uri: resolved storage root (workers never resolve it themselves).
        sink: receives each finished cell (exactly once) and each training record.
        retrain: ignore complete artifacts already in storage.
        worker_cls: the actor body (default :class:`harness.worker.Worker`;
            benchmarks pass one that does no TensorFlow work).
        observation_path: ``(cell, repeat) -> path`` of a cell's observation file in storage
            (``repeat`` 0-based: each repeat of a repeated cell writes its own).
        busy_cpus: CPUs that may be busy at once when that is fewer than Ray's
            (the embedded local Ray; see ``LOCAL_WAITING_CPUS``). ``None``: Ray's CPUs.
        streaming: send batches through streaming generators; ``None``: unless under Ray Client.
        nodes: the cluster's nodes (``cluster_nodes()``) when placements are
            checked (``precheck``): a lane whose every possible node is lost
            or ruled out is then unschedulable instead of pending.
    """

    def __init__(self, sweep: Sweep, scenarios: Mapping[str, Scenario], storage_uri: str, sink: Sink, *,
                 retrain: bool = False, worker_cls: type = Worker,
                 observation_path: Callable[[Cell, int], str | None] = lambda cell, repeat: None,
                 busy_cpus: float | None = None, streaming: bool | None = None,
                 nodes: Sequence[Mapping[str, Any]] | None = None):
        import ray

        self.ray, self.sweep, self.scenarios, self.sink = ray, sweep, dict(scenarios), sink
        self.storage_uri, self.retrain, self.observation_path = storage_uri, retrain, observation_path
        self.actor_cls = ray.remote(worker_cls)
        self.busy_cpus = busy_cpus
        self.streaming = (not client_mode()) if streaming is None else streaming
        self.nodes = None if nodes is None else list(nodes)
        self._alive = {n.get("NodeID") for n in self.nodes or () if n.get("Alive", True)}
        self.actors: dict[int, _Actor] = {}
        self.lane_envs: dict[str, dict[str, Environment]] = {}  # lane key -> its environments, the first configures
        self._replay_settings: dict[str, tuple[int, Any]] = {}
        self._capacity_at = 0.0

    # -- public ------------------------------------------------------------------------------
    def run(self, cells: Iterable[Cell], unschedulable: Mapping[str, str] | None = None,
            artifacts: Mapping[str, ArtifactRecord] | None = None, repeats: Mapping[str, int] | None = None) -> None:
        """Run ``cells``.

        Args:
            cells: the cells (their environments are the sweep's).
            unschedulable: environment name (``"training"`` for the training
                environment) -> why no node can host it (``placement.precheck``).
            artifacts: cell name -> an artifact already trained: the cell is
                replayed without training (explain's attribution variants).
            repeats: environment name -> how many times each of its cells is
                replayed, each time in a different worker process (``Sweep.repeated``).
        """
        scheduler = self._scheduler(list(cells), dict(unschedulable or {}), artifacts, repeats)
        try:
            self._execute(scheduler, scheduler.start(time.time(), self._capacity()))
            while not scheduler.finished:
                self._wait(scheduler)
                now = time.time()
                capacity = None
                if now - self._capacity_at > RESOURCE_REFRESH_S:
                    capacity = self._capacity()
                    self._execute(scheduler, [c for e in self._nodes_gone(now) for c in scheduler.step(e)])
                self._execute(scheduler, scheduler.step(Tick(now, capacity)))
        finally:
            for wid in list(self.actors):
                self._kill(wid)

    # -- planning ------------------------------------------------------------------------------
    def _scheduler(self, cells: list[Cell], unschedulable: dict[str, str],
                   artifacts: Mapping[str, ArtifactRecord] | None,
                   repeats: Mapping[str, int] | None = None) -> Scheduler:
        sweep = self.sweep
        specs: dict[str, LaneSpec] = {}
        lane_of: dict[str, str] = {}
        groups: dict[str, list[Environment]] = {}
        for env in sweep.environments:
            key = process_key(env)
            if env.name in unschedulable:
                key = f"{key}/{env.name}"  # its own lane, failed from the start
            groups.setdefault(key, []).append(env)
            lane_of[env.name] = key
        groups = {TRAINING_LANE: [sweep.training], **groups}
        for key, envs in groups.items():
            env = envs[0]
            self.lane_envs[key] = {e.name: e for e in envs}
            training = key == TRAINING_LANE
            reason = unschedulable.get(placement.TRAINING if training else env.name)
            specs[key] = LaneSpec(
                key=key, environments=tuple(e.name for e in envs), cpus=env.num_cpus, training=training,
                title=", ".join(repr(e.name) for e in envs), placement=placement_text(env),
                runtime_env=str(sorted(env.runtime_env) or "(none)"), demands=demands(env), unschedulable=reason,
                hosts=None if self.nodes is None else placement.hosts(env, self.nodes))
        settings = Settings(retries=sweep.retries, schedule_timeout_s=sweep.schedule_timeout_s,
                            cell_timeout_s=sweep.cell_timeout_s, train_timeout_s=sweep.train_timeout_s,
                            busy_cpus=self.busy_cpus, max_batch=MAX_BATCH if self.streaming else 1)
        return Scheduler(list(specs.values()), cells, lane_of, settings, artifacts, repeats)

    def _capacity(self) -> float:
        self._capacity_at = time.time()
        return float(self.ray.cluster_resources().get("CPU", 0.0))

    # -- commands -> Ray -----------------------------------------------------------------------
    def _execute(self, scheduler: Scheduler, commands: list) -> None:
        todo = deque(commands)
        while todo:
            cmd = todo.popleft()
            if isinstance(cmd, Emit):
                self.sink.add(cmd.cell, cmd.result, cmd.artifact, attempts=cmd.attempts, repeats=cmd.repeats)
            elif isinstance(cmd, Submit):
                self._submit(cmd)
            elif isinstance(cmd, StartWorker):
                error = self._start(cmd)
                if error is not None:
                    todo.extend(scheduler.step(StartFailed(cmd.worker, time.time(), error)))
            elif isinstance(cmd, Kill):
                self._kill(cmd.worker)
            elif isinstance(cmd, Trained):
                self.sink.training_done(cmd.record)
            elif isinstance(cmd, HarnessFailed):
                self.sink.harness_failed(cmd.message)

    def _start(self, cmd: StartWorker) -> str | None:
        envs = self.lane_envs[cmd.lane]
        env = next(iter(envs.values()))
        try:
            handle = self.actor_cls.options(**ray_options(env, cmd.avoid)).remote(envs, self.scenarios,
                                                                                 self.storage_uri)
            actor = _Actor(handle, startup=deque([("where", handle.where.remote()), ("warm", handle.warm.remote())]))
        except Exception as exc:  # Ray refused the options (bad label selector, resources...)
            return ray_error_text(exc)
        self.actors[cmd.worker] = actor
        return None

    def _submit(self, cmd: Submit) -> None:
        actor = self.actors.get(cmd.worker)
        if actor is None:
            return
        jobs = [self._job(job) for job in cmd.jobs]
        if self.streaming:
            ref = actor.handle.serve.options(num_returns="streaming").remote(jobs)
            actor.calls.append(_Call(cmd.batch, ref, len(jobs)))
        else:  # Ray Client: one plain call per job (the scheduler sends batches of one)
            for job in jobs:
                actor.calls.append(_Call(cmd.batch, actor.handle.run.remote(job), 1))

    def _job(self, job: Job) -> TrainJob | ReplayJob:
        sweep = self.sweep
        if job.training:
            return TrainJob(job.scenario, tuple(sweep.formats), sweep.batch_size, self.retrain)
        cell = job.cell
        settings = self._replay_settings.get(cell.environment)
        if settings is None:  # once per environment, not per cell
            env = sweep.environment(cell.environment)
            settings = self._replay_settings[cell.environment] = (sweep.batch_size_for(env), sweep.tolerance_for(env))
        batch_size, tolerance = settings
        return ReplayJob(cell.scenario, cell.format, cell.environment, job.artifact, batch_size, tolerance,
                         dict(sweep.output_tolerances), self.observation_path(cell, job.repeat))

    def _kill(self, wid: int) -> None:
        actor = self.actors.pop(wid, None)
        if actor is None:
            return
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass

    # -- Ray -> events -------------------------------------------------------------------------
    def _wait(self, scheduler: Scheduler) -> None:
        waiting = {}
        for wid, actor in self.actors.items():
            ref = actor.next_ref()
            if ref is not None:
                waiting[ref] = (wid, ref)
        if not waiting:
            time.sleep(0.05)  # nothing in flight yet: room is being made
            return
        refs = list(waiting)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for found in ready:
            # Ray Client answers with new ref objects for the same ids: look ours up by id.
            wid, ref = waiting[found]
            actor = self.actors.get(wid)
            if actor is None or actor.next_ref() is not ref:
                continue  # killed meanwhile, by an earlier event of this round
            for event in self._outcome(wid, actor):
                self._execute(scheduler, scheduler.step(event))

    def _outcome(self, wid: int, actor: _Actor) -> list:
        now = time.time()
        if actor.startup:
            what, ref = actor.startup.popleft()
            try:
                info = self.ray.get(ref)
            except Exception as exc:
                return self._warm_failed(wid, actor, exc)
            if what == "where":
                actor.node = info.get("node_id")
                return [Placed(wid, now, actor.node)]
            return [Warmed(wid, now, info.get("unschedulable"))]
        call = actor.calls[0]
        try:
            if self.streaming:
                values = self.ray.get(next(call.ref))
            else:
                values = [self.ray.get(call.ref)]
        except StopIteration:  # the worker ended the batch before reporting every job
            actor.calls.popleft()
            return [BatchFailed(wid, call.batch, now, "the worker ended a batch without reporting all its jobs")]
        except Exception as exc:
            if _actor_died(exc):
                return self._died(wid, actor, exc)
            actor.calls.popleft()
            return [BatchFailed(wid, call.batch, now, ray_error_text(exc))]
        call.reported += len(values)
        if call.reported >= call.jobs:
            actor.calls.popleft()
        return [Reported(wid, call.batch, now, tuple(values))]

    def _warm_failed(self, wid: int, actor: _Actor, exc: BaseException) -> list:
        now = time.time()
        setup = type(exc).__name__ == "RuntimeEnvSetupError"
        return [WarmFailed(wid, now, ray_error_text(exc), setup=setup), *self._node_events(actor, exc, now)]

    def _died(self, wid: int, actor: _Actor, exc: BaseException) -> list:
        now = time.time()
        changes = self._node_events(actor, exc, now)
        return [WorkerDied(wid, now, ray_error_text(exc), node_lost=bool(changes)), *changes]

    def _node_events(self, actor: _Actor, exc: BaseException, now: float) -> list:
        """``NodesChanged`` when the dead actor's node, or any node alive before, is gone.

        An actor that never got placed dies too when the only node it may use
        is gone ("the node specified ... doesn't exist any more").
        """
        if not _actor_died(exc):
            return []
        return self._nodes_gone(now, actor.node)

    def _nodes_gone(self, now: float, node: str | None = None) -> list:
        """``NodesChanged`` if nodes alive before (or ``node``) are gone now.

        Checked when an actor dies and every ``RESOURCE_REFRESH_S``: an actor's
        death may be seen before Ray marks its node dead.
        """
        if node is None and self.nodes is None:
            return []
        try:
            nodes = cluster_nodes()
        except Exception:
            return []
        alive = {n.get("NodeID") for n in nodes if n.get("Alive")}
        lost = ({node} if node is not None else set()) | (self._alive - alive)
        lost -= alive
        self._alive = alive
        if not lost:
            return []
        hosts = {}
        if self.nodes is not None:  # placements are checked: judge every lane against the nodes left
            hosts = {key: placement.hosts(next(iter(envs.values())), nodes) for key, envs in self.lane_envs.items()}
        return [NodesChanged(now, hosts, lost=tuple(sorted(lost)))]


def call_in_environments(calls: Sequence[tuple[Environment, str, Any]], scenarios: Mapping[str, Scenario],
                         storage_uri: str, timeout_s: float, worker_cls: type = Worker) -> list[Any]:
    """Run ``worker.<method>(job)`` for each ``(environment, method, job)`` on a worker of its own, side by side.

    For one-off jobs (explain's layer traces): the same worker class, placement
    and runtime_env as a sweep's. Returns each result, or the exception it
    raised (Ray refusing to create the worker, a ``TimeoutError`` past
    ``timeout_s``); every worker created is stopped before returning.
    """
    import ray

    actor_cls = ray.remote(worker_cls)
    actors: list[Any] = []
    refs: list[Any] = []
    try:
        for env, method, job in calls:
            try:
                actor = actor_cls.options(**ray_options(env)).remote({env.name: env}, scenarios, storage_uri)
            except Exception as exc:  # this one cannot be created; the others still run
                actors.append(None)
                refs.append(exc)
                continue
            actors.append(actor)
            refs.append(getattr(actor, method).remote(job))
        pending = [r for r in refs if not isinstance(r, BaseException)]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
        out = []
        for ref in refs:
            if isinstance(ref, BaseException):
                out.append(ref)
            elif ref not in ready:
                out.append(TimeoutError(f"no answer within {timeout_s:g}s"))
            else:
                try:
                    out.append(ray.get(ref))
                except Exception as exc:
                    out.append(exc)
        return out
    finally:
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)


def _actor_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)
