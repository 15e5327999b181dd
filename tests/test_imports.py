"""The import graph of harness/, read from the source (module-level and function-level imports).

Arrows point down only: no module imports, directly or through others, one
that imports it back; and worker-side modules (what runs in a Ray worker)
never import driver-side ones (what plans, schedules and reports a run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "harness"

WORKER_SIDE = {"train", "replay", "worker", "tracing", "formats", "compare", "arrays", "storage", "fingerprint",
               "runtime", "scenario", "records", "spec"}
DRIVER_SIDE = {"engine", "sweep", "explain", "run", "report", "history", "cli", "scheduler", "envs", "placement",
               "repeats"}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in HARNESS.glob("*.py") if p.stem != "__init__"}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Harness modules ``path`` imports anywhere in its body (functions included, ``TYPE_CHECKING`` too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "harness":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            out.update(n for n in names if n in known)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "harness" and len(parts) > 1 and parts[1] in known:
                    out.add(parts[1])
    return out


def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_sides_name_real_modules():
    assert WORKER_SIDE | DRIVER_SIDE <= set(_modules())


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert imports_of(Path(__file__), {"run"}) == set()  # this file imports no harness module


def test_no_import_cycle_in_harness():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(WORKER_SIDE))
def test_worker_side_modules_never_reach_driver_side_ones(module):
    edges = graph()
    reached = reachable(edges, module) & DRIVER_SIDE
    assert not reached, f"{module} (worker side) imports driver-side {sorted(reached)}"


def test_the_scheduler_is_pure():
    """No Ray, no clock: everything it knows comes in through events."""
    source = (HARNESS / "scheduler.py").read_text()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"ray", "time", "tensorflow", "keras"}, imported


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("harness")):
                offenders += [f"{name}: {alias.name} from {node.module}" for alias in node.names
                              if alias.name.startswith("_") and alias.name != "__version__"]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in modules and node.value.id != name:
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders
