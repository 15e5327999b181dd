"""A heterogeneous multi-node Ray cluster on one machine (ray.cluster_utils.Cluster).

Nodes: a head with no CPUs, a training node, two CPU nodes of different
"families" (labels), and one node declaring a fake A10G GPU. Storage is S3
(moto's server on 127.0.0.1), so artifacts really travel through shared
storage and each worker verifies its cached copy.
"""

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from harness import isa
from harness.envs import survey
from harness.spec import parse_sweep
from harness.storage import Storage
from harness.sweep import run_sweep
from harness.worker import Worker

pytestmark = pytest.mark.cluster
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    # Nodes inherit this environment: S3 credentials and a cache dir per test run.
    os.environ["HARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HARNESS_TEST_MARKER_DIR"] = str(tmp_path_factory.mktemp("markers"))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {
        "train": c.add_node(num_cpus=1, resources={"train": 1}, labels={"node-role": "train", "cpu-family": "intel"}),
        "intel": c.add_node(num_cpus=1, labels={"node-role": "replay", "cpu-family": "intel"}),
        "amd": c.add_node(num_cpus=1, labels={"node-role": "replay", "cpu-family": "amd"}),
        "a10g": c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10G": 1},
                           labels={"node-role": "replay", "gpu": "a10g"}),
    }
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    for k in ("HARNESS_CACHE", "HARNESS_TEST_MARKER_DIR"):
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def node_ids(cluster):
    c, nodes = cluster
    return {name: n.node_id for name, n in nodes.items()}



@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.make_bucket("harness-cluster")
    return s3_server


def _sweep(doc):
    return parse_sweep(yaml.safe_load(yaml.safe_dump(doc)), source="cluster-test.yaml")


MATRIX = {
    "name": "cluster-matrix",
    "scenarios": ["seed-binary-classifier"],
    "formats": ["keras", "savedmodel"],
    "training": {"resources": {"train": 1}, "label_selector": {"node-role": "train"}},
    "precheck": False,  # exercise the schedule timeout, as on an autoscaling cluster
    "timeouts": {"schedule_timeout_s": 20, "cell_timeout_s": 180},
    "environments": {
        "intel": {"label_selector": {"cpu-family": "intel", "node-role": "replay"}, "expect": "bitwise"},
        "amd": {"label_selector": {"cpu-family": "in(amd,arm)"}, "expect": "bitwise"},
        "not-amd-cpu": {"label_selector": {"cpu-family": "!amd", "node-role": "replay", "gpu": "!a10g"}},
        "a10g": {"num_gpus": 1, "accelerator_type": "A10G", "tf32": False},
        "h100": {"num_gpus": 1, "accelerator_type": "H100"},
    },
}


@pytest.fixture(scope="module")
def matrix_run(cluster, scenarios, bucket, tmp_path_factory):
    c, _ = cluster
    out = tmp_path_factory.mktemp("run")
    storage = bucket.uri("harness-cluster", "store")
    # Ray puts the driver's cwd first on workers' sys.path; drive from outside
    # the checkout, as on a real cluster, so the py_modules upload is what runs.
    cwd = os.getcwd()
    os.chdir(out)
    try:
        res = run_sweep(_sweep(MATRIX), scenarios, out_dir=out, storage=storage, address=c.address)
    finally:
        os.chdir(cwd)
    return res, storage


def _rows(res, env):
    return [r for r in res.table.to_pylist() if r["environment"] == env]


def test_each_cell_ran_on_the_node_its_environment_selected(matrix_run, node_ids):
    res, _ = matrix_run
    assert res.table.num_rows == 2 * 5
    for env, node in (("intel", "intel"), ("amd", "amd"), ("not-amd-cpu", "intel")):
        for row in _rows(res, env):
            assert row["verdict"] == "bitwise" and row["passed"], row["error"]
            assert row["node_id"] == node_ids[node], f"{env} ran on the wrong node"
            labels = json.loads(row["node_labels"])
            # The harness reached the worker through Ray (py_modules), not a local install.
            assert "runtime_resources" in json.loads(row["fingerprint"])["harness_path"]
            assert labels["cpu-family"] == ("amd" if node == "amd" else "intel")
    train_fp = json.loads(_rows(res, "intel")[0]["train_fingerprint"])
    assert train_fp["ray_node_id"] == node_ids["train"]
    assert train_fp["ray_node_labels"]["node-role"] == "train"


def test_gpu_environment_on_a_node_without_cuda_is_a_clear_error(matrix_run, node_ids):
    res, _ = matrix_run
    for row in _rows(res, "a10g"):
        assert row["node_id"] == node_ids["a10g"]
        fp = json.loads(row["fingerprint"])
        assert fp["env"]["CUDA_VISIBLE_DEVICES"] == "0"  # Ray assigned the fake node's GPU 0
        if fp["tf_cuda_build"] and fp["gpus"]:
            continue  # a real GPU behind the fake node: the cell really ran on it
        assert row["verdict"] == "error" and not row["passed"]
        assert "asked for 1 GPU(s) but TensorFlow" in row["error"] and "CUDA_VISIBLE_DEVICES='0'" in row["error"]


