"""Plan, schedule and collect a sweep on Ray: the only Ray-aware module.

Flow: one training task per scenario (in the training environment) ->
as each finishes, one replay task per (format, environment) cell of that
scenario -> results stream back and ``results.parquet`` is rewritten
atomically after every cell, so a crash loses nothing already finished.

No hangs: environments are checked against the cluster's nodes before
dispatch (``precheck``), a cell that has not started within
``schedule_timeout_s`` becomes ``unschedulable`` (and so do the rest of its
environment), a running cell past ``cell_timeout_s`` is cancelled as
``error``. Tasks lost with their worker or node are retried by Ray
(``retries``); a retried cell still yields exactly one row.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import results
from .scenario import Scenario
from .spec import Environment, Sweep

Progress = Callable[[int, int, dict], None]


class SweepError(Exception):
    """The sweep could not run at all (e.g. Ray unreachable): exit code 3."""


@dataclass(frozen=True)
class Cell:
    scenario: str
    format: str
    environment: str

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.format}/{self.environment}"


def plan(sweep: Sweep, only: Iterable[str] = ()) -> list[Cell]:
    """Every (scenario, format, environment) cell, filtered by ``only``.

    Each name in ``only`` must be a scenario, format or environment of the
    sweep; a dimension that any name mentions is restricted to those names.
    Cells are ordered environment-major so consecutive cells reuse a worker.

    Raises:
        ValueError: a name in ``only`` is none of the sweep's names.
    """
    only = list(only)
    dims = {"scenario": list(sweep.scenarios), "format": list(sweep.formats),
            "environment": [e.name for e in sweep.environments]}
    chosen = {k: [v for v in vals if v in only] or vals for k, vals in dims.items()}
    unknown = [n for n in only if not any(n in vals for vals in dims.values())]
    if unknown:
        raise ValueError(f"--only: {', '.join(map(repr, unknown))} is not a scenario, format or environment "
                         f"of sweep {sweep.name!r}")
    return [Cell(s, f, e) for e in chosen["environment"] for s in chosen["scenario"] for f in chosen["format"]]


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# -- placement ---------------------------------------------------------------
def ray_options(env: Environment, retries: int) -> dict[str, Any]:
    """``.options(...)`` of a task running in ``env``: placement, runtime_env, retries."""
    opts: dict[str, Any] = {"num_cpus": env.num_cpus, "num_gpus": env.num_gpus,
                            "runtime_env": env.ray_runtime_env(), "max_retries": retries}
    if env.resources:
        opts["resources"] = dict(env.resources)
    if env.accelerator_type:
        opts["accelerator_type"] = env.accelerator_type
    if env.label_selector:
        opts["label_selector"] = dict(env.label_selector)
    return opts


def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray label selector semantics: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    for key, expr in selector.items():
        expr = expr.strip()
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            values = {v.strip() for v in body[3:-1].split(",")}
        else:
            values = {body}
        hit = labels.get(key) in values
        if hit == negate:
            return False
    return True


def missing_on_node(env: Environment, node: Mapping[str, Any]) -> str | None:
    """Why ``node`` cannot host ``env`` (``None`` if it can)."""
    res = node.get("Resources", {})
    if res.get("CPU", 0) < env.num_cpus:
        return f"CPU >= {env.num_cpus:g}"
    if env.num_gpus and res.get("GPU", 0) < env.num_gpus:
        return f"GPU >= {env.num_gpus:g}"
    if env.accelerator_type and f"accelerator_type:{env.accelerator_type}" not in res:
        return f"accelerator_type:{env.accelerator_type}"
    for name, amount in env.resources.items():
        if res.get(name, 0) < amount:
            return f"resource {name} >= {amount:g}"
    if env.label_selector and not label_matches(env.label_selector, node.get("Labels", {})):
        sel = ", ".join(f"{k}={v}" for k, v in env.label_selector.items())
        return f"labels {sel}"
    return None


def unschedulable_reason(env: Environment, nodes: list[Mapping[str, Any]]) -> str | None:
    """``None`` if some alive node can host ``env``, else a message naming what is missing."""
    alive = [n for n in nodes if n.get("Alive", True)]
    misses = [missing_on_node(env, n) for n in alive]
    if any(m is None for m in misses):
        return None
    accel = sorted({k.split(":", 1)[1] for n in alive for k in n.get("Resources", {}) if k.startswith("accelerator_type:")})
    first = misses[0] if misses else "any node at all"
    return (f"no node of the cluster ({len(alive)} alive) can host environment {env.name!r}: missing {first}"
            + (f" (accelerator types present: {', '.join(accel)})" if env.accelerator_type else ""))


# -- remote side ---------------------------------------------------------------
def _train_entry(tracker, key: str, scenario: Scenario, formats_: list[str], storage_uri: str,
                 training: Environment, batch_size: int, retrain: bool) -> dict:
    from .train import train

    _mark_started(tracker, key)
    return train(scenario, formats_, storage_uri, training, batch_size=batch_size, retrain=retrain).to_dict()


def _replay_entry(tracker, key: str, scenario: Scenario, fmt: str, artifact_path: str, storage_uri: str,
                  environment: Environment, kwargs: dict) -> dict:
    from .replay import replay

    _mark_started(tracker, key)
    return replay(scenario, fmt, artifact_path, storage_uri, environment, **kwargs)


def _mark_started(tracker, key: str) -> None:
    import ray

    if tracker is None:
        return
    try:
        # Wait for the record: attempts and start times must be known before
        # the result can reach the driver, and before this node can die.
        ray.get(tracker.start.remote(key, ray.get_runtime_context().get_node_id()), timeout=30)
    except Exception:  # bookkeeping must never fail the cell itself
        pass


class _Tracker:
    """Records when each task really started (and how often: Ray retries)."""

    def __init__(self):
        self.started: dict[str, tuple[float, str, int]] = {}

    def start(self, key: str, node_id: str) -> None:
        attempts = self.started.get(key, (0, "", 0))[2] + 1
        self.started[key] = (time.time(), node_id, attempts)

    def snapshot(self) -> dict[str, tuple[float, str, int]]:
        return dict(self.started)


# -- driver ------------------------------------------------------------------
@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    table: Any  # pa.Table
    results_uri: str | None = None  # copy of results.parquet in shared storage

    @property
    def passed(self) -> bool:
        return all(self.table.column("passed").to_pylist())


@dataclass
class _Pending:
    kind: str  # "train" | "cell"
    key: str
    submitted: float
    environment: str
    payload: Any = None


@dataclass
class _State:
    sweep: Sweep
    run_id: str
    run_dir: Path
    storage_uri: str
    total: int
    progress: Progress | None
    rows: list[dict] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    train_fp: dict[str, dict] = field(default_factory=dict)

    def table(self):
        """Rows in the sweep's own order (scenario, format, environment), not completion
        order, so reports of the same sweep always have the same layout."""
        rank = {dim: {name: i for i, name in enumerate(names)} for dim, names in (
            ("scenario", self.sweep.scenarios), ("format", self.sweep.formats),
            ("environment", [e.name for e in self.sweep.environments]))}
        key = lambda r: tuple(rank[d].get(r[d], len(rank[d])) for d in ("scenario", "format", "environment"))
        return results.to_table(sorted(self.rows, key=key))

    def add(self, cell: Cell, values: dict[str, Any], artifact: Mapping[str, Any] | None = None) -> None:
        env = self.sweep.environment(cell.environment)
        expected = self.sweep.expectation(env)
        row = {"run_id": self.run_id, "sweep": self.sweep.name, "scenario": cell.scenario, "format": cell.format,
               "environment": cell.environment, "expected": expected,
               "train_fingerprint": self.train_fp.get(cell.scenario)}
        if artifact:
            row.update(artifact_digest=artifact.get("digest"), artifact_uri=artifact.get("uri"),
                       save_verdict=artifact.get("save_verdict"), save_max_abs_diff=artifact.get("save_max_abs_diff"),
                       save_max_ulp_diff=artifact.get("save_max_ulp_diff"))
        row.update({k: v for k, v in values.items() if k in results.COLUMN_NAMES})
        # A cell that never started (unschedulable, failed save) is dated when it was decided.
        row["started_at"] = row.get("started_at") or time.time()
        save_ok = row.get("save_verdict") is None or results.meets(row["save_verdict"], self.sweep.expect_save)
        row["passed"] = results.meets(row["verdict"], expected) and save_ok
        if not save_ok and row["verdict"] in results.NUMERIC_VERDICTS:
            note = f"save round trip is {row['save_verdict']} (expect_save: {self.sweep.expect_save})"
            row["error"] = f"{note}; {row['error']}" if row.get("error") else note
        self.rows.append(row)
        self.done.add(cell.key)
        results.write_table(self.table(), self.run_dir / "results.parquet")
        if self.progress:
            self.progress(len(self.done), self.total, row)


def _cell_row_for_failed_artifact(art: Mapping[str, Any]) -> dict[str, Any]:
    return {"verdict": "error", "error": art["error"]}


def run_sweep(sweep: Sweep, scenarios: Mapping[str, Scenario], *, out_dir: str | os.PathLike,
              address: str = "local", storage: str | None = None, only: Iterable[str] = (),
              retrain: bool = False, inline: bool = False, resume: bool = False,
              progress: Progress | None = None, run_id: str | None = None, verbose: bool = False) -> RunResult:
    """Run every cell of ``sweep`` and write ``out_dir/results.parquet``.

    Args:
        sweep: the validated sweep.
        scenarios: name -> Scenario for (at least) the sweep's scenarios.
        out_dir: run directory on the driver (results.parquet, reports).
        address: ``local`` (embedded Ray), ``auto`` or ``ray://host:port``. If
            Ray is already initialised in this process it is used as is.
        storage: overrides the sweep's ``storage`` URI.
        only: restrict cells (see ``plan``).
        retrain: ignore complete artifacts already in storage.
        inline: run everything in this process, without Ray (debugging). An
            environment needing import-time env vars this process lacks gets
            an ``error`` verdict saying so.
        resume: keep the rows of an earlier run in ``out_dir`` and run only
            the missing cells, under the same run id.
        progress: called as ``progress(done, total, row)`` after each cell.

    Returns:
        A ``RunResult``; ``passed`` is true iff every cell met its expectation.

    Raises:
        SweepError: Ray could not be started or reached.
    """
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = []
    if resume and (run_dir / "results.parquet").exists():
        previous = results.read_table(run_dir).to_pylist()
        run_id = run_id or (previous[0]["run_id"] if previous else None)
    cells = plan(sweep, only)
    state = _State(sweep=sweep, run_id=run_id or new_run_id(), run_dir=run_dir,
                   storage_uri=storage or sweep.storage, total=len(cells), progress=progress)
    for row in previous:
        state.rows.append(row)
        state.done.add(Cell(row["scenario"], row["format"], row["environment"]).key)
    todo = [c for c in cells if c.key not in state.done]
    if inline:
        _run_inline(state, scenarios, todo, retrain)
    else:
        _run_ray(state, scenarios, todo, address, retrain, verbose)
    table = state.table()
    results.write_table(table, run_dir / "results.parquet")
    # Also publish next to the observations in shared storage: on a cluster
    # the driver's disk may not outlive the run.
    from .storage import Storage

    st = Storage.open(state.storage_uri)
    rel = f"runs/{state.run_id}/results.parquet"
    st.write_bytes(rel, results.to_parquet_bytes(table))
    return RunResult(run_id=state.run_id, run_dir=run_dir, table=table, results_uri=st.uri_of(rel))


def _replay_kwargs(sweep: Sweep, env: Environment, state: _State, cell: Cell) -> dict[str, Any]:
    return {"batch_size": sweep.batch_size_for(env), "tolerance": sweep.tolerance_for(env),
            "output_tolerances": dict(sweep.output_tolerances),
            "observation_path": f"runs/{state.run_id}/observations/{cell.scenario}/{cell.format}/{cell.environment}.arrow"}


def _run_inline(state: _State, scenarios: Mapping[str, Scenario], todo: list[Cell], retrain: bool) -> None:
    from .replay import replay
    from .train import train

    sweep = state.sweep
    for name in dict.fromkeys(c.scenario for c in todo):
        tr = train(scenarios[name], list(sweep.formats), state.storage_uri, sweep.training,
                   batch_size=sweep.batch_size, retrain=retrain).to_dict()
        state.train_fp[name] = tr["fingerprint"]
        for cell in [c for c in todo if c.scenario == name]:
            art = tr["artifacts"][cell.format]
            env = sweep.environment(cell.environment)
            if art.get("error"):
                state.add(cell, _cell_row_for_failed_artifact(art), art)
                continue
            started = time.time()
            row = replay(scenarios[name], cell.format, art["path"], state.storage_uri, env,
                         **_replay_kwargs(sweep, env, state, cell))
            state.add(cell, {**row, "attempts": 1, "started_at": started}, art)


def _init_ray(address: str, verbose: bool) -> bool:
    """Start or connect to Ray; returns whether we own the connection."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if address == "local":
        kwargs.update(address="local", include_dashboard=False)
    else:
        # Workers of a real cluster get this very harness code through Ray,
        # so a node needs only Python, Ray and TensorFlow installed.
        kwargs.update(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        ray.init(**kwargs)
    except Exception as exc:
        raise SweepError(f"cannot start/connect to Ray at {address!r}: {type(exc).__name__}: {exc}") from exc
    return True


def _register_scenarios_by_value(scenarios: Iterable[Scenario]) -> None:
    """Ship user scenario modules to workers by value (nothing to install there)."""
    from ray import cloudpickle

    for s in scenarios:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) == s.source_file and mod.__name__.startswith("_harness_scenarios."):
                try:
                    cloudpickle.register_pickle_by_value(mod)
                except ValueError:
                    pass  # already registered


