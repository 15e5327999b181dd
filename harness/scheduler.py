"""The sweep's scheduler as a pure state machine: events in, commands out (no Ray, no clock of its own).

``Scheduler.step(event) -> [command]`` is the whole interface. The engine
(``harness.engine``) is a thin Ray adapter: it turns what Ray tells it (an
actor placed, TensorFlow imported, a chunk of results, an actor or node lost,
time passing) into events, and the commands that come back (start a worker,
submit jobs, kill a worker, emit a row) into Ray calls and sink calls. Every
decision -- what runs where, in which order, when to give up -- is made here,
with time given by the events, so it is tested with a fake clock.

**Cells** have an explicit state (:class:`CellState`): planned -> awaiting
training -> queued -> running(attempt) -> done, or straight to done when they
cannot run (training or their environment unschedulable, their artifact not
saved). ``done`` is reached exactly once: one row per cell.

**Lanes** are what share worker processes: the training environment, and each
group of environments with one process key (placement, runtime_env and
process-wide TensorFlow settings). A lane's **workers** are pending (asked of
Ray, not placed yet), warming (placed, importing TensorFlow), then ready;
jobs go to a ready worker in **batches** (at most ``Settings.pipeline``
queued per worker), and results come back in chunks, in order, so the
scheduler always knows which job runs and since when.

Rules, in the order ``_schedule`` applies them after every event:

* Idle workers of finished or failed lanes go at once.
* Ready work first (the training lane's first): it is cheap next to a worker start.
* First workers for lanes without one: training, then lanes with cells ready,
  then lanes waiting for training (they import TensorFlow while it trains).
  A worker is started when Ray has room for it (``Tick.capacity`` CPUs, ours
  counted) and, with ``Settings.busy_cpus``, when busy workers (pending,
  warming or running jobs) stay within that many CPUs; the last lane to start
  may exceed it by one CPU. A warm worker waiting for work is not busy.
* More workers for lanes whose cells are long (``SCALE_MIN_S``) and whose
  queue is deep, when no lane waits for room.

Time limits: a worker not placed within ``schedule_timeout_s`` makes its lane
unschedulable (its clock restarts when one of our *placed* workers sharing a
GPU, accelerator or custom resource with it gives that back: it may have
waited behind our own work). Importing TensorFlow has a clock of its own, from
placement, also ``schedule_timeout_s`` (a slow import is not a missing node).
Each job is bounded by ``cell_timeout_s`` (``train_timeout_s`` on the
training lane): past it the worker is killed (TensorFlow cannot be
interrupted), the job is an error and the lane goes on with a fresh worker. A worker that dies is replaced and its
running job retried up to ``retries`` times. A worker that finds its node
cannot be the environment (a ``cpu_isa`` above the CPU) rules that node out
for the lane; the lane is unschedulable once no known node is left, and so is
a lane whose last possible node was lost.

Work per event is O(lanes + workers), independent of the number of cells;
counters of held and busy CPUs are kept as workers change state.

**Repeats** (``repeats``: environment -> N > 1): a cell is replayed N times,
each in a different worker process. A lane gets one **slot** per repeat: slot
``r`` is a lane of its own (same placement, its own workers), and repeat ``r``
of every cell runs on slot ``r``. Workers never move between slots, so the
repeats of a cell always run in N different processes, while each slot's
workers stay warm for all the cells of that repeat. Every rule above applies to
slots as to any lane (deadlines, retries, busy bound); a repeat that fails
settles that repeat only. A repeated cell's row is emitted once all of its
repeats are settled, with every repeat's result (``Emit.repeats``; the driver
combines them: ``harness.repeats``). With no repeats a lane has one slot and
nothing else changes.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

from .records import ArtifactRecord, Cell, CellResult, JobFailed, TrainRecord

PIPELINE = 2
BATCH_TARGET_S = 2.0
MAX_BATCH = 256
SCALE_MIN_S = 5.0
MAX_WORKERS_PER_LANE = 8
_EPS = 1e-9


class CellState(enum.Enum):
    PLANNED = "planned"
    AWAITING_TRAINING = "awaiting training"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


# -- what the scheduler is given ---------------------------------------------------------------
@dataclass(frozen=True)
class LaneSpec:
    """One lane: environments that share worker processes, and what a worker of theirs needs.

    ``key`` identifies the lane (the engine's process key); ``demands`` are the
    non-CPU resources a worker holds (``GPU``, custom resources, accelerator
    types): freeing a worker that shares one may let a pending worker be placed.
    ``hosts`` are the alive nodes that fit it (``None``: not known, e.g. an
    autoscaling cluster); ``unschedulable`` says why no node can host it at all.
    """

    key: str
    environments: tuple[str, ...]
    cpus: float = 1.0
    training: bool = False
    title: str = ""  # the environments, quoted, for messages
    placement: str = ""  # "environment 'x' (num_cpus=1, ...)" for messages
    runtime_env: str = "(none)"  # the runtime_env's keys, for messages
    demands: frozenset[str] = frozenset()
    unschedulable: str | None = None
    hosts: frozenset[str] | None = None


@dataclass(frozen=True)
class Settings:
    """The sweep's limits, and how jobs travel (``max_batch=1``: one job per call, e.g. under Ray Client)."""

    retries: int = 2
    schedule_timeout_s: float = 300.0
    cell_timeout_s: float = 600.0
    train_timeout_s: float = 1800.0
    busy_cpus: float | None = None
    max_batch: int = MAX_BATCH
    pipeline: int = PIPELINE


@dataclass(eq=False)
class Job:
    """One unit of work for a worker: train a scenario (``cell`` is None) or replay one cell.

    ``attempts`` counts dispatches that started; a job requeued before it
    started does not count. ``repeat``: which repeat of the cell (0-based) it
    is, run on the lane's slot of that number; a repeated cell has one job per
    repeat and its row waits for all of them.
    """

    scenario: str
    cell: Cell | None = None
    artifact: ArtifactRecord | None = None
    attempts: int = 0
    repeat: int = 0

    @property
    def training(self) -> bool:
        return self.cell is None


# -- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tick:
    """Time passed; ``capacity``: Ray's CPUs now, when the engine looked again."""

    now: float
    capacity: float | None = None


@dataclass(frozen=True)
class StartFailed:
    """Ray refused to create the worker (its options: a label selector, resources...)."""

    worker: int
    now: float
    error: str


@dataclass(frozen=True)
class Placed:
    """The worker's process runs on ``node`` (its environment's runtime_env is set up)."""

    worker: int
    now: float
    node: str | None = None


@dataclass(frozen=True)
class Warmed:
    """The worker imported and configured TensorFlow; ``unschedulable``: its node cannot be the environment."""

    worker: int
    now: float
    unschedulable: str | None = None


@dataclass(frozen=True)
class WarmFailed:
    """The worker died before it was ready; ``setup``: its runtime_env could not be set up."""

    worker: int
    now: float
    error: str
    setup: bool = False


@dataclass(frozen=True)
class Reported:
    """The next ``values`` of the worker's head batch finished, in order (records or ``JobFailed``)."""

    worker: int
    batch: int
    now: float
    values: tuple[Any, ...]


@dataclass(frozen=True)
class BatchFailed:
    """The head batch's call failed without the worker dying: its unreported jobs are errors."""

    worker: int
    batch: int
    now: float
    error: str


@dataclass(frozen=True)
class WorkerDied:
    """The worker died (OOM, killed, its node lost): its running job is retried within ``retries``."""

    worker: int
    now: float
    error: str
    node_lost: bool = False


@dataclass(frozen=True)
class NodesChanged:
    """Alive nodes changed (``lost``): ``hosts`` maps lane key -> the alive nodes that fit it now."""

    now: float
    hosts: Mapping[str, frozenset[str]]
    lost: tuple[str, ...] = ()


Event = Union[Tick, StartFailed, Placed, Warmed, WarmFailed, Reported, BatchFailed, WorkerDied, NodesChanged]


# -- commands -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartWorker:
    """Create a worker for ``lane``, on a node not in ``avoid``; then report Placed and Warmed."""

    worker: int
    lane: str
    avoid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Submit:
    """Send ``jobs`` to the worker as one batch; their values come back as ``Reported`` chunks, in order."""

    worker: int
    batch: int
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Kill:
    """Stop the worker (its results, if any arrive, are ignored)."""

    worker: int


@dataclass(frozen=True)
class Emit:
    """A cell is done: its row (``result``), the artifact it used, and how many dispatches it took.

    A repeated cell: ``repeats`` holds every repeat's result in repeat order
    (each with its own ``attempts``; ``result`` is the first), ``attempts``
    their sum. Empty for a cell replayed once.
    """

    cell: Cell
    result: CellResult
    artifact: ArtifactRecord | None = None
    attempts: int | None = None
    repeats: tuple[CellResult, ...] = ()


@dataclass(frozen=True)
class Trained:
    """A scenario was trained: its record goes to the sink (training fingerprint, repaired artifacts)."""

    record: TrainRecord


@dataclass(frozen=True)
class HarnessFailed:
    """The harness itself failed (not a cell): the run ends with exit code 3."""

    message: str


Command = Union[StartWorker, Submit, Kill, Emit, Trained, HarnessFailed]


# -- state ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Batch:
    id: int
    jobs: list[Job]
    done: int = 0

    @property
    def left(self) -> list[Job]:
        return self.jobs[self.done:]


@dataclass(eq=False)
class _Worker:
    id: int
    lane: "_Lane"
    created: float
    phase: str = "pending"  # pending -> warming -> ready
    node: str | None = None
    placed_at: float = 0.0
    restarted: float = 0.0  # the pending clock restarts when a worker it may wait behind is freed
    head_started: float = 0.0  # when the running job (first unreported of the head batch) started
    batches: deque = field(default_factory=deque)
    counted_busy: bool = False

    @property
    def busy(self) -> bool:
        return self.phase != "ready" or bool(self.batches)

    def unreported(self) -> list[Job]:
        return [job for batch in self.batches for job in batch.left]


@dataclass(eq=False)
class _Lane:
    spec: LaneSpec
    slot: int = 0  # which repeat of its cells this lane runs (a lane has one slot per repeat)
    queue: deque = field(default_factory=deque)  # Job, ready to dispatch
    expected: int = 0  # cells (repeats, with repeats) of this lane awaiting training
    workers: list = field(default_factory=list)
    inflight: int = 0  # jobs submitted and not reported
    failed: tuple[str, str] | None = None  # (verdict, reason) of every remaining cell
    warm_failures: int = 0
    busy_seconds: float = 0.0
    jobs_done: int = 0
    hosts: frozenset[str] | None = None
    excluded: dict = field(default_factory=dict)  # node -> why it cannot be this lane's environment (shared by slots)

    @property
    def training(self) -> bool:
        return self.spec.training

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or self.expected > 0 or self.inflight > 0

    @property
    def mean_seconds(self) -> float:
        return self.busy_seconds / self.jobs_done if self.jobs_done else 0.0


@dataclass(eq=False)
class _Track:
    cell: Cell
    state: CellState = CellState.PLANNED
    repeats: int = 1
    parts: dict | None = None  # repeat -> its settled result, while a repeated cell waits for the others
    artifact: ArtifactRecord | None = None  # the artifact its repeats replayed


class Scheduler:
    """Decides a sweep's schedule from events; see the module docstring for the rules.

    Args:
        lanes: every lane; exactly one has ``training=True``.
        cells: the cells to run.
        lane_of: environment name -> lane key.
        settings: retries, time limits, busy bound, batching.
        artifacts: cell name -> an artifact already trained (the cell needs no training).
        repeats: environment name -> how many times each of its cells is replayed (missing: once).

    Call :meth:`start` once, then :meth:`step` for every event, executing the
    commands each returns in order, until :attr:`finished`.
    """

    def __init__(self, lanes: Sequence[LaneSpec], cells: Iterable[Cell], lane_of: Mapping[str, str],
                 settings: Settings = Settings(), artifacts: Mapping[str, ArtifactRecord] | None = None,
                 repeats: Mapping[str, int] | None = None):
        self.settings = settings
        repeats = {env: n for env, n in (repeats or {}).items() if n > 1}
        self.lanes: dict[tuple[str, int], _Lane] = {}  # (lane key, slot) -> lane
        for spec in sorted(lanes, key=lambda s: not s.training):  # the training lane first
            slots = 1 if spec.training else max([repeats.get(env, 1) for env in spec.environments] or [1])
            excluded: dict = {}  # a node that cannot be the environment cannot be it for any slot
            for slot in range(slots):
                self.lanes[(spec.key, slot)] = _Lane(spec, slot, hosts=spec.hosts, excluded=excluded)
        trainers = [lane for lane in self.lanes.values() if lane.training]
        if len(trainers) != 1:
            raise ValueError(f"exactly one training lane is needed, got {len(trainers)}")
        self.training = trainers[0]
        self.lane_of = dict(lane_of)
        self.tracks: dict[str, _Track] = {c.name: _Track(c, repeats=repeats.get(c.environment, 1)) for c in cells}
        self.artifacts = dict(artifacts or {})
        self.awaiting: dict[str, list[tuple[_Track, int]]] = {}  # scenario -> (cell, repeat) waiting for its training
        self.workers: dict[int, _Worker] = {}
        self.capacity = 0.0
        self.now = 0.0
        self.held = 0.0  # CPUs of all our workers
        self.busy = 0.0  # CPUs of our busy workers
        self.done = 0
        self._ids = 0
        self._out: list[Command] = []

    # -- public -------------------------------------------------------------------------------
    def start(self, now: float, capacity: float = 0.0) -> list[Command]:
        """Plan every cell (those that cannot run are emitted now) and start the first workers."""
        self.now, self.capacity = now, capacity
        for lane in self.lanes.values():
            if lane.spec.unschedulable:
                lane.failed = ("unschedulable", lane.spec.unschedulable)
        for track in self.tracks.values():
            self._plan(track)
        for scenario in self.awaiting:
            self.training.queue.append(Job(scenario))
        return self._finish_step()

    def step(self, event: Event) -> list[Command]:
        """Apply one event; returns the commands to execute, in order."""
        self.now = max(self.now, event.now)
        handler = getattr(self, f"_on_{type(event).__name__}")
        handler(event)
        self._check_timeouts()
        return self._finish_step()

    @property
    def finished(self) -> bool:
        """Every cell is done and no lane has work left."""
        return self.done == len(self.tracks) and not any(lane.has_work for lane in self.lanes.values())

    def state(self, cell: str) -> CellState:
        """The state of cell ``scenario/format/environment``."""
        return self.tracks[cell].state

    def _lane(self, environment: str, repeat: int = 0) -> _Lane:
        """The lane (slot) that runs repeat ``repeat`` of ``environment``'s cells."""
        return self.lanes[(self.lane_of[environment], repeat)]

    # -- planning -------------------------------------------------------------------------------
    def _plan(self, track: _Track) -> None:
        cell = track.cell
        lane = self._lane(cell.environment)
        art = self.artifacts.get(cell.name)
        if art is None and self.training.failed:
            self._emit(track, "unschedulable", f"training: {self.training.failed[1]}")
        elif lane.failed:  # decided now, not after training (a lane's slots fail alike at the start)
            self._emit(track, *lane.failed, artifact=art)
        elif art is not None:
            if art.error:
                self._emit(track, "error", art.error, artifact=art)
            else:
                for repeat in range(track.repeats):
                    self._ready(track, repeat, art)
        else:
            track.state = CellState.AWAITING_TRAINING
            waiting = self.awaiting.setdefault(cell.scenario, [])
            for repeat in range(track.repeats):
                waiting.append((track, repeat))
                self._lane(cell.environment, repeat).expected += 1

    def _ready(self, track: _Track, repeat: int, art: ArtifactRecord) -> None:
        """Queue repeat ``repeat`` of a cell whose artifact exists, on its slot (settled at once if that failed)."""
        lane = self._lane(track.cell.environment, repeat)
        if art.error:
            self._settle(track, repeat, "error", art.error, artifact=art)
        elif lane.failed:
            self._settle(track, repeat, *lane.failed, artifact=art)
        else:
            track.state = CellState.QUEUED
            lane.queue.append(Job(track.cell.scenario, track.cell, art, repeat=repeat))

    # -- events ---------------------------------------------------------------------------------
    def _on_Tick(self, event: Tick) -> None:
        if event.capacity is not None:
            self.capacity = event.capacity

    def _on_StartFailed(self, event: StartFailed) -> None:
        worker = self.workers.get(event.worker)
        if worker is None:
            return
        lane = worker.lane
        reason = f"Ray refused to place {lane.spec.placement}: {event.error}"
        self._out.append(HarnessFailed(reason))
        self._kill(worker)
        self._fail_lane(lane, "error", reason)

    def _on_Placed(self, event: Placed) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or worker.phase != "pending":
            return
        worker.phase, worker.node, worker.placed_at = "warming", event.node, event.now
        self._sync(worker)

    def _on_Warmed(self, event: Warmed) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or worker.phase == "ready":
            return
        lane = worker.lane
        if worker.phase == "pending":  # placed and warmed reported together
            worker.placed_at = event.now
        if event.unschedulable:
            node = worker.node
            self._kill(worker)
            lane.excluded[node] = event.unschedulable
            candidates = None if lane.hosts is None else lane.hosts - set(lane.excluded)
            if node is None or candidates is not None and not candidates:
                self._fail_lane(lane, "unschedulable", self._excluded_text(lane))
            return  # else: the next worker avoids the nodes ruled out
        worker.phase, worker.head_started = "ready", event.now
        self._sync(worker)

    def _on_WarmFailed(self, event: WarmFailed) -> None:
        worker = self.workers.get(event.worker)
        if worker is None:
            return
        lane = worker.lane
        self._kill(worker)
        lane.warm_failures += 1
        if event.setup:
            self._fail_lane(lane, "error", f"runtime_env of environment {lane.spec.title} could not be set up: "
                                           f"{event.error}")
        elif lane.warm_failures > self.settings.retries:
            self._fail_lane(lane, "error", (
                f"the worker for environment {lane.spec.title} died before the harness code started "
                f"({lane.warm_failures} time(s)): its runtime_env {lane.spec.runtime_env} probably cannot import "
                f"the harness's dependencies (numpy/pyarrow/TensorFlow versions); see the python-core-worker logs. "
                f"{event.error}"))

    def _on_Reported(self, event: Reported) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or not worker.batches or worker.batches[0].id != event.batch:
            return  # a killed worker, or a batch already given up
        lane, batch = worker.lane, worker.batches[0]
        values = event.values[:len(batch.left)]
        lane.busy_seconds += max(0.0, event.now - worker.head_started)
        lane.jobs_done += len(values)
        worker.head_started = event.now
        for value in values:
            job = batch.jobs[batch.done]
            batch.done += 1
            lane.inflight -= 1
            if isinstance(value, JobFailed):
                self._job_failed(job, "error", value.error)
            elif job.training:
                self._trained(value)
            else:
                self._settle(self.tracks[job.cell.name], job.repeat, value, artifact=job.artifact,
                             attempts=job.attempts)
        if worker.batches and not worker.batches[0].left:
            worker.batches.popleft()
            worker.head_started = event.now
        self._sync(worker)

    def _on_BatchFailed(self, event: BatchFailed) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or not worker.batches or worker.batches[0].id != event.batch:
            return
        batch = worker.batches.popleft()
        worker.lane.inflight -= len(batch.left)
        worker.head_started = event.now
        self._sync(worker)
        for job in batch.left:  # should not happen: jobs catch their own errors
            self._job_failed(job, "error", f"{event.error} (after {job.attempts} attempt(s))")

    def _on_WorkerDied(self, event: WorkerDied) -> None:
        worker = self.workers.get(event.worker)
        if worker is None:
            return
        if worker.phase != "ready" and not worker.batches:
            self._on_WarmFailed(WarmFailed(event.worker, event.now, event.error))
            return
        lane = worker.lane
        unreported = worker.unreported()
        self._drop_batches(worker)
        self._kill(worker)
        if not unreported:
            return
        head, rest = unreported[0], unreported[1:]
        self._requeue(lane, rest)
        if head.attempts <= self.settings.retries:
            self._requeue(lane, [head], started=True)
        else:
            self._job_failed(head, "error", f"{event.error} (after {head.attempts} attempt(s))")

    def _on_NodesChanged(self, event: NodesChanged) -> None:
        lost = ", ".join(n[:12] for n in event.lost) or "a node"
        for lane in list(self.lanes.values()):
            hosts = event.hosts.get(lane.spec.key)
            if hosts is None or lane.hosts is None:
                continue
            lane.hosts = frozenset(hosts)
            if not lane.failed and lane.has_work and not (lane.hosts - set(lane.excluded)):
                self._fail_lane(lane, "unschedulable", (
                    f"node {lost} was lost and no other alive node can host {lane.spec.placement}"
                    + (f"; {self._excluded_text(lane)}" if lane.excluded else "")))

    # -- outcomes -------------------------------------------------------------------------------
    def _trained(self, record: TrainRecord) -> None:
        self._out.append(Trained(record))
        for track, repeat in self.awaiting.pop(record.scenario, []):
            self._lane(track.cell.environment, repeat).expected -= 1
            art = record.artifacts.get(track.cell.format)
            if art is None:
                self._settle(track, repeat, "error", f"training saved no artifact of format {track.cell.format!r}")
            else:  # (settled at once if its slot failed while this scenario trained)
                self._ready(track, repeat, art)

    def _job_failed(self, job: Job, verdict: str, reason: str) -> None:
        if job.training:
            self._training_failed(job.scenario, verdict, reason)
        else:
            self._settle(self.tracks[job.cell.name], job.repeat, verdict, reason, artifact=job.artifact,
                         attempts=job.attempts or None)

    def _training_failed(self, scenario: str, verdict: str, reason: str) -> None:
        for track, repeat in self.awaiting.pop(scenario, []):
            self._lane(track.cell.environment, repeat).expected -= 1
            self._settle(track, repeat, verdict, f"training: {reason}")

    def _settle(self, track: _Track, repeat: int, outcome: str | CellResult, error: str | None = None, *,
                artifact: ArtifactRecord | None = None, attempts: int | None = None) -> None:
        """Repeat ``repeat`` of a cell is done; the cell's row goes once every repeat is."""
        if track.repeats == 1:
            self._emit(track, outcome, error, artifact=artifact, attempts=attempts)
            return
        if track.state is CellState.DONE:
            return
        parts = track.parts if track.parts is not None else {}
        track.parts = parts
        if repeat in parts:
            return
        cell = track.cell
        parts[repeat] = (outcome.replace(attempts=attempts) if isinstance(outcome, CellResult) else CellResult(
            scenario=cell.scenario, format=cell.format, environment=cell.environment, verdict=outcome, error=error,
            attempts=attempts))
        track.artifact = artifact or track.artifact
        if len(parts) == track.repeats:
            ordered = tuple(parts[r] for r in range(track.repeats))
            dispatched = sum(p.attempts or 0 for p in ordered)
            self._emit(track, ordered[0], artifact=track.artifact, attempts=dispatched or None, repeats=ordered)

    def _emit(self, track: _Track, verdict: str | CellResult, error: str | None = None, *,
              artifact: ArtifactRecord | None = None, attempts: int | None = None,
              repeats: tuple[CellResult, ...] = ()) -> None:
        """The cell's row, exactly once (for all its repeats: a cell decided before any of them ran has none)."""
        if track.state is CellState.DONE:
            return
        track.state = CellState.DONE
        track.parts = None
        self.done += 1
        cell = track.cell
        result = verdict if isinstance(verdict, CellResult) else CellResult(
            scenario=cell.scenario, format=cell.format, environment=cell.environment, verdict=verdict, error=error,
            attempts=attempts)
        self._out.append(Emit(cell, result, artifact, attempts, repeats))

    def _fail_lane(self, lane: _Lane, verdict: str, reason: str) -> None:
        """Every remaining cell of ``lane`` gets ``verdict``; the lane's workers go."""
        if lane.failed:
            return
        lane.failed = (verdict, reason)
        for worker in list(lane.workers):
            lane.queue.extend(worker.unreported())
            self._drop_batches(worker)
            self._kill(worker)
        while lane.queue:
            job = lane.queue.popleft()
            if lane.training:
                self._training_failed(job.scenario, verdict, reason)
            else:
                self._settle(self.tracks[job.cell.name], job.repeat, verdict, reason, artifact=job.artifact,
                             attempts=job.attempts or None)
        if lane.training:
            for scenario in list(self.awaiting):
                self._training_failed(scenario, verdict, reason)
            return
        names = set(lane.spec.environments)
        for scenario, waiting in self.awaiting.items():
            mine = [(t, r) for t, r in waiting if r == lane.slot and t.cell.environment in names]
            if mine:
                self.awaiting[scenario] = [(t, r) for t, r in waiting if r != lane.slot or t.cell.environment not in names]
                for track, repeat in mine:
                    lane.expected -= 1
                    self._settle(track, repeat, verdict, reason)

    # -- time limits ------------------------------------------------------------------------------
    def _limit(self, lane: _Lane) -> tuple[float, str]:
        if lane.training:
            return self.settings.train_timeout_s, "train_timeout_s"
        return self.settings.cell_timeout_s, "cell_timeout_s"

    def pending_deadline(self, worker: _Worker) -> float:
        """When a worker not placed yet is given up."""
        return max(worker.created, worker.restarted) + self.settings.schedule_timeout_s

    def _check_timeouts(self) -> None:
        now = self.now
        for lane in self.lanes.values():
            for worker in list(lane.workers):
                if lane.failed:
                    break
                limit, what = self._limit(lane)
                if worker.phase == "pending":
                    if now > self.pending_deadline(worker) + _EPS:
                        if any(w.phase == "ready" for w in lane.workers):
                            self._kill(worker)  # an extra worker found no room: the lane goes on without it
                        else:
                            self._fail_lane(lane, "unschedulable", (
                                f"still pending after schedule_timeout_s={self.settings.schedule_timeout_s:g}s: "
                                f"no node took {lane.spec.placement}"
                                + (f"; {self._excluded_text(lane)}" if lane.excluded else "")))
                elif worker.phase == "warming":
                    # Its own clock, from placement: importing TensorFlow is not waiting for a node.
                    warm_limit = self.settings.schedule_timeout_s
                    if now - worker.placed_at > warm_limit + _EPS:
                        self._kill(worker)
                        if not any(w.phase == "ready" for w in lane.workers):
                            self._fail_lane(lane, "error", (
                                f"the worker for environment {lane.spec.title} was placed but did not finish "
                                f"importing and configuring TensorFlow within schedule_timeout_s={warm_limit:g}s; "
                                "it was stopped"))
                elif worker.batches and now - worker.head_started > limit + _EPS:
                    self._timed_out(worker, limit, what)

    def _timed_out(self, worker: _Worker, limit: float, what: str) -> None:
        """Stop the worker (TensorFlow cannot be interrupted); the lane goes on with a fresh one."""
        lane = worker.lane
        job, *rest = worker.unreported()
        self._drop_batches(worker)
        self._kill(worker)
        self._requeue(lane, rest)
        self._job_failed(job, "error", f"timed out after {limit:g}s ({what}); its worker was stopped and "
                                       "the environment goes on with a fresh one")

    # -- dispatch ---------------------------------------------------------------------------------
    def _schedule(self) -> None:
        for lane in self.lanes.values():
            if lane.failed or not lane.has_work:
                for worker in list(lane.workers):
                    if not worker.batches:
                        self._kill(worker)
        # Ready work first (the training lane first): it is cheap next to a worker start-up.
        pipeline = self.settings.pipeline
        for lane in self.lanes.values():
            if lane.failed:
                continue
            for worker in lane.workers:
                while (worker.phase == "ready" and lane.queue and len(worker.batches) < pipeline
                       and (worker.batches or self._cores_free(lane))):
                    size = min(self._batch_size(lane), len(lane.queue))
                    self._submit(worker, [lane.queue.popleft() for _ in range(size)])
        # First workers: training, then lanes with cells ready, then lanes still waiting (prewarm).
        first = [lane for lane in self.lanes.values() if not lane.failed and lane.has_work and not lane.workers]
        first.sort(key=lambda lane: (not lane.training, not lane.queue))
        starving = False
        # The last lane to start may exceed ``busy_cpus`` by one CPU: instead of importing
        # TensorFlow alone at the very end while a core idles, it shares the cores.
        last = len(first) == 1 and not self.training.has_work
        for lane in first:
            if not self._fits(lane):
                starving |= lane.training or bool(lane.queue)
                if lane.training:
                    self._free_idle_prewarmed()
            elif self._cores_free(lane, slack=1.0 if last else 0.0):
                self._start(lane)
        # More workers for long cells when nothing else waits for room.
        if not starving:
            for lane in self.lanes.values():
                if (not lane.failed and lane.workers and len(lane.workers) < MAX_WORKERS_PER_LANE
                        and len(lane.queue) > 2 * len(lane.workers) and lane.mean_seconds >= SCALE_MIN_S
                        and all(w.phase == "ready" for w in lane.workers) and self._fits(lane)
                        and self._cores_free(lane)):
                    self._start(lane)

    def _batch_size(self, lane: _Lane) -> int:
        """About ``BATCH_TARGET_S`` worth of jobs; one while the lane's cell time is unknown or long."""
        if lane.training or not lane.jobs_done or len(lane.workers) > 1:
            return 1
        return max(1, min(self.settings.max_batch, int(BATCH_TARGET_S / max(lane.mean_seconds, 1e-4))))

    def _fits(self, lane: _Lane) -> bool:
        """Ray has room for one more worker of ``lane`` next to ours (or none of ours is alive)."""
        return not self.workers or self.held + lane.spec.cpus <= self.capacity + _EPS

    def _cores_free(self, lane: _Lane, slack: float = 0.0) -> bool:
        """One more busy worker of ``lane`` stays within ``busy_cpus`` (a warm worker waiting for work is not busy)."""
        bound = self.settings.busy_cpus
        return bound is None or self.busy <= _EPS or self.busy + lane.spec.cpus <= bound + slack + _EPS

    def _free_idle_prewarmed(self) -> None:
        """Training needs room: give back workers that only wait for artifacts."""
        for lane in self.lanes.values():
            if not lane.training and not lane.queue:
                for worker in list(lane.workers):
                    if not worker.batches:
                        self._kill(worker)

    def _start(self, lane: _Lane) -> None:
        self._ids += 1
        worker = _Worker(self._ids, lane, self.now)
        lane.workers.append(worker)
        self.workers[worker.id] = worker
        self.held += lane.spec.cpus
        self._sync(worker)
        self._out.append(StartWorker(worker.id, lane.spec.key, frozenset(n for n in lane.excluded if n)))

    def _submit(self, worker: _Worker, jobs: list[Job]) -> None:
        for job in jobs:
            job.attempts += 1
            if job.cell is not None:
                self.tracks[job.cell.name].state = CellState.RUNNING
        if not worker.batches:
            worker.head_started = self.now
        self._ids += 1
        worker.batches.append(_Batch(self._ids, jobs))
        worker.lane.inflight += len(jobs)
        self._sync(worker)
        self._out.append(Submit(worker.id, self._ids, tuple(jobs)))

    def _requeue(self, lane: _Lane, jobs: list[Job], started: bool = False) -> None:
        """Put jobs back at the front of the queue, in order; a job that never started loses that attempt."""
        for job in reversed(jobs):
            if not started:
                job.attempts -= 1
            if job.cell is not None:
                self.tracks[job.cell.name].state = CellState.QUEUED
            lane.queue.appendleft(job)

    def _drop_batches(self, worker: _Worker) -> None:
        worker.lane.inflight -= len(worker.unreported())
        worker.batches.clear()
        self._sync(worker)

    def _kill(self, worker: _Worker) -> None:
        if self.workers.pop(worker.id, None) is None:
            return
        worker.lane.workers.remove(worker)
        self.held -= worker.lane.spec.cpus
        if worker.counted_busy:
            self.busy -= worker.lane.spec.cpus
            worker.counted_busy = False
        if worker.phase != "pending" and worker.lane.spec.demands:
            # What it held may be what a pending worker waits for: restart their clocks.
            for other in self.workers.values():
                if other.phase == "pending" and other.lane.spec.demands & worker.lane.spec.demands:
                    other.restarted = self.now
        self._out.append(Kill(worker.id))

    def _sync(self, worker: _Worker) -> None:
        """Keep the busy-CPU counter in step with the worker's state."""
        busy = worker.busy and worker.id in self.workers
        if busy != worker.counted_busy:
            self.busy += worker.lane.spec.cpus if busy else -worker.lane.spec.cpus
            worker.counted_busy = busy

    def _strand(self) -> None:
        """Nothing runs and nothing can: cells still waiting for training would wait forever."""
        for scenario in list(self.awaiting):
            self._training_failed(scenario, "error", "internal: no training job is left for this scenario")
        for lane in self.lanes.values():
            lane.expected = 0

    @staticmethod
    def _excluded_text(lane: _Lane) -> str:
        return "; ".join(f"node {str(node)[:12]}: {why}" if node else why for node, why in lane.excluded.items())

    def _finish_step(self) -> list[Command]:
        self._schedule()
        if (not self.workers and not any(lane.queue for lane in self.lanes.values())
                and any(lane.has_work for lane in self.lanes.values())):
            self._strand()
        out, self._out = self._out, []
        return out
