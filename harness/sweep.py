"""Plan a sweep, run it (on Ray through the engine, or inline), collect the results.

Flow: ``plan`` the cells -> a :class:`harness.run.Run` (new, or resumed) ->
check placements against the cluster (``harness.placement.precheck``) -> the
engine (``harness.engine``, driving ``harness.scheduler``) trains each scenario
in the training environment and replays every cell on its environment's
long-lived worker -> each finished cell is completed with the run's columns by
the ``Collector`` and appended to the run journal (one line, O(1)) -> the
final ``results.parquet`` is written once, from the journal, at the end.

A crash or SIGKILL loses no finished cell: ``--resume`` (or ``harness report``)
rebuilds the table from the journal. The run's ``run.json`` is in storage from
the start and the journal's lines follow in batches every few seconds
(``runs/<run_id>/journal/``), so a driver on another host resumes the run from
storage alone (``--resume --run-id``). ``execute`` runs any cells of a run --
the sweep's, or the derived cells ``harness explain`` adds -- and is the one
way into the engine.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa

from . import engine, placement, results
from .reach import StorageUnreachable, check_storage_reach
from .repeats import combine as combine_repeats
from .records import ArtifactRecord, Cell, CellResult, TrainRecord, to_json
from .run import RUN_FILE, Run
from .scenario import Scenario
from .spec import Sweep

Progress = Callable[[int, int, CellResult], None]


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


# -- collecting ----------------------------------------------------------------
class Collector:
    """Completes each finished cell with the run's columns and journals it: O(1) per cell.

    The one place that decides ``passed`` (the verdict -- of every repeat, for
    a repeated cell -- meets the environment's expectation and the save round
    trip meets ``expect_save``), and that makes a repeated cell's repeats one
    row (``harness.repeats.combine``).
    """

    def __init__(self, sweep: Sweep, run_id: str, journal: results.Journal, total: int,
                 progress: Progress | None = None, done: Iterable[str] = ()):
        self.sweep, self.run_id, self.journal, self.total, self.progress = sweep, run_id, journal, total, progress
        self.done: set[str] = set(done)
        self.train_fingerprints: dict[str, str] = {}
        self.train_seconds: dict[str, float] = {}
        self._envs = {env.name: env for env in sweep.environments}
        self.harness_failures: list[str] = []  # failures of the harness itself (exit code 3)

    def harness_failed(self, message: str) -> None:
        """Record a failure of the harness itself (not of a cell): the run ends with exit code 3."""
        if message not in self.harness_failures:
            self.harness_failures.append(message)

    def training_done(self, record: TrainRecord) -> None:
        # Encoded once per scenario, not once per cell.
        self.train_fingerprints[record.scenario] = to_json(record.fingerprint)
        self.train_seconds[record.scenario] = record.seconds
        for art in record.artifacts.values():
            if art.repaired:
                print(f"harness: warning: replaced a damaged artifact in storage: {art.repaired}", file=sys.stderr)

    def add(self, cell: Cell, result: CellResult, artifact: ArtifactRecord | None = None,
            attempts: int | None = None, repeats: Sequence[CellResult] = ()) -> None:
        """Complete ``result`` with the run's columns, journal it and report progress (once per cell).

        ``repeats``: every repeat's result, in repeat order, when the cell was
        replayed more than once (``result`` is the first); they become one row.
        """
        if cell.name in self.done:
            return  # exactly one row per cell, whatever retried
        env = self._envs[cell.environment]
        expected = self.sweep.expectation(env)
        if repeats:
            result = combine_repeats(repeats)
        save = {}
        if artifact is not None:
            save = dict(artifact_digest=artifact.digest, artifact_uri=artifact.uri, save_verdict=artifact.save_verdict,
                        save_max_abs_diff=artifact.save_max_abs_diff, save_max_ulp_diff=artifact.save_max_ulp_diff)
        save_verdict = save.get("save_verdict", result.save_verdict)
        save_ok = save_verdict is None or results.meets(save_verdict, self.sweep.expect_save)
        attempts = result.attempts if attempts is None else attempts
        # Every repeat is judged (one that missed the expectation fails the cell); the row shows the first.
        met = result.meets(expected) and all(part.meets(expected) for part in repeats[1:])
        error = result.error
        if not save_ok and result.verdict in results.NUMERIC_VERDICTS:
            note = f"save round trip is {save_verdict} (expect_save: {self.sweep.expect_save})"
            error = f"{note}; {error}" if error else note
        result = result.replace(
            run_id=self.run_id, sweep=self.sweep.name, scenario=cell.scenario, format=cell.format,
            environment=cell.environment, expected=expected, error=error,
            # An optional environment no node can host is not judged: it may not exist on every machine.
            passed=None if env.optional and result.verdict == "unschedulable" else met and save_ok,
            train_fingerprint=self.train_fingerprints.get(cell.scenario), train_s=self.train_seconds.get(cell.scenario),
            attempts=attempts, repeats=result.repeats if repeats else int(bool(attempts)),
            # A cell that never started (unschedulable, failed save) is dated when decided.
            started_at=result.started_at or time.time(), **save)
        self.journal.append(result)
        self.done.add(cell.name)
        if self.progress:
            self.progress(len(self.done), self.total, result)


@dataclass
class RunResult:
    run: Run
    table: Any  # pa.Table
    results_uri: str | None = None  # copy of results.parquet in shared storage
    harness_failures: list[str] = field(default_factory=list)  # the harness itself failed (exit code 3)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def storage_uri(self) -> str:
        """The storage the run used (``Run.publish`` puts its files in ``runs/<run_id>/`` there)."""
        return self.run.storage

    @property
    def passed(self) -> bool:
        """Every cell met its expectation (a cell not judged, ``passed`` null, does not fail the run)."""
        return all(p is not False for p in self.table.column("passed").to_pylist())


def check_storage(uri: str, run: Run) -> None:
    """Write, read back and delete a small file: a storage the run cannot use fails now, not in every cell.

    Raises:
        StorageError: the storage cannot be opened, written or read (exit code 3).
    """
    from . import layout
    from .storage import Storage, StorageError, StorageFailure

    rel = layout.writable_probe(run.run_id)
    try:
        st = Storage.open(uri)
        st.write_bytes(rel, b"ok")
        if st.read_bytes(rel) != b"ok":
            raise OSError("a file written there reads back differently")
        st.fs.delete_file(st.path(rel))
    except StorageFailure as exc:  # the cause and the place first, then what it means here
        raise StorageFailure(f"{exc}; this storage cannot be used (check the path or bucket exists and "
                             "is writable)", exc.kind, exc.transient) from None
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"storage {uri} cannot be used: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                           "(check the path or bucket exists and is writable)") from None


def scenario_dirs(sweep: Sweep, scenarios: Mapping[str, Scenario]) -> list[str]:
    """The directories the sweep's scenarios come from (a run records them: ``explain`` finds them again)."""
    return [str(Path(s.source_file).parent) for name in sweep.scenarios
            if (s := scenarios.get(name)) is not None and s.source_file]


