"""harness.scheduler: the pure state machine behind the engine, with a fake clock.

``Fake`` plays the engine and Ray: it executes the scheduler's commands into
a model of workers and batches and feeds back the events a test chooses.
The last part throws random interleavings of events at the scheduler
(Hypothesis ``RuleBasedStateMachine``) and checks its invariants after every
step: one row per cell, busy workers within the bound, no worker silent past
its time limit, retries within ``retries``, the repeats of a cell on different
workers and all in its one row, and every cell done once only ticks remain.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from harness.records import ArtifactRecord, Cell, CellResult, JobFailed, TrainRecord
from harness.scheduler import (BatchFailed, CellState, Emit, HarnessFailed, Kill, LaneSpec, NodesChanged, Placed,
                               Reported, Scheduler, Settings, StartFailed, StartWorker, Submit, Tick, Trained,
                               WarmFailed, Warmed, WorkerDied)

T = "<training>"


def lanes(*envs: str, training_cpus: float = 1.0, **specs) -> list[LaneSpec]:
    """A training lane and one lane per environment (``specs[env]``: LaneSpec fields)."""
    out = [LaneSpec(T, ("training",), cpus=training_cpus, training=True, title="'training'",
                    placement="environment 'training' (num_cpus=1)")]
    for env in envs:
        fields = {"cpus": 1.0, "title": repr(env), "placement": f"environment {env!r} (num_cpus=1)",
                  **specs.get(env.replace("-", "_"), {})}
        out.append(LaneSpec(env, (env,), **fields))
    return out


def cells(scenarios, formats, envs) -> list[Cell]:
    return [Cell(s, f, e) for e in envs for s in scenarios for f in formats]


@dataclass
class FakeWorker:
    lane: str
    avoid: frozenset
    clock: float = 0.0  # since when it waits to be placed (restarted when a worker it may wait behind goes)
    placed: bool = False
    warmed: bool = False
    batches: deque = field(default_factory=deque)  # [batch id, jobs, reported]
    last_progress: float = 0.0


class Fake:
    """The engine and Ray, as far as the scheduler can tell: executes commands, produces events."""

    def __init__(self, scheduler: Scheduler, formats=("keras",), capacity: float = 8.0):
        self.s, self.formats, self.now = scheduler, formats, 0.0
        self.workers: dict[int, FakeWorker] = {}
        self.rows: dict[str, CellResult] = {}
        self.emitted: Counter = Counter()
        self.attempts: dict[str, int | None] = {}
        self.parts: dict[str, tuple] = {}  # cell -> every repeat's result (empty: not repeated)
        self.ran_on: dict[str, dict[int, set]] = {}  # cell -> repeat -> workers it was sent to
        self.worker_repeats: dict[int, set] = {}  # worker -> repeats of cells it was sent
        self.trained: list[str] = []
        self.failures: list[str] = []
        self.submits: list[Submit] = []
        self.demands = {lane.spec.key: lane.spec.demands for lane in scheduler.lanes.values()}
        self.apply(scheduler.start(0.0, capacity))

    def apply(self, commands) -> None:
        for cmd in commands:
            if isinstance(cmd, StartWorker):
                assert cmd.worker not in self.workers
                self.workers[cmd.worker] = FakeWorker(cmd.lane, cmd.avoid, clock=self.now, last_progress=self.now)
            elif isinstance(cmd, Submit):
                worker = self.workers[cmd.worker]
                assert worker.warmed, "a job was sent to a worker that is not ready"
                if not worker.batches:
                    worker.last_progress = self.now
                worker.batches.append([cmd.batch, list(cmd.jobs), 0])
                self.submits.append(cmd)
                for job in cmd.jobs:
                    if job.cell is not None:
                        self.ran_on.setdefault(job.cell.name, {}).setdefault(job.repeat, set()).add(cmd.worker)
                        self.worker_repeats.setdefault(cmd.worker, set()).add(job.repeat)
            elif isinstance(cmd, Kill):
                gone = self.workers.pop(cmd.worker, None)
                if gone is not None and gone.placed:  # what it held (GPU, ...) may be what a pending one waits for
                    for other in self.workers.values():
                        if not other.placed and self.demands[other.lane] & self.demands[gone.lane]:
                            other.clock = self.now
            elif isinstance(cmd, Emit):
                self.emitted[cmd.cell.name] += 1
                self.rows[cmd.cell.name] = cmd.result
                self.attempts[cmd.cell.name] = cmd.attempts
                self.parts[cmd.cell.name] = cmd.repeats
            elif isinstance(cmd, Trained):
                self.trained.append(cmd.record.scenario)
            elif isinstance(cmd, HarnessFailed):
                self.failures.append(cmd.message)

    def step(self, event) -> None:
        self.now = max(self.now, event.now)
        self.apply(self.s.step(event))

    def tick(self, dt: float = 0.0, capacity: float | None = None) -> None:
        self.step(Tick(self.now + dt, capacity))

    # -- what Ray would report ----------------------------------------------------------------------
    def of_lane(self, lane: str) -> list[int]:
        return [wid for wid, w in self.workers.items() if w.lane == lane]

    def place(self, wid: int, node: str | None = "n1", dt: float = 0.0) -> None:
        self.workers[wid].placed = True
        self.workers[wid].last_progress = self.now + dt
        self.step(Placed(wid, self.now + dt, node))

    def warm(self, wid: int, unschedulable: str | None = None, dt: float = 0.0) -> None:
        worker = self.workers[wid]
        worker.warmed = not unschedulable
        worker.last_progress = self.now + dt
        self.step(Warmed(wid, self.now + dt, unschedulable))

    def ready(self, wid: int, node: str = "n1") -> None:
        self.place(wid, node)
        self.warm(wid)

    def value(self, job, fail: bool = False, art_error: str | None = None):
        if fail:
            return JobFailed("boom")
        if job.training:
            arts = {f: ArtifactRecord(job.scenario, f, digest="d", path=f"artifacts/{job.scenario}/d", uri="u",
                                      manifest_sha256="m", error=art_error, save_verdict="bitwise")
                    for f in self.formats}
            return TrainRecord(job.scenario, {}, arts)
        return CellResult(scenario=job.cell.scenario, format=job.cell.format, environment=job.cell.environment,
                          verdict="bitwise")

    def report(self, wid: int, n: int = 1, dt: float = 0.0, fail: bool = False, art_error: str | None = None) -> None:
        worker = self.workers[wid]
        batch = worker.batches[0]
        jobs = batch[1][batch[2]:batch[2] + n]
        batch[2] += len(jobs)
        if batch[2] == len(batch[1]):
            worker.batches.popleft()
        worker.last_progress = self.now + dt
        self.step(Reported(wid, batch[0], self.now + dt, tuple(self.value(j, fail, art_error) for j in jobs)))

    def serve_all(self, limit: int = 1000) -> None:
        """Place, warm and answer everything until nothing is left (no time passes)."""
        for _ in range(limit):
            if self.s.finished:
                return
            wid = next(iter(self.workers), None)
            if wid is None:
                self.tick()
                continue
            worker = self.workers[wid]
            if not worker.placed:
                self.place(wid)
            elif not worker.warmed:
                self.warm(wid)
            elif worker.batches:
                self.report(wid)
            else:
                # idle ready worker: let another make progress, or time pass
                busy = [w for w, x in self.workers.items() if not x.placed or not x.warmed or x.batches]
                if not busy:
                    self.tick()
                    if not self.s.finished and all(not x.batches for x in self.workers.values()):
                        raise AssertionError("stuck: ready workers, nothing submitted")
                    continue
                wid = busy[0]
                worker = self.workers[wid]
                if not worker.placed:
                    self.place(wid)
                elif not worker.warmed:
                    self.warm(wid)
                else:
                    self.report(wid)
        raise AssertionError("did not finish")


def make(envs=("a",), scenarios=("s1",), formats=("keras",), settings_=Settings(), artifacts=None, capacity=8.0,
         repeats=None, **specs) -> Fake:
    sched = Scheduler(lanes(*envs, **specs), cells(scenarios, formats, envs), {e: e for e in envs}, settings_,
                      artifacts, repeats)
    return Fake(sched, formats, capacity)


# -- the happy path and the cell states ------------------------------------------------------------
def test_every_cell_goes_through_its_states_to_one_row():
    fake = make(envs=("a", "b"), scenarios=("s1", "s2"), formats=("keras", "h5"))
    s = fake.s
    assert {s.state(c) for c in fake.s.tracks} == {CellState.AWAITING_TRAINING}
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)  # s1 trained
    assert s.state("s1/keras/a") in (CellState.QUEUED, CellState.RUNNING) and s.state("s2/h5/b") is CellState.AWAITING_TRAINING
    fake.serve_all()
    assert s.finished and set(fake.emitted.values()) == {1} and len(fake.emitted) == 8
    assert all(s.state(c) is CellState.DONE for c in s.tracks)
    assert set(fake.attempts.values()) == {1} and fake.trained == ["s1", "s2"]


def test_cells_with_an_artifact_need_no_training():
    art = ArtifactRecord("s1", "keras", digest="d", path="p", manifest_sha256="m")
    fake = make(envs=("a",), artifacts={"s1/keras/a": art})
    assert not fake.of_lane(T), "nothing to train: no training worker"
    assert fake.s.state("s1/keras/a") is CellState.QUEUED
    fake.serve_all()
    assert fake.emitted == {"s1/keras/a": 1} and not fake.trained


def test_a_format_that_did_not_save_is_an_error_row_at_once():
    fake = make(envs=("a",))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer, art_error="save in format 'keras' failed: no")
    assert fake.rows["s1/keras/a"].verdict == "error" and "no" in fake.rows["s1/keras/a"].error


def test_unschedulable_training_settles_every_cell_at_once():
    fake = make(envs=("a", "b"), **{"": {}})
    sched = Scheduler([LaneSpec(T, ("training",), training=True, unschedulable="missing label node-role=train"),
                       LaneSpec("a", ("a",)), LaneSpec("b", ("b",))], cells(["s1"], ["keras"], ["a", "b"]),
                      {"a": "a", "b": "b"})
    fake = Fake(sched)
    assert sched.finished and not fake.workers
    assert {r.error for r in fake.rows.values()} == {"training: missing label node-role=train"}


def test_an_unschedulable_lane_keeps_its_cells_apart_from_the_others():
    fake = make(envs=("cpu", "gpu"), gpu={"unschedulable": "missing GPU >= 1"})
    assert fake.rows["s1/keras/gpu"].verdict == "unschedulable" and not fake.attempts["s1/keras/gpu"]
    fake.serve_all()
    assert fake.rows["s1/keras/cpu"].verdict == "bitwise"


def test_ray_client_mode_sends_one_job_per_call():
    fake = make(envs=("a",), scenarios=tuple(f"s{i}" for i in range(4)), settings_=Settings(max_batch=1))
    fake.serve_all()
    assert fake.submits and all(len(cmd.jobs) == 1 for cmd in fake.submits)
    streaming = make(envs=("a",), scenarios=("s1",), formats=tuple(f"f{i}" for i in range(40)))
    streaming.serve_all()
    assert max(len(cmd.jobs) for cmd in streaming.submits) > 1  # cheap cells travel in batches


# -- busy workers and room -------------------------------------------------------------------------
def test_busy_workers_stay_within_the_bound_and_warm_waiting_workers_hold_none():
    envs = tuple(f"e{i}" for i in range(5))
    fake = make(envs=envs, settings_=Settings(busy_cpus=2.0), capacity=10.0)
    assert len(fake.workers) == 2  # training + one prewarming lane: 2 busy CPUs
    for wid in list(fake.workers):
        fake.ready(wid)  # warm and waiting (training's worker now runs its job)
    # a prewarmed worker waiting for training holds no core: the next lanes import beside training
    assert fake.s.busy <= 2.0 + 1e-9 and len(fake.workers) >= 3
    fake.serve_all()
    assert len(fake.emitted) == 5


def test_no_second_worker_when_ray_has_no_room():
    fake = make(envs=("a", "b"), capacity=1.0)
    assert len(fake.workers) == 1  # training only: Ray's one CPU is taken
    fake.serve_all()
    assert set(fake.emitted.values()) == {1}


# -- time limits -------------------------------------------------------------------------------------
def test_a_pending_worker_is_unschedulable_after_the_schedule_timeout_whatever_else_is_freed():
    """Every kill used to restart every pending worker's clock: an unplaceable lane could wait forever."""
    fake = make(envs=("ok", "ghost"), scenarios=("s1", "s2"), settings_=Settings(schedule_timeout_s=10))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    ghost = fake.of_lane("ghost")[0]  # never placed
    fake.report(trainer, dt=3.0)
    fake.report(trainer, dt=3.0)  # training done: its worker is freed at 6 s
    assert trainer not in fake.workers
    (ok,) = fake.of_lane("ok")
    fake.ready(ok)
    fake.report(ok, dt=1.5)
    fake.report(ok, dt=1.5)  # lane done: freed at 9 s
    assert ok not in fake.workers
    assert fake.now == 9.0 and ghost in fake.workers
    fake.tick(1.5)
    assert ghost not in fake.workers
    assert fake.rows["s1/keras/ghost"].verdict == "unschedulable"
    assert "still pending after schedule_timeout_s=10s" in fake.rows["s1/keras/ghost"].error


