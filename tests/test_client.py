"""``harness run --address ray://...``: a real sweep through Ray Client, which has no streaming actor calls.

As in Ray's own tests (``ray.util.client.ray_client_helpers``), this process
starts a private local Ray and a Ray Client server in front of it on a free
port; the harness CLI runs in a subprocess and connects to
``ray://127.0.0.1:PORT``, shipping its own code (``py_modules``). The engine
then sends one job per plain actor call instead of streaming batches.

Not the proxy server a head node runs: it starts a "specific server" per
client on a port of a fixed machine-wide range (23000-24000), which other
sessions on a shared machine use too. The in-process server lacks only the
call that pins an uploaded package, added here as the proxy server does it, and
serves every client with its own job, so that job gets the runtime_env the
harness ships (its own code).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

import harness
from test_cli import RUN_TIMEOUT, explain as explain_proc, run_cli, write_sweep


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client_address():
    from ray.core.generated import ray_client_pb2
    from ray.experimental import internal_kv
    from ray.util.client.server import server as client_server

    def pin(self, request, context):  # what the proxy server does (ray.util.client.server.proxier)
        internal_kv._pin_runtime_env_uri(request.uri, expiration_s=request.expiration_s)
        return ray_client_pb2.ClientPinRuntimeEnvURIResponse()

    if ray.is_initialized():  # another module's Ray: the client server fronts a cluster of its own
        ray.shutdown()
    # The job's runtime_env must be the one clients ask for: the harness's code, as `harness run` ships it.
    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0, log_to_driver=False,
             logging_level="ERROR", runtime_env={"py_modules": [str(Path(harness.__file__).resolve().parent)]})
    patch = pytest.MonkeyPatch()
    patch.setattr(client_server.RayletServicer, "PinRuntimeEnvURI", pin, raising=False)
    port = _free_port()
    server = client_server.serve("127.0.0.1", port)  # connects clients to the Ray this process started
    try:
        yield f"ray://127.0.0.1:{port}"
    finally:
        server.stop(0)
        patch.undo()
        ray.shutdown()


def test_a_sweep_runs_through_ray_client_with_one_row_per_cell(client_address, tmp_path):
    doc = {"name": "client", "storage": str(tmp_path / "store"), "scenarios": ["seed-linear-regression"],
           "formats": ["keras", "h5"], "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180},
           # cpu-default twice, in two worker processes (the second on a slot of its own)
           "environments": {"cpu-default": {"expect": "bitwise", "repeats": 2},
                            "cpu-batch-1": {"batch_size": 1, "expect": "any"},
                            "needs-gpu": {"num_gpus": 1, "optional": True}}}
    write_sweep(tmp_path, "sweep.yaml", doc)
    proc = run_cli("run", "sweep.yaml", "--address", client_address, "--out", tmp_path / "run", cwd=tmp_path,
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain_proc(proc)
    assert "Streaming actor methods" not in proc.stderr
    rows = {(r["format"], r["environment"]): r for r in pq.read_table(tmp_path / "run" / "results.parquet").to_pylist()}
    assert len(rows) == 6
    for fmt in ("keras", "h5"):
        same = rows[(fmt, "cpu-default")]
        assert same["verdict"] == "bitwise" and same["passed"] and same["attempts"] == 2, same["error"]
        assert same["manifest_sha256"] and json.loads(same["fingerprint"])["environment"] == "cpu-default"
        assert (same["repeats"], same["flaky"], same["repeat_spread_ulp"]) == (2, False, 0.0)
        pids = [r["pid"] for r in json.loads(same["detail"])["repeats"]]
        assert len(set(pids)) == 2 and None not in pids, pids  # one plain call per repeat, in two processes
        batch = rows[(fmt, "cpu-batch-1")]
        assert batch["verdict"] in ("bitwise", "within_tolerance", "mismatch") and batch["repeats"] == 1
        assert json.loads(batch["fingerprint"])["pid"] == pids[0]  # it shares the first repeat's worker
        gpu = rows[(fmt, "needs-gpu")]  # the precheck (ray.nodes() through the client) decided it
        assert gpu["verdict"] == "unschedulable" and "missing GPU >= 1" in gpu["error"] and gpu["passed"] is None
