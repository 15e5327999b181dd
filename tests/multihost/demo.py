"""``make cluster-demo``: the rig's sweep across hosts that share no disk, from job submission to report.

Starts the rig (see rig.py), shows its nodes (``harness envs`` on the head),
submits ``tests/multihost/matrix.yaml`` with ``ray job submit`` from this
machine, reads the run back from S3 as any other machine would (``harness
report s3://.../runs/RUN_ID``), prints the matrix and, next to it, the host
each cell ran on; then tears everything down (only what it started).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rig import DUMMY_AWS, VENV_BIN, Rig, RigError

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "matrix.yaml"
_RAY_CLI_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|SUCC)\s")  # `ray job submit`'s own chatter


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def hosts_table(table, rig: Rig) -> str:
    """Rows scenario/format, columns environments: the rig host each cell ran on."""
    from tabulate import tabulate

    from harness import results

    nodes = {n["node_id"]: rig.host_of_ip(n["node_ip"]) for n in rig.nodes()}
    cells = results.cells(table)
    envs = list(dict.fromkeys(c.environment for c in cells))
    rows = list(dict.fromkeys((c.scenario, c.format) for c in cells))
    where = {(c.scenario, c.format, c.environment): nodes.get(c.node_id, c.node_id or "-") for c in cells}
    train = {c.scenario: nodes.get((c.train_fingerprint or {}).get("ray_node_id"), "?") for c in cells}
    body = [[f"{s}/{f}", train[s], *(where.get((s, f, e), "") for e in envs)] for s, f in rows]
    return tabulate(body, headers=["scenario/format", "trained on", *envs])


def main() -> int:
    os.environ.update(DUMMY_AWS)  # this process reads the run back from the rig's S3 (moto refuses unsigned requests)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    try:
        rig = Rig(log=sys.stdout).start()
    except RigError as exc:
        print(f"cluster-demo: the rig did not start: {exc}", file=sys.stderr)
        return 3
    try:
        _step(f"the cluster: head {rig.head_ip} (no CPUs), workers train / replay-a / replay-b, "
              f"S3 on {rig.s3_endpoint}; each host has its own /tmp and HOME")
        envs = rig.run("head", ["harness", "envs", "--address", "auto", "--sweep", str(MATRIX)], timeout=600)
        print(envs.stdout or envs.stderr, flush=True)

        _step(f"ray job submit --address {rig.dashboard_url} -- harness run matrix.yaml --address auto "
              f"--storage {rig.storage_uri()}")
        with tempfile.TemporaryDirectory() as work:
            Path(work, "matrix.yaml").write_text(MATRIX.read_text())
            job = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", f"--address={rig.dashboard_url}",
                                  f"--working-dir={work}", "--", "harness", "run", "matrix.yaml", "--address", "auto",
                                  "--storage", rig.storage_uri()], env=env, text=True, capture_output=True,
                                 timeout=900)
        print("\n".join(line for line in job.stdout.splitlines() if not _RAY_CLI_LOG.match(line)))
        from drive import run_id_of

        run_id = run_id_of(job.stdout)

        base, query = rig.storage_uri().split("?", 1)
        uri = f"{base}/runs/{run_id}?{query}"
        _step(f"from this machine (no Ray, no shared disk): harness report {base}/runs/{run_id}")
        from harness import report, results

        table = results.read_table(uri)
        print(report.matrix_text(table))
        _step("where each cell ran")
        print(hosts_table(table, rig))
        print("\nThe rig proves: cells ran on the hosts their labels select; artifacts and results travelled only\n"
              "through S3; a run is readable from any machine. It does not prove hardware differences: every\n"
              "host is this machine's CPU (replay-b computes as an AVX2 machine through its node environment),\n"
              f"and GPU nodes are not simulated here. {time.time() - started:.0f} s in all.")
        return job.returncode
    finally:
        _step("tearing down the rig (only its own processes, namespaces and links)")
        rig.close()


if __name__ == "__main__":
    sys.exit(main())
