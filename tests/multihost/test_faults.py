"""Faults on real hosts (the multi-host rig): every failure is a row or a one-line error, never a hang.

* one run on fresh storage through three faults: the S3 server stopped for 10 s while
  training uploads (SIGSTOP/SIGCONT: an outage that loses no data), its link cut for
  10 s while a cell writes, then the driver SIGKILLed mid-run and the run resumed from
  another host with ``--resume --run-id`` through storage alone: storage calls wait and
  go on, no ``corrupt`` or ``error`` verdict, no half-written artifact visible, the
  finished cells kept, one row per cell;
* a host's link cut for 30 s, then restored: one row per cell, within the sweep's timeouts;
* every process of a replay host SIGKILLed while its cell runs: the cell is retried
  on another host whose labels fit; a cell no other host can take is
  ``unschedulable`` naming the lost host; exactly one row per cell.

Cells of ``test-slow-build`` (tests/scenarios/slow.py) wait at a *gate* until the
test opens it for their node, and leave a *marker* saying which node builds
which environment: faults hit a cell that is really running, without racing a
clock. Gates and markers live in the rig's shared control directory; the
harness's own data (artifacts, results) travels only through S3.
"""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import pytest

from drive import (RUN_LINE, TEST_SCENARIOS, explain, harness, markers, progress_lines, published, run_id_of,
                   wait_for, write_sweep)

pytestmark = pytest.mark.multihost

TRAINING = {"resources": {"train": 1}, "label_selector": {"node-role": "train"}}
REPLAY_HOSTS = ("replay-a", "replay-b")


def _gated_sweep(rig, name: str, scenarios=("test-slow-build",), **timeouts) -> tuple[Path, Path, Path]:
    """``scenarios`` x weights x {pool (either replay host), pinned-a, pinned-b}, half a CPU each; the cells
    of test-slow-build wait at a gate.

    Returns (sweep file, gate directory, marker directory).
    """
    gate, marks = rig.shared / f"{name}-gate", rig.shared / f"{name}-markers"
    for d in (gate, marks):
        d.mkdir(mode=0o777)
    env = {"HARNESS_TEST_BUILD_GATE": str(gate), "HARNESS_TEST_MARKER_DIR": str(marks)}
    doc = {"name": name, "scenarios": list(scenarios), "formats": ["weights"], "training": TRAINING,
           "expect": "tolerance", "retries": 2,
           # schedule_timeout_s counts a worker's start and TensorFlow import: 90 s on a busy 2-core machine.
           "timeouts": {"schedule_timeout_s": 90, "cell_timeout_s": 180, "train_timeout_s": 300, **timeouts},
           "environments": {
               "pool": {"num_cpus": 0.5, "label_selector": {"node-role": "replay"}, "env": env},
               "pinned-a": {"num_cpus": 0.5, "label_selector": {"node-role": "replay", "cpu": "native"}, "env": env},
               "pinned-b": {"num_cpus": 0.5, "label_selector": {"node-role": "replay", "cpu": "avx2"}, "env": env}}}
    return write_sweep(rig, name, doc), gate, marks


def _start_driver(rig, host: str, sweep: Path, out: str, log: str, *extra: str, prefix: str = "faults"):
    """``harness run`` of ``sweep`` in the background on ``host``, into storage ``prefix`` of the rig's S3."""
    return rig.spawn(host, ["harness", "run", str(sweep), "--address", "auto" if host == "head" else rig.gcs_address,
                            "--storage", rig.storage_uri(prefix), "--scenarios-path", str(TEST_SCENARIOS),
                            "--out", out, *extra], log)


def _finish(rig, driver, timeout: float, log: Path) -> str:
    try:
        driver.wait(timeout=timeout)
    except Exception:
        rig.signal(driver, signal.SIGKILL)
        driver.wait(timeout=10)
        raise AssertionError(f"the driver did not finish within {timeout:g}s (a hang):\n{log.read_text()[-4000:]}")
    return log.read_text()


def _all_building(marks: Path, envs=("pool", "pinned-a", "pinned-b")):
    found = markers(marks)
    return found if all(e in found for e in envs) else None


def _rows_by_env(rig, output: str, prefix: str = "faults") -> dict[str, dict]:
    rows = published(rig, run_id_of(output), prefix).to_pylist()
    by_env = {r["environment"]: r for r in rows}
    assert len(rows) == len(by_env), f"more than one row for a cell: {[r['environment'] for r in rows]}"
    return by_env


