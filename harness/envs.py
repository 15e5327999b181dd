"""``harness envs``: the cluster's nodes, a fingerprint taken on each, and which
sweep environments each node can host."""

from __future__ import annotations

import json
from typing import Any

from . import isa
from .spec import Sweep
from .engine import cluster_nodes, session
from .placement import TRAINING, missing_on_node, unschedulable_reason

FINGERPRINT_TIMEOUT_S = 120.0


def _fingerprint_task() -> dict[str, Any]:
    from . import fingerprint

    try:
        return fingerprint.collect()
    except ImportError as exc:  # e.g. a node without TensorFlow
        return {"error": f"{type(exc).__name__}: {exc}", **fingerprint.cpu_info(), **fingerprint.ray_info()}


def survey(sweep: Sweep | None = None) -> list[dict[str, Any]]:
    """One dict per alive node: id, resources, labels, fingerprint, hostable environments.

    Needs an initialised Ray. Fingerprint tasks ask for no CPU so they run even
    on a head node with ``CPU: 0``; each is pinned to its node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in cluster_nodes() if n.get("Alive")]
    task = ray.remote(_fingerprint_task)
    refs = {n["NodeID"]: task.options(
        num_cpus=0, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote() for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=FINGERPRINT_TIMEOUT_S)
    out = []
    for n in nodes:
        ref = refs[n["NodeID"]]
        try:
            fp = ray.get(ref) if ref in ready else {"error": f"no answer within {FINGERPRINT_TIMEOUT_S:g}s"}
        except Exception as exc:
            fp = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        envs = [e.name for e in (sweep.environments if sweep else ()) if missing_on_node(e, n) is None]
        if sweep and missing_on_node(sweep.training, n) is None:
            envs.insert(0, TRAINING)
        out.append({"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                    "resources": {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")},
                    "labels": {k: v for k, v in n.get("Labels", {}).items() if k != "ray.io/node-id"},
                    "fingerprint": fp, "environments": envs,
                    "cpu_isa": isa.supported(fp.get("cpu_flags", []))})
    return out


def _short_resources(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items()))


def describe_cluster(address: str, sweep: Sweep | None = None, as_json: bool = False) -> str:
    """Human (or JSON) description of the cluster at ``address`` for ``harness envs``."""
    from tabulate import tabulate

    with session(address):
        nodes = survey(sweep)
        raw_nodes = cluster_nodes()
    placement = {}
    if sweep:
        for env in (sweep.training, *sweep.environments):
            placement[env.name] = unschedulable_reason(env, raw_nodes) or "ok"
    if as_json:
        return json.dumps({"nodes": nodes, "environments": placement}, indent=1, default=str)
    rows = []
    for n in nodes:
        fp = n["fingerprint"]
        gpus = ", ".join(g.get("name") or "?" for g in fp.get("gpus", [])) or "-"
        onednn = {True: "on", False: "off"}.get(fp.get("onednn_default"), "?")
        rows.append([n["node_id"][:12], _short_resources(n["resources"]),
                     ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-",
                     fp.get("tf_version") or fp.get("error", "?"), fp.get("cpu_model"),
                     " ".join(f for f in fp.get("cpu_flags", []) if f.startswith(("avx512f", "amx", "avx2"))) or "-",
                     onednn, ", ".join(n["cpu_isa"]) or "-",
                     gpus, ", ".join(n["environments"]) or ("-" if sweep else "")])
    headers = ["node", "resources", "labels", "TF", "CPU", "flags", "oneDNN default", "can emulate (cpu_isa)",
               "GPUs", "can host" if sweep else ""]
    text = tabulate(rows, headers=headers)
    if sweep:
        text += "\n\n" + tabulate(sorted(placement.items()), headers=["environment", "placement"])
    return text
