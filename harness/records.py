"""The typed records a sweep's data flows through, and the verdict vocabulary.

::

    train()  -> TrainRecord (one ArtifactRecord per format)
    replay() -> CellResult  (the cell's own columns)
    driver   -> CellResult completed with the run's columns -> results table -> reports

``CellResult``'s fields *are* the results columns: ``harness.results`` builds
the Arrow schema from them, so a column cannot exist in one place only. No
TensorFlow or Ray here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

#: Verdicts, from best to worst. ``compare`` produces the first three,
#: ``replay`` produces ``error``/``corrupt``, the driver produces ``unschedulable``.
VERDICTS = ("bitwise", "within_tolerance", "mismatch", "corrupt", "error", "unschedulable")

#: Expectations a sweep may state per environment.
EXPECTATIONS = ("bitwise", "tolerance", "any")

#: Verdicts that mean "the numbers were compared" (as opposed to a failure to run).
NUMERIC_VERDICTS = ("bitwise", "within_tolerance", "mismatch")


def meets(verdict: str | None, expected: str) -> bool:
    """Whether a verdict satisfies an expectation.

    ``bitwise`` accepts only ``bitwise``; ``tolerance`` accepts ``bitwise`` and
    ``within_tolerance``; ``any`` accepts every numeric verdict (including
    ``mismatch``) but never ``error``, ``corrupt`` or ``unschedulable``: a cell
    that did not run cannot pass.

    Raises:
        ValueError: ``expected`` is not one of ``EXPECTATIONS``.
    """
    if expected == "bitwise":
        return verdict == "bitwise"
    if expected == "tolerance":
        return verdict in ("bitwise", "within_tolerance")
    if expected == "any":
        return verdict in NUMERIC_VERDICTS
    raise ValueError(f"unknown expectation {expected!r}; use one of {', '.join(EXPECTATIONS)}")


# -- the plan --------------------------------------------------------------------
class CellNames:
    """What names a cell, for records with ``scenario``, ``format`` and ``environment`` fields."""

    scenario: str | None
    format: str | None
    environment: str | None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scenario, self.format, self.environment)

    @property
    def name(self) -> str:
        """``scenario/format/environment``: how a cell is named on the command line and in explanations."""
        return f"{self.scenario}/{self.format}/{self.environment}"


@dataclass(frozen=True)
class Cell(CellNames):
    """One (scenario, format, environment) of a run: what the scheduler plans and a results row describes."""

    scenario: str
    format: str
    environment: str


@dataclass(frozen=True)
class JobFailed:
    """A worker's job raised instead of returning its record (a bug in a scenario's code, or in ours)."""

    error: str


# -- training ------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactRecord:
    """One format of one trained scenario, as stored (or why it could not be)."""

    scenario: str
    format: str
    digest: str | None = None  # content address
    path: str | None = None  # artifact directory, relative to the storage root
    uri: str | None = None
    manifest_sha256: str | None = None  # binds the replays to exactly the manifest training wrote or found
    error: str | None = None  # saving failed: there is no artifact
    save_verdict: str | None = None  # in-memory model vs its reload in the training environment
    save_max_abs_diff: float | None = None
    save_max_ulp_diff: float | None = None
    save_error: str | None = None
    reused: bool = False  # found complete in storage, not trained again
    repaired: str | None = None  # a damaged stored copy was found (why) and replaced by this one


@dataclass(frozen=True)
class TrainRecord:
    """What training one scenario produced: the training worker's fingerprint and its artifacts."""

    scenario: str
    fingerprint: Mapping[str, Any]
    artifacts: Mapping[str, ArtifactRecord]
    seconds: float = 0.0


# -- cell results ----------------------------------------------------------------
def _col(arrow: pa.DataType, doc: str, *, json_value: bool = False) -> Any:
    return field(default=None, metadata={"arrow": arrow, "doc": doc, "json": json_value})


