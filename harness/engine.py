"""The Ray engine: long-lived workers per environment, environments side by side.

Every environment (the training environment included) is a *lane*: a queue of
jobs and the Ray actors serving it. An actor is a :class:`harness.worker.Worker`
started with the environment's placement and ``runtime_env``; it imports and
configures TensorFlow once (``warm``) and then serves jobs one at a time, so
TensorFlow is imported once per environment (per node where it runs on
several), not once per cell.

Scheduling, in one loop on the driver:

* Lanes get their first actor in priority order as the cluster has room: the
  training lane first (it is on every cell's critical path), then lanes with
  cells ready to run, then lanes still waiting for training (their actor
  imports TensorFlow while training runs).
* On the embedded local Ray (``busy_cpus``), Ray has room beyond the
  machine's cores and the engine counts what is *busy*: actors importing TensorFlow or
  running jobs stay within the cores, while warm actors waiting for training
  hold only Ray's accounting. So the next lanes import TensorFlow on the core
  training leaves free instead of waiting for it to end. Ready cells go before
  new actors; the last lane to start may use one core more so it does not import
  alone at the end.
* A lane gets more actors only when its cells are long (``SCALE_MIN_S``), its
  queue is deep and no other lane is waiting for room. Actors are released as
  soon as their lane has nothing left to do.
* Jobs go to an actor in batches through a Ray streaming generator: one call
  per batch, sized so a batch lasts about ``BATCH_TARGET_S`` (one job while
  the lane's cell time is unknown or long); the worker reports finished jobs
  in chunks at least every 50 ms, so the driver knows which job is running and
  since when. At most ``PIPELINE`` batches are queued per actor.
* An actor not ready within ``schedule_timeout_s`` (the clock restarts when one
  of our actors frees resources) makes its environment ``unschedulable``; a job
  past ``cell_timeout_s`` / ``train_timeout_s`` kills its actor (TensorFlow
  cannot be interrupted) and the lane goes on with a fresh one; an actor that
  dies (node lost, OOM) is replaced and its running job retried up to
  ``retries`` times, still giving exactly one row.

Driver work per finished cell is O(1): results go to the collector, which
appends one line to the run journal.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from .records import ArtifactRecord, CellResult, TrainRecord
from .scenario import Scenario
from .spec import Environment, Sweep
from .worker import JobFailed, ReplayJob, TrainJob, Worker

POLL_S = 0.5
PIPELINE = 2
BATCH_TARGET_S = 2.0
MAX_BATCH = 256
SCALE_MIN_S = 5.0
MAX_ACTORS_PER_LANE = 8
RESOURCE_REFRESH_S = 5.0
TRAINING = "training"


class Cell(Protocol):
    scenario: str
    format: str
    environment: str
    key: str


class Sink(Protocol):
    """Where finished cells go (``harness.sweep.Collector``)."""

    def add(self, cell: Cell, result: CellResult, artifact: ArtifactRecord | None = None,
            attempts: int | None = None) -> None: ...

    def training_done(self, record: TrainRecord) -> None: ...

    def harness_failed(self, message: str) -> None: ...


def ray_options(env: Environment) -> dict[str, Any]:
    """``.options(...)`` of an actor serving ``env``: placement and runtime_env."""
    opts: dict[str, Any] = {"num_cpus": env.num_cpus, "num_gpus": env.num_gpus,
                            "runtime_env": env.ray_runtime_env(), "max_restarts": 0, "max_task_retries": 0,
                            "max_concurrency": 1}
    if env.resources:
        opts["resources"] = dict(env.resources)
    if env.accelerator_type:
        opts["accelerator_type"] = env.accelerator_type
    if env.label_selector:
        opts["label_selector"] = dict(env.label_selector)
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


def ray_error_text(exc: BaseException, attempts: int | None = None) -> str:
    """One line for an exception Ray raised: its type and last meaningful line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    after = f" after {attempts} attempt(s)" if attempts is not None else ""
    return f"{type(exc).__name__}{after}: {lines[-1].strip()[:500] if lines else ''}"