def test_a_freed_worker_sharing_a_gpu_restarts_a_pending_clock():
    gpu = {"demands": frozenset({"GPU"})}
    fake = make(envs=("g1", "g2"), settings_=Settings(schedule_timeout_s=10), g1=gpu, g2=gpu)
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    g1, g2 = fake.of_lane("g1")[0], fake.of_lane("g2")[0]
    fake.ready(g1)  # placed on the GPU node; g2 waits for that GPU
    fake.tick(8.0)
    fake.report(g1)  # g1's lane is done: its worker goes, the GPU is free
    assert g1 not in fake.workers
    fake.tick(8.0)  # 16 s since g2 was asked for, 8 s since the GPU was freed
    assert g2 in fake.workers
    fake.ready(g2)
    fake.report(g2)
    assert fake.rows["s1/keras/g2"].verdict == "bitwise"


def test_importing_tensorflow_does_not_count_against_placement():
    """The schedule timeout used to count the TensorFlow import: a slow import made a placed worker unschedulable."""
    fake = make(envs=("a",), settings_=Settings(schedule_timeout_s=10, cell_timeout_s=5))
    fake.tick(8.0)
    for wid in list(fake.workers):
        fake.place(wid)  # placed at 8 s, then importing
    fake.tick(9.0)  # 17 s since asked for, 9 s importing: neither clock has run out
    assert len(fake.workers) == 2 and not fake.rows
    fake.tick(1.5)  # 10.5 s importing: the import is stuck
    assert fake.rows["s1/keras/a"].verdict == "error"
    assert "did not finish importing and configuring TensorFlow within schedule_timeout_s=10s" in \
        fake.rows["s1/keras/a"].error


