"""Run history: every run's results table, kept on shared storage.

Layout under a history URI (any ``harness.storage`` URI: local path, ``s3://``...)::

    <history_uri>/date=YYYY-MM-DD/<run_id>.parquet

One Parquet file per run, partitioned by the run's UTC date (earliest
``started_at`` of its cells, or today when unknown). Appending the same run
again replaces its file, so nightly jobs can be retried safely.

This module also compares two runs (:func:`diff_runs`) and renders the
comparison as Markdown (:func:`render_changes_md`). Both read typed
:class:`harness.records.CellResult` cells, each table decoded once by
:func:`harness.results.cells`. It imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
from collections import Counter
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness import results, text
from harness.records import CellResult, json_object
from harness.storage import Storage

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

_CELL_KEY = ("scenario", "format", "environment")
_FILE_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})/([^/.][^/]*)\.parquet$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]*$")
_LIST_LIMIT = 20

Key = tuple[str, str, str]
#: What run summaries and trend points read: a long history is decoded without its JSON columns.
_SUMMARY_COLUMNS = ("run_id", "sweep", *_CELL_KEY, "verdict", "passed", "started_at", "max_ulp_diff", "max_abs_diff")


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


# -- writing and reading -------------------------------------------------------
def _conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly the results schema (missing columns as nulls, extras dropped)."""
    for field in results.SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table.select(list(results.COLUMN_NAMES)).cast(results.SCHEMA)


def _run_date(table: pa.Table) -> str:
    earliest = pc.min(table["started_at"]).as_py()
    when = earliest if earliest is not None else _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).date().isoformat()


def _single_run_id(table: pa.Table) -> str:
    run_ids = pc.unique(table["run_id"]).to_pylist()
    if len(run_ids) != 1 or run_ids[0] is None:
        raise ValueError(f"append_run needs the table of exactly one run; got run_ids {run_ids}")
    run_id = run_ids[0]
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run_id {run_id!r} cannot be a file name; use letters, digits and _.:+-")
    return run_id


def _run_files(storage: Storage) -> list[tuple[str, str, str]]:
    """``(relative path, date, run_id)`` of every run file in the history."""
    found = []
    for rel in storage.walk_files(""):
        match = _FILE_RE.match(rel)
        if match:
            found.append((rel, match.group(1), match.group(2)))
    return found


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
    run_id = _single_run_id(table)
    storage = Storage.open(history_uri)
    existing = [rel for rel, _, rid in _run_files(storage) if rid == run_id]
    rel = existing[0] if existing else f"date={_run_date(table)}/{run_id}.parquet"
    storage.write_bytes(rel, results.to_parquet_bytes(table))
    return rel


def _with_date(table: pa.Table, date: str) -> pa.Table:
    return _conform(table).append_column(HISTORY_SCHEMA.field("date"), pa.array([date] * len(table), pa.string()))


def load_history(history_uri: str, *, sweep: str | None = None) -> pa.Table:
    """All runs stored under ``history_uri`` as one table (results schema + ``date``).

    Args:
        history_uri: where :func:`append_run` wrote.
        sweep: keep only rows of this sweep.

    Returns:
        The rows of every run (an empty table with :data:`HISTORY_SCHEMA` if
        there are none). Files written before a column existed get nulls there.
    """
    storage = Storage.open(history_uri)
    parts = [_with_date(pq.read_table(pa.BufferReader(storage.read_bytes(rel))), date)
             for rel, date, _ in _run_files(storage)]
    history = pa.concat_tables(parts) if parts else HISTORY_SCHEMA.empty_table()
    if sweep is not None:
        history = history.filter(pc.equal(history["sweep"], sweep))
    return history


# -- querying ------------------------------------------------------------------
def _cells(table: pa.Table, columns: Iterable[str] | None = None) -> list[CellResult]:
    """A results or history table's rows as typed cells (a history's ``date`` is the run's, not the cell's).

    With ``columns``, only those are decoded; the cells' other fields stay None.
    """
    names = [c for c in (columns or results.COLUMN_NAMES) if c in table.column_names]
    return results.cells(table.select(names))


def _dated_cells(table: pa.Table) -> list[tuple[CellResult, str | None]]:
    """Each row's :data:`_SUMMARY_COLUMNS` as a typed cell, beside its run's partition date (None if no ``date``)."""
    dates = table["date"].to_pylist() if "date" in table.column_names else [None] * table.num_rows
    return list(zip(_cells(table, _SUMMARY_COLUMNS), dates))


def _order_key(run: Mapping[str, Any]) -> tuple[_dt.datetime, str]:
    """Chronological order of runs: started_at, else the partition date, then run_id."""
    when = run["started_at"]
    if when is None:
        when = _dt.datetime.fromisoformat(run["date"] or "1970-01-01").replace(tzinfo=_dt.timezone.utc)
    return when, run["run_id"]