# -- bookkeeping ---------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    """A job with its retry count and, for replays, the cell it produces."""

    job: TrainJob | ReplayJob
    cell: Cell | None = None
    attempts: int = 0


@dataclass(eq=False)
class _Batch:
    """Jobs sent to an actor in one streaming call; ``done`` of them have reported."""

    generator: Any
    jobs: list[_Job]
    done: int = 0

    @property
    def left(self) -> list[_Job]:
        return self.jobs[self.done:]


@dataclass(eq=False)
class _Actor:
    lane: "_Lane"
    handle: Any
    created: float
    warm_ref: Any = None
    ready: bool = False
    inflight: deque = field(default_factory=deque)  # _Batch, in submission order
    head_started: float = 0.0  # when the running job (first unreported of the head batch) started

    def unreported(self) -> list[_Job]:
        return [job for batch in self.inflight for job in batch.left]


@dataclass(eq=False)
class _Lane:
    """The jobs of one or more environments that can share worker processes, and those workers.

    ``env`` is the first of ``environments``; they all have its placement,
    runtime_env and process-wide TensorFlow settings (see ``process_key``).
    """

    env: Environment
    environments: dict[str, Environment] = field(default_factory=dict)
    training: bool = False
    queue: deque = field(default_factory=deque)  # _Job ready to dispatch
    expected: int = 0  # cells that will arrive once their scenario is trained
    actors: list[_Actor] = field(default_factory=list)
    failed: tuple[str, str] | None = None  # (verdict, reason) for every remaining cell
    warm_failures: int = 0
    busy_seconds: float = 0.0
    jobs_done: int = 0

    @property
    def inflight(self) -> int:
        return sum(len(a.unreported()) for a in self.actors)

    @property
    def title(self) -> str:
        return ", ".join(map(repr, self.environments)) if len(self.environments) > 1 else repr(self.env.name)

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or self.expected > 0 or self.inflight > 0

    @property
    def mean_seconds(self) -> float:
        return self.busy_seconds / self.jobs_done if self.jobs_done else 0.0


