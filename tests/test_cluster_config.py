"""cluster.yaml is a valid Ray cluster config, and the hardware-matrix sweep fits it.

Offline and fast: no AWS call, no Ray cluster. What `ray up` does and what this
checks of it:

* ``prepare_config`` (merge ``ray/autoscaler/aws/defaults.yaml``, merge setup
  commands, fill per-type min/max workers) and ``validate_config`` (JSON schema
  ``ray-schema.json`` + cross-field checks) read only local files: they run here,
  with AWS credentials removed from the environment and sockets disabled, to prove it.
* The AWS steps of ``ray up`` that follow them are *not* exercised: filling node
  resources from ``ec2:DescribeInstanceTypes`` (``fillout_available_node_types_resources``)
  and ``bootstrap_aws`` (IAM role, key pair, subnets, security groups). cluster.yaml
  declares CPU/GPU/accelerator resources explicitly, so the first step adds nothing
  the sweep relies on; the second only needs an account.

The structural tests then parse cluster.yaml and the sweep and check that every
environment of the sweep (labels, resources, accelerator type, CPUs, GPUs) can be
hosted by some node type, and that each node type installs the right extra.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from harness.spec import load_sweep

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
SWEEP_YAML = ROOT / "scenarios" / "sweeps" / "hardware-matrix.yaml"

EXPECTED_ENVIRONMENTS = {
    "intel-avx512", "intel-avx512-onednn-off", "amd", "amd-single-thread",
    "a10g", "a10g-tf32", "l4-determinism", "tf-2.20",
}

_INSTALL_RE = re.compile(r"pip install\b.*?-e\s+\"?(?P<path>[^\s\"\[]+)\[(?P<extra>[a-z]+)\]")


# -- helpers -------------------------------------------------------------------------
def selector_matches(selector: dict, labels: dict) -> bool:
    """Ray label-selector semantics: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``.

    A negated condition also matches a node that lacks the key (Ray's NOT_IN).
    """
    for key, expr in selector.items():
        expr = str(expr).strip()
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        m = re.fullmatch(r"in\((.*)\)", body)
        values = {v.strip() for v in m.group(1).split(",")} if m else {body}
        if (labels.get(key) in values) == negate:
            return False
    return True


def selector_values(expr: str) -> set[str]:
    """The label values a selector expression names (with or without ``!``)."""
    body = str(expr).strip().lstrip("!")
    m = re.fullmatch(r"in\((.*)\)", body)
    return {v.strip() for v in m.group(1).split(",")} if m else {body}


def is_gpu_type(node_type: dict) -> bool:
    return node_type.get("resources", {}).get("GPU", 0) > 0


def effective_setup_commands(prepared: dict, name: str) -> list[str]:
    """The setup commands a node of type ``name`` really runs (Ray's override rule:
    a node type's own ``worker_setup_commands`` replace the global setup_commands +
    worker_setup_commands)."""
    if name == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    node_type = prepared["available_node_types"][name]
    if "worker_setup_commands" in node_type:
        return node_type["worker_setup_commands"]
    return prepared["worker_setup_commands"]


def project_installs(commands: list[str]) -> list[tuple[str, str]]:
    """``(path, extra)`` of every ``pip install -e <path>[extra]`` in ``commands``."""
    return [(m["path"], m["extra"]) for c in commands for m in _INSTALL_RE.finditer(c)]


def exported(commands: list[str], var: str) -> set[str]:
    """Values ``var`` is exported with (``export VAR=value``) anywhere in ``commands``."""
    out = set()
    for c in commands:
        for tok in shlex.split(c, posix=True):
            m = re.search(rf"\bexport {var}=(\S+)", tok)
            if m:
                out.add(m.group(1))
    return out


def can_host(env, node_type: dict) -> bool:
    res = node_type.get("resources", {})
    if res.get("CPU", 0) < env.num_cpus or res.get("GPU", 0) < env.num_gpus:
        return False
    if env.accelerator_type and res.get(f"accelerator_type:{env.accelerator_type}", 0) <= 0:
        return False
    if any(res.get(k, 0) < v for k, v in env.resources.items()):
        return False
    return selector_matches(dict(env.label_selector), node_type.get("labels", {}))


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cluster))


@pytest.fixture(scope="module")
def sweep():
    return load_sweep(SWEEP_YAML)


@pytest.fixture(scope="module")
def workers(cluster) -> dict:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


# -- (a) Ray's own validation ------------------------------------------------------------
def test_cluster_yaml_passes_ray_validation_offline(cluster, monkeypatch):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")

    def no_network(*args, **kwargs):
        raise AssertionError("cluster config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert config["provider"]["type"] == "aws"
    assert config["cluster_name"] == "tf-repro-harness"
    # prepare_config filled what it should and kept our node types.
    assert set(config["available_node_types"]) == set(cluster["available_node_types"])
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_labels_and_selectors_use_ray_syntax(cluster, sweep):
    from ray._private.label_utils import (
        validate_label_selector,
        validate_node_label_syntax,
        validate_node_labels,
    )

    for name, node_type in cluster["available_node_types"].items():
        labels = node_type.get("labels", {})
        assert labels, f"node type {name!r} declares no Ray node labels"
        validate_node_labels(labels)          # no reserved ray.io/ prefix
        validate_node_label_syntax(labels)    # Kubernetes-style keys and values
    for env in (sweep.training, *sweep.environments):
        err = validate_label_selector(dict(env.label_selector))
        assert err is None, f"environment {env.name!r}: {err}"


# -- (b) structure of cluster.yaml ------------------------------------------------------
def test_head_does_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_train_node_type(workers):
    train = [n for n, t in workers.items() if t.get("resources", {}).get("train", 0) >= 1]
    assert train, "no node type provides the custom resource `train`"
    for name in train:
        assert workers[name]["labels"].get("node-role") == "train", name
        assert not is_gpu_type(workers[name]), f"{name}: training is on a CPU node"


def test_two_cpu_families(workers):
    families = {t["labels"].get("cpu-family") for t in workers.values()
                if not is_gpu_type(t) and t["labels"].get("node-role") == "replay"}
    assert {"intel", "amd"} <= families, f"replay CPU node types cover only {families}"
    types = {t["node_config"]["InstanceType"] for t in workers.values() if not is_gpu_type(t)}
    assert any(i.startswith("m7i") or i.startswith("c7i") for i in types), types  # Sapphire Rapids
    assert any(re.match(r"[mcr][67]a\.", i) for i in types), types               # AMD EPYC


def test_two_gpu_types(workers):
    accel = {}
    for name, t in workers.items():
        if not is_gpu_type(t):
            assert t["labels"].get("gpu") == "none", f"{name}: CPU node types say gpu: none"
            assert not any(k.startswith("accelerator_type:") for k in t["resources"]), name
            continue
        kinds = [k.split(":", 1)[1] for k in t["resources"] if k.startswith("accelerator_type:")]
        assert len(kinds) == 1, f"{name}: declare exactly one accelerator_type:<GPU> resource"
        assert t["labels"].get("gpu") == kinds[0].lower(), f"{name}: label gpu != {kinds[0]}"
        accel[kinds[0]] = name
    assert {"A10G", "L4"} <= set(accel), f"GPU node types: {accel}"
    assert workers[accel["A10G"]]["node_config"]["InstanceType"].startswith("g5.")
    assert workers[accel["L4"]]["node_config"]["InstanceType"].startswith("g6.")


def test_each_node_type_installs_the_right_extra(prepared, cluster):
    mounts = {str(k).replace("~", "$HOME", 1): v for k, v in prepared["file_mounts"].items()}
    for name, node_type in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            # Without its own list a worker would fall back to the global one; all
            # types here have one, and it must repeat the common steps (see below).
            assert "worker_setup_commands" in node_type, f"{name}: no worker_setup_commands"
        installs = project_installs(effective_setup_commands(prepared, name))
        assert len(installs) == 1, f"{name}: expected one `pip install -e <project>[extra]`, got {installs}"
        path, extra = installs[0]
        want = "gpu" if is_gpu_type(node_type) else "cpu"
        assert extra == want, f"{name}: installs [{extra}], expected [{want}]"
        assert mounts.get(path) == ".", f"{name}: installs {path}, which is not the file mount of the repo"


def test_every_node_sets_up_python_ray_and_storage(prepared, cluster):
    import ray

    tf_pins = set()
    for name in cluster["available_node_types"]:
        cmds = effective_setup_commands(prepared, name)
        text = "\n".join(cmds)
        assert "venv" in text, f"{name}: no Python venv set up"
        pins = set(re.findall(r"ray\[default\]==([\w.]+)", text))
        assert pins == {ray.__version__}, (
            f"{name}: nodes must run the launcher's Ray {ray.__version__}, setup pins {pins or 'nothing'}")
        storage = exported(cmds, "HARNESS_STORAGE")
        assert len(storage) == 1 and next(iter(storage)).startswith("s3://"), f"{name}: HARNESS_STORAGE {storage}"
        tf_pins |= set(re.findall(r"tensorflow(?:-cpu|\[and-cuda\])==([\w.]+)", text))
    assert len(tf_pins) == 1, f"CPU and GPU node types must pin one TensorFlow release, got {tf_pins}"


# -- (b) the sweep fits the cluster ------------------------------------------------------
def test_storage_is_s3_in_both(prepared, cluster, sweep):
    assert sweep.storage.startswith("s3://")
    in_cluster = exported(effective_setup_commands(prepared, cluster["head_node_type"]), "HARNESS_STORAGE")
    assert {v.rstrip("/") for v in in_cluster} == {sweep.storage.rstrip("/")}, (
        f"cluster.yaml exports HARNESS_STORAGE={in_cluster}, the sweep uses {sweep.storage}")


def test_every_selected_label_is_provided(cluster, sweep):
    provided: dict[str, set[str]] = {}
    resources: set[str] = set()
    for t in cluster["available_node_types"].values():
        for k, v in t.get("labels", {}).items():
            provided.setdefault(k, set()).add(v)
        resources |= set(t.get("resources", {}))
    for env in (sweep.training, *sweep.environments):
        for key, expr in env.label_selector.items():
            assert key in provided, f"{env.name}: label {key!r} is on no node type (have {sorted(provided)})"
            missing = selector_values(expr) - provided[key]
            assert not missing, f"{env.name}: {key} value(s) {missing} are on no node type"
        for res in env.resources:
            assert res in resources, f"{env.name}: resource {res!r} is on no node type"
        if env.accelerator_type:
            assert f"accelerator_type:{env.accelerator_type}" in resources, env.name


def test_every_environment_has_a_node_type(workers, sweep):
    for env in (sweep.training, *sweep.environments):
        hosts = [n for n, t in workers.items() if can_host(env, t)]
        assert hosts, f"no node type of cluster.yaml can host environment {env.name!r}"
        if env.num_gpus == 0:
            gpu_hosts = [n for n in hosts if is_gpu_type(workers[n])]
            assert not gpu_hosts, f"CPU environment {env.name!r} could land on GPU node types {gpu_hosts}"
        if env.name != "training":
            assert not any(workers[n]["labels"].get("node-role") == "train" for n in hosts), (
                f"replay environment {env.name!r} could land on the train node type")
    train_hosts = {n for n, t in workers.items() if can_host(sweep.training, t)}
    assert train_hosts == {n for n, t in workers.items() if t["labels"].get("node-role") == "train"}


def test_environments_select_the_intended_hardware(workers, sweep):
    def labels_of_hosts(name, key):
        env = sweep.environment(name)
        return {workers[n]["labels"][key] for n, t in workers.items() if can_host(env, t)}

    assert labels_of_hosts("intel-avx512", "cpu-family") == {"intel"}
    assert labels_of_hosts("intel-avx512-onednn-off", "cpu-family") == {"intel"}
    assert labels_of_hosts("amd", "cpu-family") == {"amd"}
    assert labels_of_hosts("amd-single-thread", "cpu-family") == {"amd"}
    assert labels_of_hosts("a10g", "gpu") == {"a10g"}
    assert labels_of_hosts("a10g-tf32", "gpu") == {"a10g"}
    assert labels_of_hosts("l4-determinism", "gpu") == {"l4"}


@pytest.mark.parametrize("selector, labels, expected", [
    ({"gpu": "a10g"}, {"gpu": "a10g"}, True),
    ({"gpu": "a10g"}, {"gpu": "l4"}, False),
    ({"gpu": "!a10g"}, {"gpu": "l4"}, True),
    ({"gpu": "!a10g"}, {}, True),
    ({"gpu": "in(a10g, l4)"}, {"gpu": "l4"}, True),
    ({"gpu": "in(a10g,l4)"}, {"gpu": "none"}, False),
    ({"gpu": "!in(a10g,l4)"}, {"gpu": "none"}, True),
    ({"gpu": "!in(a10g,l4)"}, {"gpu": "a10g"}, False),
    ({"gpu": "a10g", "cpu-family": "amd"}, {"gpu": "a10g", "cpu-family": "intel"}, False),
])
def test_selector_matcher(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


# -- (c) the sweep itself --------------------------------------------------------------
def test_hardware_matrix_sweep_loads(sweep):
    assert sweep.name == "hardware-matrix"
    assert {e.name for e in sweep.environments} == EXPECTED_ENVIRONMENTS
    assert set(sweep.scenarios) == {"seed-binary-classifier", "seed-linear-regression", "seed-dense-regression"}
    assert set(sweep.formats) == {"keras", "h5", "savedmodel", "tf-savedmodel", "weights"}
    # An autoscaling cluster launches nodes on demand: no precheck, long schedule timeout.
    assert sweep.precheck is False
    assert sweep.schedule_timeout_s >= 600
    assert sweep.retries >= 1


def test_hardware_matrix_expectations(sweep):
    env = sweep.environment
    assert env("a10g").tf32 is False and env("a10g-tf32").tf32 is True
    assert env("l4-determinism").op_determinism is True
    assert env("tf-2.20").runtime_env["pip"] == ["tensorflow-cpu==2.20.0"]
    assert sweep.expectation(env("tf-2.20")) == "any"
    for name in ("intel-avx512", "amd", "a10g", "a10g-tf32", "l4-determinism"):
        assert sweep.expectation(env(name)) == "tolerance", name
    import numpy as np

    f32 = np.dtype("float32")
    base = sweep.tolerance_for(env("intel-avx512")).for_dtype(f32)
    gpu = sweep.tolerance_for(env("a10g")).for_dtype(f32)
    tf32 = sweep.tolerance_for(env("a10g-tf32")).for_dtype(f32)
    assert gpu[1] >= base[1] and gpu[0] >= base[0], "GPU tolerance must not be tighter than the CPU one"
    assert tf32[1] > gpu[1], "TF32 needs a looser rtol than full-float32 GPU math"
