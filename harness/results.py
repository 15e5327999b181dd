"""The results table: one row per (scenario, format, environment) cell.

This module owns the Arrow schema of a cell result, turns cell dicts into a
table, and writes/reads ``results.parquet`` atomically so a crash never leaves
a half-written file. It imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

# The verdict vocabulary lives with the records; re-exported here for readers of results.
from .layout import JOURNAL as SEGMENTS, RESULTS
from .records import EXPECTATIONS, FIELDS, NUMERIC_VERDICTS, VERDICTS, CellResult, jsonable, meets, to_json  # noqa: F401

# (name, type, description) of every column, from CellResult's fields: the README's
# results schema table is generated from the same list, so code and docs cannot drift.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = tuple(
    (f.name, f.metadata["arrow"], f.metadata["doc"]) for f in FIELDS)

SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in COLUMNS])
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)
# The journal's lines: the same columns, but started_at as epoch seconds.
_JOURNAL_SCHEMA = pa.schema([pa.field(f.name, pa.float64() if f.name == "started_at" else f.type) for f in SCHEMA])


def empty_row(**values: Any) -> dict[str, Any]:
    """A row with every column present (nulls), updated with ``values``.

    Raises:
        KeyError: if a value names a column the schema does not have.
    """
    unknown = set(values) - set(COLUMN_NAMES)
    if unknown:
        raise KeyError(f"unknown result columns: {sorted(unknown)}")
    row = dict.fromkeys(COLUMN_NAMES)
    row.update(values)
    return row


def _coerce(row: Mapping[str, Any] | CellResult) -> dict[str, Any]:
    if isinstance(row, CellResult):
        return row.to_row()
    out = empty_row()  # raises KeyError on an unknown column: nothing is dropped silently
    for key, value in row.items():
        if key not in out:
            raise KeyError(f"unknown result column {key!r}")
        if isinstance(value, (dict, list)) and key in _JSON_COLUMNS:
            value = to_json(value)
        elif key == "started_at" and isinstance(value, (int, float)):
            value = _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc)
        out[key] = value
    return out


_JSON_COLUMNS = tuple(f.name for f in FIELDS if f.metadata["json"])
_NAMES = frozenset(f.name for f in FIELDS)


def to_table(rows: Iterable[Mapping[str, Any] | CellResult]) -> pa.Table:
    """Build a results table from cell results or row dicts (missing columns become null).

    Raises:
        KeyError: a dict names a column the schema does not have.
    """
    columns: dict[str, list] = {name: [] for name in COLUMN_NAMES}
    for row in rows:
        for name, value in _coerce(row).items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to the local file ``path`` as Parquet, atomically (``Storage.write_bytes``)."""
    from .storage import Storage

    path = Path(path).resolve()
    Storage.open(str(path.parent)).write_bytes(path.name, to_parquet_bytes(table))


JOURNAL = "results.journal.jsonl"
#: How often a run's driver publishes the cells finished since the last time (see ``Journal``),
#: and at most how much at once.
PUBLISH_EVERY_S = 3.0
PUBLISH_BATCH_BYTES = 4 << 20


