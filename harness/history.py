"""Run history: every run's results table, kept on shared storage, and what a night changed.

Layout under a history URI (any ``harness.storage`` URI: local path, ``s3://``...)::

    <history_uri>/date=YYYY-MM-DD/<run_id>.parquet

One Parquet file per run, partitioned by the run's UTC date (earliest
``started_at`` of its cells, or today when unknown). Appending the same run
again replaces its file, so nightly jobs can be retried safely.

:class:`History` reads that layout as a ``pyarrow.dataset`` with hive
partitions (through the storage's ``pyarrow.fs`` filesystem): every question
projects only the columns it needs and pushes its filters down (dates prune
partitions, run ids prune files, sweep and cell keys filter rows), so a
history of months of 10,000-cell sweeps answers "tonight vs last night" by
reading two files' narrow columns. A damaged or foreign Parquet file is
reported (named) and skipped, never fatal.

:func:`compare` is the nightly's question: tonight against the previous run
(:func:`diff_runs`: new failures, known failures, fixed, flaky, differences,
accuracy tiers, fingerprints), each failing cell's streak (first bad and last good run, and
the fingerprint keys that changed since it last passed), and the trends of
the last runs; :func:`render_changes_md` renders it. Rows are read as typed
:class:`harness.records.CellResult` cells (projections of them), decoded by
:func:`harness.results.cells`; JSON is decoded only for the cells (or the
distinct fingerprints) a question needs. No TensorFlow or Ray here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import itertools
import json
import math
import operator
import re
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from harness import charts, results, text
from harness.compare import AS_ACCURATE, LESS_ACCURATE
from harness.records import CellResult, json_object
from harness.storage import Storage, StorageError

#: Schema of a loaded history: the results schema plus the partition date.
HISTORY_SCHEMA = results.SCHEMA.append(pa.field("date", pa.string()))

#: Fingerprint keys whose change between runs is worth reporting; volatile keys
#: (pid, hostname, ray_node_id, ...) are deliberately absent.
FINGERPRINT_KEYS = (
    "tf_version", "keras_version", "python", "numpy", "cuda_version", "cudnn_version",
    "cpu_model", "cpu_flags", "gpus", "gpu_driver", "onednn", "onednn_max_isa", "intra_op_threads",
    "inter_op_threads", "tf32", "op_determinism", "jit_compile", "xla_cpu_flags",
)

#: Pseudo-environment name under which training-fingerprint changes are listed.
TRAINING = "(training)"

#: How many runs the nightly's trends look back (tonight included).
TREND_RUNS = 30

_CELL_KEY = ("scenario", "format", "environment")
_FILE_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})/([^/.][^/]*)\.parquet$")
_PARTITION_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})/")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]*$")
#: Entries shown per list of "What changed" (Markdown and HTML reports); the rest are counted.
LIST_LIMIT = 20

Key = tuple[str, str, str]

#: ``flaky`` (the repeats of a cell disagree bitwise: ``harness.repeats``); histories written
#: before it existed read it as null, i.e. not flaky.
_FLAKY = tuple(c for c in ("flaky",) if c in results.COLUMN_NAMES)
#: What a cell's pass/fail status needs.
_STATUS_COLUMNS = ("run_id", *_CELL_KEY, "verdict", "passed", *_FLAKY)
#: What run summaries and trend points read: a long history is decoded without its JSON columns.
_SUMMARY_COLUMNS = (*_STATUS_COLUMNS, "sweep", "started_at", "max_ulp_diff", "max_abs_diff",
                    "required_ulp", "required_atol")
#: A cell's accuracy tier against float64, with the two RMSEs it was judged by.
_ACCURACY_COLUMNS = ("accuracy", "rmse_vs_fp64", "reference_rmse_vs_fp64")
#: What the diff of two runs reads per cell (fingerprints are compared per distinct value).
_DIFF_COLUMNS = (*_STATUS_COLUMNS, "expected", "error", "max_ulp_diff", "max_abs_diff", *_ACCURACY_COLUMNS)
_FINGERPRINT_COLUMNS = ("fingerprint", "train_fingerprint")

# Fingerprint columns are read as dictionaries: a night holds a few distinct fingerprints
# (one per worker), not one per cell, so 10,000 rows cost a few strings and an index each.
_READ_SCHEMA = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string()))
                          if f.name in _FINGERPRINT_COLUMNS else f for f in HISTORY_SCHEMA])
_FORMAT = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=list(_FINGERPRINT_COLUMNS)))
_PARTITIONING = ds.partitioning(pa.schema([HISTORY_SCHEMA.field("date")]), flavor="hive")
#: Columns without which a Parquet file in the history is not a results table.
_REQUIRED = ("run_id", *_CELL_KEY, "verdict")

#: A cell's status in one run (see :func:`cell_status`).
PASSING, FAILING, FLAKY, UNJUDGED = "passing", "failing", "flaky", "unjudged"


# -- value formatting (shared with harness.report) -----------------------------
def format_value(value: Any, limit: int = 120) -> str:
    """A fingerprint value as short text: strings as-is, the rest as compact JSON."""
    if value is None:
        return "(missing)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_change(old: Any, new: Any) -> str:
    """``old -> new``; for two lists of strings (e.g. cpu_flags) only what was added/removed."""
    if isinstance(old, list) and isinstance(new, list) and all(isinstance(v, str) for v in old + new):
        added = [f"+{v}" for v in new if v not in old]
        removed = [f"-{v}" for v in old if v not in new]
        return format_value(", ".join(added + removed) or "reordered", limit=400)
    return f"{format_value(old)} -> {format_value(new)}"


# -- writing -------------------------------------------------------------------
def _conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly the results schema (missing columns as nulls, extras dropped)."""
    for field in results.SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table.select(list(results.COLUMN_NAMES)).cast(results.SCHEMA)


def _earliest(table: pa.Table) -> _dt.datetime | None:
    return pc.min(table["started_at"]).as_py() if "started_at" in table.column_names else None


def _run_date(table: pa.Table) -> str:
    earliest = _earliest(table)
    when = earliest if earliest is not None else _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).date().isoformat()


def _single(table: pa.Table, column: str) -> str | None:
    values = pc.unique(table[column]).to_pylist()
    if len(values) != 1:
        raise ValueError(f"needs the table of exactly one run; got {column} values {values}")
    return values[0]


def _single_run_id(table: pa.Table) -> str:
    run_id = _single(table, "run_id")
    if run_id is None:
        raise ValueError("needs the table of exactly one run; got run_ids [None]")
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run_id {run_id!r} cannot be a file name; use letters, digits and _.:+-")
    return run_id