def run_sweep(sweep: Sweep, scenarios: Mapping[str, Scenario], *, out_dir: str | Path,
              address: str = "local", storage: str | None = None, only: Iterable[str] = (),
              retrain: bool = False, inline: bool = False, resume: bool = False,
              progress: Progress | None = None, run_id: str | None = None, verbose: bool = False,
              worker_cls: type | None = None, started: Callable[[Run], None] | None = None) -> RunResult:
    """Run every cell of ``sweep`` and write ``out_dir/results.parquet``.

    Args:
        sweep: the validated sweep.
        scenarios: name -> Scenario for (at least) the sweep's scenarios.
        out_dir: run directory on the driver (run.json, journal, results.parquet, reports).
        address: ``local`` (embedded Ray), ``auto`` or ``ray://host:port``. If
            Ray is already initialised in this process it is used as is.
        storage: overrides the sweep's ``storage`` URI.
        only: restrict cells (see ``plan``).
        retrain: ignore complete artifacts already in storage.
        inline: run everything in this process, without Ray (debugging). An
            environment needing import-time env vars this process lacks gets
            an ``error`` verdict saying so.
        resume: keep the cells an earlier run finished in ``out_dir`` and run
            only the missing ones, under the same run id.
        run_id: with ``resume``, the run to resume from its directory in
            storage, ``runs/<run_id>/`` (``out_dir`` is rebuilt from it: see
            ``Run.fetch``); without, the id of the new run.
        progress: called as ``progress(done, total, result)`` after each cell.
        started: called as ``started(run)`` once the run is recorded (in ``out_dir``
            and in storage), before any cell runs.
        worker_cls: the actor body (benchmarks replace TensorFlow work with it).

    Returns:
        A ``RunResult``; ``passed`` is true iff every cell met its expectation.
        A run whose engine failed still writes every row it finished.

    Raises:
        engine.RayUnavailable: Ray could not be started or reached.
        run.RunDirError: ``resume`` and ``out_dir`` holds another sweep's or plan's run
            (or, with ``run_id``, storage holds no such run, or another sweep's or plan's).
    """
    from .storage import RunLease, StorageError, normalize_uri

    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Resolved once, here: workers must never resolve a relative path in their own cwd.
    storage_uri = normalize_uri(storage or sweep.storage)
    dirs = scenario_dirs(sweep, scenarios)
    if resume:
        run, previous = Run.resume(run_dir, sweep, scenarios, storage_uri, scenario_paths=dirs, run_id=run_id)
    else:
        run, previous = Run.create(run_dir, sweep, scenarios, storage_uri, scenario_paths=dirs, run_id=run_id), None
        results.Journal.remove(run_dir)  # a fresh run never mixes in an old journal
    if previous is None:
        previous = results.SCHEMA.empty_table()
    cells = plan(sweep, only)
    check_storage(storage_uri, run)
    run.save()
    # In storage from the start, and each finished cell within seconds (the journal's
    # segments): a driver on another host can resume the run with --run-id.
    run.publish({RUN_FILE: (run_dir / RUN_FILE).read_bytes()})
    if started is not None:
        started(run)
    done = set(zip(*(previous.column(c).to_pylist() for c in results.KEY_COLUMNS)))
    todo = [c for c in cells if c.key not in done]
    with results.Journal(run_dir, publish=run.publish_journal) as journal, \
            RunLease(storage_uri, run.run_id):  # gc honours the lease
        collector = Collector(sweep, run.run_id, journal, total=len(cells), progress=progress,
                              done=[c.name for c in cells if c.key in done])
        try:
            execute(run, sweep, scenarios, todo, collector, address=address, inline=inline, retrain=retrain,
                    verbose=verbose, worker_cls=worker_cls)
        finally:
            table = run.ordered(pa.concat_tables([previous, results.Journal.table(run_dir)]), sweep)
            results.write_table(table, run.results_file)
    results.Journal.remove(run_dir)  # every line is in results.parquet now
    # Also publish next to the observations in shared storage: on a cluster
    # the driver's disk may not outlive the run.
    uri = None
    try:
        uri = run.publish({"results.parquet": results.to_parquet_bytes(table),
                           RUN_FILE: (run_dir / RUN_FILE).read_bytes()})["results.parquet"]
        run.remove_journal()  # every row is in results.parquet now
    except StorageError as exc:  # one sentence that starts with the cause and the place
        collector.harness_failed(f"{exc}; the results are in {run.results_file}")
    except Exception as exc:
        collector.harness_failed(f"results could not be published to storage {storage_uri}: {exc}; "
                                 f"they are in {run.results_file}")
    return RunResult(run=run, table=table, results_uri=uri, harness_failures=collector.harness_failures)