class Journal:
    """The run's results as they arrive: one JSON line per finished cell, appended.

    Appending a line is O(1) whatever the run's size, and a line reaches the
    operating system before the next cell is handled, so killing the driver
    (even SIGKILL) loses no finished cell. ``results.parquet`` is written once
    from the journal at the end (or by ``--resume`` / ``harness report`` after
    a crash). A line torn by a crash is skipped when reading.

    With ``publish``, the lines are also handed to ``publish(data)`` in
    batches, from a background thread that reads them back from the file, at
    most every ``every_s`` seconds and once more when the journal is closed
    (the run's driver publishes them to storage: another host can resume the
    run from there). Appending costs nothing more; a batch that cannot be
    published goes with the next one.

    Example:
        >>> with Journal("runs/x") as journal:
        ...     journal.append(result)
        >>> rows = Journal.read("runs/x")
    """

    def __init__(self, run_dir: str | os.PathLike, publish: Callable[[bytes], None] | None = None,
                 every_s: float = PUBLISH_EVERY_S):
        self.path = Path(run_dir) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if torn:  # a crash cut the last line: start ours on a fresh one
            self._file.write("\n")
            self._file.flush()
        self._publish = publish
        # Published up to here: the publisher reads what follows back from the file, so
        # appending costs nothing more and memory holds one batch at most, while it is sent.
        self._published = self.path.stat().st_size
        self._publish_lock = threading.Lock()  # one batch at a time, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if publish is not None:
            self._thread = threading.Thread(target=self._publisher, args=(every_s,), daemon=True,
                                            name="harness-journal-publisher")
            self._thread.start()

    def append(self, result: CellResult) -> None:
        # Non-finite numbers stay NaN/Infinity tokens here: Arrow's JSON reader takes them as doubles.
        self._file.write(json.dumps(result.to_row(epoch=True), default=jsonable) + "\n")
        self._file.flush()

    def publish_pending(self) -> bool:
        """Hand the complete lines not yet published to ``publish``, in batches of at most about
        ``PUBLISH_BATCH_BYTES``; False if it failed (they go with the next call)."""
        if self._publish is None:
            return True
        with self._publish_lock:
            size = PUBLISH_BATCH_BYTES
            while True:
                with open(self.path, "rb") as f:
                    f.seek(self._published)
                    chunk = f.read(size)
                end = chunk.rfind(b"\n") + 1  # a line being written is left for the next batch
                if not end:
                    if len(chunk) < size:
                        return True
                    size *= 2  # one line longer than a batch
                    continue
                try:
                    self._publish(chunk[:end])
                except Exception:  # noqa: BLE001 -- storage down: the next batch (or the run's results) carries them
                    return False
                self._published += end
                if len(chunk) < size:
                    return True
                size = PUBLISH_BATCH_BYTES

    def _publisher(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.publish_pending()

    def close(self) -> None:
        """Publish what is left (with ``publish``), stop the publisher and close the file."""
        self._stop.set()
        try:
            self.publish_pending()
        finally:
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def read(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
        """Every complete line of the journal in ``run_dir`` as a results row (empty if there is none).

        Rows keep JSON columns as text: ``to_table`` takes them as they are.
        """
        path = Path(run_dir) / JOURNAL
        if not path.exists():
            return []
        with open(path, encoding="utf-8", errors="replace") as f:
            return _journal_rows(f)

    @staticmethod
    def table(run_dir: str | os.PathLike) -> pa.Table:
        """The journal in ``run_dir`` as a results table (empty if there is none)."""
        path = Path(run_dir) / JOURNAL
        return journal_table(path) if path.exists() else SCHEMA.empty_table()

    @staticmethod
    def remove(run_dir: str | os.PathLike) -> None:
        (Path(run_dir) / JOURNAL).unlink(missing_ok=True)


def _journal_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and set(row) <= _NAMES and row.get("scenario") is not None:
            out.append(row)
    return out


def journal_table(source: Path | bytes) -> pa.Table:
    """Journal lines -- a journal file, or the bytes of published segments -- as a results table.

    Arrow's JSON reader parses them natively (fast, little memory); lines
    with one torn by a crash go the careful line-by-line way instead.
    """
    if isinstance(source, bytes) and not source.strip():
        return SCHEMA.empty_table()
    try:
        raw = pajson.read_json(source if isinstance(source, Path) else pa.BufferReader(source),
                               read_options=pajson.ReadOptions(block_size=64 << 20),
                               parse_options=pajson.ParseOptions(explicit_schema=_JOURNAL_SCHEMA,
                                                                 unexpected_field_behavior="error"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if isinstance(source, Path):
            with open(source, encoding="utf-8", errors="replace") as f:
                return to_table(_journal_rows(f))
        return to_table(_journal_rows(source.decode(errors="replace").splitlines()))
    micros = pc.cast(pc.round(pc.multiply(raw["started_at"], 1e6)), pa.int64())
    started = pc.cast(micros, SCHEMA.field("started_at").type)
    return raw.set_column(raw.schema.get_field_index("started_at"), SCHEMA.field("started_at"), started)


def to_parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet file bytes (for writing through ``harness.storage``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ResultsError(ValueError):
    """A results file that cannot be read as one (exit code 2): the message names it and the fix."""


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a results table from a ``results.parquet`` file or a run directory, local or in storage.

    A run directory's journal (cells a crashed or running sweep finished) is
    read too, the last row of a cell winning. Columns the current schema has
    but an older file lacks come back as nulls, so reports keep working on old runs.
    A storage URI (``s3://bucket/prefix/runs/RUN_ID?endpoint_override=...``)
    names a run directory a sweep published there (see ``harness.run.Run.publish``),
    or its ``results.parquet``.

    Raises:
        FileNotFoundError: no results there.
        ResultsError: the file is not a results table (truncated, another file).
    """
    if "://" in os.fspath(path):
        return _read_published(os.fspath(path))
    path = Path(path)
    run_dir = path if path.is_dir() else None
    if run_dir is not None:
        path = path / "results.parquet"
    parts = []
    if path.exists():
        parts.append(_as_results(lambda: pq.read_table(path), str(path)))
    if run_dir is not None and (run_dir / SEGMENTS).is_dir():  # a run published to a local storage
        parts.append(_segments_table(os.listdir(run_dir / SEGMENTS), lambda n: (run_dir / SEGMENTS / n).read_bytes()))
    if run_dir is not None and (run_dir / JOURNAL).exists():
        parts.append(Journal.table(run_dir))
    if not parts:
        raise FileNotFoundError(f"{path}: no results here; pass a run directory written by `harness run`")
    return last_row_per_cell(pa.concat_tables(parts)) if len(parts) > 1 else parts[0]


def _read_published(uri: str) -> pa.Table:
    """The results table a run published in storage (``uri``: its run directory or results.parquet).

    A run directory's journal segments (cells published while the run went on,
    see :class:`Journal`) are read too, the last row of a cell winning: a run
    still going, or whose driver died, shows what it finished.
    """
    from .storage import Storage, StorageError

    base, _, query = uri.partition("?")
    base = base.rstrip("/")
    name = RESULTS
    if base.endswith(".parquet"):
        base, name = base.rsplit("/", 1)
    shown = f"{base}/{name}"
    try:
        st = Storage.open(base + (f"?{query}" if query else ""))
        parts = []
        try:
            raw = st.read_bytes(name)
            parts.append(_as_results(lambda: pq.read_table(pa.BufferReader(raw)), shown))
        except FileNotFoundError:
            pass
        if name == RESULTS:
            names = st.listdir(SEGMENTS)
            if names:
                parts.append(_segments_table(names, lambda n: st.read_bytes(f"{SEGMENTS}/{n}")))
    except (StorageError, ResultsError):
        raise  # already one sentence: the cause and the place
    except Exception as exc:  # noqa: BLE001 -- unreachable storage: the caller's exit code 3
        raise StorageError(f"cannot read {shown}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") \
            from None
    if not parts:
        raise FileNotFoundError(f"{shown}: no results here; pass a run directory a sweep published "
                                "(`harness run` prints it: storage: .../runs/RUN_ID)")
    return last_row_per_cell(pa.concat_tables(parts)) if len(parts) > 1 else parts[0]


def _segments_table(names: Iterable[str], read: Callable[[str], bytes]) -> pa.Table:
    """A run's published journal segments (``journal/<time>-<random>.jsonl``, read in time order) as one table."""
    chunks = []
    for name in sorted(n for n in names if n.endswith(".jsonl")):
        try:
            data = read(name)
        except FileNotFoundError:
            continue  # removed meanwhile: its rows are in results.parquet now
        chunks.append(data if not data or data.endswith(b"\n") else data + b"\n")
    return journal_table(b"".join(chunks))


def _as_results(read, shown: str) -> pa.Table:
    """``read()``'s Parquet table in the current schema (missing columns as nulls), or ResultsError naming ``shown``."""
    try:
        table = read()
        for field in SCHEMA:
            if field.name not in table.column_names:
                table = table.append_column(field, pa.nulls(len(table), field.type))
        return table.select(list(COLUMN_NAMES)).cast(SCHEMA)
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        raise ResultsError(f"{shown}: not a results table written by `harness run` "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                           "remove it or point at another run directory") from None


def last_row_per_cell(table: pa.Table, order: Sequence[Sequence[str]] | None = None) -> pa.Table:
    """One row per (scenario, format, environment): its last one.

    Rows come in the order of those last rows, or, with ``order`` (the
    scenario, format and environment names in the sweep's order), sorted by
    it; names ``order`` does not know go after the others. This is the one
    "last row of a cell wins" of the harness.
    """
    keys = list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))
    last: dict[tuple, int] = {}
    for i, key in enumerate(keys):
        last.pop(key, None)
        last[key] = i
    if order is None:
        indices = sorted(last.values())
    else:
        rank = [{name: i for i, name in enumerate(names)} for names in order]
        indices = [last[k] for k in sorted(last, key=lambda k: tuple(r.get(v, len(r)) for r, v in zip(rank, k)))]
    return table.take(pa.array(indices, pa.int64()))  # typed: an empty list would be a null array


KEY_COLUMNS = ("scenario", "format", "environment")


def cells(table: pa.Table) -> list[CellResult]:
    """Every row of a results table as a typed :class:`CellResult`, in table order.

    This is where a table's rows are decoded (JSON columns to dicts, text that
    is not JSON to ``{"unparsable": text}``, ``started_at`` to epoch seconds);
    readers use the records' fields. ``table`` may lack columns (those fields
    stay None) but must not have any outside :data:`SCHEMA`.

    Raises:
        ResultsError: a row has a verdict or save verdict outside ``VERDICTS``
            (only a damaged or foreign file has one).
    """
    out = []
    for row in table.to_pylist():
        for column in ("verdict", "save_verdict"):
            value = row.get(column)
            if value is not None and value not in VERDICTS:
                name = "/".join(str(row.get(k)) for k in ("scenario", "format", "environment"))
                raise ResultsError(f"cell {name!r}: unknown {column} {value!r} (not one of {', '.join(VERDICTS)}); "
                                   "the results file is damaged or was not written by `harness run`")
        out.append(CellResult.from_row(row))
    return out


def schema_markdown() -> str:
    """The results schema as a Markdown table (used in the README)."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {t} | {d.replace('|', chr(92) + '|')} |" for n, t, d in COLUMNS]  # \| keeps a cell whole
    return "\n".join(lines)
