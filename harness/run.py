"""One run of a sweep: its identity, its plan, where its files are, and its results.

A :class:`Run` is what ``harness run`` creates and what ``--resume``,
``harness explain`` and ``harness report`` read back from the run directory:

* **identity**: the run id, the sweep's name and file, the directories its
  scenarios were found in, and the resolved storage URI (``run.json``);
* **plan digest**: what decides the run's results -- scenario names and the
  digests of their sources, formats, every environment's settings (names and
  knobs, tolerances, expectations; not descriptions), the training
  environment, tolerances and expectations. ``--resume`` and ``explain``
  refuse a run whose sweep file or scenarios changed since;
* **layout**: every path of the run, in the run directory and in storage
  (through ``harness.layout``);
* **results**: the run's table, one row per cell in the sweep's order (the
  last row of a cell winning), and the derived cells ``explain`` adds (the
  attribution variants), kept apart in ``attribution/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from . import layout, results
from .records import Cell, CellResult, to_json
from .scenario import Scenario
from .spec import Environment, Sweep, environment_document

RUN_FILE = "run.json"
#: Where the derived cells of ``harness explain`` (its attribution variants) are kept in a run directory.
DERIVED_DIR = "attribution"
_DERIVED_ENVIRONMENTS = "environments.json"


class RunDirError(ValueError):
    """A run directory cannot be used as asked (exit code 2): the message names the directory and the fix."""


def new_run_id() -> str:
    """A UTC timestamp and a short random suffix: ``20260101T120000Z-a1b2c3``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def environment_digest(env: Environment) -> str:
    """What in ``env`` decides a cell's result (its settings, not its description)."""
    doc = environment_document(env)
    doc.pop("description", None)
    return hashlib.sha256(to_json([env.name, doc]).encode()).hexdigest()[:16]


def plan_digest(sweep: Sweep, scenarios: Mapping[str, Scenario]) -> str:
    """What decides a run's results: cells, scenario sources, environments, tolerances, expectations.

    Names count (a renamed environment is another column), and so do
    ``repeats`` (they decide ``flaky``); descriptions, comments, timeouts,
    retries and ``explain`` do not.
    """
    def tolerance(tol: Any) -> Any:
        return dataclasses.asdict(tol) if tol is not None else None

    parts = {
        "scenarios": [[name, getattr(scenarios.get(name), "source_digest", None)] for name in sweep.scenarios],
        "formats": list(sweep.formats),
        "training": environment_digest(sweep.training),
        "environments": [environment_digest(env) for env in sweep.environments],
        "tolerance": tolerance(sweep.tolerance),
        "output_tolerances": {k: tolerance(v) for k, v in sorted(sweep.output_tolerances.items())},
        "expect": [sweep.expect, sweep.expect_save],
        "batch_size": sweep.batch_size,
    }
    if sweep.repeats != 1:  # (only then: the digests of runs planned before repeats existed stay the same)
        parts["repeats"] = sweep.repeats
    return hashlib.sha256(to_json(parts).encode()).hexdigest()[:16]


def write_file(path: str | Path, data: bytes) -> None:
    """Write a local file atomically (readers see the old file or the whole new one): ``Storage.write_bytes``."""
    from .storage import Storage

    path = Path(path)
    Storage.open(str(path.parent.resolve())).write_bytes(path.name, data)


def explanation_file(run_dir: str | Path, cell: str) -> Path:
    """Where ``harness explain`` keeps the explanation of cell ``scenario/format/environment`` (JSON)."""
    scenario, fmt, env = cell.split("/")
    return Path(run_dir) / "explain" / scenario / fmt / f"{env}.json"


def explanation_files(run_dir: str | Path) -> list[Path]:
    """Every explanation file of a run directory (``harness report`` reads them without a ``Run``)."""
    return sorted((Path(run_dir) / "explain").glob("*/*/*.json"))