@dataclass(frozen=True)
class CellResult(CellNames):
    """One (scenario, format, environment) cell: one row of ``results.parquet``.

    ``replay`` fills the cell's own columns; the driver completes the run's
    (``run_id``, ``sweep``, ``expected``, ``passed``, the save round trip, the
    training fingerprint, ``attempts``) with :meth:`completed`. JSON columns
    hold dicts here and JSON text in Arrow; ``started_at`` is epoch seconds
    here and a UTC timestamp in Arrow. A JSON column holds a dict, or its JSON
    text (see :meth:`encoded`).
    """

    run_id: str | None = _col(pa.string(), "identifier of the run (UTC timestamp + short random suffix)")
    sweep: str | None = _col(pa.string(), "sweep name")
    scenario: str | None = _col(pa.string(), "scenario name")
    format: str | None = _col(pa.string(), "save format")
    environment: str | None = _col(pa.string(), "environment name")
    verdict: str | None = _col(pa.string(), "bitwise | within_tolerance | mismatch | corrupt | error | unschedulable")
    expected: str | None = _col(pa.string(), "expectation for this environment: bitwise | tolerance | any")
    passed: bool | None = _col(pa.bool_(), "verdict meets `expected` and the save round trip meets `expect_save`")
    max_abs_diff: float | None = _col(pa.float64(), "max |observed - reference| over all outputs (null if not compared)")
    max_rel_diff: float | None = _col(pa.float64(), "max |observed - reference| / |reference|")
    max_ulp_diff: float | None = _col(pa.float64(), "max distance in units in the last place of the reference dtype")
    mismatch_fraction: float | None = _col(pa.float64(), "fraction of output elements whose bits differ")
    prediction_flips: int | None = _col(pa.int64(), "decisions changed, summed over outputs: top-1 class (scores over "
                                        "classes), 0.5 threshold (one score in [0, 1]) or label (null: no output decides)")
    prediction_flip_fraction: float | None = _col(pa.float64(), "largest fraction of one output's predictions whose "
                                                  "decision changed")
    max_rank_change: int | None = _col(pa.int64(), "largest move in rank of one of the reference's top-k classes "
                                       "(k = 5 or the number of classes)")
    weights_equal: bool | None = _col(pa.bool_(), "every restored model parameter has the original's bytes (null if not checked)")
    save_verdict: str | None = _col(pa.string(), "in-memory model vs reload in the training environment")
    save_max_abs_diff: float | None = _col(pa.float64(), "max abs diff of that save round trip")
    save_max_ulp_diff: float | None = _col(pa.float64(), "max ULP diff of that save round trip")
    atol: float | None = _col(pa.float64(), "absolute tolerance applied (largest over outputs)")
    rtol: float | None = _col(pa.float64(), "relative tolerance applied")
    max_ulp: float | None = _col(pa.float64(), "ULP tolerance applied")
    required_atol: float | None = _col(pa.float64(), "smallest atol (rtol=0) that would have passed every element")
    required_rtol: float | None = _col(pa.float64(), "smallest rtol (atol=0) that would have passed every element")
    required_ulp: float | None = _col(pa.float64(), "smallest max_ulp that would have passed every element")
    error: str | None = _col(pa.string(), "what went wrong, for error / corrupt / unschedulable / weight mismatches")
    detail: Mapping[str, Any] | None = _col(pa.string(), "JSON: per-output metrics and per-variable weight mismatches",
                                            json_value=True)
    fingerprint: Mapping[str, Any] | None = _col(pa.string(), "JSON fingerprint of the worker that ran the reload",
                                                 json_value=True)
    train_fingerprint: Mapping[str, Any] | None = _col(pa.string(), "JSON fingerprint of the training worker",
                                                       json_value=True)
    node_id: str | None = _col(pa.string(), "Ray node id the reload ran on")
    node_labels: Mapping[str, Any] | None = _col(pa.string(), "JSON Ray node labels of that node", json_value=True)
    tf_version: str | None = _col(pa.string(), "TensorFlow version of the reload worker")
    artifact_digest: str | None = _col(pa.string(), "content address of the artifact")
    artifact_uri: str | None = _col(pa.string(), "where the artifact lives in storage")
    manifest_sha256: str | None = _col(pa.string(), "sha256 of the artifact manifest this cell really replayed "
                                       "(verified before loading; null if the cell never reached the artifact)")
    observation_uri: str | None = _col(pa.string(), "Arrow IPC file with this cell's outputs")
    attempts: int | None = _col(pa.int32(), "how many times the cell was dispatched")
    started_at: float | None = _col(pa.timestamp("us", tz="UTC"), "when the cell started (epoch seconds; UTC timestamp in Arrow)")
    seconds: float | None = _col(pa.float64(), "wall time of the cell")

    def __post_init__(self):
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; one of {', '.join(VERDICTS)}")

    def replace(self, **changes: Any) -> "CellResult":
        """A copy with ``changes`` (field names only: an unknown name is a ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def encoded(self) -> "CellResult":
        """This result with its JSON columns as JSON text.

        Workers send results this way: the encoding happens in parallel, in
        the workers, and the driver's work per cell stays small and constant.
        """
        return dataclasses.replace(self, **{f.name: to_json(getattr(self, f.name))
                                            for f in FIELDS if f.metadata["json"]
                                            and getattr(self, f.name) is not None
                                            and not isinstance(getattr(self, f.name), str)})

    def to_row(self, *, epoch: bool = False) -> dict[str, Any]:
        """The Arrow row: JSON columns as text, ``started_at`` as a UTC datetime (epoch seconds with ``epoch``)."""
        row = dict(self.__dict__)  # every field, in field order (called once per cell: kept cheap)
        for name in _JSON_FIELDS:
            value = row[name]
            if value is not None and not isinstance(value, str):
                row[name] = to_json(value)
        if not epoch and isinstance(row["started_at"], (int, float)):
            row["started_at"] = _dt.datetime.fromtimestamp(row["started_at"], tz=_dt.timezone.utc)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "CellResult":
        """A results-table or journal row (JSON text) back to a record; an unknown column is a ``TypeError``."""
        values = dict(row)
        for name in _JSON_FIELDS:  # only the columns that need converting: called once per row of a history
            value = values.get(name)
            if isinstance(value, str):
                try:
                    values[name] = json.loads(value)
                except ValueError:
                    values[name] = {"unparsable": value}
        if isinstance(values.get("started_at"), _dt.datetime):
            values["started_at"] = values["started_at"].timestamp()
        return cls(**values)


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(CellResult)
_JSON_FIELDS = tuple(f.name for f in FIELDS if f.metadata["json"])


def unparsable(value: Any) -> bool:
    """Whether a decoded JSON column is :meth:`CellResult.from_row`'s ``{"unparsable": text}`` for text not JSON."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("unparsable"), str)


def json_value(value: Any) -> Any:
    """A decoded JSON column's value; None for text that was not JSON."""
    return None if unparsable(value) else value


def json_object(value: Any) -> dict[str, Any]:
    """A decoded JSON column (e.g. a fingerprint) as a dict: empty if null, not JSON or not an object."""
    return value if isinstance(value, dict) and not unparsable(value) else {}


# -- JSON: one policy for every JSON the harness writes ---------------------------------
#: How a non-finite float is written: strict JSON has no NaN/Infinity, and a difference is never hidden as null.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def jsonable(value: Any) -> Any:
    """``value`` as strict-JSON data: NaN/Inf as ``"nan"``/``"inf"``/``"-inf"``, numpy scalars and arrays as
    Python numbers and lists, tuples as lists, datetimes as ISO 8601; other objects as their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def to_json(value: Any, **kwargs: Any) -> str:
    """``value`` as strict JSON text (see :func:`jsonable`); keys sorted unless ``sort_keys=False``."""
    kwargs.setdefault("sort_keys", True)
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def json_number(value: Any) -> Any:
    """A number read back from :func:`to_json` text: ``"inf"`` etc. become floats again, anything else is kept."""
    return NONFINITE.get(value, value) if isinstance(value, str) else value
