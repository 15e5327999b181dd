"""The results table: one row per (scenario, format, environment) cell.

This module owns the Arrow schema of a cell result, turns cell dicts into a
table, and writes/reads ``results.parquet`` atomically so a crash never leaves
a half-written file. It imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

#: Verdicts, from best to worst. ``compare`` produces the first three,
#: ``replay`` produces ``error``/``corrupt``, ``sweep`` produces ``unschedulable``.
VERDICTS = ("bitwise", "within_tolerance", "mismatch", "corrupt", "error", "unschedulable")

#: Expectations a sweep may state per environment.
EXPECTATIONS = ("bitwise", "tolerance", "any")

#: Verdicts that mean "the numbers were compared" (as opposed to a failure to run).
NUMERIC_VERDICTS = ("bitwise", "within_tolerance", "mismatch")


def meets(verdict: str, expected: str) -> bool:
    """Whether a verdict satisfies an expectation.

    ``bitwise`` accepts only ``bitwise``; ``tolerance`` accepts ``bitwise`` and
    ``within_tolerance``; ``any`` accepts every numeric verdict (including
    ``mismatch``) but never ``error``, ``corrupt`` or ``unschedulable``: a cell
    that did not run cannot pass.
    """
    if expected == "bitwise":
        return verdict == "bitwise"
    if expected == "tolerance":
        return verdict in ("bitwise", "within_tolerance")
    if expected == "any":
        return verdict in NUMERIC_VERDICTS
    raise ValueError(f"unknown expectation {expected!r}; use one of {', '.join(EXPECTATIONS)}")


# (name, type, description) -- the README's results schema table is generated
# from the same list, so code and docs cannot drift.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("run_id", pa.string(), "identifier of the run (UTC timestamp + short random suffix)"),
    ("sweep", pa.string(), "sweep name"),
    ("scenario", pa.string(), "scenario name"),
    ("format", pa.string(), "save format"),
    ("environment", pa.string(), "environment name"),
    ("verdict", pa.string(), "bitwise | within_tolerance | mismatch | corrupt | error | unschedulable"),
    ("expected", pa.string(), "expectation for this environment: bitwise | tolerance | any"),
    ("passed", pa.bool_(), "verdict meets `expected` and the save round trip meets `expect_save`"),
    ("max_abs_diff", pa.float64(), "max |observed - reference| over all outputs (null if not compared)"),
    ("max_rel_diff", pa.float64(), "max |observed - reference| / |reference|"),
    ("max_ulp_diff", pa.float64(), "max distance in units in the last place of the reference dtype"),
    ("mismatch_fraction", pa.float64(), "fraction of output elements whose bits differ"),
    ("weights_equal", pa.bool_(), "every restored variable has the original's bytes (null if not checked)"),
    ("save_verdict", pa.string(), "in-memory model vs reload in the training environment"),
    ("save_max_abs_diff", pa.float64(), "max abs diff of that save round trip"),
    ("save_max_ulp_diff", pa.float64(), "max ULP diff of that save round trip"),
    ("atol", pa.float64(), "absolute tolerance applied (largest over outputs)"),
    ("rtol", pa.float64(), "relative tolerance applied"),
    ("max_ulp", pa.float64(), "ULP tolerance applied"),
    ("required_atol", pa.float64(), "smallest atol (rtol=0) that would have passed every element"),
    ("required_rtol", pa.float64(), "smallest rtol (atol=0) that would have passed every element"),
    ("required_ulp", pa.float64(), "smallest max_ulp that would have passed every element"),
    ("error", pa.string(), "what went wrong, for error / corrupt / unschedulable / weight mismatches"),
    ("detail", pa.string(), "JSON: per-output metrics and per-variable weight mismatches"),
    ("fingerprint", pa.string(), "JSON fingerprint of the worker that ran the reload"),
    ("train_fingerprint", pa.string(), "JSON fingerprint of the training worker"),
    ("node_id", pa.string(), "Ray node id the reload ran on"),
    ("node_labels", pa.string(), "JSON Ray node labels of that node"),
    ("tf_version", pa.string(), "TensorFlow version of the reload worker"),
    ("artifact_digest", pa.string(), "content address of the artifact"),
    ("artifact_uri", pa.string(), "where the artifact lives in storage"),
    ("observation_uri", pa.string(), "Arrow IPC file with this cell's outputs"),
    ("attempts", pa.int32(), "how many times the cell was dispatched"),
    ("started_at", pa.timestamp("us", tz="UTC"), "when the cell started (driver clock)"),
    ("seconds", pa.float64(), "wall time of the cell"),
)

SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in COLUMNS])
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


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


def _coerce(row: Mapping[str, Any]) -> dict[str, Any]:
    out = empty_row()
    for key, value in row.items():
        if key not in out:
            raise KeyError(f"unknown result column {key!r}")
        if isinstance(value, (dict, list)) and key in ("detail", "fingerprint", "train_fingerprint", "node_labels"):
            value = json.dumps(value, sort_keys=True, default=str)
        if key == "started_at" and isinstance(value, (int, float)):
            value = _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc)
        out[key] = value
    return out


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a results table from cell dicts (missing columns become null)."""
    coerced = [_coerce(r) for r in rows]
    return pa.Table.from_pylist(coerced, schema=SCHEMA)


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` as Parquet, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def to_parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet file bytes (for writing through ``harness.storage``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a results table from a ``results.parquet`` file or a run directory.

    Columns the current schema has but an older file lacks come back as nulls,
    so reports keep working on old runs.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results here; pass a run directory written by `harness run`")
    table = pq.read_table(path)
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table.select(list(COLUMN_NAMES)).cast(SCHEMA)


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """The table as a list of dicts, JSON columns left as strings."""
    return table.to_pylist()


def schema_markdown() -> str:
    """The results schema as a Markdown table (used in the README)."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {t} | {d} |" for n, t, d in COLUMNS]
    return "\n".join(lines)