def execute(run: Run, sweep: Sweep, scenarios: Mapping[str, Scenario], cells: Sequence[Cell], sink: "Collector", *,
            address: str = "local", inline: bool = False, retrain: bool = False, verbose: bool = False,
            worker_cls: type | None = None, artifacts: Mapping[str, ArtifactRecord] | None = None,
            derived: bool = False) -> None:
    """Run ``cells`` of ``run`` and hand every result to ``sink`` (one row per cell, even if the engine fails).

    Args:
        run: the run the cells belong to (storage, observation paths).
        sweep: the sweep whose environments the cells name (for derived cells: a
            sweep of the derived environments).
        scenarios: name -> Scenario.
        cells: what to run.
        sink: the collector.
        artifacts: cell name -> an artifact already trained (the cell is only replayed).
        derived: the cells are explain's attribution variants (their outputs go under ``attribution``).

    A failure of the harness itself while cells run (Ray lost, a bug) is
    recorded with ``sink.harness_failed`` and every cell without a row gets an
    ``error`` row saying so; ``KeyboardInterrupt`` is not caught.
    """
    observation = (lambda cell, repeat=0: run.observation_path(cell, derived=derived, repeat=repeat))
    # Explain's attribution variants answer "which knob", not "does it repeat": they run once.
    repeated = {} if derived else sweep.repeated()
    needed = {c.scenario for c in cells}
    try:
        if inline:
            _run_inline(sweep, {n: scenarios[n] for n in needed}, run.storage, sink, cells, retrain, observation,
                        artifacts, repeated)
            return
        with engine.session(address, verbose):
            if engine.local_cores() is None:  # a cluster: can its hosts read this storage? (exit 2 if not)
                for host in check_storage_reach(run.storage, sweep, engine.cluster_nodes()):
                    print(f"harness: warning: {host} did not answer the storage probe in time", file=sys.stderr)
            engine.register_scenarios(scenarios[n] for n in needed)
            nodes = engine.cluster_nodes() if sweep.precheck else None
            unschedulable = placement.precheck(sweep, nodes) if nodes is not None else {}
            from .worker import Worker

            eng = engine.Engine(sweep, {n: scenarios[n] for n in needed}, run.storage, sink, retrain=retrain,
                                worker_cls=worker_cls or Worker, observation_path=observation,
                                busy_cpus=engine.local_cores(), nodes=nodes)
            eng.run(cells, unschedulable, artifacts, repeated)
    except (engine.RayUnavailable, StorageUnreachable):
        raise
    except Exception as exc:  # the engine failed: what finished is kept; --resume runs the rest
        left = sum(c.name not in sink.done for c in cells)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sink.harness_failed(f"the run stopped with {left} of {len(cells)} cell(s) not run: "
                            f"{type(exc).__name__}: {text} (finished cells are kept; continue with --resume)")