def append_run(table: pa.Table, history_uri: str) -> str:
    """Store one run's results table in the history at ``history_uri``.

    Appending a run that is already there replaces its file in place (same
    partition), so retries never duplicate a run.

    Returns:
        The path written, relative to ``history_uri`` (``date=YYYY-MM-DD/<run_id>.parquet``).

    Raises:
        ValueError: the table holds no run_id or several.
    """
    table = _conform(table)
    try:
        run_id = _single_run_id(table)
    except ValueError as exc:
        raise ValueError(f"append_run {exc}") from None
    found = History.open(history_uri)
    existing = [f.rel for f in found.files if f.run_id == run_id]
    rel = existing[0] if existing else f"date={_run_date(table)}/{run_id}.parquet"
    found.storage.write_bytes(rel, results.to_parquet_bytes(table))
    return rel


# -- reading -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunFile:
    """One run's file in the history: its path (relative to the history), partition date and run id."""

    rel: str
    date: str
    run_id: str


@dataclasses.dataclass(frozen=True)
class RunRef:
    """A run as the history knows it: id, partition date and the start of its earliest cell."""

    run_id: str
    date: str | None
    started_at: _dt.datetime | None = None

    @property
    def order(self) -> tuple[_dt.datetime, str]:
        """Chronological order of runs: started_at, else the partition date, then run_id."""
        return _when(self.started_at, self.date), self.run_id

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "date": self.date}


def _when(started_at: _dt.datetime | None, date: str | None) -> _dt.datetime:
    if started_at is not None:
        return started_at
    return _dt.datetime.fromisoformat(date or "1970-01-01").replace(tzinfo=_dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Freed:
    """What :meth:`History.retain` deleted (or, with ``dry_run``, would delete)."""

    cutoff: str  # partitions dated before this day went
    partitions: tuple[str, ...]
    files: int
    bytes: int
    dry_run: bool = False

    def text(self) -> str:
        """One line for the console: what was (or would be) freed."""
        verb = "would free" if self.dry_run else "freed"
        span = f" ({self.partitions[0]} .. {self.partitions[-1]})" if self.partitions else ""
        return (f"history retention: {verb} {len(self.partitions)} partition(s){span} older than {self.cutoff}: "
                f"{self.files} file(s), {_size(self.bytes)} ({self.bytes} bytes)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _all_of(*exprs: ds.Expression | None) -> ds.Expression | None:
    """The conjunction of the filters given (None: no filter)."""
    kept = [e for e in exprs if e is not None]
    return functools.reduce(operator.and_, kept) if kept else None


def _only_cells(table: pa.Table, keys: Iterable[Key]) -> pa.Table:
    """The rows of ``table`` whose ``(scenario, format, environment)`` is one of ``keys``.

    Each key column is filtered in Arrow first; only the rows that pass all
    three (usually just the wanted ones) are matched as Python tuples.
    """
    wanted = set(keys)
    for i, column in enumerate(_CELL_KEY):
        table = table.filter(pc.is_in(table[column], pa.array(sorted({k[i] for k in wanted}), pa.string())))
    columns = [table[c].to_pylist() for c in _CELL_KEY]
    return table.filter(pa.array([k in wanted for k in zip(*columns)], pa.bool_()))


def _unknown_verdict(table: pa.Table) -> str | None:
    for column in ("verdict", "save_verdict"):
        if column in table.column_names:
            values = table[column]
            bad = values.filter(pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(results.VERDICTS)))))
            if len(bad):
                return f"unknown {column} {bad[0].as_py()!r}"
    return None


