"""Can the cluster's hosts read what the driver writes to storage? Checked once, before a sweep runs.

A storage path on the driver's own disk (``.harness/store``, ``/tmp/store``) or
an S3 endpoint only the driver can reach (``endpoint_override=127.0.0.1:9000``)
works for the driver and fails on every other host: without this check, a
sweep on a cluster then fills up with ``corrupt`` and ``error`` cells. Here the
driver writes a small probe file, a tiny Ray task pinned to each alive node that
may host one of the sweep's environments reads it back, and the first host that
cannot is named in a one-line :class:`StorageUnreachable` (exit code 2).

Nodes on the driver's own machine (same IP address) see its disk and its
network, so they are not asked; on the embedded local Ray there is nothing to
check. A node that does not answer within the timeout is not judged here (it
may be busy or going away): the sweep's own timeouts deal with it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .spec import Sweep
from .placement import missing_on_node

PROBE_TIMEOUT_S = 60.0
# A host that cannot reach the storage usually never will (wrong endpoint, no route): its probe
# retries transient failures for this long, not the sweep's minute, so the refusal comes quickly.
PROBE_RETRY_S = 8.0
PROBE_DIR = ".harness-reach"


class StorageUnreachable(ValueError):
    """Some host of the cluster cannot read the sweep's storage (exit code 2): the message names it."""


@dataclass(frozen=True)
class ProbeResult:
    """What one node found when it read the probe file back."""

    node_id: str
    address: str
    digest: str | None = None  # sha256 of what it read
    error: str | None = None  # why it could not read it


def read_probe(storage_uri: str, rel: str) -> tuple[str | None, str | None]:
    """Runs on a node: ``(sha256 of the file, None)``, or ``(None, why it cannot be read)``."""
    from .storage import Storage

    try:
        return hashlib.sha256(Storage.open(storage_uri, retry_s=PROBE_RETRY_S).read_bytes(rel)).hexdigest(), None
    except Exception as exc:  # noqa: BLE001 -- every failure is the answer
        text = str(exc).strip()
        return None, f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def nodes_to_check(sweep: Sweep, nodes: Sequence[Mapping[str, Any]], driver_address: str | None) -> list[Mapping[str, Any]]:
    """Alive nodes that may host the training environment or an environment, on another machine than the driver."""
    envs = (sweep.training, *sweep.environments)
    return [n for n in nodes if n.get("Alive", True) and n.get("NodeManagerAddress") != driver_address
            and any(missing_on_node(env, n) is None for env in envs)]


def describe_node(node: Mapping[str, Any]) -> str:
    """``host 10.0.0.12 (node 3f2a1b0c9d8e, labels cpu=avx2, node-role=replay)``."""
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    shown = f", labels {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))}" if labels else ""
    return f"host {node.get('NodeManagerAddress', '?')} (node {str(node.get('NodeID', '?'))[:12]}{shown})"


def verdict(storage_name: str, expected: str, nodes: Sequence[Mapping[str, Any]],
            results: Mapping[str, ProbeResult]) -> str | None:
    """The one-line problem of the first node that read something else than ``expected`` (None: all fine).

    ``results`` holds the nodes that answered, by node id; nodes that did not are not judged.
    """
    for node in nodes:
        res = results.get(node["NodeID"])
        if res is None or res.digest == expected:
            continue
        what = (f"cannot read a file the driver just wrote there ({res.error})" if res.error
                else "reads other bytes than the driver just wrote there")
        return (f"storage {storage_name}: {describe_node(node)} {what}; every host that runs cells must see the "
                "same storage: use an object store (s3://..., gs://...) or a path shared by all hosts (NFS), "
                "with an endpoint every host can reach")
    return None


def check_storage_reach(storage_uri: str, sweep: Sweep, nodes: Sequence[Mapping[str, Any]],
                        timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Raise :class:`StorageUnreachable` if a host that may run cells cannot read what the driver writes.

    Needs an initialised Ray (connected to the cluster). ``nodes`` is
    ``ray.nodes()``. Returns the nodes that did not answer within ``timeout_s``
    (as ``describe_node`` text), which the caller may warn about.

    Raises:
        StorageUnreachable: naming the storage, the first host that cannot read
            the probe, what it got, and the fix.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .storage import Storage

    targets = nodes_to_check(sweep, nodes, ray.util.get_node_ip_address())
    if not targets:
        return []
    st = Storage.open(storage_uri)
    rel = f"{PROBE_DIR}/{secrets.token_hex(8)}"
    payload = secrets.token_bytes(64)
    st.write_bytes(rel, payload)
    try:
        task = ray.remote(read_probe)
        refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(storage_uri, rel): n for n in targets}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        results = {}
        for ref in ready:
            node = refs[ref]
            try:
                digest, error = ray.get(ref)
            except Exception:  # noqa: BLE001 -- the node went away meanwhile: not a storage problem
                continue
            results[node["NodeID"]] = ProbeResult(node["NodeID"], node.get("NodeManagerAddress", "?"), digest, error)
        for ref in late:
            ray.cancel(ref, force=True)
        problem = verdict(storage_uri.split("?", 1)[0], hashlib.sha256(payload).hexdigest(), targets, results)
        if problem:
            raise StorageUnreachable(problem)
        return [describe_node(refs[ref]) for ref in late]
    finally:
        try:
            st.fs.delete_file(st.path(rel))
        except Exception:  # noqa: BLE001 -- a leftover probe file is harmless
            pass