def test_environment_no_node_can_host_times_out_as_unschedulable(matrix_run):
    res, _ = matrix_run
    for row in _rows(res, "h100"):
        assert row["verdict"] == "unschedulable"
        assert "schedule_timeout_s=20" in row["error"] and "accelerator_type=H100" in row["error"]


def test_artifacts_and_observations_live_in_s3(matrix_run):
    res, storage = matrix_run
    st = Storage.open(storage)
    files = st.walk_files("")
    assert any(f.startswith("artifacts/seed-binary-classifier/") and f.endswith("manifest.json") for f in files)
    obs = [f for f in files if f.startswith(f"runs/{res.run_id}/observations/")]
    assert f"runs/{res.run_id}/results.parquet" in files
    published = pq.read_table(pa.BufferReader(st.read_bytes(f"runs/{res.run_id}/results.parquet")))
    assert published.num_rows == res.table.num_rows and res.results_uri.startswith("s3://harness-cluster/store/runs/")
    assert len(obs) == 6  # intel, amd, not-amd-cpu x 2 formats; no observation for error/unschedulable
    for row in _rows(res, "amd"):
        assert row["artifact_uri"].startswith("s3://harness-cluster/store/artifacts/")
    assert any(Path(os.environ["HARNESS_CACHE"]).iterdir()), "workers fetch into the local digest cache"


def test_envs_lists_nodes_fingerprints_and_hostable_environments(cluster, matrix_run, node_ids):
    if not ray.is_initialized():
        ray.init(address=cluster[0].address, log_to_driver=False)
    nodes = {n["node_id"]: n for n in survey(_sweep(MATRIX))}
    assert set(node_ids.values()) <= set(nodes)
    assert nodes[node_ids["amd"]]["labels"]["cpu-family"] == "amd"
    assert nodes[node_ids["amd"]]["environments"] == ["amd"]
    assert nodes[node_ids["train"]]["environments"] == ["training"]
    assert nodes[node_ids["a10g"]]["environments"] == ["a10g"]
    for n in nodes.values():
        fp = n["fingerprint"]
        assert fp["tf_version"] and fp["ray_node_id"] == n["node_id"]
        # What the node can stand in for follows from its own CPU flags, whatever this machine is.
        assert n["cpu_isa"] == isa.supported(fp["cpu_flags"]) and "sse41" in n["cpu_isa"]
        assert fp["onednn_default"] == isa.onednn_default(fp["cpu_flags"])


class FirstNodeLacksIsa(Worker):
    """A worker whose ``cpu_isa`` check fails on the first node that asks (one file per run says which).

    The CPUs of this machine's fake nodes are all the same; this stands in for
    a cluster where one node's CPU lacks the instruction set and another has it.
    """

    def missing_isa(self):
        from harness import fingerprint

        if not getattr(self.environment, "cpu_isa", None):
            return None  # the training worker warms too, maybe first: only the isa environment claims a node
        node = fingerprint.ray_info()["ray_node_id"]
        claim = Path(os.environ["HARNESS_TEST_MARKER_DIR"]) / "isa-node"
        try:
            with open(claim, "x") as f:
                f.write(node)
        except FileExistsError:
            pass
        lacking = claim.read_text() == node
        return "cpu_isa 'sse41' needs CPU flags sse4_1 that this node's CPU (test) lacks" if lacking else None


def test_a_cpu_isa_one_node_lacks_is_retried_on_another_node(cluster, node_ids, scenarios, bucket, tmp_path):
    """The first node Ray picks cannot emulate it: the cell runs on another node that can, not unschedulable."""
    from ray import cloudpickle
    import sys

    c, _ = cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class travels by value
    marker_dir = Path(os.environ["HARNESS_TEST_MARKER_DIR"])
    (marker_dir / "isa-node").unlink(missing_ok=True)
    sweep = _sweep({"name": "isa-retry", "scenarios": ["seed-linear-regression"], "formats": ["keras"],
                    "training": {"resources": {"train": 1}},
                    "timeouts": {"schedule_timeout_s": 60, "cell_timeout_s": 180},
                    "environments": {"isa": {"cpu_isa": "sse41", "expect": "any",
                                             "label_selector": {"node-role": "replay", "gpu": "!a10g"}}}})
    res = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=bucket.uri("harness-cluster", "isa"),
                    address=c.address, worker_cls=FirstNodeLacksIsa)
    (row,) = res.table.to_pylist()
    refused = (marker_dir / "isa-node").read_text()
    assert refused in (node_ids["intel"], node_ids["amd"])
    assert row["verdict"] in ("bitwise", "within_tolerance", "mismatch"), row["error"]
    assert row["node_id"] != refused and row["node_id"] in (node_ids["intel"], node_ids["amd"])