def test_a_job_past_its_time_limit_is_an_error_and_the_rest_go_on_with_a_fresh_worker():
    fake = make(envs=("a",), scenarios=("s1", "s2"), settings_=Settings(cell_timeout_s=10))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    fake.report(trainer)
    (wid,) = fake.of_lane("a")
    fake.ready(wid)
    fake.tick(11.0)
    assert wid not in fake.workers
    stuck = [r for r in fake.rows.values() if r.verdict == "error"]
    assert len(stuck) == 1 and "timed out after 10s (cell_timeout_s)" in stuck[0].error
    fake.serve_all()
    other = next(name for name in fake.rows if fake.rows[name].verdict == "bitwise")
    assert fake.attempts[other] == 1  # queued behind the stuck one, never started: not an attempt


def test_a_dead_worker_is_retried_within_retries_then_an_error():
    fake = make(envs=("a",), settings_=Settings(retries=1))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    for attempt in (1, 2):
        (wid,) = fake.of_lane("a")
        fake.ready(wid)
        assert fake.workers[wid].batches
        fake.step(WorkerDied(wid, fake.now, "ActorDiedError: killed"))
    row = fake.rows["s1/keras/a"]
    assert row.verdict == "error" and "after 2 attempt(s)" in row.error and fake.attempts["s1/keras/a"] == 2


