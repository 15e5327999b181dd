"""Driving the harness on the rig's hosts: run it, watch its progress, read what it published.

Drivers run *on a host* (in its namespaces, with its private disk), so their
``--out`` directories are that host's; what the tests read comes from the
rig's S3 storage, where every run publishes ``runs/<run_id>/`` -- exactly what a
user on another machine would have.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from rig import Rig

REPO = Path(__file__).resolve().parents[2]
MATRIX = REPO / "tests" / "multihost" / "matrix.yaml"
TEST_SCENARIOS = REPO / "tests" / "scenarios"
PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\] (\S+)/(\S+) @ (\S+): (\w+)", re.M)
STORAGE_LINE = re.compile(r"^storage: (\S+)/runs/(\S+)$", re.M)
RUN_LINE = re.compile(r"^harness: sweep .* \(run (\S+)\)$", re.M)  # the first line: the run id, before any cell


def harness(rig: Rig, host: str, *args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``harness ARGS`` on ``host``; its output captured."""
    return rig.run(host, ["harness", *map(str, args)], timeout=timeout, env=env)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def run_id_of(output: str) -> str:
    """The run id ``harness run`` printed in its ``storage: .../runs/RUN_ID`` line."""
    found = STORAGE_LINE.search(output)
    assert found, f"no 'storage: .../runs/RUN_ID' line in:\n{output[-3000:]}"
    return found.group(2)


def published(rig: Rig, run_id: str, prefix: str = "store"):
    """The results table the run published in the rig's storage (read from this, the root, namespace)."""
    from harness import results

    uri = rig.storage_uri(prefix)
    base, query = uri.split("?", 1)
    return results.read_table(f"{base}/runs/{run_id}?{query}")


def progress_lines(text: str) -> list[re.Match]:
    return list(PROGRESS.finditer(text))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, driver=None, log: Path | None = None):
    """Poll ``predicate`` until it returns something truthy.

    AssertionError naming ``what`` after ``timeout``, or as soon as the
    background ``driver`` process has exited (with the end of its ``log``).
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            tail = log.read_text()[-4000:] if log is not None else ""
            raise AssertionError(f"the driver exited ({driver.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def write_sweep(rig: Rig, name: str, doc: dict) -> Path:
    """A sweep file every host can read (the rig's shared control directory)."""
    import yaml

    path = rig.shared / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def markers(directory: Path) -> dict[str, tuple[str, str]]:
    """``environment -> (node id, pid)`` of every cell of ``test-slow-build`` that started building
    (see tests/scenarios/slow.py; the last marker of an environment wins)."""
    out = {}
    for f in sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime):
        parts = f.read_text().split()
        if len(parts) == 2:
            node, pid = f.name.split(".", 1)
            out[parts[1]] = (node, pid)
    return out