# In `make test` the multi-host rig covers this on real hosts (tests/multihost/test_faults.py::
# test_a_killed_hosts_cell_is_retried_on_another_host_whose_labels_fit); here it runs with
# `make test-slow`, to keep the default suite within its time budget.
@pytest.mark.slow
def test_node_lost_mid_sweep_is_retried_elsewhere_with_one_row(cluster, node_ids, scenarios, bucket, tmp_path):
    c, nodes = cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    # Nodes share one IP here, so the driver may sit on any node's raylet: never
    # kill that one. Select the pool by Ray's default node-id label instead.
    driver_node = ray.get_runtime_context().get_node_id()
    pool = [name for name in ("intel", "amd", "a10g") if node_ids[name] != driver_node][:2]
    marker_dir = Path(os.environ["HARNESS_TEST_MARKER_DIR"])
    for f in marker_dir.iterdir():
        f.unlink()
    gate = tmp_path / "gate"  # the replay cell waits in build() until gate/<its node id> exists
    gate.mkdir()
    sweep = _sweep({
        "name": "node-loss", "scenarios": ["test-slow-build"], "formats": ["weights"],
        "training": {"resources": {"train": 1}}, "retries": 2,
        "timeouts": {"schedule_timeout_s": 60, "cell_timeout_s": 120},
        "environments": {"pool": {
            "label_selector": {"ray.io/node-id": f"in({','.join(node_ids[n] for n in pool)})"},
            "env": {"HARNESS_TEST_BUILD_GATE": str(gate)}, "expect": "bitwise"}},
    })
    box = {}
    runner = threading.Thread(target=lambda: box.update(res=run_sweep(
        sweep, scenarios, out_dir=tmp_path, storage=bucket.uri("harness-cluster", "node-loss"), address=c.address)))
    runner.start()
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:
        started = [f.name.split(".")[0] for f in marker_dir.iterdir()]
        victim = next((name for name in pool if node_ids[name] in started), None)
        time.sleep(0.2)
    assert victim, "the replay cell never started"
    survivor = next(name for name in pool if name != victim)
    (gate / node_ids[survivor]).write_text("go")  # only a retry on the surviving node may pass
    c.remove_node(nodes[victim], allow_graceful=False)  # the cell is still waiting at the gate there
    runner.join(timeout=240)
    assert not runner.is_alive()
    rows = box["res"].table.to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["verdict"] == "bitwise", row["error"]
    assert row["node_id"] == node_ids[survivor] and row["attempts"] >= 2, (victim, survivor, row["attempts"], row["started_at"])


# In `make test` the multi-host rig covers this on real hosts (tests/multihost/test_faults.py::
# test_the_unschedulable_cell_names_the_lost_host); here it runs with `make test-slow`, to keep
# the default suite within its time budget.
@pytest.mark.slow
def test_a_node_lost_with_no_other_node_to_host_its_environment_is_named(cluster, node_ids, scenarios, bucket,
                                                                        tmp_path):
    """Exactly one row, unschedulable, naming the node that was lost."""
    c, nodes = cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    driver_node = ray.get_runtime_context().get_node_id()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    victim = next(name for name in ("amd", "intel", "a10g") if node_ids[name] != driver_node
                  and node_ids[name] in alive)
    marker_dir = Path(os.environ["HARNESS_TEST_MARKER_DIR"])
    for f in marker_dir.iterdir():
        f.unlink()
    gate = tmp_path / "gate"  # never opened: the cell waits there until its node goes
    gate.mkdir()
    sweep = _sweep({
        "name": "node-gone", "scenarios": ["test-slow-build"], "formats": ["weights"],
        "training": {"resources": {"train": 1}}, "retries": 2,
        "timeouts": {"schedule_timeout_s": 60, "cell_timeout_s": 120},
        "environments": {"pinned": {"label_selector": {"ray.io/node-id": node_ids[victim]},
                                    "env": {"HARNESS_TEST_BUILD_GATE": str(gate)}}},
    })
    box = {}
    runner = threading.Thread(target=lambda: box.update(res=run_sweep(
        sweep, scenarios, out_dir=tmp_path / "run", storage=bucket.uri("harness-cluster", "node-gone"),
        address=c.address)))
    runner.start()
    deadline = time.time() + 120
    while not any(f.name.startswith(node_ids[victim]) for f in marker_dir.iterdir()) and time.time() < deadline:
        time.sleep(0.2)
    assert any(f.name.startswith(node_ids[victim]) for f in marker_dir.iterdir()), "the cell never started"
    c.remove_node(nodes[victim], allow_graceful=False)
    runner.join(timeout=240)
    assert not runner.is_alive()
    (row,) = box["res"].table.to_pylist()
    assert row["verdict"] == "unschedulable", (row["verdict"], row["error"])
    assert f"node {node_ids[victim][:12]} was lost" in row["error"] and "no other alive node can host" in row["error"]