def test_a_worker_that_cannot_start_fails_its_lane_as_a_harness_failure():
    fake = make(envs=("a",))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    (wid,) = fake.of_lane("a")
    fake.step(StartFailed(wid, fake.now, "ValueError: bad label"))
    assert fake.rows["s1/keras/a"].verdict == "error" and "Ray refused to place" in fake.failures[0]


def test_a_runtime_env_that_cannot_be_set_up_fails_its_lane():
    fake = make(envs=("a",))
    (wid,) = fake.of_lane("a")
    fake.step(WarmFailed(wid, fake.now, "RuntimeEnvSetupError: pip", setup=True))
    fake.serve_all()
    assert "runtime_env of environment 'a' could not be set up" in fake.rows["s1/keras/a"].error


# -- nodes: cpu_isa and node loss --------------------------------------------------------------------
def test_a_cpu_isa_the_first_node_lacks_is_tried_on_another_node():
    fake = make(envs=("isa",), isa={"hosts": frozenset({"n1", "n2"})})
    (wid,) = fake.of_lane("isa")
    fake.place(wid, "n1")
    fake.warm(wid, unschedulable="cpu_isa 'avx512_core' needs CPU flags avx512f")
    assert not fake.rows, "one node lacking the instruction set does not make it unschedulable"
    (again,) = fake.of_lane("isa")
    assert fake.workers[again].avoid == frozenset({"n1"})
    fake.place(again, "n2")
    fake.warm(again)
    fake.serve_all()
    assert fake.rows["s1/keras/isa"].verdict == "bitwise"


