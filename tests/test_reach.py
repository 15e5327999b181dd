"""The storage-reachability check (harness/reach.py): every host that may run cells must read what the driver wrote.

Pure parts (which nodes are asked, the one-line verdict) are tested directly;
the check itself runs on a real multi-node ``ray.cluster_utils.Cluster`` whose
two nodes see S3 at different endpoints (each node's environment names its
own ``AWS_ENDPOINT_URL``): one reaches the moto server, the other reaches
nothing. The multi-host rig (tests/multihost) checks the same on hosts that
share no disk.
"""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from harness import reach
from harness.spec import parse_sweep

SWEEP = parse_sweep(yaml.safe_load("""
name: reach
scenarios: [seed-linear-regression]
training: {resources: {train: 1}}
environments:
  replay: {label_selector: {node-role: replay}}
"""), source="reach.yaml")


def _node(ip: str, node_id: str, cpus: float = 1, labels=None, resources=None, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive,
            "Resources": {"CPU": cpus, **(resources or {})}, "Labels": {"ray.io/node-id": node_id, **(labels or {})}}


HEAD = _node("10.0.0.10", "h" * 56, cpus=0)
TRAIN = _node("10.0.0.11", "t" * 56, resources={"train": 1})
REPLAY = _node("10.0.0.12", "r" * 56, labels={"node-role": "replay"})
OTHER = _node("10.0.0.13", "o" * 56, labels={"node-role": "batch"})
DEAD = _node("10.0.0.14", "d" * 56, labels={"node-role": "replay"}, alive=False)
LOCAL = _node("10.0.0.2", "l" * 56, labels={"node-role": "replay"})


def test_only_alive_nodes_that_may_host_an_environment_off_the_drivers_machine_are_asked():
    asked = reach.nodes_to_check(SWEEP, [HEAD, TRAIN, REPLAY, OTHER, DEAD, LOCAL], driver_address="10.0.0.2")
    assert [n["NodeID"] for n in asked] == [TRAIN["NodeID"], REPLAY["NodeID"]]


def test_verdict_names_the_first_host_that_cannot_read_and_the_fix():
    ok = reach.ProbeResult(TRAIN["NodeID"], "10.0.0.11", digest="abc")
    bad = reach.ProbeResult(REPLAY["NodeID"], "10.0.0.12", error="FileNotFoundError: /tmp/store/.harness-reach/x")
    assert reach.verdict("/tmp/store", "abc", [TRAIN, REPLAY], {TRAIN["NodeID"]: ok}) is None
    line = reach.verdict("/tmp/store", "abc", [TRAIN, REPLAY], {TRAIN["NodeID"]: ok, REPLAY["NodeID"]: bad})
    assert "\n" not in line
    assert line.startswith("storage /tmp/store: host 10.0.0.12 (node rrrrrrrrrrrr, labels node-role=replay)")
    assert "FileNotFoundError" in line and "s3://" in line and "every host that runs cells" in line


def test_verdict_catches_a_host_reading_other_bytes():
    other = reach.ProbeResult(TRAIN["NodeID"], "10.0.0.11", digest="not-abc")
    line = reach.verdict("/data/store", "abc", [TRAIN], {TRAIN["NodeID"]: other})
    assert "host 10.0.0.11" in line and "reads other bytes" in line


@given(st.lists(st.sampled_from(["ok", "missing", "error", "other"]), min_size=1, max_size=6))
def test_verdict_judges_exactly_the_nodes_that_answered_wrong(answers):
    nodes = [_node(f"10.1.0.{i}", f"{i:056d}") for i in range(len(answers))]
    results = {}
    for node, answer in zip(nodes, answers):
        if answer == "ok":
            results[node["NodeID"]] = reach.ProbeResult(node["NodeID"], node["NodeManagerAddress"], digest="d")
        elif answer == "error":
            results[node["NodeID"]] = reach.ProbeResult(node["NodeID"], node["NodeManagerAddress"], error="E: x")
        elif answer == "other":
            results[node["NodeID"]] = reach.ProbeResult(node["NodeID"], node["NodeManagerAddress"], digest="e")
    line = reach.verdict("s3://b/p", "d", nodes, results)
    wrong = [n for n, a in zip(nodes, answers) if a in ("error", "other")]
    if not wrong:
        assert line is None  # a node that did not answer ("missing") is never judged
    else:
        assert f"host {wrong[0]['NodeManagerAddress']} " in line


# -- on a real cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_cluster(s3_server):
    """Two nodes: one sees the moto server through AWS_ENDPOINT_URL, the other an endpoint where nothing listens."""
    import ray
    from ray.cluster_utils import Cluster

    s3_server.make_bucket("reach")
    os.environ["AWS_ENDPOINT_URL"] = s3_server.url  # the driver's view
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    good = c.add_node(num_cpus=1, labels={"node-role": "replay"}, env_vars={"AWS_ENDPOINT_URL": s3_server.url})
    bad = c.add_node(num_cpus=1, resources={"train": 1}, env_vars={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield good.node_id, bad.node_id
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.pop("AWS_ENDPOINT_URL", None)


def test_a_node_that_cannot_reach_the_storage_is_named(split_cluster):
    import ray

    good, bad = split_cluster
    # Every node of this cluster shares the driver's IP: pretend the driver is elsewhere so each is asked.
    nodes = [{**n, "NodeManagerAddress": f"node-{n['NodeID'][:6]}"} for n in ray.nodes()]
    with pytest.raises(reach.StorageUnreachable) as err:
        reach.check_storage_reach("s3://reach/store", SWEEP, nodes, timeout_s=120)
    line = str(err.value)
    assert "\n" not in line and line.startswith("storage s3://reach/store: host node-"), line
    assert bad[:12] in line and good[:12] not in line
    assert "cannot read a file the driver just wrote there" in line


def test_nodes_that_all_read_the_probe_pass_and_it_is_removed(split_cluster, s3_server):
    import ray

    from harness.storage import Storage

    good, _ = split_cluster
    nodes = [{**n, "NodeManagerAddress": "elsewhere"} for n in ray.nodes() if n["NodeID"] == good]
    assert reach.check_storage_reach("s3://reach/store", SWEEP, nodes, timeout_s=120) == []
    assert Storage.open("s3://reach/store").walk_files(reach.PROBE_DIR) == []
    # On the driver's own machine nothing is asked (no task, no probe).
    assert reach.check_storage_reach("s3://reach/store", SWEEP, ray.nodes(), timeout_s=120) == []


def test_a_run_refused_before_any_cell_ran_orders_its_empty_table():
    from harness import results

    order = (SWEEP.scenarios, SWEEP.formats, [e.name for e in SWEEP.environments])
    # Arrow has no take kernel for null indices: an empty table must still be ordered
    assert results.last_row_per_cell(results.SCHEMA.empty_table(), order=order).num_rows == 0