# -- S3 stopped, S3 cut off, then the driver lost: one run, nothing lost ------------------------------------
def _artifact_objects(rig, prefix: str) -> list[str]:
    from harness.storage import Storage

    try:
        return Storage.open(rig.storage_uri(prefix)).walk_files("artifacts")
    except Exception:  # noqa: BLE001 -- not there yet
        return []


def _published_rows(rig, run_id: str, prefix: str) -> int:
    try:
        return published(rig, run_id, prefix).num_rows
    except FileNotFoundError:
        return 0


def test_s3_outages_then_the_drivers_loss_cost_nothing(healthy, tmp_path):
    """One run on fresh storage (so training uploads during it), through three faults in turn:

    1. the S3 server stopped for 10 s as the first artifact file lands: the uploads wait and go on;
    2. S3's link cut for 10 s while replay-a's gated cell finishes and writes its outputs;
    3. the driver (on the head) SIGKILLed while replay-b's cell still runs; another host resumes
       the run with ``--resume --run-id``, from storage alone (its own disk, nothing shared).

    Exactly one row per cell, none ``corrupt`` or ``error``, the cells finished before the kill
    kept, and no half-written artifact visible.
    """
    rig = healthy
    prefix = f"outage-{secrets.token_hex(2)}"
    sweep, gate, marks = _gated_sweep(rig, f"s3-{secrets.token_hex(2)}",
                                      scenarios=("seed-linear-regression", "test-slow-build"))
    only = ("--only", "pinned-a", "pinned-b")
    log = rig.logfile("driver-s3.log")
    driver = _start_driver(rig, "head", sweep, "/tmp/home/run-s3", log.name, *only, prefix=prefix)
    run_id = wait_for(lambda: (m := RUN_LINE.search(log.read_text())) and m.group(1), 300, "the run's first line",
                      driver=driver, log=log)
    wait_for(lambda: _artifact_objects(rig, prefix), 300, "the first artifact file in S3", interval=0.05,
             driver=driver, log=log)
    with rig.s3_outage():
        time.sleep(10)
    wait_for(lambda: _all_building(marks, ("pinned-a", "pinned-b")), 300, "test-slow-build's cells to be building",
             driver=driver, log=log)
    rig.cut("s3")  # packets to and from S3 are dropped: requests wait (TCP retransmits) until the link is back
    try:
        (gate / rig.node_ids()["replay-a"]).write_text("go")  # its cell finishes and writes during the cut
        time.sleep(10)
    finally:
        rig.restore("s3")
    # Three cells done, in storage within seconds of finishing; replay-b's still waits at the gate.
    wait_for(lambda: _published_rows(rig, run_id, prefix) >= 3, 300, "three finished cells in storage",
             driver=driver, log=log)
    rig.signal(driver, signal.SIGKILL)
    driver.wait(timeout=30)
    assert len(progress_lines(log.read_text())) == 3, "replay-b's cell must still be running when the driver dies"
    (gate / "all").write_text("go")

    proc = harness(rig, "replay-a", "run", sweep, "--address", rig.gcs_address, "--storage", rig.storage_uri(prefix),
                   "--scenarios-path", TEST_SCENARIOS, "--out", "/tmp/home/resumed", *only, "--resume", "--run-id",
                   run_id, timeout=600)
    assert proc.returncode == 0, explain(proc)
    assert run_id_of(proc.stdout) == run_id, "the resumed run keeps its run id"
    ran = [(m.group(1), m.group(3), m.group(5)) for m in progress_lines(proc.stderr)]
    assert ran == [("4", "test-slow-build", "pinned-b")], explain(proc)  # the three finished cells are kept
    rows = published(rig, run_id, prefix).to_pylist()
    assert len(rows) == len({(r["scenario"], r["environment"]) for r in rows}) == 4, rows
    assert {r["run_id"] for r in rows} == {run_id}
    for row in rows:  # an outage is not damage, nor an error
        assert row["verdict"] in ("bitwise", "within_tolerance"), (row["scenario"], row["environment"], row["error"])
    # Every artifact that is visible (has its manifest) is whole.
    from harness.storage import Storage

    store = Storage.open(rig.storage_uri(prefix))
    visible = [f.rsplit("/", 1)[0] for f in _artifact_objects(rig, prefix) if f.endswith("/manifest.json")]
    assert len(visible) == 2
    for rel in visible:
        store.get_dir(rel, cache_root=tmp_path / "cache")  # raises CorruptArtifact naming a bad file