def test_a_cpu_isa_no_node_has_is_unschedulable_naming_each_node():
    fake = make(envs=("isa",), isa={"hosts": frozenset({"n1aaaaaaaaaaaaaa", "n2bbbbbbbbbbbbbb"})})
    for node in ("n1aaaaaaaaaaaaaa", "n2bbbbbbbbbbbbbb"):
        (wid,) = fake.of_lane("isa")
        fake.place(wid, node)
        fake.warm(wid, unschedulable=f"lacks avx512f on {node[:2]}")
    row = fake.rows["s1/keras/isa"]
    assert row.verdict == "unschedulable"
    assert "node n1aaaaaaaaaa: lacks avx512f on n1" in row.error and "node n2bbbbbbbbbb: lacks avx512f on n2" in row.error


def test_a_lost_node_retries_its_job_elsewhere_or_names_the_node():
    fake = make(envs=("pool", "only"), pool={"hosts": frozenset({"n1", "n2"})}, only={"hosts": frozenset({"n1"})})
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer, node="n0")
    fake.report(trainer)
    (pool,), (only,) = fake.of_lane("pool"), fake.of_lane("only")
    fake.ready(pool, "n1")
    fake.ready(only, "n1")
    fake.step(WorkerDied(pool, fake.now, "ActorDiedError: node died", node_lost=True))
    fake.step(WorkerDied(only, fake.now, "ActorDiedError: node died", node_lost=True))
    fake.step(NodesChanged(fake.now, {"pool": frozenset({"n2"}), "only": frozenset()}, lost=("n1",)))
    assert fake.rows["s1/keras/only"].verdict == "unschedulable"
    assert "node n1 was lost and no other alive node can host" in fake.rows["s1/keras/only"].error
    fake.serve_all()
    assert fake.rows["s1/keras/pool"].verdict == "bitwise" and fake.attempts["s1/keras/pool"] == 2


def test_a_batch_that_fails_without_the_worker_dying_fails_its_jobs_only():
    fake = make(envs=("a",), scenarios=("s1",), formats=("keras", "h5"))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    (wid,) = fake.of_lane("a")
    fake.ready(wid)
    batch = fake.workers[wid].batches.popleft()
    fake.step(BatchFailed(wid, batch[0], fake.now, "TypeError: oops"))
    fake.serve_all()
    assert sum(r.verdict == "error" for r in fake.rows.values()) == len(batch[1])
    assert set(fake.emitted.values()) == {1}