class Engine:
    """Runs a sweep's cells on Ray actors and hands every result to ``sink``.

    Args:
        sweep: the validated sweep.
        scenarios: name -> Scenario (shipped once to each actor).
        storage_uri: resolved storage root (workers never resolve it themselves).
        sink: receives each finished cell (exactly once) and each training record.
        retrain: ignore complete artifacts already in storage.
        worker_cls: the actor body (default :class:`harness.worker.Worker`;
            benchmarks pass one that does no TensorFlow work).
        observation_path: ``cell -> path`` of a cell's observation file in storage.
        busy_cpus: CPUs that may be busy at once (actors importing TensorFlow or
            running jobs), when that is fewer than Ray's logical CPUs: the
            embedded local Ray has room for warm actors that wait for training
            (``harness.sweep.LOCAL_WAITING_CPUS``). ``None``: Ray's CPUs.
    """

    def __init__(self, sweep: Sweep, scenarios: Mapping[str, Scenario], storage_uri: str, sink: Sink, *,
                 retrain: bool = False, worker_cls: type = Worker,
                 observation_path: Callable[[Cell], str | None] = lambda cell: None,
                 busy_cpus: float | None = None):
        import ray

        self.ray, self.sweep, self.scenarios, self.sink = ray, sweep, dict(scenarios), sink
        self.storage_uri, self.retrain, self.observation_path = storage_uri, retrain, observation_path
        self.actor_cls = ray.remote(worker_cls)
        self.lanes: dict[str, _Lane] = {}  # by process key; the training lane is "training"
        self.lane_of: dict[str, _Lane] = {}  # environment name -> its lane
        self.cells_of: dict[str, list[Cell]] = {}
        self.capacity = 0.0
        self._capacity_at = 0.0
        self.freed_at = 0.0  # last time one of our actors gave its resources back
        self.busy_cpus = busy_cpus

    # -- public ------------------------------------------------------------------------
    def run(self, todo: Iterable[Cell], unschedulable: Mapping[str, str] | None = None) -> None:
        """Run ``todo``; ``unschedulable`` maps environment (or ``training``) -> why no node can host it."""
        unschedulable = dict(unschedulable or {})
        todo = list(todo)
        self._plan(todo, unschedulable)
        try:
            self._loop()
        finally:
            for lane in self.lanes.values():
                for actor in list(lane.actors):
                    self._kill(actor)

    # -- planning ------------------------------------------------------------------------
    def _plan(self, todo: list[Cell], unschedulable: Mapping[str, str]) -> None:
        training = _Lane(self.sweep.training, {TRAINING: self.sweep.training}, training=True)
        self.lanes[TRAINING] = training
        for env in self.sweep.environments:
            key = process_key(env)
            if env.name in unschedulable:
                key = f"{key}/{env.name}"  # its own lane, failed from the start
            lane = self.lanes.setdefault(key, _Lane(env, failed=("unschedulable", unschedulable[env.name])
                                                    if env.name in unschedulable else None))
            lane.environments[env.name] = env
            self.lane_of[env.name] = lane
        for cell in todo:
            if TRAINING in unschedulable:
                self.sink.add(cell, _failure(cell, "unschedulable", f"training: {unschedulable[TRAINING]}"))
                continue
            lane = self.lane_of[cell.environment]
            lane.expected += 1
            if lane.failed:  # decided now, not after training
                self._settle(cell, lane)
            else:
                self.cells_of.setdefault(cell.scenario, []).append(cell)
        for scenario in self.cells_of:
            job = TrainJob(scenario, tuple(self.sweep.formats), self.sweep.batch_size, self.retrain)
            training.queue.append(_Job(job))

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while any(lane.has_work for lane in self.lanes.values()):
            self._schedule()
            waiting = {}
            for lane in self.lanes.values():
                for actor in lane.actors:
                    if actor.warm_ref is not None:
                        waiting[actor.warm_ref] = (actor, None)
                    elif actor.inflight:
                        waiting[actor.inflight[0].generator] = (actor, actor.inflight[0])
            if waiting:
                refs = list(waiting)
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)
                if ready:
                    ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    actor, batch = waiting[ref]
                    if batch is None:
                        self._warmed(actor)
                    elif actor.inflight and actor.inflight[0] is batch:  # not lost meanwhile
                        self._reported(actor)
            elif not any(lane.queue or lane.actors for lane in self.lanes.values()):
                self._strand()  # nothing runs and nothing can: what is left would never arrive
            else:
                time.sleep(0.05)  # nothing in flight yet: room is being made
            self._check_timeouts()

    def _schedule(self) -> None:
        now = time.time()
        if now - self._capacity_at > RESOURCE_REFRESH_S:
            self.capacity = float(self.ray.cluster_resources().get("CPU", 0.0))
            self._capacity_at = now
        for lane in self.lanes.values():
            if lane.failed or not lane.has_work:
                for actor in list(lane.actors):
                    if not actor.inflight:
                        self._kill(actor)
        # Ready work first (training lane first): it is cheap next to a worker start-up.
        for lane in self.lanes.values():
            for actor in lane.actors:
                while (actor.ready and lane.queue and len(actor.inflight) < PIPELINE and not lane.failed
                       and (actor.inflight or self._cores_free(lane.env))):
                    self._submit(actor, [lane.queue.popleft() for _ in range(min(self._batch_size(lane), len(lane.queue)))])
        # First actors: training, then lanes with cells ready, then lanes still waiting (prewarm).
        lanes = [lane for lane in self.lanes.values() if not lane.failed and lane.has_work and not lane.actors]
        lanes.sort(key=lambda lane: (not lane.training, not lane.queue))
        starving = False
        # The last lane to start may exceed ``busy_cpus`` by one core: instead of importing
        # TensorFlow alone at the very end while a core idles, it shares the cores.
        last = len(lanes) == 1 and not self.lanes[TRAINING].has_work
        for lane in lanes:
            if not self._fits(lane.env):
                starving |= lane.training or bool(lane.queue)
                if lane.training:
                    self._free_idle_prewarmed()
            elif self._cores_free(lane.env, slack=1.0 if last else 0.0):
                self._start_actor(lane)
        # More actors for long cells when nothing else waits for room.
        if not starving:
            for lane in self.lanes.values():
                if (not lane.failed and lane.actors and len(lane.actors) < MAX_ACTORS_PER_LANE
                        and len(lane.queue) > 2 * len(lane.actors) and lane.mean_seconds >= SCALE_MIN_S
                        and all(a.ready for a in lane.actors) and self._fits(lane.env)
                        and self._cores_free(lane.env)):
                    self._start_actor(lane)

    @staticmethod
    def _batch_size(lane: _Lane) -> int:
        """About ``BATCH_TARGET_S`` worth of jobs; one while the lane's cell time is unknown or long."""
        if lane.training or not lane.jobs_done or len(lane.actors) > 1:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_TARGET_S / max(lane.mean_seconds, 1e-4))))

    def _cpus(self, busy_only: bool = False) -> float:
        """CPUs our actors hold (``busy_only``: only those importing TensorFlow or running jobs)."""
        return sum(a.lane.env.num_cpus for lane in self.lanes.values() for a in lane.actors
                   if not busy_only or a.warm_ref is not None or a.inflight)

    def _fits(self, env: Environment) -> bool:
        """Ray has room for one more actor of ``env`` next to ours (or none of ours is alive)."""
        alive = any(lane.actors for lane in self.lanes.values())
        return not alive or self._cpus() + env.num_cpus <= self.capacity + 1e-9

    def _cores_free(self, env: Environment, slack: float = 0.0) -> bool:
        """One more busy actor of ``env`` stays within ``busy_cpus`` (a warm actor waiting for work is not busy)."""
        if self.busy_cpus is None:
            return True
        busy = self._cpus(busy_only=True)
        return busy == 0 or busy + env.num_cpus <= self.busy_cpus + slack + 1e-9

    def _free_idle_prewarmed(self) -> None:
        """Training needs room: give back actors that only wait for artifacts."""
        for lane in self.lanes.values():
            if not lane.training and not lane.queue:
                for actor in list(lane.actors):
                    if not actor.inflight:
                        self._kill(actor)

    def _start_actor(self, lane: _Lane) -> None:
        env = lane.env
        try:
            handle = self.actor_cls.options(**ray_options(env)).remote(lane.environments, self.scenarios,
                                                                       self.storage_uri)
            warm_ref = handle.warm.remote()
        except Exception as exc:  # Ray refused the options (bad label selector, resources...)
            reason = f"Ray refused to place {placement_text(env)}: {ray_error_text(exc)}"
            self.sink.harness_failed(reason)
            self._fail_lane(lane, "error", reason)
            return
        lane.actors.append(_Actor(lane, handle, time.time(), warm_ref))

    def _submit(self, actor: _Actor, jobs: list[_Job]) -> None:
        for job in jobs:
            job.attempts += 1
        if not actor.inflight:
            actor.head_started = time.time()
        generator = actor.handle.serve.options(num_returns="streaming").remote([job.job for job in jobs])
        actor.inflight.append(_Batch(generator, jobs))

    def _kill(self, actor: _Actor) -> None:
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass
        if actor in actor.lane.actors:
            actor.lane.actors.remove(actor)
        self.freed_at = time.time()

    # -- outcomes ------------------------------------------------------------------------
    def _warmed(self, actor: _Actor) -> None:
        lane, ref = actor.lane, actor.warm_ref
        actor.warm_ref = None
        try:
            info = self.ray.get(ref)
        except Exception as exc:
            self._kill(actor)
            lane.warm_failures += 1
            name = type(exc).__name__
            if name == "RuntimeEnvSetupError":
                self._fail_lane(lane, "error", f"runtime_env of environment {lane.title} could not be set up: "
                                               f"{ray_error_text(exc)}")
            elif lane.warm_failures > self.sweep.retries:
                self._fail_lane(lane, "error", (
                    f"the worker for environment {lane.title} died before the harness code started "
                    f"({lane.warm_failures} time(s)): its runtime_env {sorted(lane.env.runtime_env) or '(none)'} "
                    f"probably cannot import the harness's dependencies (numpy/pyarrow/TensorFlow versions); "
                    f"see the python-core-worker logs. {ray_error_text(exc)}"))
            return
        if info.get("unschedulable"):
            self._kill(actor)
            self._fail_lane(lane, "unschedulable", f"node {str(info.get('node_id'))[:12]}: {info['unschedulable']}")
            return
        actor.ready = True
        actor.head_started = time.time()

    def _reported(self, actor: _Actor) -> None:
        """The head batch has a chunk of finished jobs (or has ended)."""
        lane, batch = actor.lane, actor.inflight[0]
        try:
            chunk = self.ray.get(next(batch.generator))
        except StopIteration:  # every job reported
            actor.inflight.popleft()
            actor.head_started = time.time()
            return
        except Exception as exc:
            if _actor_died(exc):
                self._lost_actor(actor, exc)
            else:  # should not happen (jobs catch their own errors): fail what is left of the batch
                actor.inflight.popleft()
                for job in batch.left:
                    self._job_failed(job, "error", ray_error_text(exc, job.attempts))
            return
        now = time.time()
        lane.busy_seconds += now - actor.head_started
        lane.jobs_done += len(chunk)
        actor.head_started = now
        for value in chunk:
            job = batch.jobs[batch.done]
            batch.done += 1
            if isinstance(value, JobFailed):
                self._job_failed(job, "error", value.error)
            elif isinstance(job.job, TrainJob):
                self._trained(value)
            else:
                self.sink.add(job.cell, value, job.job.artifact, attempts=job.attempts)

    def _lost_actor(self, actor: _Actor, exc: BaseException) -> None:
        """The actor died: its running job is retried (within ``retries``); jobs it never started are requeued."""
        lane = actor.lane
        unreported = actor.unreported()
        actor.inflight.clear()
        self._kill(actor)
        if not unreported:
            return
        head, rest = unreported[0], unreported[1:]
        for job in reversed(rest):
            job.attempts -= 1  # submitted but never started
            lane.queue.appendleft(job)
        if head.attempts <= self.sweep.retries:
            lane.queue.appendleft(head)
        else:
            self._job_failed(head, "error", ray_error_text(exc, head.attempts))

    def _trained(self, record: TrainRecord) -> None:
        self.sink.training_done(record)
        for cell in self.cells_of.pop(record.scenario, []):
            lane = self.lane_of[cell.environment]
            art = record.artifacts[cell.format]
            if art.error:
                lane.expected -= 1
                self.sink.add(cell, _failure(cell, "error", art.error), art)
            elif lane.failed:  # failed while this scenario trained
                self._settle(cell, lane, art)
            else:
                lane.expected -= 1
                env = lane.environments[cell.environment]
                job = ReplayJob(cell.scenario, cell.format, cell.environment, art, self.sweep.batch_size_for(env),
                                self.sweep.tolerance_for(env), dict(self.sweep.output_tolerances),
                                self.observation_path(cell))
                lane.queue.append(_Job(job, cell))

    def _job_failed(self, job: _Job, verdict: str, reason: str) -> None:
        if isinstance(job.job, TrainJob):
            self._training_failed(job.job.scenario, verdict, reason)
        else:
            self.sink.add(job.cell, _failure(job.cell, verdict, reason, job.attempts), job.job.artifact)

    def _training_failed(self, scenario: str, verdict: str, reason: str) -> None:
        for cell in self.cells_of.pop(scenario, []):
            self.lane_of[cell.environment].expected -= 1
            self.sink.add(cell, _failure(cell, verdict, f"training: {reason}"))

    def _strand(self) -> None:
        for scenario in list(self.cells_of):
            self._training_failed(scenario, "error", "internal: no training job is left for this scenario")
        for lane in self.lanes.values():
            lane.expected = 0

    def _settle(self, cell: Cell, lane: _Lane, artifact: ArtifactRecord | None = None) -> None:
        """A cell of a failed lane: its row, now."""
        lane.expected -= 1
        verdict, reason = lane.failed
        self.sink.add(cell, _failure(cell, verdict, reason), artifact)

    def _fail_lane(self, lane: _Lane, verdict: str, reason: str) -> None:
        """Every remaining cell of ``lane`` gets ``verdict``; the lane's actors go."""
        lane.failed = (verdict, reason)
        for actor in list(lane.actors):
            lane.queue.extend(actor.unreported())
            actor.inflight.clear()
            self._kill(actor)
        while lane.queue:
            job = lane.queue.popleft()
            if lane.training:
                self._training_failed(job.job.scenario, verdict, reason)
            else:
                self.sink.add(job.cell, _failure(job.cell, verdict, reason, job.attempts or None), job.job.artifact)
        if lane.training:
            for scenario in list(self.cells_of):
                self._training_failed(scenario, verdict, reason)
        else:
            for cells in self.cells_of.values():
                for cell in [c for c in cells if c.environment in lane.environments]:
                    cells.remove(cell)
                    self._settle(cell, lane)

    def _check_timeouts(self) -> None:
        now = time.time()
        for lane in list(self.lanes.values()):
            for actor in list(lane.actors):
                if lane.failed:
                    break
                if actor.warm_ref is not None:
                    if now - max(actor.created, self.freed_at) > self.sweep.schedule_timeout_s:
                        if any(a.ready for a in lane.actors):
                            self._kill(actor)  # an extra worker found no room: the lane goes on without it
                        else:
                            self._fail_lane(lane, "unschedulable", (
                                f"still pending after schedule_timeout_s={self.sweep.schedule_timeout_s:g}s: "
                                f"no node took {placement_text(lane.env)}"))
                    continue
                limit = self.sweep.train_timeout_s if lane.training else self.sweep.cell_timeout_s
                if actor.unreported() and now - actor.head_started > limit:
                    self._timed_out(actor, limit)

    def _timed_out(self, actor: _Actor, limit: float) -> None:
        """Stop the actor (TensorFlow cannot be interrupted); the lane goes on with a fresh worker."""
        lane = actor.lane
        job, *rest = actor.unreported()
        actor.inflight.clear()
        self._kill(actor)
        for other in reversed(rest):
            other.attempts -= 1  # submitted but never started
            lane.queue.appendleft(other)
        what = "train_timeout_s" if lane.training else "cell_timeout_s"
        self._job_failed(job, "error", f"timed out after {limit:g}s ({what}); its worker was stopped and "
                                       "the environment goes on with a fresh one")


