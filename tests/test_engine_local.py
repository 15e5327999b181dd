"""The engine on the embedded Ray the harness starts itself (``address="local"``).

Workers here do no TensorFlow work: they sleep as a worker would be busy and log
when they were busy, by their own clock. What is checked is scheduling: at most
the machine's cores are busy at once (one more only for the last lane to start,
after training), workers that wait for training do not hold a core (the next
environment imports while training runs), and placement is still judged against
the machine's real cores although Ray is given room for the waiting workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import ray
from ray import cloudpickle

from harness import engine
from harness.records import ArtifactRecord, CellResult, TrainRecord
from harness.scenario import Scenario
from harness.spec import parse_sweep
from harness.sweep import run_sweep
from harness.worker import Worker

WARM_S, TRAIN_S, CELL_S = 1.0, 1.5, 0.1
CORES = engine.host_cores()
ENVIRONMENTS = int(CORES) + 2  # more lanes than fit beside training without room for waiting workers


class TimedWorker(Worker):
    """A worker without TensorFlow that logs each busy interval (warm, train, replay) to ``storage/busy``."""

    def _log(self, what: str, start: float) -> None:
        log = Path(self.storage_uri) / "busy"
        log.mkdir(parents=True, exist_ok=True)
        with open(log / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"what": what, "lane": self.environment.name, "start": start, "end": time.time()}) + "\n")

    def warm(self) -> dict:
        start = time.time()
        time.sleep(WARM_S)
        self._log("warm", start)
        return {"pid": os.getpid(), "node_id": None, "seconds": WARM_S}

    def train(self, job) -> TrainRecord:
        start = time.time()
        time.sleep(TRAIN_S)
        self._log("train", start)
        arts = {f: ArtifactRecord(scenario=job.scenario, format=f, digest="d" * 20, path=f"artifacts/{job.scenario}/{f}",
                                  uri=f"{self.storage_uri}/artifacts/{job.scenario}/{f}", manifest_sha256="m" * 64,
                                  save_verdict="bitwise", save_max_abs_diff=0.0, save_max_ulp_diff=0.0)
                for f in job.formats}
        return TrainRecord(scenario=job.scenario, fingerprint={"pid": os.getpid()}, artifacts=arts, seconds=TRAIN_S)

    def replay(self, job) -> CellResult:
        start = time.time()
        time.sleep(CELL_S)
        self._log("replay", start)
        return CellResult(scenario=job.scenario, format=job.format, environment=job.environment, verdict="bitwise",
                          max_abs_diff=0.0, max_ulp_diff=0.0, mismatch_fraction=0.0, weights_equal=True,
                          fingerprint={"pid": os.getpid()}, started_at=start, seconds=CELL_S)


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    if ray.is_initialized():  # another module's Ray: this module is about the harness's own
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class travels by value
    tmp = tmp_path_factory.mktemp("engine-local")
    names = ["s1", "s2", "s3"]
    scenarios = {n: Scenario(name=n, probe=lambda rng: None, train=lambda seed: None) for n in names}
    envs = {f"env-{i}": {"env": {"ENGINE_TEST_ENV": str(i)}} for i in range(ENVIRONMENTS)}  # a process each
    envs["too-big"] = {"num_cpus": CORES + 1}
    sweep = parse_sweep({"name": "engine-local", "scenarios": names, "formats": ["keras"], "storage": str(tmp / "store"),
                         "environments": envs, "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 120}},
                        source="engine-local.yaml")
    res = run_sweep(sweep, scenarios, out_dir=tmp / "run", worker_cls=TimedWorker)
    busy = [json.loads(line) for log in sorted((tmp / "store" / "busy").glob("*.jsonl"))
            for line in log.read_text().splitlines()]
    return res, busy


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_every_cell_has_one_row_and_the_embedded_ray_is_stopped(timed_run):
    res, _ = timed_run
    rows = res.table.to_pylist()
    assert len(rows) == 3 * (ENVIRONMENTS + 1)
    assert len({(r["scenario"], r["environment"]) for r in rows}) == len(rows)
    assert {r["verdict"] for r in rows if r["environment"] != "too-big"} == {"bitwise"}
    assert not ray.is_initialized()
    assert engine.local_cores() is None


def test_placement_is_judged_against_the_machines_cores_not_rays_room(timed_run):
    res, _ = timed_run
    big = [r for r in res.table.to_pylist() if r["environment"] == "too-big"]
    assert {r["verdict"] for r in big} == {"unschedulable"}
    assert all("CPU" in r["error"] for r in big), big[0]["error"]


def test_busy_workers_never_exceed_the_cores(timed_run):
    _, busy = timed_run
    training_end = max(b["end"] for b in busy if b["what"] == "train")
    while_training = [(b["start"], b["end"]) for b in busy if b["start"] < training_end]
    assert _max_overlap(while_training) <= CORES
    assert _max_overlap([(b["start"], b["end"]) for b in busy]) <= CORES + 1  # the last lane to start may share


def test_environments_import_while_training_runs(timed_run):
    """Warm workers waiting for artifacts hold no core: more lanes than the cores left beside training warm up."""
    _, busy = timed_run
    training_end = max(b["end"] for b in busy if b["what"] == "train")
    warm_before = {b["lane"] for b in busy if b["what"] == "warm" and b["lane"] != "training" and b["end"] < training_end}
    assert len(warm_before) > CORES - 1, (warm_before, busy)


def test_shutdown_kills_the_idle_autoscaler_monitor_instead_of_waiting_for_it():
    """Ray's monitor answers SIGTERM by calling the GCS ray.shutdown() already stopped (1 s lost per run)."""
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    if ray.is_initialized():
        ray.shutdown()
    assert engine.connect("local", verbose=False)
    try:
        monitors = [info.process for info in
                    ray_worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])]
        assert monitors, "Ray no longer starts an autoscaler monitor for ray.init(): drop engine.stop_autoscaler_monitor"
        engine.stop_autoscaler_monitor()
        assert [p.returncode for p in monitors] == [-9]
    finally:
        engine.disconnect()
    assert not ray.is_initialized()


class PingWorker(Worker):
    """A worker that answers with its process id (no TensorFlow)."""

    def ping(self, job) -> int:
        return os.getpid()


def _gone(pid: int, timeout_s: float = 60.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_call_in_environments_stops_every_worker_when_one_cannot_be_created(tmp_path):
    """One creation raising used to leak the workers already created (and raise instead of answering)."""
    from harness.spec import Environment

    if ray.is_initialized():
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    first, last = (Environment(name=n, env={"ENGINE_TEST_PING": n}) for n in ("first", "last"))
    refused = first.model_copy(update={"name": "refused", "num_cpus": -1.0})  # Ray refuses it at .options()
    with engine.session("local"):
        answers = engine.call_in_environments([(first, "ping", None), (refused, "ping", None), (last, "ping", None)],
                                              {}, str(tmp_path), timeout_s=120, worker_cls=PingWorker)
        assert isinstance(answers[0], int) and isinstance(answers[2], int), answers
        assert isinstance(answers[1], Exception) and "num_cpus" in str(answers[1]), answers[1]
        assert _gone(answers[0]) and _gone(answers[2]), "a worker outlived call_in_environments"