# -- repeats -----------------------------------------------------------------------------------------
def test_repeats_run_in_different_workers_and_end_in_one_row_each():
    fake = make(envs=("a",), scenarios=("s1", "s2"), formats=("keras", "h5"), repeats={"a": 3})
    fake.serve_all()
    assert set(fake.emitted.values()) == {1} and len(fake.emitted) == 4
    for name, by_repeat in fake.ran_on.items():
        assert sorted(by_repeat) == [0, 1, 2]
        workers = [w for ws in by_repeat.values() for w in ws]
        assert len(workers) == len(set(workers)) == 3, by_repeat  # three repeats, three processes
        parts = fake.parts[name]
        assert len(parts) == 3 and all(p.verdict == "bitwise" and p.attempts == 1 for p in parts)
        assert fake.rows[name] is parts[0] and fake.attempts[name] == 3  # every repeat's dispatch counted
    assert all(len(r) == 1 for r in fake.worker_repeats.values())  # a worker serves one repeat only...
    assert len(fake.worker_repeats) == 3  # ...of every cell: three warm workers, not one per cell


def test_without_repeats_rows_carry_no_parts_and_one_worker_serves_the_lane():
    fake = make(envs=("a",), scenarios=("s1", "s2"), repeats={"a": 1})
    fake.serve_all()
    assert fake.parts == {"s1/keras/a": (), "s2/keras/a": ()} and len(fake.worker_repeats) == 1
    assert [key for key in fake.s.lanes] == [(T, 0), ("a", 0)]  # one slot each: nothing else changed


def test_environments_sharing_a_lane_share_its_first_slot_whatever_their_repeats():
    specs = [LaneSpec(T, ("training",), training=True), LaneSpec("p", ("thrice", "once"))]
    sched = Scheduler(specs, cells(["s1"], ["keras"], ["thrice", "once"]), {"thrice": "p", "once": "p"},
                      repeats={"thrice": 3})
    fake = Fake(sched)
    fake.serve_all()
    assert len(fake.parts["s1/keras/thrice"]) == 3 and fake.parts["s1/keras/once"] == ()
    (slot0,) = fake.ran_on["s1/keras/once"][0]
    assert slot0 in fake.ran_on["s1/keras/thrice"][0]  # the same warm worker: its first repeat and the cell run once
    assert len(fake.worker_repeats) == 3


def test_a_repeat_that_fails_settles_itself_and_the_row_waits_for_the_others():
    fake = make(envs=("a",), repeats={"a": 2})
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    first, second = fake.of_lane("a")
    fake.ready(second)
    slot = next(iter(fake.s.workers[second].batches)).jobs[0].repeat
    fake.report(second, fail=True)
    assert not fake.rows, "one repeat of two is settled: no row yet"
    fake.ready(first)
    fake.report(first)
    parts = fake.parts["s1/keras/a"]
    assert parts[slot].verdict == "error" and parts[slot].error == "boom" and parts[1 - slot].verdict == "bitwise"
    assert fake.attempts["s1/keras/a"] == 2


def test_a_slot_no_node_takes_settles_its_repeats_and_the_rest_still_run():
    fake = make(envs=("a",), repeats={"a": 2}, settings_=Settings(schedule_timeout_s=10))
    trainer = fake.of_lane(T)[0]
    fake.ready(trainer)
    fake.report(trainer)
    lanes_of = {wid: fake.s.workers[wid].lane.slot for wid in fake.of_lane("a")}
    ready = next(w for w, slot in lanes_of.items() if slot == 0)
    fake.ready(ready)
    fake.report(ready)
    fake.tick(11.0)  # slot 1's worker was never placed
    row, parts = fake.rows["s1/keras/a"], fake.parts["s1/keras/a"]
    assert row.verdict == "bitwise" and parts[1].verdict == "unschedulable"
    assert "still pending after schedule_timeout_s=10s" in parts[1].error and parts[1].attempts is None


def test_a_cell_decided_before_it_runs_is_one_row_without_repeats():
    fake = make(envs=("gpu",), repeats={"gpu": 3}, gpu={"unschedulable": "missing GPU >= 1"})
    assert fake.rows["s1/keras/gpu"].verdict == "unschedulable" and fake.parts["s1/keras/gpu"] == ()


# -- random interleavings ----------------------------------------------------------------------------
MAX_DT = 40.0