def call_in_environments(calls: Sequence[tuple[Environment, str, Any]], scenarios: Mapping[str, Scenario],
                         storage_uri: str, timeout_s: float, worker_cls: type = Worker) -> list[Any]:
    """Run ``worker.<method>(job)`` for each ``(environment, method, job)`` on a worker of its own, side by side.

    For one-off jobs (explain's layer traces): the same worker class, placement
    and runtime_env as a sweep's. Returns each result, or the exception it
    raised (a ``TimeoutError`` past ``timeout_s``); the workers are stopped after.
    """
    import ray

    actor_cls = ray.remote(worker_cls)
    actors = [actor_cls.options(**ray_options(env)).remote({env.name: env}, scenarios, storage_uri)
              for env, _, _ in calls]
    try:
        refs = [getattr(actor, method).remote(job) for actor, (_, method, job) in zip(actors, calls)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in refs:
            if ref not in ready:
                out.append(TimeoutError(f"no answer within {timeout_s:g}s"))
                continue
            try:
                out.append(ray.get(ref))
            except Exception as exc:
                out.append(exc)
        return out
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _actor_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _failure(cell: Cell, verdict: str, error: str, attempts: int | None = None) -> CellResult:
    return CellResult(scenario=cell.scenario, format=cell.format, environment=cell.environment,
                      verdict=verdict, error=error, attempts=attempts)


def warn(message: str) -> None:
    print(f"harness: warning: {message}", file=sys.stderr)