def _summarise(run_id: str, dated: list[tuple[CellResult, str | None]]) -> dict[str, Any]:
    cells = [cell for cell, _ in dated]
    starts = [c.started_at for c in cells if c.started_at is not None]
    verdicts = Counter(c.verdict for c in cells)
    return {
        "run_id": run_id,
        "sweep": next((c.sweep for c in cells if c.sweep), None),
        "date": next((date for _, date in dated if date), None),
        "started_at": _dt.datetime.fromtimestamp(min(starts), tz=_dt.timezone.utc) if starts else None,
        "cells": len(cells),
        "passed": sum(c.passed is True for c in cells),
        "failed": sum(c.passed is False for c in cells),
        **{v: verdicts.get(v, 0) for v in results.VERDICTS},
    }


def _list_runs(dated: Iterable[tuple[CellResult, str | None]]) -> list[dict[str, Any]]:
    grouped: dict[str, list[tuple[CellResult, str | None]]] = {}
    for cell, date in dated:
        grouped.setdefault(cell.run_id, []).append((cell, date))
    return sorted((_summarise(rid, group) for rid, group in grouped.items()), key=_order_key)


def list_runs(history: pa.Table) -> list[dict[str, Any]]:
    """One summary dict per run, oldest first.

    Each dict has run_id, sweep, date, started_at (a UTC datetime or None),
    cells, passed, failed and one count per verdict (``bitwise``,
    ``within_tolerance``, ...).
    """
    return _list_runs(_dated_cells(history))


def previous_run(history: pa.Table, sweep: str, run_id: str) -> pa.Table | None:
    """The most recent run of ``sweep`` before ``run_id``, or None.

    Runs are ordered by started_at, then run_id. If ``run_id`` is not in the
    history yet (tonight's run, not appended), the latest run of the sweep is
    returned.
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

    @classmethod
    def of(cls, cell: CellResult, date: str | None = None) -> "TrendPoint":
        """The point of ``cell``'s run (``date``: that run's partition date, if it has one)."""
        return cls(cell.run_id, date, cell.verdict, cell.passed, cell.max_ulp_diff, cell.max_abs_diff)


def trends(history: pa.Table, last: int = 10) -> dict[Key, list[TrendPoint]]:
    """Per cell ``(scenario, format, environment)``: its last ``last`` runs, oldest first."""
    dated = _dated_cells(history)
    order = {r["run_id"]: _order_key(r) for r in _list_runs(dated)}
    per_cell: dict[Key, dict[str, TrendPoint]] = {}
    for cell, date in dated:
        per_cell.setdefault(cell.key, {})[cell.run_id] = TrendPoint.of(cell, date)  # a later duplicate wins
    return {key: sorted(points.values(), key=lambda p: order[p.run_id])[-last:]
            for key, points in per_cell.items()}


def cell_trend(history: pa.Table, scenario: str, format: str, environment: str,
               last: int = 10) -> list[TrendPoint]:
    """The last ``last`` results of one cell, oldest first (see :func:`trends`)."""
    mask = pc.and_(pc.and_(pc.equal(history["scenario"], scenario), pc.equal(history["format"], format)),
                   pc.equal(history["environment"], environment))
    return trends(history.filter(mask), last).get((scenario, format, environment), [])


# -- comparing two runs --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Changes:
    """What differs between a previous run and the current one.

    Cells are dicts with scenario, format, environment (plus old/new values
    where relevant); ``fingerprint_changes`` holds one
    ``{"environment", "changes": {key: {"old", "new"}}}`` per environment whose
    fingerprint changed (training-worker changes under ``"(training)"``).
    """

    newly_failing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fixed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    diff_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fingerprint_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    new_environments: list[str] = dataclasses.field(default_factory=list)
    vanished_environments: list[str] = dataclasses.field(default_factory=list)
    new_cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    vanished_cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def regressed(self) -> bool:
        """True iff some cell that passed (or had no expectation result) now fails."""
        return bool(self.newly_failing)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) of every list plus ``regressed``."""
        return {**dataclasses.asdict(self), "regressed": self.regressed}


def index_cells(cells: Iterable[CellResult]) -> dict[Key, CellResult]:
    """Cells by ``(scenario, format, environment)``, in first-appearance order; a later duplicate wins."""
    return {cell.key: cell for cell in cells}


def _cell_id(key: Key) -> dict[str, Any]:
    return dict(zip(_CELL_KEY, key))


def _environments(cells: Mapping[Key, Any]) -> list[str]:
    return list(dict.fromkeys(key[2] for key in cells))


def _status_change(key: Key, old: CellResult, new: CellResult) -> dict[str, Any]:
    return {**_cell_id(key), "old_verdict": old.verdict, "new_verdict": new.verdict,
            "old_passed": old.passed, "new_passed": new.passed, "error": new.error}


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


def _representative(fingerprints: list[dict[str, Any]]) -> dict[str, Any]:
    """Per compared key, the most common value among an environment's cells."""
    merged = {}
    for key in FINGERPRINT_KEYS:
        counts = Counter(json.dumps(fp.get(key), sort_keys=True, default=str) for fp in fingerprints)
        merged[key] = json.loads(counts.most_common(1)[0][0])
    return merged


