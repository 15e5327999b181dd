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

from .compare import ACCURACY_TIERS, AS_ACCURATE, LESS_ACCURATE

#: Verdicts, from best to worst. ``compare`` produces the first three,
#: ``replay`` produces ``error``/``corrupt``, the driver produces ``unschedulable``.
VERDICTS = ("bitwise", "within_tolerance", "mismatch", "corrupt", "error", "unschedulable")

#: Expectations a sweep may state per environment, by name, from strictest to loosest. Besides
#: these, ``{metric_delta: D}`` (``expected`` text ``metric_delta<=D``, see ``metric_delta_text``).
EXPECTATIONS = ("bitwise", "tolerance", "accurate", "any")
#: Expectations of the save round trip (no oracle or labels judge it).
SAVE_EXPECTATIONS = ("bitwise", "tolerance", "any")
#: The mapping key of the task-metric expectation, ``expect: {metric_delta: 0.001}``.
METRIC_DELTA = "metric_delta"
_METRIC_DELTA_PREFIX = f"{METRIC_DELTA}<="

#: Verdicts that mean "the numbers were compared" (as opposed to a failure to run).
NUMERIC_VERDICTS = ("bitwise", "within_tolerance", "mismatch")


def metric_delta_text(bound: float) -> str:
    """The ``expected`` text of ``{metric_delta: bound}``: ``metric_delta<=0.001``."""
    return f"{_METRIC_DELTA_PREFIX}{float(bound)!r}"


def metric_delta_bound(expected: str | None) -> float | None:
    """``D`` of an ``expected`` text ``metric_delta<=D``; None for any other expectation."""
    if not isinstance(expected, str) or not expected.startswith(_METRIC_DELTA_PREFIX):
        return None
    try:
        return float(expected[len(_METRIC_DELTA_PREFIX):])
    except ValueError:
        return None


def meets(verdict: str | None, expected: str, *, accuracy: str | None = None, metric_delta: float | None = None,
          weights_equal: bool | None = None) -> bool:
    """Whether a cell's outcome satisfies an expectation.

    * ``bitwise`` accepts only ``bitwise``;
    * ``tolerance`` accepts ``bitwise`` and ``within_tolerance``;
    * ``accurate`` accepts ``bitwise`` and any cell whose ``accuracy`` is ``as_accurate``;
      it fails ``less_accurate``, and where there is no tier (``n/a``: no float64 oracle)
      it falls back to ``tolerance``;
    * ``metric_delta<=D`` accepts ``bitwise`` and any cell whose task metric moved by
      ``|metric_delta| <= D``;
    * ``any`` accepts every numeric verdict (including ``mismatch``).

    ``error``, ``corrupt`` and ``unschedulable`` never pass: a cell that did not run
    cannot. ``accurate`` and ``metric_delta`` judge the outputs, so a parameter that was
    not restored (``weights_equal`` false) fails them whatever the outputs say.

    Raises:
        ValueError: ``expected`` is not one of ``EXPECTATIONS`` or a ``metric_delta<=D`` text.
    """
    if expected == "bitwise":
        return verdict == "bitwise"
    if expected == "tolerance":
        return verdict in ("bitwise", "within_tolerance")
    if expected == "any":
        return verdict in NUMERIC_VERDICTS
    bound = metric_delta_bound(expected)
    if expected != "accurate" and bound is None:
        raise ValueError(f"unknown expectation {expected!r}; use one of {', '.join(EXPECTATIONS)} "
                         f"or {{{METRIC_DELTA}: D}}")
    if verdict == "bitwise":
        return True
    if verdict not in NUMERIC_VERDICTS or weights_equal is False:
        return False
    if bound is not None:
        return metric_delta is not None and math.isfinite(metric_delta) and abs(metric_delta) <= bound
    if accuracy == AS_ACCURATE:
        return True
    return accuracy != LESS_ACCURATE and verdict == "within_tolerance"


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
    oracle_seconds: float = 0.0  # of ``seconds``: rebuilding the model in float64 and predicting the probe


