"""Can a node host an environment? Ray's placement rules as pure functions (no Ray import).

The precheck of a sweep (``precheck``) judges every environment against the
cluster's alive nodes (``ray.nodes()`` dicts: ``NodeID``, ``Alive``,
``Resources``, ``Labels``) before anything is dispatched, so an environment no
node can host is ``unschedulable`` at once, with a message naming what no node
has: a label, a resource, a GPU or accelerator type -- every requirement is
checked on every node, not the first check of the first node.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from .spec import Environment, Sweep

Node = Mapping[str, Any]

#: Key of the training environment in a precheck's answer (a sweep environment cannot have this name).
TRAINING = "training"


def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray label selector semantics: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    return all(_label_ok(key, expr, labels) for key, expr in selector.items())


def _label_ok(key: str, expr: str, labels: Mapping[str, str]) -> bool:
    expr = expr.strip()
    negate = expr.startswith("!")
    body = expr[1:] if negate else expr
    values = {v.strip() for v in body[3:-1].split(",")} if body.startswith("in(") and body.endswith(")") else {body}
    return (labels.get(key) in values) != negate


def requirements(env: Environment) -> list[tuple[str, Callable[[Node], bool]]]:
    """What ``env`` asks of one node, one ``(text, test)`` per requirement, in the order a user reads them."""
    def amount(name: str, need: float) -> Callable[[Node], bool]:
        return lambda node: node.get("Resources", {}).get(name, 0) >= need

    reqs: list[tuple[str, Callable[[Node], bool]]] = [(f"CPU >= {env.num_cpus:g}", amount("CPU", env.num_cpus))]
    if env.num_gpus:
        reqs.append((f"GPU >= {env.num_gpus:g}", amount("GPU", env.num_gpus)))
    if env.accelerator_type:
        key = f"accelerator_type:{env.accelerator_type}"
        reqs.append((key, lambda node: key in node.get("Resources", {})))
    for name, need in env.resources.items():
        reqs.append((f"resource {name} >= {need:g}", amount(name, need)))
    for key, expr in env.label_selector.items():
        reqs.append((f"label {key}={expr}", lambda node, k=key, e=expr: _label_ok(k, e, node.get("Labels", {}))))
    return reqs


def missing_on_node(env: Environment, node: Node) -> str | None:
    """What ``node`` lacks to host ``env`` (every unmet requirement), or ``None`` if it can."""
    unmet = [text for text, ok in requirements(env) if not ok(node)]
    return ", ".join(unmet) or None


def alive(nodes: Iterable[Node]) -> list[Node]:
    """The nodes Ray reports alive."""
    return [n for n in nodes if n.get("Alive", True)]


def hosts(env: Environment, nodes: Iterable[Node]) -> frozenset[str]:
    """Ids of the alive nodes that can host ``env``."""
    return frozenset(n.get("NodeID", "") for n in alive(nodes) if missing_on_node(env, n) is None)


def unschedulable_reason(env: Environment, nodes: Iterable[Node]) -> str | None:
    """``None`` if some alive node can host ``env``, else one line naming what no node has.

    A requirement that no alive node meets is named (all such requirements);
    when each is met by some node but no node meets all of them, the line says
    so and names what the closest node lacks.
    """
    live = alive(nodes)
    reqs = requirements(env)
    if any(all(ok(n) for _, ok in reqs) for n in live):
        return None
    head = f"no node of the cluster ({len(live)} alive) can host environment {env.name!r}"
    if not live:
        return f"{head}: no node is alive"
    unmet = [text for text, ok in reqs if not any(ok(n) for n in live)]
    if unmet:
        accel = sorted({k.split(":", 1)[1] for n in live for k in n.get("Resources", {})
                        if k.startswith("accelerator_type:")})
        present = f" (accelerator types present: {', '.join(accel) or 'none'})" if env.accelerator_type else ""
        return f"{head}: missing {', '.join(unmet)}{present}"
    closest = min(live, key=lambda n: sum(not ok(n) for _, ok in reqs))
    return (f"{head}: no single node has all of {', '.join(text for text, _ in reqs)}; the closest, "
            f"node {str(closest.get('NodeID', '?'))[:12]}, lacks {missing_on_node(env, closest)}")


def precheck(sweep: Sweep, nodes: Iterable[Node]) -> dict[str, str]:
    """Environment name (``TRAINING`` for the training environment) -> why no alive node can host it."""
    nodes = list(nodes)
    out = {}
    for name, env in ((TRAINING, sweep.training), *((e.name, e) for e in sweep.environments)):
        reason = unschedulable_reason(env, nodes)
        if reason:
            out[name] = reason
    return out