def _run_ray(state: _State, scenarios: Mapping[str, Scenario], todo: list[Cell], address: str,
             retrain: bool, verbose: bool) -> None:
    import ray

    owned = _init_ray(address, verbose)
    try:
        _Driver(state, scenarios, todo, retrain).run()
    finally:
        if owned:
            ray.shutdown()


class _Driver:
    """The event loop of one Ray sweep (kept small: state lives in ``_State``)."""

    POLL_S = 1.0

    def __init__(self, state: _State, scenarios: Mapping[str, Scenario], todo: list[Cell], retrain: bool):
        import ray

        self.ray, self.state, self.sweep, self.retrain = ray, state, state.sweep, retrain
        self.scenarios = scenarios
        self.todo = todo
        self.pending: dict[Any, _Pending] = {}
        self.queue: list[tuple[Cell, Mapping[str, Any]]] = []  # cells ready to dispatch
        self.dead_envs: dict[str, str] = {}
        self.tracker_lost = False
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Keep the bookkeeping actor on the head node, which lives as long as the
        # cluster: losing a worker node must not lose the record of which cells
        # started. Hard affinity: a soft one is only a preference (measured: 2
        # of 3 zero-CPU actors landed elsewhere). No head visible: the driver's node.
        alive = [n for n in ray.nodes() if n.get("Alive")]
        head = next((n["NodeID"] for n in alive if "node:__internal_head__" in n.get("Resources", {})), None)
        home = head or ray.get_runtime_context().get_node_id()
        self.tracker = ray.remote(num_cpus=0)(_Tracker).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(home, soft=head is None)).remote()
        self.train_fn = ray.remote(_train_entry)
        self.replay_fn = ray.remote(_replay_entry)
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
        # Cap tasks in flight so a submitted task starts soon if it can run at
        # all: the schedule timeout then measures infeasibility, not queueing.
        self.max_in_flight = max(4, int(cpus) + 2)

    def run(self) -> None:
        _register_scenarios_by_value(self.scenarios[n] for n in {c.scenario for c in self.todo})
        if self.sweep.precheck:
            self._precheck()
        for name in dict.fromkeys(c.scenario for c in self.todo):
            if self._cells_of(name):
                self._submit_train(name)
        last_poll, snapshot = 0.0, {}
        while self.pending or self.queue:
            self._dispatch()
            if not self.pending:
                continue
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=self.POLL_S)
            if time.time() - last_poll >= self.POLL_S or ready:
                snapshot, last_poll = self._snapshot(), time.time()
            for ref in ready:
                self._collect(ref, self.pending.pop(ref), snapshot)
            self._check_timeouts(snapshot)

    # -- helpers -------------------------------------------------------------
    def _cells_of(self, scenario: str) -> list[Cell]:
        return [c for c in self.todo if c.scenario == scenario and c.key not in self.state.done]

    def _snapshot(self) -> dict:
        try:
            return self.ray.get(self.tracker.snapshot.remote(), timeout=30)
        except Exception as exc:  # results still arrive; only start times and attempts are lost
            if not self.tracker_lost:
                print(f"harness: warning: lost the start-time tracker ({type(exc).__name__}); "
                      "attempts and start times of later cells are unknown", file=sys.stderr)
            self.tracker_lost = True
            return {}

    def _precheck(self) -> None:
        nodes = self.ray.nodes()
        train_reason = unschedulable_reason(self.sweep.training, nodes)
        for env in self.sweep.environments:
            reason = unschedulable_reason(env, nodes)
            if reason:
                self.dead_envs[env.name] = reason
        if train_reason:
            for cell in list(self.todo):
                self.state.add(cell, {"verdict": "unschedulable", "error": f"training: {train_reason}"})
        else:
            for cell in list(self.todo):
                if cell.environment in self.dead_envs:
                    self.state.add(cell, {"verdict": "unschedulable", "error": self.dead_envs[cell.environment]})

    def _submit_train(self, name: str) -> None:
        tr = self.sweep.training
        ref = self.train_fn.options(**ray_options(tr, self.sweep.retries)).remote(
            self.tracker, f"train/{name}", self.scenarios[name], list(self.sweep.formats), self.state.storage_uri,
            tr, self.sweep.batch_size, self.retrain)
        self.pending[ref] = _Pending("train", f"train/{name}", time.time(), "training", name)

    def _dispatch(self) -> None:
        while self.queue and len(self.pending) < self.max_in_flight:
            cell, art = self.queue.pop(0)
            if cell.key in self.state.done:
                continue
            if cell.environment in self.dead_envs:
                self.state.add(cell, {"verdict": "unschedulable", "error": self.dead_envs[cell.environment]}, art)
                continue
            env = self.sweep.environment(cell.environment)
            ref = self.replay_fn.options(**ray_options(env, self.sweep.retries)).remote(
                self.tracker, cell.key, self.scenarios[cell.scenario], cell.format, art["path"],
                self.state.storage_uri, env, _replay_kwargs(self.sweep, env, self.state, cell))
            self.pending[ref] = _Pending("cell", cell.key, time.time(), cell.environment, (cell, art))

    def _collect(self, ref, p: _Pending, snapshot: dict) -> None:
        started, _node, attempts = snapshot.get(p.key, (p.submitted, None, 0))
        try:
            value, error = self.ray.get(ref), None
        except Exception as exc:  # task error after retries, cancelled, worker/node died
            value, error = None, _ray_error_text(exc, attempts)
            if not attempts and not self.tracker_lost:
                env = self.sweep.training if p.kind == "train" else self.sweep.environment(p.environment)
                error = (f"the worker for environment {env.name!r} died before the harness code started: its "
                         f"runtime_env {sorted(env.runtime_env) or '(none)'} probably cannot import the harness's "
                         f"dependencies (numpy/pyarrow/TensorFlow versions); see the python-core-worker logs. {error}")
        if p.kind == "train":
            self._collect_train(p, value, error)
            return
        cell, art = p.payload
        row = value if value is not None else {"verdict": "error", "error": error}
        self.state.add(cell, {**row, "attempts": attempts, "started_at": started}, art)

    def _collect_train(self, p: _Pending, value: dict | None, error: str | None, verdict: str = "error") -> None:
        name = p.payload
        cells = self._cells_of(name)
        if value is None:
            for cell in cells:
                self.state.add(cell, {"verdict": verdict, "error": f"training: {error}"})
            return
        self.state.train_fp[name] = value["fingerprint"]
        for cell in cells:
            art = value["artifacts"][cell.format]
            if art.get("error"):
                self.state.add(cell, _cell_row_for_failed_artifact(art), art)
            else:
                self.queue.append((cell, art))
        # Environment-major order keeps consecutive tasks on the same worker.
        order = {e.name: i for i, e in enumerate(self.sweep.environments)}
        self.queue.sort(key=lambda item: order[item[0].environment])

    def _check_timeouts(self, snapshot: dict) -> None:
        now = time.time()
        for ref, p in list(self.pending.items()):
            started = snapshot.get(p.key)
            run_limit = self.sweep.train_timeout_s if p.kind == "train" else self.sweep.cell_timeout_s
            if started is None and now - p.submitted > self.sweep.schedule_timeout_s:
                env = self.sweep.training if p.kind == "train" else self.sweep.environment(p.environment)
                reason = (f"still pending after schedule_timeout_s={self.sweep.schedule_timeout_s:g}s: no node took "
                          f"{_placement_text(env)}")
                self.ray.cancel(ref, force=True)
                self.pending.pop(ref)
                if p.kind == "train":
                    self._collect_train(p, None, reason, verdict="unschedulable")
                else:
                    self.dead_envs[p.environment] = reason
                    cell, art = p.payload
                    self.state.add(cell, {"verdict": "unschedulable", "error": reason, "attempts": 0}, art)
            elif started is not None and now - started[0] > run_limit:
                self.ray.cancel(ref, force=True)
                self.pending.pop(ref)
                msg = f"timed out after {run_limit:g}s (cell_timeout_s / train_timeout_s) on node {started[1]}"
                if p.kind == "train":
                    self._collect_train(p, None, msg)
                else:
                    cell, art = p.payload
                    self.state.add(cell, {"verdict": "error", "error": msg, "attempts": started[2],
                                          "started_at": started[0]}, art)


def _placement_text(env: Environment) -> str:
    parts = [f"num_cpus={env.num_cpus:g}"]
    if env.num_gpus:
        parts.append(f"num_gpus={env.num_gpus:g}")
    if env.accelerator_type:
        parts.append(f"accelerator_type={env.accelerator_type}")
    parts += [f"{k}={v:g}" for k, v in env.resources.items()]
    parts += [f"label {k}={v}" for k, v in env.label_selector.items()]
    return f"environment {env.name!r} ({', '.join(parts)})"


def _ray_error_text(exc: BaseException, attempts: int) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    first = next((line for line in reversed(text) if line.strip()), "") if text else ""
    return f"{name} after {attempts} attempt(s): {first[:500]}"