# -- cell results ----------------------------------------------------------------
def _col(arrow: pa.DataType, doc: str, *, json_value: bool = False) -> Any:
    return field(default=None, metadata={"arrow": arrow, "doc": doc, "json": json_value})


@dataclass(frozen=True)
class CellResult(CellNames):
    """One (scenario, format, environment) cell: one row of ``results.parquet``.

    ``replay`` fills the cell's own columns; the driver (``harness.sweep.Collector``) completes the run's
    (``run_id``, ``sweep``, ``expected``, ``passed``, the save round trip, the
    training fingerprint, ``attempts``, and for a repeated cell ``repeats``,
    ``flaky`` and ``repeat_spread_ulp``: see :mod:`harness.repeats`). JSON columns
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
    expected: str | None = _col(pa.string(), "expectation for this environment: bitwise | tolerance | accurate | any "
                                "| metric_delta<=D")
    passed: bool | None = _col(pa.bool_(), "the cell meets `expected` and the save round trip meets `expect_save`")
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
    accuracy: str | None = _col(pa.string(), "as_accurate | less_accurate | n/a: is the observation as close to the "
                                "model run in float64 as the reference (null if not compared)")
    reference_rmse_vs_fp64: float | None = _col(pa.float64(), "RMSE of the reference against the float64 oracle "
                                                "(the output closest to failing)")
    rmse_vs_fp64: float | None = _col(pa.float64(), "RMSE of this cell's outputs against the float64 oracle (same output)")
    accuracy_note: str | None = _col(pa.string(), "the accuracy rule with that output's numbers, or why there is no tier")
    metric: str | None = _col(pa.string(), "the scenario's task metric on its probe labels: accuracy | auc | mse | mae")
    reference_metric: float | None = _col(pa.float64(), "the task metric on the reference outputs (the output that "
                                          "moved most)")
    observed_metric: float | None = _col(pa.float64(), "the task metric on this cell's outputs (same output)")
    metric_delta: float | None = _col(pa.float64(), "observed_metric - reference_metric")
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
    observation_uri: str | None = _col(pa.string(), "Arrow IPC file with this cell's outputs (its first repeat's)")
    attempts: int | None = _col(pa.int32(), "how many times the cell was dispatched (summed over its repeats)")
    repeats: int | None = _col(pa.int32(), "how many repeats of the cell reached a worker (its environment's `repeats`, "
                               "or fewer when some could not run; 0: none did)")
    flaky: bool | None = _col(pa.bool_(), "the outputs of its repeats differ in some bit (null: fewer than two repeats "
                              "produced outputs); a flaky cell is never a regression")
    repeat_spread_ulp: float | None = _col(pa.float64(), "largest ULP distance between the outputs of any two repeats "
                                           "(0: identical bits; inf: a difference ULPs cannot measure, e.g. of shape or "
                                           "strings; null: not repeated, or the outputs could not be read back)")
    started_at: float | None = _col(pa.timestamp("us", tz="UTC"), "when the cell started (epoch seconds; UTC timestamp in Arrow)")
    seconds: float | None = _col(pa.float64(), "wall time of the cell")
    train_s: float | None = _col(pa.float64(), "wall time of the scenario's training step in this run: fit, save and "
                                 "reload every format (near 0 when its artifacts were reused from storage)")

    def __post_init__(self):
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; one of {', '.join(VERDICTS)}")
        if self.accuracy is not None and self.accuracy not in ACCURACY_TIERS:
            raise ValueError(f"unknown accuracy tier {self.accuracy!r}; one of {', '.join(ACCURACY_TIERS)}")

    def meets(self, expected: str | None = None) -> bool:
        """Whether this cell satisfies ``expected`` (default: its own ``expected``); see :func:`meets`."""
        return meets(self.verdict, expected or self.expected or "", accuracy=self.accuracy,
                     metric_delta=self.metric_delta, weights_equal=self.weights_equal)

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