def _run_inline(sweep: Sweep, scenarios: Mapping[str, Scenario], storage_uri: str, sink: Collector,
                todo: Sequence[Cell], retrain: bool, observation: Callable[[Cell, int], str],
                artifacts: Mapping[str, ArtifactRecord] | None, repeated: Mapping[str, int]) -> None:
    """Train and replay in this process. Repeats run here too, one after another in this one process:
    they show what changes between calls, not between processes (the pids in ``detail.repeats`` say so)."""
    from .replay import replay
    from .train import train

    artifacts = artifacts or {}
    for name in dict.fromkeys(c.scenario for c in todo):
        mine = [c for c in todo if c.scenario == name]
        record = None
        if any(c.name not in artifacts for c in mine):
            record = train(scenarios[name], list(sweep.formats), storage_uri, sweep.training,
                           batch_size=sweep.batch_size, retrain=retrain)
            sink.training_done(record)
        for cell in mine:
            art = artifacts.get(cell.name) or record.artifacts[cell.format]
            if art.error:
                sink.add(cell, CellResult(verdict="error", error=art.error), art)
                continue
            env = sweep.environment(cell.environment)
            parts = [replay(scenarios[name], cell.format, art.path, storage_uri, env,
                            batch_size=sweep.batch_size_for(env), tolerance=sweep.tolerance_for(env),
                            output_tolerances=dict(sweep.output_tolerances),
                            observation_path=observation(cell, repeat),
                            manifest_sha256=art.manifest_sha256).replace(attempts=1)
                     for repeat in range(repeated.get(cell.environment, 1))]
            sink.add(cell, parts[0], art, attempts=len(parts), repeats=parts if len(parts) > 1 else ())