@dataclass(frozen=True)
class Run:
    """A run's identity and layout (see the module docstring). Frozen: a new run id is a new ``Run``."""

    run_dir: Path
    run_id: str
    sweep: str  # the sweep's name
    source: str  # the sweep file (absolute), or a description for a sweep built in memory
    plan: str
    storage: str  # resolved storage URI
    scenario_paths: tuple[str, ...] = ()  # directories its scenarios were found in (absolute)

    # -- creating and reading back ------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | Path, sweep: Sweep, scenarios: Mapping[str, Scenario], storage: str, *,
               run_id: str | None = None, scenario_paths: Iterable[str] = ()) -> "Run":
        """A new run of ``sweep`` in ``run_dir`` (not written yet: see :meth:`save`)."""
        source = sweep.source
        if Path(source).is_file():
            source = str(Path(source).resolve())
        paths = dict.fromkeys([*sweep.scenario_paths, *(str(Path(p).resolve()) for p in scenario_paths)])
        return cls(Path(run_dir), run_id or new_run_id(), sweep.name, source, plan_digest(sweep, scenarios),
                   storage, tuple(paths))

    @classmethod
    def load(cls, run_dir: str | Path) -> "Run":
        """The run recorded in ``run_dir/run.json``.

        Raises:
            FileNotFoundError: there is no run.json (not a run directory, or one of an older harness).
            RunDirError: run.json is not one.
        """
        run_dir = Path(run_dir)
        path = run_dir / RUN_FILE
        try:
            return cls.parse(run_dir, path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no run here; pass a run directory written by `harness run`") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(f"{path}: unreadable or not written by `harness run`; run the sweep again "
                              "into a fresh --out") from None

    @classmethod
    def parse(cls, run_dir: str | Path, raw: bytes) -> "Run":
        """The run a ``run.json``'s bytes record, in ``run_dir``.

        Raises:
            ValueError, KeyError, TypeError: not a run.json.
        """
        meta = json.loads(raw)
        return cls(Path(run_dir), meta["run_id"], meta["sweep"], meta["source"], meta.get("plan") or "",
                   meta.get("storage") or "", tuple(meta.get("scenario_paths") or ()))

    def save(self) -> None:
        """Write ``run.json`` (atomically)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_file(self.run_dir / RUN_FILE, json.dumps(
            {"run_id": self.run_id, "sweep": self.sweep, "source": self.source, "plan": self.plan,
             "storage": self.storage, "scenario_paths": list(self.scenario_paths)}, indent=1).encode())

    @classmethod
    def resume(cls, run_dir: str | Path, sweep: Sweep, scenarios: Mapping[str, Scenario], storage: str, *,
               scenario_paths: Iterable[str] = (), run_id: str | None = None) -> tuple["Run", pa.Table]:
        """The run in ``run_dir`` to go on with (same id), and the finished cells ``--resume`` keeps.

        A directory with no run yet gives a new run and an empty table. With
        ``run_id``, the run is first rebuilt in ``run_dir`` from its directory
        in ``storage`` (:meth:`fetch`): a driver on another host resumes it.

        Raises:
            RunDirError: the directory holds another sweep's run, a run planned
                from another version of this sweep (or its scenarios), or an
                unreadable run.json; with ``run_id``: no such run in storage, or
                ``run_dir`` holds another run.
            results.ResultsError: its results file is not one.
        """
        run_dir = Path(run_dir)
        fresh = cls.create(run_dir, sweep, scenarios, storage, scenario_paths=scenario_paths)
        if run_id is not None:
            cls.fetch(run_dir, storage, run_id, expect=fresh)
        fix = "use another --out, or run without --resume to start afresh there"
        try:
            stored = results.read_table(run_dir)
        except FileNotFoundError:
            stored = results.SCHEMA.empty_table()
        try:
            previous = cls.load(run_dir)
        except FileNotFoundError:
            previous = None
        except RunDirError:
            raise RunDirError(f"{run_dir / RUN_FILE}: unreadable; {fix}") from None
        fresh.refuse_other(str(run_dir), previous, stored, fix)
        run_id = previous.run_id if previous else (stored["run_id"][0].as_py() if stored.num_rows else None)
        return dataclasses.replace(fresh, run_id=run_id or fresh.run_id), stored

    def refuse_other(self, where: str, previous: "Run | None", stored: pa.Table, fix: str) -> None:
        """Refuse to go on with ``previous`` (and its rows ``stored``) as this run: another sweep, or another plan.

        Raises:
            RunDirError: naming ``where``, what differs, and ``fix``.
        """
        sweeps = ({previous.sweep} if previous else set()) | (set(stored.column("sweep").to_pylist()) - {None})
        if sweeps and sweeps != {self.sweep}:
            raise RunDirError(f"{where}: --resume: it holds a run of sweep {', '.join(map(repr, sorted(sweeps)))}, "
                              f"not {self.sweep!r}; {fix}")
        if previous is not None and previous.plan and previous.plan != self.plan:
            raise RunDirError(f"{where}: --resume: its run {previous.run_id!r} was planned from another version "
                              f"of sweep {self.sweep!r} (scenarios, environments, tolerances or expectations "
                              f"changed); {fix}")

    @classmethod
    def fetch(cls, run_dir: str | Path, storage: str, run_id: str, expect: "Run | None" = None) -> None:
        """Rebuild ``run_dir`` from run ``run_id`` as published in ``storage`` (``runs/<run_id>/``).

        Writes ``run_dir/run.json`` and ``run_dir/results.parquet`` with the rows
        the run published (its ``results.parquet`` and journal segments) and
        any ``run_dir`` already holds of the same run, the last row of a cell
        winning. Nothing is written unless every check passes.

        Args:
            expect: the run about to go on (the sweep as it is now): a stored run
                of another sweep or plan is refused, as ``--resume`` refuses a directory.

        Raises:
            RunDirError: no such run in storage, its run.json is unreadable, it
                does not match ``expect``, or ``run_dir`` holds another run.
            harness.storage.StorageError: the storage cannot be read.
            results.ResultsError: a published results file is not one.
        """
        from .storage import Storage

        run_dir = Path(run_dir)
        st = Storage.open(storage)
        root = layout.run_root(run_id)
        where = st.name_of(root)
        try:
            raw = st.read_bytes(f"{root}/{RUN_FILE}")
        except FileNotFoundError:
            raise RunDirError(f"{where}: no run {run_id!r} in this storage (no {RUN_FILE}); check --run-id and "
                              "--storage (`harness run` prints the run as storage: .../runs/RUN_ID)") from None
        try:
            stored_run = cls.parse(run_dir, raw)
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{where}/{RUN_FILE}: unreadable or not written by `harness run`; resume another "
                              "run, or run the sweep afresh") from None
        if stored_run.run_id != run_id:
            raise RunDirError(f"{where}/{RUN_FILE}: names run {stored_run.run_id!r}, not {run_id!r}; the storage "
                              "was changed by hand: run the sweep afresh")
        try:
            published = results.read_table(st.uri_of(root))
        except FileNotFoundError:
            published = results.SCHEMA.empty_table()
        if expect is not None:
            expect.refuse_other(where, stored_run, published,
                                "resume it with the sweep file it was run from, or run the sweep afresh")
        try:
            local = cls.load(run_dir)
        except FileNotFoundError:
            local = None
        except RunDirError:
            raise RunDirError(f"{run_dir / RUN_FILE}: unreadable; use another --out to resume run {run_id!r} "
                              "into") from None
        if local is not None and local.run_id != run_id:
            raise RunDirError(f"{run_dir}: --resume --run-id {run_id}: it holds run {local.run_id!r}; use another "
                              "--out (an empty or new directory)")
        try:
            mine = results.read_table(run_dir)
        except FileNotFoundError:
            mine = results.SCHEMA.empty_table()
        table = results.last_row_per_cell(pa.concat_tables([published, mine]))
        run_dir.mkdir(parents=True, exist_ok=True)
        if local is None:
            write_file(run_dir / RUN_FILE, raw)
        results.write_table(table, run_dir / layout.RESULTS)

    def check(self, sweep: Sweep, scenarios: Mapping[str, Scenario]) -> None:
        """Refuse ``sweep`` unless it is the one this run was planned from (``explain`` re-runs cells of it).

        Raises:
            RunDirError: its name or plan digest differs (the sweep file or a scenario changed since).
        """
        if sweep.name != self.sweep:
            raise RunDirError(f"{self.run_dir}: the run is of sweep {self.sweep!r}, not {sweep.name!r} "
                              f"({sweep.source}); name the run's own sweep file with --sweep")
        if self.plan and plan_digest(sweep, scenarios) != self.plan:
            raise RunDirError(f"{self.run_dir}: {sweep.source} changed since run {self.run_id!r} (its environments, "
                              "tolerances, expectations or scenarios differ from what was run); explain a run of "
                              "the sweep as it is now (run it again), or restore the file")

    # -- layout: the run directory ------------------------------------------------------------
    @property
    def results_file(self) -> Path:
        return self.run_dir / "results.parquet"

    def explanation_file(self, cell: str) -> Path:
        """``RUN_DIR/explain/<scenario>/<format>/<environment>.json`` of cell ``scenario/format/environment``."""
        return explanation_file(self.run_dir, cell)

    @property
    def derived_dir(self) -> Path:
        return self.run_dir / DERIVED_DIR

    # -- layout: storage ------------------------------------------------------------------------
    def observation_path(self, cell: Cell | CellResult, derived: bool = False, repeat: int = 0) -> str:
        """Where a cell's outputs go in storage (a derived cell's under ``attribution``; ``repeat`` > 0: a later repeat's)."""
        return layout.observation_file(self.run_id, cell, "attribution" if derived else "observations", repeat)

    def explain_path(self, cell: Cell | CellResult, part: str = "") -> str:
        return layout.explain_file(self.run_id, cell, part)

    @property
    def results_path(self) -> str:
        return layout.results_file(self.run_id)

    def publish(self, files: Mapping[str, bytes]) -> dict[str, str]:
        """Write ``files`` (name -> bytes) into the run's directory in storage, ``runs/<run_id>/``.

        ``harness report STORAGE/runs/RUN_ID`` reads a run from there, on any
        machine that reaches the storage. Returns each file's URI, by name.

        Raises:
            harness.storage.StorageError: a file could not be written (the cause and the place first).
        """
        from .storage import Storage

        st = Storage.open(self.storage)
        written = {}
        for name, data in files.items():
            rel = f"{layout.run_root(self.run_id)}/{name}"
            st.write_bytes(rel, data)
            written[name] = st.uri_of(rel)
        return written

    def publish_journal(self, data: bytes) -> None:
        """Publish journal lines (cells finished since the last time) as a new segment in ``runs/<run_id>/journal/``.

        Raises:
            harness.storage.StorageError: the segment could not be written.
        """
        from .storage import Storage

        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.jsonl"  # names sort by time
        Storage.open(self.storage).write_bytes(f"{layout.journal_dir(self.run_id)}/{name}", data)

    def remove_journal(self) -> None:
        """Remove the published journal segments (once ``results.parquet`` in storage holds every row).

        Best effort: a segment left behind only repeats rows of ``results.parquet``.
        """
        from .storage import Storage

        try:
            Storage.open(self.storage).delete(layout.journal_dir(self.run_id))
        except Exception:  # noqa: BLE001 -- see above
            pass

    # -- results ---------------------------------------------------------------------------------
    def ordered(self, table: pa.Table, sweep: Sweep) -> pa.Table:
        """``table`` as this run's results: one row per cell (its last), in the sweep's order.

        Reports of the same sweep always have the same layout, whatever order cells finished in.
        """
        return results.last_row_per_cell(table, order=(sweep.scenarios, sweep.formats,
                                                       [e.name for e in sweep.environments]))

    def table(self) -> pa.Table:
        """The run's results as stored (results.parquet and any journal), one row per cell."""
        return results.last_row_per_cell(results.read_table(self.run_dir))

    def cells(self) -> list[CellResult]:
        """The run's results as typed records, one per cell.

        Raises:
            FileNotFoundError: the run has no results yet.
            results.ResultsError: a damaged table.
        """
        return results.cells(self.table())

    # -- derived cells (explain's attribution variants) ---------------------------------------
    def derived_cells(self, environments: Sequence[Environment]) -> list[CellResult]:
        """The derived cells already run whose environment is still one of ``environments``, exactly as now.

        A variant is reused only if its settings are the same (``environment_digest``),
        so a harness that derives a variant differently never reuses a stale row.
        """
        try:
            stored = json.loads((self.derived_dir / _DERIVED_ENVIRONMENTS).read_text())
            table = results.read_table(self.derived_dir)
        except (OSError, ValueError, results.ResultsError):
            return []
        current = {env.name: environment_digest(env) for env in environments}
        keep = {name for name, digest in current.items() if stored.get(name) == digest}
        return [c for c in results.cells(results.last_row_per_cell(table)) if c.environment in keep]

    def record_derived_environments(self, environments: Sequence[Environment]) -> None:
        """Remember the settings of derived environments once their cells ran (see :meth:`derived_cells`)."""
        path = self.derived_dir / _DERIVED_ENVIRONMENTS
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        stored.update({env.name: environment_digest(env) for env in environments})
        self.derived_dir.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(stored, indent=1, sort_keys=True).encode())
