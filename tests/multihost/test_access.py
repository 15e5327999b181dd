"""Every way to reach a cluster, on hosts that share no disk (the multi-host rig).

* ``ray job submit`` from another machine (this, the root, namespace): the driver
  runs on the head, a node of the cluster, with ``--address auto``; the run
  directory lands in storage and ``harness report s3://.../runs/RUN_ID`` works here;
* ``harness run --address ray://HEAD:10001`` (Ray Client) from this machine;
* a storage path only the driver can see is refused before anything runs (exit 2).

Each cell must run on the host its environment's labels select, and every
host fetches artifacts into its own cache: nothing travels through a shared disk.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drive import MATRIX, explain, harness, progress_lines, published, run_id_of
from harness import isa
from rig import DUMMY_AWS, VENV_BIN

pytestmark = pytest.mark.multihost

RUN_TIMEOUT = 600
HOST_OF_ENV = {"native": "replay-a", "native-xla": "replay-a", "avx2-host": "replay-b"}


def _root_env() -> dict[str, str]:
    """The environment of a process on this machine (outside the rig) that reaches the rig's S3 and Ray."""
    env = {**os.environ, **DUMMY_AWS, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _root_harness(*args, cwd, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=cwd, env=_root_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_hosts_share_no_local_disk(healthy):
    rig = healthy
    token = secrets.token_hex(4)
    rig.run("train", ["sh", "-c", f"echo {token} > /tmp/{token} && echo {token} > $HOME/{token}"], timeout=30,
            check=True)
    assert rig.run("train", ["cat", f"/tmp/{token}", f"/tmp/home/{token}"], timeout=30).stdout.split() == [token] * 2
    for host in ("head", "replay-a", "replay-b", "s3"):
        assert rig.run(host, ["ls", f"/tmp/{token}", f"/tmp/home/{token}"], timeout=30).returncode != 0, host
    assert not Path(f"/tmp/{token}").exists()
    # Each host has its own Ray session directory: the GCS's logs are on the head only.
    gcs_log = "ls /tmp/ray/session_latest/logs/gcs_server.out"
    assert rig.run("head", ["sh", "-c", gcs_log], timeout=30).returncode == 0
    assert rig.run("train", ["sh", "-c", gcs_log], timeout=30).returncode != 0


# -- ray job submit from this machine: the driver runs on the head, --address auto ----------------
@pytest.fixture(scope="module")
def job_run(rig, tmp_path_factory):
    """The rig's matrix sweep submitted from this machine with ``ray job submit``: its driver runs on the
    head (a node of the cluster) with ``--address auto``. (process, run id, published rows, host -> node id)."""
    rig.ensure_healthy()
    work = tmp_path_factory.mktemp("job")
    shutil.copy(MATRIX, work / "matrix.yaml")
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", f"--address={rig.dashboard_url}", f"--working-dir={work}", "--",
         "harness", "run", "matrix.yaml", "--address", "auto", "--storage", rig.storage_uri()],
        cwd=work, env=_root_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    run_id = run_id_of(proc.stdout)
    return proc, run_id, published(rig, run_id).to_pylist(), rig.node_ids()


def test_a_job_runs_each_cell_on_the_host_its_labels_select(job_run):
    proc, _, rows, nodes = job_run
    assert "12 cells:" in proc.stdout and "12 passed, 0 failed expectations" in proc.stdout, explain(proc)
    assert len(progress_lines(proc.stdout)) == 12  # the job's log: the driver's stdout and stderr
    assert len(rows) == 12 and len({(r["scenario"], r["format"], r["environment"]) for r in rows}) == 12
    for row in rows:
        host = HOST_OF_ENV[row["environment"]]
        assert row["node_id"] == nodes[host], (row["environment"], row["node_id"], nodes)
        fp = json.loads(row["fingerprint"])
        assert "runtime_resources" in fp["harness_path"], "the harness reached the worker through Ray (py_modules)"
        assert json.loads(row["train_fingerprint"])["ray_node_id"] == nodes["train"]
        if row["environment"] == "native":  # same CPU and settings as training, another host
            assert row["verdict"] == "bitwise" and row["weights_equal"], row["error"]
        if row["environment"] == "avx2-host":  # the node's own environment makes it compute as an AVX2 machine
            capped = "avx2" if isa.includes(fp["cpu_isa_native"], "avx2") else fp["cpu_isa_native"]
            assert fp["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and fp["onednn"] is True
            assert fp["onednn_max_isa"] == capped
            assert row["verdict"] in ("bitwise", "within_tolerance"), row["error"]


def test_every_replay_host_fetched_artifacts_into_its_own_cache(job_run, rig):
    cache = "/tmp/home/.cache/tf-repro-harness/artifacts"
    for host in ("replay-a", "replay-b"):
        listed = rig.run(host, ["ls", cache], timeout=30)
        assert listed.returncode == 0 and listed.stdout.split(), f"{host}: {listed.stderr}"
    assert rig.run("head", ["ls", cache], timeout=30).returncode != 0, "the driver fetched no artifact"


def test_the_job_lands_the_run_in_storage_and_another_machine_reports_it(job_run, rig, tmp_path):
    run_id = job_run[1]
    from harness.storage import Storage

    store = Storage.open(rig.storage_uri())
    for name in ("results.parquet", "report.md", "run.json"):
        assert store.exists(f"runs/{run_id}/{name}"), name
    assert json.loads(store.read_bytes(f"runs/{run_id}/run.json"))["run_id"] == run_id
    assert not store.exists(f"runs/{run_id}/journal"), "journal segments go once results.parquet is there"
    base, query = rig.storage_uri().split("?", 1)
    proc = _root_harness("report", f"{base}/runs/{run_id}?{query}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, explain(proc)
    assert f"Run {run_id}" in proc.stdout and "12 passed, 0 failed expectations" in proc.stdout
    report = _root_harness("report", f"{base}/runs/{run_id}?{query}", "--format", "json", cwd=tmp_path, timeout=120)
    assert report.returncode == 0, explain(report)
    doc = json.loads(report.stdout)
    assert doc["summary"]["cells"] == 12 and doc["summary"]["passed"] == 12


# -- ray:// (Ray Client), from this machine ------------------------------------------------------
def test_ray_client_driver_gets_results_and_report_on_its_own_disk(healthy, tmp_path):
    rig = healthy
    out = tmp_path / "out"
    proc = _root_harness("run", MATRIX, "--address", rig.client_address, "--storage", rig.storage_uri(),
                         "--out", out, "--only", "avx2-host", cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    assert len(progress_lines(proc.stderr)) == 4, explain(proc)  # each cell one plain call, reported as it ends
    from harness import results

    table = results.read_table(out)
    assert table.num_rows == 4 and (out / "report.md").exists()
    assert set(table.column("node_id").to_pylist()) == {rig.node_ids()["replay-b"]}
    assert published(rig, run_id_of(proc.stdout)).num_rows == 4


# -- storage the hosts cannot see -------------------------------------------------------------------
def test_local_storage_the_hosts_cannot_see_is_refused_before_anything_runs(healthy):
    rig = healthy
    proc = harness(rig, "head", "run", MATRIX, "--address", "auto", "--storage", "/tmp/home/store-on-the-head",
                   "--out", "/tmp/home/run-reach", timeout=RUN_TIMEOUT)
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, explain(proc)
    worker_ips = {rig.hosts[h].ip for h in ("train", "replay-a", "replay-b")}
    assert any(f"host {ip} " in errors[0] for ip in worker_ips), errors[0]
    assert "storage /tmp/home/store-on-the-head: " in errors[0] and "cannot read a file the driver just wrote" \
        in errors[0]
    assert not progress_lines(proc.stderr), "no cell may run"
    # Nothing was trained into it either: the driver's copy holds no artifact.
    assert rig.run("head", ["ls", "/tmp/home/store-on-the-head/artifacts"], timeout=30).returncode != 0