@dataclasses.dataclass
class History:
    """A history dataset on storage: its run files, read through ``pyarrow.dataset``.

    Opening lists the files once (no file is read); every query reads only
    what it names. Files that cannot be read as a results table are skipped
    and collected in :attr:`problems`, each message naming the file.

    Example:
        >>> past = History.open("s3://bucket/history")
        >>> previous = next(past.runs("nightly"), None)
        >>> table = past.read(["scenario", "verdict"], run_ids={previous.run_id})
    """

    storage: Storage
    files: list[RunFile]
    listing: list[str] = dataclasses.field(repr=False)  # every file below the history, relative
    _bad: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # skipped file -> why

    @classmethod
    def open(cls, uri: str) -> "History":
        """The history at ``uri`` (nothing there yet is an empty history).

        Raises:
            harness.storage.StorageError: the storage cannot be opened or listed.
        """
        storage = Storage.open(uri)
        try:
            listing = storage.walk_files("")
        except OSError as exc:  # unreachable, refused, no such bucket: the harness cannot run (exit 3)
            where = storage.name_of("").rstrip("/")
            raise StorageError(f"history {where}: cannot list it: {text.one_line(exc, 300)}") from exc
        files = [RunFile(rel, m.group(1), m.group(2)) for rel in listing if (m := _FILE_RE.match(rel))]
        return cls(storage, files, listing)

    @property
    def problems(self) -> list[str]:
        """One message per skipped file: its name, why, and what to do."""
        return [f"{self.storage.name_of(rel)}: {why}; skipped (move it out of the history or delete it)"
                for rel, why in self._bad.items()]

    def date_of(self, run_id: str) -> str | None:
        """The partition date of ``run_id``'s file, or None when it is not in the history."""
        return next((f.date for f in self.files if f.run_id == run_id), None)

    # -- rows --------------------------------------------------------------------
    def read(self, columns: Iterable[str] | None = None, *, sweep: str | None = None,
             run_ids: Iterable[str] | None = None, since: str | None = None, until: str | None = None,
             cells: Iterable[Key] | None = None) -> pa.Table:
        """The rows of the history that match every filter given, projected to ``columns`` (+ ``date``).

        Args:
            columns: results columns to read (default all); ``date`` is always added.
            sweep: only this sweep's rows.
            run_ids: only these runs (files of other runs are not opened).
            since, until: only partitions dated within ``[since, until]`` (``YYYY-MM-DD``).
            cells: only these ``(scenario, format, environment)`` keys.

        Returns:
            A table with the types of :data:`HISTORY_SCHEMA`, except that
            ``fingerprint`` and ``train_fingerprint`` are dictionary-encoded
            strings. Files written before a column existed give nulls there.
        """
        names = list(dict.fromkeys([*(columns or results.COLUMN_NAMES), "date"]))
        unknown = [n for n in names if n not in _READ_SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown history column(s) {unknown}; choose from {_READ_SCHEMA.names}")
        runs = None if run_ids is None else set(run_ids)
        keys = None if cells is None else set(cells)
        files = [f for f in self.files if f.rel not in self._bad and (runs is None or f.run_id in runs)]
        empty = _READ_SCHEMA.empty_table().select(names)
        if not files or keys == set() or runs == set():
            return empty
        dataset = ds.dataset([self.storage.path(f.rel) for f in files], schema=_READ_SCHEMA, format=_FORMAT,
                             filesystem=self.storage.fs, partitioning=_PARTITIONING,
                             partition_base_dir=self.storage.root)
        dates = _all_of(ds.field("date") >= since if since else None, ds.field("date") <= until if until else None)
        rows = _all_of(
            ds.field("sweep") == sweep if sweep is not None else None,
            ds.field("run_id").isin(sorted(runs)) if runs is not None else None,
            *(ds.field(c).isin(sorted({k[i] for k in keys})) if keys is not None else None
              for i, c in enumerate(_CELL_KEY)))
        # The verdict is always read: a file with verdicts outside VERDICTS is skipped by every query alike.
        scanned = list(dict.fromkeys([*names, "verdict", *(_CELL_KEY if keys is not None else ())]))
        parts = [part for fragment in dataset.get_fragments(filter=dates)
                 if (part := self._scan(fragment, scanned, rows)) is not None]
        if not parts:
            return empty
        table = pa.concat_tables(parts)
        return (_only_cells(table, keys) if keys is not None else table).select(names)

    def _scan(self, fragment: ds.Fragment, names: list[str], rows: ds.Expression | None) -> pa.Table | None:
        """One file's matching rows, or None (and the file in :attr:`problems`) if it is not a results table."""
        rel = fragment.path[len(self.storage.root) + 1:]
        try:
            present = fragment.physical_schema.names
            missing = [c for c in _REQUIRED if c not in present]
            if missing:
                self._bad[rel] = f"not a results table (no column {missing[0]!r})"
                return None
            table = fragment.to_table(schema=_READ_SCHEMA, columns=names, filter=rows)
        except (pa.ArrowException, OSError, ValueError) as exc:
            self._unreadable(rel, exc)
            return None
        problem = _unknown_verdict(table)
        if problem:
            self._bad[rel] = f"not a results table written by `harness run` ({problem})"
            return None
        return table

    def _unreadable(self, rel: str, exc: Exception) -> None:
        """Skip a file that cannot be read, unless the storage itself is what failed (then raise)."""
        try:
            self.storage.fs.get_file_info(self.storage.path(rel))
        except OSError as down:
            where = self.storage.name_of("").rstrip("/")
            raise StorageError(f"history {where}: cannot read {rel}: {text.one_line(down, 300)}") from exc
        reason = text.one_line(f"{type(exc).__name__}: {str(exc).replace(self.storage.path(rel), rel)}", 200)
        self._bad[rel] = f"unreadable, damaged or not Parquet ({reason})"

    # -- runs --------------------------------------------------------------------
    def runs(self, sweep: str | None = None, *, before: RunRef | None = None) -> Iterator[RunRef]:
        """The runs (of ``sweep``), newest first; with ``before``, only runs older than it (never itself).

        Lazy, a date partition at a time, each file read for ``run_id`` and
        ``started_at`` only: "the previous run" opens the newest partition's files.
        """
        for date in sorted({f.date for f in self.files}, reverse=True):
            if before is not None and before.date is not None and date > before.date:
                continue  # a partition is its runs' start date: later partitions hold later runs
            found = _run_refs(self.read(["run_id", "started_at"], sweep=sweep, since=date, until=date))
            for ref in sorted(found, key=lambda r: r.order, reverse=True):
                if before is None or (ref.run_id != before.run_id and ref.order < before.order):
                    yield ref

    def recent(self, sweep: str | None, last: int = TREND_RUNS, current: pa.Table | None = None) -> pa.Table:
        """The summary columns of the last ``last`` runs, oldest rows first, with their dates.

        With ``current`` (tonight's results table), the window ends with it
        whether or not it was appended yet.
        """
        tonight = _tonight(self, current) if current is not None else None
        refs = list(itertools.islice(self.runs(sweep, before=tonight), last - (tonight is not None)))
        table = self.read(_SUMMARY_COLUMNS, sweep=sweep, run_ids={r.run_id for r in refs})
        if tonight is not None:
            tonight_rows = _with_date(_project(current, _SUMMARY_COLUMNS), tonight.date)
            table = pa.concat_tables([table, tonight_rows.select(table.column_names)])
        return table

    def summaries(self, sweep: str | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """The last ``last`` runs (all with None) as :func:`list_runs` summaries, oldest first."""
        refs = list(itertools.islice(self.runs(sweep), last))
        return list_runs(self.read(_SUMMARY_COLUMNS, sweep=sweep, run_ids={r.run_id for r in refs}))

    def cell_points(self, key: Key, sweep: str | None = None) -> list[TrendPoint]:
        """Every result of one cell in the history, oldest first (pass it to :func:`cell_streak`)."""
        return cell_trend(self.read(_SUMMARY_COLUMNS, sweep=sweep, cells=[key]), *key, last=None)

    # -- streaks -----------------------------------------------------------------
    def streaks(self, sweep: str | None, tonight: RunRef, statuses: Mapping[Key, str]) -> dict[Key, "Streak"]:
        """For each cell ``FAILING`` tonight, its failing streak: walks back run by run until it last passed.

        Each step reads one older run's status columns for the cells still
        open, so a cell that passed last night costs one small read.
        """
        seen = {key: [(tonight, FAILING)] for key, status in statuses.items() if status == FAILING}
        still_open = set(seen)
        for ref in self.runs(sweep, before=tonight):
            if not still_open:
                break
            for cell in _cells(self.read(_STATUS_COLUMNS, sweep=sweep, run_ids={ref.run_id}, cells=still_open)):
                status = cell_status(cell)
                seen[cell.key].append((ref, status))
                if status == PASSING:
                    still_open.discard(cell.key)
        return {key: streak for key, history in seen.items() if (streak := failing_streak(history)) is not None}

    def changed_since(self, sweep: str | None, current: pa.Table,
                      last_good: Mapping[Key, RunRef]) -> dict[Key, dict[str, Any] | None]:
        """Per cell, the fingerprint keys that changed between its last good run and ``current``.

        Values as :func:`fingerprint_delta`'s. Decodes the fingerprints of
        these cells only: theirs in those runs, and tonight's.
        """
        if not last_good:
            return {}
        columns = ("run_id", *_CELL_KEY, *_FINGERPRINT_COLUMNS)
        then = self.read(columns, sweep=sweep, run_ids={r.run_id for r in last_good.values()}, cells=last_good)
        old = {c.key: c for c in _cells(then) if c.run_id == last_good[c.key].run_id}
        new = index_cells(_cells(_only_cells(_project(current, columns), last_good)))
        return {key: fingerprint_delta(old.get(key), new.get(key)) for key in last_good}

    # -- retention ---------------------------------------------------------------
    def retain(self, keep_days: int, *, today: _dt.date, dry_run: bool = False,
               protect: Iterable[str] = ()) -> Freed:
        """Delete the date partitions older than ``keep_days`` days before ``today``.

        A partition holding a run in ``protect`` (tonight's) is never deleted.
        Everything in a deleted partition goes, damaged files included.

        Raises:
            ValueError: ``keep_days`` is negative.
            harness.storage.StorageError: a partition could not be deleted (those before it are gone).
        """
        if keep_days < 0:
            raise ValueError(f"keep_days must be >= 0, got {keep_days}")
        cutoff = (today - _dt.timedelta(days=keep_days)).isoformat()
        kept = {f.date for f in self.files if f.run_id in set(protect)}
        doomed: dict[str, list[str]] = {}
        for rel in self.listing:
            m = _PARTITION_RE.match(rel)
            if m and m.group(1) < cutoff and m.group(1) not in kept:
                doomed.setdefault(m.group(1), []).append(rel)
        paths = [self.storage.path(rel) for rels in doomed.values() for rel in rels]
        size = sum(info.size or 0 for info in self.storage.fs.get_file_info(paths)) if paths else 0
        if not dry_run:
            for date in sorted(doomed):
                try:
                    self.storage.delete(f"date={date}")
                except (OSError, StorageError) as exc:
                    where = self.storage.name_of(f"date={date}")
                    raise StorageError(f"history retention: cannot delete {where}: {text.one_line(exc, 300)}") from exc
            self.files = [f for f in self.files if f.date not in doomed]
            self.listing = [rel for rel in self.listing if not any(rel in rels for rels in doomed.values())]
        return Freed(cutoff, tuple(sorted(doomed)), len(paths), size, dry_run)


def _run_refs(table: pa.Table) -> list[RunRef]:
    grouped = table.group_by(["run_id", "date"], use_threads=False).aggregate([("started_at", "min")])
    return [RunRef(r["run_id"], r["date"], r["started_at_min"]) for r in grouped.to_pylist()]


def _tonight(history: History, current: pa.Table) -> RunRef:
    """Tonight's run as a :class:`RunRef` (its partition date: where it is, or where it will be)."""
    run_id = _single_run_id(current)
    return RunRef(run_id, history.date_of(run_id) or _run_date(current), _earliest(current))


def _with_date(table: pa.Table, date: str) -> pa.Table:
    return _conform(table).append_column(HISTORY_SCHEMA.field("date"), pa.array([date] * len(table), pa.string()))


def load_history(history_uri: str, *, sweep: str | None = None) -> pa.Table:
    """All runs stored under ``history_uri`` as one table (results schema + ``date``).

    Files that are not results tables are skipped (:class:`History` names
    them in ``problems``; use it directly to see them, and to read less).

    Args:
        history_uri: where :func:`append_run` wrote.
        sweep: keep only rows of this sweep.

    Returns:
        The rows of every run (an empty table with :data:`HISTORY_SCHEMA` if
        there are none). Files written before a column existed get nulls there.
    """
    return History.open(history_uri).read(sweep=sweep).cast(HISTORY_SCHEMA)


# -- querying a history table ----------------------------------------------------
def _cells(table: pa.Table, columns: Iterable[str] | None = None) -> list[CellResult]:
    """A results or history table's rows as typed cells (a history's ``date`` is the run's, not the cell's).

    With ``columns``, only those are decoded; the cells' other fields stay None.
    """
    return results.cells(_project(table, columns or results.COLUMN_NAMES))


def _project(table: pa.Table, columns: Iterable[str]) -> pa.Table:
    """``table`` with only those of ``columns`` it has (filter after projecting: a filter copies every column)."""
    return table.select([c for c in columns if c in table.column_names])


def _dated_cells(table: pa.Table) -> list[tuple[CellResult, str | None]]:
    """Each row's :data:`_SUMMARY_COLUMNS` as a typed cell, beside its run's partition date (None if no ``date``)."""
    dates = table["date"].to_pylist() if "date" in table.column_names else [None] * table.num_rows
    return list(zip(_cells(table, _SUMMARY_COLUMNS), dates))


def _order_key(run: Mapping[str, Any]) -> tuple[_dt.datetime, str]:
    """Chronological order of run summaries (as :attr:`RunRef.order`)."""
    return _when(run["started_at"], run["date"]), run["run_id"]


def _count(mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """A boolean column as 0/1 (null counts as 0), to be summed per group."""
    return pc.cast(pc.fill_null(mask, False), pa.int64())


def list_runs(history: pa.Table) -> list[dict[str, Any]]:
    """One summary dict per run, oldest first (counted in Arrow: no row is decoded).

    Each dict has run_id, sweep, date, started_at (a UTC datetime or None),
    cells, passed, failed and one count per verdict (``bitwise``,
    ``within_tolerance``, ...). ``history`` needs ``run_id``, ``sweep``,
    ``started_at``, ``passed`` and ``verdict``; ``date`` if it has one.
    """
    if not history.num_rows:
        return []
    date = history["date"] if "date" in history.column_names else pa.nulls(history.num_rows, pa.string())
    counts = {"passed": _count(pc.equal(history["passed"], True)), "failed": _count(pc.equal(history["passed"], False)),
              **{v: _count(pc.equal(history["verdict"], v)) for v in results.VERDICTS}}
    table = pa.table({"run_id": history["run_id"], "sweep": history["sweep"], "date": date,
                      "started_at": history["started_at"], **counts})
    grouped = table.group_by(["run_id"], use_threads=False).aggregate(
        [("sweep", "first"), ("date", "first"), ("started_at", "min"), ([], "count_all"),
         *((name, "sum") for name in counts)])
    runs = [{"run_id": r["run_id"], "sweep": r["sweep_first"], "date": r["date_first"],
             "started_at": r["started_at_min"], "cells": r["count_all"],
             **{name: r[f"{name}_sum"] for name in counts}} for r in grouped.to_pylist()]
    return sorted(runs, key=_order_key)


def previous_run(history: pa.Table, sweep: str, run_id: str) -> pa.Table | None:
    """The most recent run of ``sweep`` before ``run_id``, or None.

    Runs are ordered by started_at, then run_id. If ``run_id`` is not in the
    history yet (tonight's run, not appended), the latest run of the sweep is
    returned. (:meth:`History.runs` answers the same from storage, reading less.)
    """
    runs = list_runs(history.filter(pc.equal(history["sweep"], sweep)))
    keys = {r["run_id"]: _order_key(r) for r in runs}
    earlier = [r for r in runs if r["run_id"] != run_id and (run_id not in keys or _order_key(r) < keys[run_id])]
    if not earlier:
        return None
    return history.filter(pc.equal(history["run_id"], earlier[-1]["run_id"]))


@dataclasses.dataclass(frozen=True)
class TrendPoint:
    """One cell's result in one run: a point of the cell's trend."""

    run_id: str | None
    date: str | None  # the run's partition date; None for a run not in the history
    verdict: str | None
    passed: bool | None
    max_ulp_diff: float | None
    max_abs_diff: float | None
    required_ulp: float | None = None  # the smallest tolerances that would have passed the cell
    required_atol: float | None = None
    flaky: bool | None = None  # the cell's repeats disagreed (None: not known)

    @classmethod
    def of(cls, cell: CellResult, date: str | None = None) -> "TrendPoint":
        """The point of ``cell``'s run (``date``: that run's partition date, if it has one)."""
        return cls(cell.run_id, date, cell.verdict, cell.passed, cell.max_ulp_diff, cell.max_abs_diff,
                   cell.required_ulp, cell.required_atol, getattr(cell, "flaky", None))


def trends(history: pa.Table, last: int | None = 10) -> dict[Key, list[TrendPoint]]:
    """Per cell ``(scenario, format, environment)``: its last ``last`` runs (all with None), oldest first."""
    dated = _dated_cells(history)
    order = {r["run_id"]: _order_key(r) for r in list_runs(history)}
    per_cell: dict[Key, dict[str, TrendPoint]] = {}
    for cell, date in dated:
        per_cell.setdefault(cell.key, {})[cell.run_id] = TrendPoint.of(cell, date)  # a later duplicate wins
    return {key: sorted(points.values(), key=lambda p: order[p.run_id])[-last if last else 0:]
            for key, points in per_cell.items()}


def cell_trend(history: pa.Table, scenario: str, format: str, environment: str,
               last: int | None = 10) -> list[TrendPoint]:
    """The last ``last`` results of one cell (all with None), oldest first (see :func:`trends`)."""
    return trends(_only_cells(history, [(scenario, format, environment)]), last).get(
        (scenario, format, environment), [])


# -- status, streaks, new vs known ----------------------------------------------------
def cell_status(cell: Any) -> str:
    """``FLAKY``, ``FAILING``, ``PASSING`` or ``UNJUDGED``: a cell (or trend point) in one run.

    ``flaky`` (its repeats disagreed; None when not repeated) wins over
    ``passed``, so a flaky cell is never a failure, a regression or a fix. The
    judgement is the collector's ``passed`` (False: failing, True: passing,
    None: not judged, e.g. an optional cell).
    """
    if getattr(cell, "flaky", None) is True:
        return FLAKY
    return {True: PASSING, False: FAILING}.get(cell.passed, UNJUDGED)


def classify(previous: Mapping[Key, str], current: Mapping[Key, str]) -> dict[str, list[Key]]:
    """Tonight's cells against last night's, by status (see :func:`cell_status`).

    Returns ``{"new": ..., "known": ..., "fixed": ..., "flaky": ...}``, keys
    in ``current``'s order: new = failing tonight and not failing last night
    (passing, not judged, flaky or absent); known = failing both nights;
    fixed = passing tonight, failing last night; flaky = flaky tonight. Every
    cell failing tonight is new or known, never both; a flaky cell is none of
    the others.
    """
    out: dict[str, list[Key]] = {"new": [], "known": [], "fixed": [], "flaky": []}
    for key, status in current.items():
        before = previous.get(key)
        if status == FLAKY:
            out["flaky"].append(key)
        elif status == FAILING:
            out["known" if before == FAILING else "new"].append(key)
        elif status == PASSING and before == FAILING:
            out["fixed"].append(key)
    return out


@dataclasses.dataclass(frozen=True)
class Streak:
    """A cell's current run of failures: the run it started in, and the last run before it that passed."""

    first_bad: RunRef
    last_good: RunRef | None  # None: it never passed in the history
    failing_runs: int  # runs in the streak, tonight included


def failing_streak(history: Sequence[tuple[RunRef, str]]) -> Streak | None:
    """The failing streak ending at the newest run, from ``(run, status)`` pairs newest first.

    None when the newest run is not ``FAILING``. Runs where the cell is flaky
    or not judged neither end nor extend a streak; the first ``PASSING`` run
    ends it (that is the last good run).
    """
    if not history or history[0][1] != FAILING:
        return None
    first_bad, last_good, failing = history[0][0], None, 0
    for run, status in history:
        if status == FAILING:
            first_bad, failing = run, failing + 1
        elif status == PASSING:
            last_good = run
            break
    return Streak(first_bad, last_good, failing)


def cell_streak(points: Sequence[TrendPoint]) -> Streak | None:
    """The failing streak at the end of one cell's trend (oldest first), or None if its last point is not failing."""
    return failing_streak([(RunRef(p.run_id, p.date), cell_status(p)) for p in reversed(points)])


def fingerprint_delta(old: CellResult | None, new: CellResult | None) -> dict[str, Any] | None:
    """The :data:`FINGERPRINT_KEYS` whose value differs between two results of one cell.

    Reload-worker keys by name, training-worker keys as ``"(training) key"``,
    each ``{"old", "new"}``. None when neither fingerprint could be compared
    (one side has none: the cell did not run).
    """
    delta: dict[str, Any] = {}
    compared = False
    for column, prefix in (("fingerprint", ""), ("train_fingerprint", f"{TRAINING} ")):
        before = json_object(getattr(old, column, None))
        after = json_object(getattr(new, column, None))
        if before and after:
            compared = True
            delta.update({prefix + k: {"old": before.get(k), "new": after.get(k)}
                          for k in FINGERPRINT_KEYS if before.get(k) != after.get(k)})
    return delta if compared else None


# -- comparing runs --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Changes:
    """What differs between a previous run and the current one (and, from :func:`compare`, since when).

    Cells are dicts with scenario, format, environment (plus old/new values
    where relevant). ``accuracy_changes`` holds cells whose accuracy tier went from
    ``as_accurate`` to ``less_accurate`` or back (:func:`accuracy_change`), passing or not.
    Failing cells (``newly_failing``, ``known_failing``) from
    :func:`compare` also carry ``first_bad`` and ``last_good`` (``{"run_id",
    "date"}``; ``last_good`` None if the cell never passed), ``failing_runs``
    and ``changed_since_good`` (see :func:`fingerprint_delta`).
    ``fingerprint_changes`` holds one ``{"environment", "changes": {key:
    {"old", "new"}}}`` per environment whose fingerprint changed
    (training-worker changes under ``"(training)"``). ``nights`` and
    ``drifting`` are the trends of the last runs (:func:`night_counts`,
    :func:`drifting_cells`); ``skipped_files`` names history files that could
    not be read.
    """

    newly_failing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fixed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    diff_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fingerprint_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    new_environments: list[str] = dataclasses.field(default_factory=list)
    vanished_environments: list[str] = dataclasses.field(default_factory=list)
    new_cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    vanished_cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    accuracy_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    known_failing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    flaky: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    previous_run: dict[str, Any] | None = None  # {"run_id", "date"} of the run compared with
    nights: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    drifting: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped_files: list[str] = dataclasses.field(default_factory=list)

    @property
    def regressed(self) -> bool:
        """True iff some cell fails tonight that did not fail in the previous run (flaky cells never count)."""
        return bool(self.newly_failing)

    @property
    def counts(self) -> dict[str, int]:
        """How many cells are new failures, known failures, fixed and flaky."""
        return {"new": len(self.newly_failing), "known": len(self.known_failing), "fixed": len(self.fixed),
                "flaky": len(self.flaky)}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) of every field plus ``regressed`` and ``counts``."""
        return {**dataclasses.asdict(self), "regressed": self.regressed, "counts": self.counts}


def index_cells(cells: Iterable[CellResult]) -> dict[Key, CellResult]:
    """Cells by ``(scenario, format, environment)``, in first-appearance order; a later duplicate wins."""
    return {cell.key: cell for cell in cells}


def _cell_id(key: Key) -> dict[str, Any]:
    return dict(zip(_CELL_KEY, key))


def _environments(cells: Mapping[Key, Any]) -> list[str]:
    return list(dict.fromkeys(key[2] for key in cells))


def _status_change(key: Key, old: CellResult | None, new: CellResult) -> dict[str, Any]:
    return {**_cell_id(key), "old_verdict": old.verdict if old else None, "new_verdict": new.verdict,
            "old_passed": old.passed if old else None, "new_passed": new.passed, "error": new.error}


def is_finite(value: Any) -> bool:
    """A real, finite number (not None, bool, NaN or inf): a metric worth showing or comparing."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metric_changed(old: float, new: float, factor: float) -> bool:
    if (old == 0) != (new == 0):
        return True
    return old != 0 and max(new / old, old / new) > factor


def _diff_change(key: Key, metric: str, old: CellResult, new: CellResult, factor: float) -> dict[str, Any] | None:
    before, after = getattr(old, metric), getattr(new, metric)
    if not (is_finite(before) and is_finite(after)) or not _metric_changed(before, after, factor):
        return None
    return {**_cell_id(key), "metric": metric, "old": before, "new": after,
            "ratio": after / before if before else None}


def accuracy_change(key: Key, old: CellResult, new: CellResult) -> dict[str, Any] | None:
    """A cell whose tier against float64 went from ``as_accurate`` to ``less_accurate`` or back, else None.

    ``n/a`` and unjudged cells (no oracle, no outputs) have no tier to lose: a change to
    or from them is a verdict or scenario change, reported as such.
    """
    tiers = (AS_ACCURATE, LESS_ACCURATE)
    if old.accuracy not in tiers or new.accuracy not in tiers or old.accuracy == new.accuracy:
        return None
    return {**_cell_id(key), "old": old.accuracy, "new": new.accuracy, "rmse_vs_fp64": new.rmse_vs_fp64,
            "reference_rmse_vs_fp64": new.reference_rmse_vs_fp64, "passed": new.passed}


def _fingerprints_by_env(table: pa.Table | None, column: str) -> dict[str, dict[str, Any]]:
    """Per environment (or :data:`TRAINING`), the most common value of each compared key.

    Counts rows per distinct fingerprint in Arrow and decodes each distinct
    JSON text once: a night of 10,000 cells holds a handful.
    """
    if table is None or column not in table.column_names or not table.num_rows:
        return {}
    by = ["environment", column] if column == "fingerprint" else [column]
    counted = (table.select(by).group_by(by, use_threads=False).aggregate([([], "count_all")])
               .cast(pa.schema([pa.field(n, pa.string()) for n in by] + [pa.field("count_all", pa.int64())])))
    grouped: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for cell, n in zip(results.cells(counted.select(by)), counted["count_all"].to_pylist()):
        fp = json_object(getattr(cell, column))
        if fp:
            grouped.setdefault(cell.environment if column == "fingerprint" else TRAINING, []).append((fp, n))
    return {env: _representative(fps) for env, fps in grouped.items()}


def _representative(fingerprints: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """Per compared key, the most common value among an environment's cells (``(fingerprint, cells)`` pairs)."""
    merged = {}
    for key in FINGERPRINT_KEYS:
        counts: Counter[str] = Counter()
        for fp, n in fingerprints:
            counts[json.dumps(fp.get(key), sort_keys=True, default=str)] += n
        merged[key] = json.loads(counts.most_common(1)[0][0])
    return merged


def _fingerprint_changes(old: pa.Table | None, new: pa.Table) -> list[dict[str, Any]]:
    changes = []
    for column in _FINGERPRINT_COLUMNS:
        before, after = _fingerprints_by_env(old, column), _fingerprints_by_env(new, column)
        for env in [e for e in after if e in before]:
            diff = {k: {"old": before[env][k], "new": after[env][k]}
                    for k in FINGERPRINT_KEYS if before[env][k] != after[env][k]}
            if diff:
                changes.append({"environment": env, "changes": diff})
    return changes


def _run_of(table: pa.Table | None) -> dict[str, Any] | None:
    """``{"run_id", "date"}`` of a run's table (its first row's; date None outside a history)."""
    if table is None or not table.num_rows:
        return None
    return {"run_id": table["run_id"][0].as_py(),
            "date": table["date"][0].as_py() if "date" in table.column_names else None}


def diff_runs(previous: pa.Table | None, current: pa.Table, *, factor: float = 2.0) -> Changes:
    """Compare the current run with the previous one.

    Args:
        previous: the earlier run's rows (e.g. from :func:`previous_run`), or None.
        current: this run's rows.
        factor: a cell's max_ulp_diff or max_abs_diff counts as changed when it
            grew or shrank by more than this factor, or went from 0 to nonzero
            (or back).

    Returns:
        A :class:`Changes` (cells classified by :func:`classify`). With no
        previous run, only ``new_cells`` and ``new_environments`` are filled,
        and nothing counts as a regression.

    Raises:
        harness.results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    new_keys = _keys(current)
    old_keys = _keys(previous) if previous is not None else {}
    if previous is None:
        return Changes(new_environments=_environments(new_keys), new_cells=[_cell_id(k) for k in new_keys])
    wanted = _maybe_changed(previous, current, new_keys, old_keys)  # only these are decoded
    new = index_cells(_cells(_only_cells(_project(current, _DIFF_COLUMNS), wanted)))
    old = index_cells(_cells(_only_cells(_project(previous, _DIFF_COLUMNS), wanted)))
    groups = classify({k: cell_status(c) for k, c in old.items()}, {k: cell_status(c) for k, c in new.items()})
    diffs = [_diff_change(k, m, old[k], cell, factor) for k, cell in new.items() if k in old
             for m in ("max_ulp_diff", "max_abs_diff")]
    old_envs, new_envs = _environments(old_keys), _environments(new_keys)
    return Changes(
        previous_run=_run_of(previous),
        newly_failing=[_status_change(k, old.get(k), new[k]) for k in groups["new"]],
        known_failing=[_status_change(k, old.get(k), new[k]) for k in groups["known"]],
        fixed=[_status_change(k, old.get(k), new[k]) for k in groups["fixed"]],
        flaky=[_status_change(k, old.get(k), new[k]) for k in groups["flaky"]],
        diff_changes=[d for d in diffs if d is not None],
        fingerprint_changes=_fingerprint_changes(previous, current),
        new_environments=[e for e in new_envs if e not in old_envs],
        vanished_environments=[e for e in old_envs if e not in new_envs],
        new_cells=[_cell_id(k) for k in new_keys if k not in old_keys],
        vanished_cells=[_cell_id(k) for k in old_keys if k not in new_keys],
        accuracy_changes=[a for k, cell in new.items() if k in old
                          if (a := accuracy_change(k, old[k], cell)) is not None],
    )


def _keys(table: pa.Table) -> dict[Key, None]:
    """The table's cell keys in first-appearance order (a dict used as an ordered set)."""
    return dict.fromkeys(zip(*(table[c].to_pylist() for c in _CELL_KEY)))


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Null-safe element-wise equality: two nulls are the same, a null and a value are not."""
    return pc.fill_null(pc.or_kleene(pc.equal(a, b), pc.and_(pc.is_null(a), pc.is_null(b))), False)


def _maybe_changed(previous: pa.Table, current: pa.Table, new_keys: Mapping[Key, None],
                   old_keys: Mapping[Key, None]) -> set[Key]:
    """Every cell but those that certainly did not change (found in Arrow, nothing decoded).

    A cell certainly did not change when, in every pairing of its rows in the
    two runs, it is not failing, not flaky, and has the same ``passed``,
    verdict, max ULP / abs differences and accuracy tier: then it can be no
    failure, fix, flaky cell, difference or tier change. A night of 10,000 cells decodes its few
    changed ones.
    """
    columns = ["passed", "verdict", "max_ulp_diff", "max_abs_diff", *_FLAKY,
               *(c for c in ("accuracy",) if c in current.column_names and c in previous.column_names)]
    pairs = current.select([*_CELL_KEY, *columns]).join(
        previous.select([*_CELL_KEY, *columns]), keys=list(_CELL_KEY), join_type="inner", right_suffix=" old")
    quiet = pc.fill_null(pc.not_equal(pairs["passed"], False), True)
    for column in columns:
        quiet = pc.and_(quiet, _same(pairs[column], pairs[f"{column} old"]))
    for column in _FLAKY:
        quiet = pc.and_(quiet, pc.fill_null(pc.not_equal(pairs[column], True), True))
    calm, moved = set(_keys(pairs.filter(quiet))), set(_keys(pairs.filter(pc.invert(quiet))))
    return (set(new_keys) | set(old_keys)) - (calm - moved)


# -- trends ------------------------------------------------------------------------
def night_counts(window: pa.Table) -> list[dict[str, Any]]:
    """Per run of a history window (oldest first): ``run_id``, ``date``, ``cells``, ``non_bitwise``, ``failed``.

    ``non_bitwise`` counts cells whose verdict is not ``bitwise`` (within
    tolerance, mismatch, or did not run). From :func:`list_runs`.
    """
    return [{"run_id": r["run_id"], "date": r["date"], "cells": r["cells"], "non_bitwise": r["cells"] - r["bitwise"],
             "failed": r["failed"]} for r in list_runs(window)]


def drifting_cells(window: pa.Table, limit: int = LIST_LIMIT) -> list[dict[str, Any]]:
    """Cells whose required tolerance (ULP or atol) was not the same in every run of a history window.

    Found in Arrow (min and max per cell); only the ``limit`` cells that
    drifted most (ratio of largest to smallest required ULP) are decoded.
    Each is ``{scenario, format, environment, runs, required_ulp: [...],
    required_atol: [...]}`` with one value per run, oldest first.
    """
    if not window.num_rows:
        return []
    stats = window.group_by(list(_CELL_KEY), use_threads=False).aggregate(
        [("required_ulp", "min"), ("required_ulp", "max"), ("required_atol", "min"), ("required_atol", "max")])
    moved = stats.filter(pc.or_(*(pc.fill_null(pc.not_equal(stats[f"{m}_min"], stats[f"{m}_max"]), False)
                                  for m in ("required_ulp", "required_atol"))))
    if not moved.num_rows:
        return []
    spread = pc.divide(pc.add(pc.fill_null(moved["required_ulp_max"], 0.0), 1.0),
                       pc.add(pc.fill_null(moved["required_ulp_min"], 0.0), 1.0))
    top = moved.take(pc.select_k_unstable(moved.append_column("spread", spread),
                                          k=min(limit, moved.num_rows), sort_keys=[("spread", "descending")]))
    keys = list(zip(*(top[c].to_pylist() for c in _CELL_KEY)))
    points = trends(_only_cells(window, keys), last=None)
    return [{**_cell_id(k), "runs": [p.run_id for p in points[k]],
             "required_ulp": [p.required_ulp for p in points[k]],
             "required_atol": [p.required_atol for p in points[k]]} for k in keys]


def tolerance_chart(name: str, points: Sequence[TrendPoint]) -> str:
    """Inline SVG: one cell's required ULP and required atol over its runs (log scales), oldest first."""
    labels = [p.date or p.run_id or "?" for p in points]
    return charts.svg([charts.Panel(f"{name}: required ULP", labels, {"ulp": [p.required_ulp for p in points]},
                                    log=True),
                       charts.Panel("required atol", labels, {"atol": [p.required_atol for p in points]}, log=True)],
                      label=f"{name}: required tolerance over {len(points)} runs")


def nights_chart(nights: Sequence[Mapping[str, Any]]) -> str:
    """Inline SVG: non-bitwise and failed cells per night (from :func:`night_counts`)."""
    labels = [n["date"] or n["run_id"] for n in nights]
    return charts.svg([charts.Panel("cells per night", labels,
                                    {"non-bitwise": [n["non_bitwise"] for n in nights],
                                     "failed": [n["failed"] for n in nights]})],
                      label=f"non-bitwise and failed cells over {len(nights)} runs")


# -- the nightly comparison ------------------------------------------------------------
def compare(history: History, current: pa.Table, *, factor: float = 2.0,
            recent: pa.Table | None = None) -> Changes:
    """Tonight's run against the history it is (or will be) appended to.

    The previous run of the same sweep (:meth:`History.runs`) is diffed with
    ``current`` (:func:`diff_runs`); every cell failing tonight gets its
    streak (first bad run, last good run, fingerprint keys changed since);
    ``nights`` and ``drifting`` cover ``recent`` (default: ``history.recent``
    of the sweep's last :data:`TREND_RUNS` runs, tonight included). Files of
    the history that cannot be read are skipped and listed in ``skipped_files``.

    Raises:
        ValueError: ``current`` is not the table of exactly one run of one sweep.
        harness.storage.StorageError: the history's storage failed while reading.
    """
    tonight = _tonight(history, current)
    sweep = _single(current, "sweep")
    before = next(history.runs(sweep, before=tonight), None)
    columns = (*_DIFF_COLUMNS, *_FINGERPRINT_COLUMNS)
    previous = history.read(columns, sweep=sweep, run_ids={before.run_id}) if before else None
    changes = diff_runs(previous, current, factor=factor)
    status = _project(current, _STATUS_COLUMNS)
    failed = status.filter(pc.fill_null(pc.equal(status["passed"], False), False))  # decode only these
    statuses = {cell.key: cell_status(cell) for cell in _cells(failed)}
    streaks = history.streaks(sweep, tonight, statuses)
    since = history.changed_since(sweep, current, {k: s.last_good for k, s in streaks.items() if s.last_good})

    def with_streak(entry: dict[str, Any]) -> dict[str, Any]:
        key = (entry["scenario"], entry["format"], entry["environment"])
        streak = streaks.get(key)
        if streak is None:
            return entry
        return {**entry, "first_bad": streak.first_bad.to_dict(), "failing_runs": streak.failing_runs,
                "last_good": streak.last_good.to_dict() if streak.last_good else None,
                "changed_since_good": since.get(key)}

    if recent is None:
        recent = history.recent(sweep, TREND_RUNS, current)
    return dataclasses.replace(
        changes, previous_run=before.to_dict() if before else None,
        newly_failing=[with_streak(e) for e in changes.newly_failing],
        known_failing=[with_streak(e) for e in changes.known_failing],
        nights=night_counts(recent), drifting=drifting_cells(recent), skipped_files=history.problems)


# -- rendering -----------------------------------------------------------------
def _cell_name(entry: Mapping[str, Any]) -> str:
    return f"{text.code(entry['scenario'] + '/' + entry['format'])} @ {text.code(entry['environment'])}"


def _bullets(items: list[str]) -> list[str]:
    shown = [f"- {item}" for item in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        shown.append(f"- ... and {len(items) - LIST_LIMIT} more")
    return shown


def _section(title: str, items: list[str]) -> list[str]:
    return [f"**{title}** ({len(items)}):", "", *_bullets(items), ""] if items else []


def _run_text(run: Mapping[str, Any] | None) -> str:
    return f"{text.code(run['run_id'])} ({run['date'] or 'date unknown'})" if run else "none"


def describe_delta(delta: Mapping[str, Any] | None) -> list[str]:
    """A fingerprint delta (:func:`fingerprint_delta`, or a ``fingerprint_changes`` entry's ``changes``) as
    plain lines, ``key: old -> new`` each; one line saying why when nothing changed or nothing compared."""
    if delta is None:
        return ["fingerprints not comparable (the cell did not run)"]
    if not delta:
        return ["no fingerprint key changed"]
    return [f"{k}: {describe_change(v['old'], v['new'])}" for k, v in delta.items()]


def _changed_text(delta: Mapping[str, Any] | None) -> str:
    return "; ".join(text.markdown(line) for line in describe_delta(delta))


def _status_text(entry: Mapping[str, Any]) -> str:
    line = f"{_cell_name(entry)}: {entry['old_verdict']} -> {entry['new_verdict']}"
    if "first_bad" in entry:
        good = _run_text(entry["last_good"]) if entry["last_good"] else "never passed in the history"
        line += (f"; first bad: {_run_text(entry['first_bad'])}, failing {entry['failing_runs']} run(s)"
                 f"; last good: {good}")
        if entry["last_good"]:
            line += f"; since then: {_changed_text(entry['changed_since_good'])}"
    return line


def _diff_text(entry: Mapping[str, Any]) -> str:
    return f"{_cell_name(entry)}: {entry['metric']} {entry['old']:.3g} -> {entry['new']:.3g}"


def _accuracy_text(entry: Mapping[str, Any]) -> str:
    rmses = ""
    if is_finite(entry["rmse_vs_fp64"]) and is_finite(entry["reference_rmse_vs_fp64"]):
        rmses = f" (rmse vs float64 {entry['rmse_vs_fp64']:.3g}, reference's {entry['reference_rmse_vs_fp64']:.3g})"
    met = "; its expectation still passes" if entry["passed"] else ""
    return f"{_cell_name(entry)}: {entry['old']} -> {entry['new']}{rmses}{met}"


def _fingerprint_text(entry: Mapping[str, Any]) -> str:
    return f"{text.code(entry['environment'])}: " + _changed_text(entry["changes"])


def values_summary(values: Sequence[float | None]) -> str:
    """``first -> last (max m)`` of a trend's finite values (3 significant digits), or ``n/a``."""
    shown = [v for v in values if is_finite(v)]
    if not shown:
        return "n/a"
    return f"{shown[0]:.3g} -> {shown[-1]:.3g} (max {max(shown):.3g})"


def _values_text(values: Sequence[float | None]) -> str:
    summary = values_summary(values)
    return summary if summary == "n/a" else f"{charts.spark(values, log=True)} {summary}"


def _drift_text(entry: Mapping[str, Any]) -> str:
    return (f"{_cell_name(entry)}: required ULP {_values_text(entry['required_ulp'])}; "
            f"required atol {_values_text(entry['required_atol'])}")


def _trend_lines(changes: Changes) -> list[str]:
    if len(changes.nights) < 2:
        return []
    nights = changes.nights
    counts = [n["non_bitwise"] for n in nights]
    failed = [n["failed"] for n in nights]
    lines = [f"**Trends** (last {len(nights)} runs, {nights[0]['date']} .. {nights[-1]['date']}):", "",
             f"- non-bitwise cells per night: {charts.spark(counts)} {counts[0]} -> {counts[-1]} "
             f"(of {nights[-1]['cells']})",
             f"- failed cells per night: {charts.spark(failed)} {failed[0]} -> {failed[-1]}", ""]
    return lines + _section("Drifting required tolerance", [_drift_text(e) for e in changes.drifting])


def render_summary_md(changes: Changes) -> str:
    """The opening lines: the run compared with, and new / known / fixed / flaky, each counted."""
    c = changes.counts
    against = (f"Compared with the previous run {_run_text(changes.previous_run)}."
               if changes.previous_run else "No previous run of this sweep in the history: nothing to compare.")
    return (f"Regressed: **{'yes' if changes.regressed else 'no'}**\n\n{against}\n\n"
            f"**{c['new']} new failure(s), {c['known']} known failure(s), {c['fixed']} fixed, {c['flaky']} flaky**\n")


def render_changes_md(changes: Changes) -> str:
    """The changes as Markdown (no heading; the caller places it under one).

    Opens with the counts (:func:`render_summary_md`), then new failures,
    known failures (each with its first bad and last good run), fixed and
    flaky cells, then differences, fingerprints, environments and cells, the
    trends of the last runs, and history files that were skipped.
    """
    lines = [render_summary_md(changes)]
    lines += _section("New failures", [_status_text(e) for e in changes.newly_failing])
    lines += _section("Known failures", [_status_text(e) for e in changes.known_failing])
    lines += _section("Fixed", [_status_text(e) for e in changes.fixed])
    lines += _section("Flaky (repeats disagree; not a regression)", [_status_text(e) for e in changes.flaky])
    lines += _section("Difference changed", [_diff_text(e) for e in changes.diff_changes])
    lines += _section("Accuracy tier changed (vs float64)", [_accuracy_text(e) for e in changes.accuracy_changes])
    lines += _section("Fingerprint changed", [_fingerprint_text(e) for e in changes.fingerprint_changes])
    lines += _section("New environments", [f"`{e}`" for e in changes.new_environments])
    lines += _section("Vanished environments", [f"`{e}`" for e in changes.vanished_environments])
    lines += _section("New cells", [_cell_name(e) for e in changes.new_cells])
    lines += _section("Vanished cells", [_cell_name(e) for e in changes.vanished_cells])
    if len(lines) == 1 and changes.previous_run is not None:
        lines.append("No changes since the previous run.\n")
    lines += _trend_lines(changes)
    lines += _section("Skipped history files", [text.markdown(p) for p in changes.skipped_files])
    return "\n".join(lines).rstrip() + "\n"