def _fingerprints_by_env(cells: Mapping[Key, CellResult], column: str, env_of) -> dict[str, dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for key, cell in cells.items():
        fp = json_object(getattr(cell, column))
        if fp:
            grouped.setdefault(env_of(key), []).append(fp)
    return {env: _representative(fps) for env, fps in grouped.items()}


def _fingerprint_changes(old_cells: Mapping[Key, CellResult],
                         new_cells: Mapping[Key, CellResult]) -> list[dict[str, Any]]:
    changes = []
    for column, env_of in (("fingerprint", lambda k: k[2]), ("train_fingerprint", lambda k: TRAINING)):
        before = _fingerprints_by_env(old_cells, column, env_of)
        after = _fingerprints_by_env(new_cells, column, env_of)
        for env in [e for e in after if e in before]:
            diff = {k: {"old": before[env][k], "new": after[env][k]}
                    for k in FINGERPRINT_KEYS if before[env][k] != after[env][k]}
            if diff:
                changes.append({"environment": env, "changes": diff})
    return changes


def diff_runs(previous: pa.Table | None, current: pa.Table, *, factor: float = 2.0) -> Changes:
    """Compare the current run with the previous one.

    Args:
        previous: the earlier run's rows (e.g. from :func:`previous_run`), or None.
        current: this run's rows.
        factor: a cell's max_ulp_diff or max_abs_diff counts as changed when it
            grew or shrank by more than this factor, or went from 0 to nonzero
            (or back).

    Returns:
        A :class:`Changes`. With no previous run, only ``new_cells`` and
        ``new_environments`` are filled, and nothing counts as a regression.

    Raises:
        harness.results.ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    new = index_cells(_cells(current))
    old = index_cells(_cells(previous)) if previous is not None else {}
    common = [k for k in new if k in old]
    old_envs, new_envs = _environments(old), _environments(new)
    diffs = [_diff_change(k, m, old[k], new[k], factor) for k in common for m in ("max_ulp_diff", "max_abs_diff")]
    return Changes(
        newly_failing=[_status_change(k, old[k], new[k]) for k in common
                       if new[k].passed is False and old[k].passed is not False],
        fixed=[_status_change(k, old[k], new[k]) for k in common
               if new[k].passed is True and old[k].passed is False],
        diff_changes=[d for d in diffs if d is not None],
        fingerprint_changes=_fingerprint_changes(old, new),
        new_environments=[e for e in new_envs if e not in old_envs],
        vanished_environments=[e for e in old_envs if e not in new_envs],
        new_cells=[_cell_id(k) for k in new if k not in old],
        vanished_cells=[_cell_id(k) for k in old if k not in new],
    )


# -- rendering -----------------------------------------------------------------
def _cell_name(entry: Mapping[str, Any]) -> str:
    return f"{text.code(entry['scenario'] + '/' + entry['format'])} @ {text.code(entry['environment'])}"


def _bullets(items: list[str]) -> list[str]:
    shown = [f"- {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        shown.append(f"- ... and {len(items) - _LIST_LIMIT} more")
    return shown


def _section(title: str, items: list[str]) -> list[str]:
    return [f"**{title}** ({len(items)}):", "", *_bullets(items), ""] if items else []


def _status_text(entry: Mapping[str, Any]) -> str:
    return f"{_cell_name(entry)}: {entry['old_verdict']} -> {entry['new_verdict']}"


def _diff_text(entry: Mapping[str, Any]) -> str:
    return f"{_cell_name(entry)}: {entry['metric']} {entry['old']:.3g} -> {entry['new']:.3g}"


def _fingerprint_text(entry: Mapping[str, Any]) -> str:
    parts = [f"{key}: {text.markdown(describe_change(v['old'], v['new']))}" for key, v in entry["changes"].items()]
    return f"{text.code(entry['environment'])}: " + "; ".join(parts)


def render_changes_md(changes: Changes) -> str:
    """The changes as Markdown (no heading; the caller places it under one)."""
    lines = [f"Regressed: **{'yes' if changes.regressed else 'no'}**", ""]
    lines += _section("Newly failing", [_status_text(e) for e in changes.newly_failing])
    lines += _section("Fixed", [_status_text(e) for e in changes.fixed])
    lines += _section("Difference changed", [_diff_text(e) for e in changes.diff_changes])
    lines += _section("Fingerprint changed", [_fingerprint_text(e) for e in changes.fingerprint_changes])
    lines += _section("New environments", [f"`{e}`" for e in changes.new_environments])
    lines += _section("Vanished environments", [f"`{e}`" for e in changes.vanished_environments])
    lines += _section("New cells", [_cell_name(e) for e in changes.new_cells])
    lines += _section("Vanished cells", [_cell_name(e) for e in changes.vanished_cells])
    if len(lines) == 2:
        lines.append("No changes since the previous run.")
    return "\n".join(lines).rstrip() + "\n"