# -- a host partitioned for 30 s ----------------------------------------------------------------------
def test_a_partitioned_host_costs_no_hang_and_one_row_per_cell(healthy):
    rig = healthy
    sweep, gate, marks = _gated_sweep(rig, f"partition-{secrets.token_hex(2)}", cell_timeout_s=120)
    nodes = rig.node_ids()
    driver = _start_driver(rig, "head", sweep, "/tmp/home/run-partition", "driver-partition.log")
    building = wait_for(lambda: _all_building(marks), 300, "the three cells to be building on the replay hosts",
                        driver=driver, log=rig.logfile("driver-partition.log"))
    victim = {nodes[h]: h for h in REPLAY_HOSTS}[building["pool"][0]]
    survivor = next(h for h in REPLAY_HOSTS if h != victim)
    cut_at = time.time()
    rig.cut(victim)
    try:
        (gate / nodes[survivor]).write_text("go")
        time.sleep(max(0.0, 30 - (time.time() - cut_at)))
    finally:
        rig.restore(victim)
    # The GCS may declare the victim's node dead during the cut (its cells are retried elsewhere or
    # become unschedulable) or only later, or not at all (its cells finish once their gate opens).
    (gate / "all").write_text("go")
    try:
        # Bound: the cut, then a lost cell's retry waiting for a host (schedule_timeout_s) or a cell
        # stuck on the cut host (cell_timeout_s), with room for a loaded machine.
        output = _finish(rig, driver, 30 + 90 + 120 + 60, rig.logfile("driver-partition.log"))
    finally:
        rig.suspect(victim)  # a node that lived through the cut may still be declared dead later
    rows = _rows_by_env(rig, output)
    host_of = {node: host for host, node in nodes.items()}
    seen = {env: (host_of.get(r["node_id"]), r["attempts"], r["verdict"], r["error"]) for env, r in rows.items()}
    assert set(rows) == {"pool", "pinned-a", "pinned-b"}, output[-3000:]
    assert rows["pool"]["verdict"] in ("bitwise", "within_tolerance"), (victim, seen)
    for env, row in rows.items():
        assert row["verdict"] != "corrupt", (victim, seen)


# -- a replay host killed mid-cell (last: the rig need not be whole again after it) -------------------
@pytest.fixture(scope="module")
def host_killed(rig):
    rig.ensure_healthy()
    sweep, gate, marks = _gated_sweep(rig, f"host-loss-{secrets.token_hex(2)}")
    nodes = rig.node_ids()
    driver = _start_driver(rig, "head", sweep, "/tmp/home/run-host-loss", "driver-host-loss.log")
    building = wait_for(lambda: _all_building(marks), 300, "the three cells to be building on the replay hosts",
                        driver=driver, log=rig.logfile("driver-host-loss.log"))
    host_of = {nodes[h]: h for h in REPLAY_HOSTS}
    victim = host_of[building["pool"][0]]
    survivor = next(h for h in REPLAY_HOSTS if h != victim)
    rig.kill_host(victim)
    (gate / nodes[survivor]).write_text("go")  # only the survivor's cells may pass
    output = _finish(rig, driver, 90 + 180, rig.logfile("driver-host-loss.log"))
    return _rows_by_env(rig, output), nodes, victim, survivor, output


def test_a_killed_hosts_cell_is_retried_on_another_host_whose_labels_fit(host_killed):
    rows, nodes, victim, survivor, output = host_killed
    assert set(rows) == {"pool", "pinned-a", "pinned-b"}, output[-3000:]
    pool = rows["pool"]
    assert pool["verdict"] in ("bitwise", "within_tolerance"), (pool["error"], output[-3000:])
    assert pool["node_id"] == nodes[survivor] and pool["attempts"] >= 2, (victim, survivor, pool["attempts"])
    pinned = rows[f"pinned-{survivor[-1]}"]
    assert pinned["verdict"] in ("bitwise", "within_tolerance") and pinned["node_id"] == nodes[survivor]


def test_a_killed_hosts_cell_no_other_host_fits_is_unschedulable(host_killed):
    rows, _, victim, _, output = host_killed
    lost = rows[f"pinned-{victim[-1]}"]
    assert lost["verdict"] == "unschedulable", (lost["error"], output[-3000:])


def test_the_unschedulable_cell_names_the_lost_host(host_killed, rig):
    rows, nodes, victim, _, _ = host_killed
    error = rows[f"pinned-{victim[-1]}"]["error"]
    assert rig.hosts[victim].ip in error or nodes[victim][:12] in error, error