class SchedulerMachine(RuleBasedStateMachine):
    """Random events against the scheduler, with the invariants checked after each step."""

    @initialize(n_envs=st.integers(1, 4), n_scen=st.integers(1, 3), n_fmt=st.integers(1, 2),
                cpus=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=5, max_size=5),
                busy=st.sampled_from([None, 1.0, 2.0, 3.0]), retries=st.integers(0, 2),
                capacity=st.sampled_from([1.0, 2.0, 4.0, 8.0]), batch=st.sampled_from([1, 256]),
                gpu=st.lists(st.booleans(), min_size=5, max_size=5),
                unschedulable=st.lists(st.booleans(), min_size=5, max_size=5),
                ghost=st.lists(st.booleans(), min_size=5, max_size=5), hosts_known=st.booleans(),
                repeats=st.lists(st.sampled_from([1, 1, 2, 3]), min_size=5, max_size=5))
    def setup(self, n_envs, n_scen, n_fmt, cpus, busy, retries, capacity, batch, gpu, unschedulable, ghost,
              hosts_known, repeats):
        envs = [f"e{i}" for i in range(n_envs)]
        self.settings = Settings(retries=retries, schedule_timeout_s=10.0, cell_timeout_s=15.0, train_timeout_s=20.0,
                                 busy_cpus=busy, max_batch=batch)
        specs = [LaneSpec(T, ("training",), cpus=cpus[0], training=True,
                          unschedulable="no trainer" if unschedulable[0] and n_envs == 1 else None,
                          hosts=frozenset({"n1", "n2"}) if hosts_known else None)]
        for i, env in enumerate(envs, 1):
            specs.append(LaneSpec(env, (env,), cpus=cpus[i], demands=frozenset({"GPU"}) if gpu[i] else frozenset(),
                                  unschedulable="missing GPU" if unschedulable[i] and i % 2 else None,
                                  hosts=frozenset({"n1", "n2"}) if hosts_known else None))
        self.lane_cpus = {s.key: s.cpus for s in specs}
        self.ghosts = {env for env, g in zip(envs, ghost[1:]) if g}  # no node ever takes their workers
        self.formats = tuple(f"f{i}" for i in range(n_fmt))
        self.cells = cells([f"s{i}" for i in range(n_scen)], self.formats, envs)
        self.repeats = {env: n for env, n in zip(envs, repeats[1:])}
        self.fake = Fake(Scheduler(specs, self.cells, {e: e for e in envs}, self.settings, repeats=self.repeats),
                         self.formats, capacity)
        self.freed_at: dict[frozenset, float] = {}

    # -- events ---------------------------------------------------------------------------------
    def _pick(self, data, pred):
        choices = sorted(w for w, x in self.fake.workers.items() if pred(x))
        return data.draw(st.sampled_from(choices)) if choices else None

    @rule(data=st.data(), node=st.sampled_from(["n1", "n2"]))
    def place(self, data, node):
        wid = self._pick(data, lambda w: not w.placed and node not in w.avoid and w.lane not in self.ghosts)
        if wid is not None:
            self.fake.place(wid, node)

    @rule(data=st.data(), isa=st.booleans())
    def warm(self, data, isa):
        wid = self._pick(data, lambda w: w.placed and not w.warmed)
        if wid is not None:
            self.fake.warm(wid, unschedulable="lacks avx512f" if isa else None)

    @rule(data=st.data(), n=st.integers(1, 3), fail=st.booleans(), art_error=st.sampled_from([None, None, "no save"]))
    def report(self, data, n, fail, art_error):
        wid = self._pick(data, lambda w: bool(w.batches))
        if wid is not None:
            self.fake.report(wid, n=n, fail=fail, art_error=art_error)

    @rule(data=st.data(), kind=st.sampled_from(["died", "node lost", "warm failed", "batch failed", "start failed",
                                                 "nodes changed"]),
          hosts=st.sampled_from([frozenset(), frozenset({"n2"}), frozenset({"n1", "n2"})]))
    def fault(self, data, kind, hosts):
        """One rule for every fault, so that most steps make progress."""
        fake = self.fake
        if kind == "nodes changed":
            fake.step(NodesChanged(fake.now, {key: hosts for key in self.lane_cpus}, lost=("n1",)))
            return
        wants = {"died": lambda w: w.placed, "node lost": lambda w: w.placed, "warm failed": lambda w: not w.warmed,
                 "batch failed": lambda w: bool(w.batches), "start failed": lambda w: not w.placed}[kind]
        wid = self._pick(data, wants)
        if wid is None:
            return
        if kind in ("died", "node lost"):
            fake.step(WorkerDied(wid, fake.now, "ActorDiedError: gone", node_lost=kind == "node lost"))
        elif kind == "warm failed":
            fake.step(WarmFailed(wid, fake.now, "ActorDiedError: gone"))
        elif kind == "batch failed":
            batch = fake.workers[wid].batches.popleft()
            fake.step(BatchFailed(wid, batch[0], fake.now, "TypeError: x"))
        else:
            fake.step(StartFailed(wid, fake.now, "ValueError: refused"))

    @rule(dt=st.floats(0.0, MAX_DT), capacity=st.sampled_from([None, None, 2.0, 8.0]))
    def tick(self, dt, capacity):
        self.fake.tick(dt, capacity)

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def one_row_per_cell_at_most(self):
        assert all(n == 1 for n in self.fake.emitted.values()), self.fake.emitted

    @invariant()
    def busy_workers_within_the_bound(self):
        """Busy (not placed, importing TensorFlow, or running jobs), as the fake sees its workers."""
        bound = self.settings.busy_cpus
        busy = [w for w in self.fake.workers.values() if not w.warmed or w.batches]
        cpus = sum(self.lane_cpus[w.lane] for w in busy)
        if bound is not None and len(busy) > 1:
            assert cpus <= bound + 1.0 + 1e-9, (cpus, bound)  # the last lane to start may share one core
        s = self.fake.s
        assert abs(s.busy - cpus) < 1e-9 and abs(s.held - sum(self.lane_cpus[w.lane] for w in self.fake.workers.values())) < 1e-9

    @invariant()
    def retries_within_retries(self):
        limit = self.settings.retries + 1
        for name, attempts in self.fake.attempts.items():
            parts = self.fake.parts[name]
            assert all(p.attempts is None or p.attempts <= limit for p in parts)  # each repeat within retries
            assert attempts is None or attempts <= limit * max(1, len(parts))
        assert all(job.attempts <= limit for w in self.fake.s.workers.values() for b in w.batches for job in b.jobs)

    @invariant()
    def the_repeats_of_a_cell_run_in_different_workers_and_all_reach_its_row(self):
        fake = self.fake
        for name, by_repeat in fake.ran_on.items():
            seen = [w for workers in by_repeat.values() for w in workers]
            assert len(seen) == len(set(seen)), (name, by_repeat)  # no worker ran two repeats of one cell
        assert all(len(r) == 1 for w, r in fake.worker_repeats.items())
        for name, parts in fake.parts.items():
            n = self.repeats[name.rsplit("/", 1)[1]]
            assert len(parts) in ((0, n) if n > 1 else (0,)), (name, parts)
            if parts:
                assert fake.rows[name] is parts[0]

    @invariant()
    def no_worker_silent_past_its_limit(self):
        """Judged from the outside: the time since each worker last made progress, by the fake's own clock."""
        now = self.fake.now
        for wid, worker in self.fake.workers.items():
            limit = self.settings.train_timeout_s if worker.lane == T else self.settings.cell_timeout_s
            if not worker.placed:
                assert now - worker.clock <= self.settings.schedule_timeout_s + 1e-9, (wid, worker)
            elif not worker.warmed:
                assert now - worker.last_progress <= self.settings.schedule_timeout_s + 1e-9, (wid, worker)
            elif worker.batches:
                assert now - worker.last_progress <= limit + 1e-9, (wid, worker)

    @invariant()
    def the_fake_and_the_scheduler_agree_on_workers(self):
        assert set(self.fake.workers) == set(self.fake.s.workers)

    def teardown(self):
        """With only time passing, every cell is done, once, within a bounded number of deadlines."""
        fake = getattr(self, "fake", None)
        if fake is None:
            return
        for _ in range(4 * (len(self.cells) + len(self.lane_cpus)) + 10):
            if fake.s.finished:
                break
            fake.tick(MAX_DT)
        assert fake.s.finished, [(c, fake.s.state(c)) for c in fake.s.tracks if fake.s.state(c) is not CellState.DONE]
        assert fake.emitted == Counter({c.name: 1 for c in self.cells})
        assert not fake.workers


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase
