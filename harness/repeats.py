"""Repeats of a cell: one row from N replays, and whether they agreed bit for bit.

A sweep's ``repeats: N`` (or an environment's) replays every cell N times,
each time in a different worker process: the scheduler gives repeat ``r`` to
the ``r``-th worker slot of the cell's lane, a worker process of its own (see
:mod:`harness.scheduler`). Every repeat is compared with the reference by its
own worker, exactly as a single replay is. :func:`combine` turns the N
results into the cell's one row:

* the row is the **first repeat's** result: verdict, metrics against the
  reference, fingerprint, observation;
* ``flaky``: the outputs of two repeats differ in some bit (each repeat's
  ``detail.outputs_sha256``, written by ``replay``); null when fewer than two
  repeats produced outputs. A flaky cell is never a regression (see
  :func:`harness.history.cell_status`);
* ``repeat_spread_ulp``: the largest ULP distance between the outputs of any
  two repeats (:func:`spread_ulp`); 0 when they agree, which needs no reading;
  when they do not, their observation files are read back from storage;
* ``repeats``: how many repeats reached a worker;
* a repeat that produced no numbers (``error``, ``corrupt``,
  ``unschedulable``) is never dropped: the row takes its verdict and its
  ``error`` names the repeat;
* ``detail.repeats``: every repeat's pid, node, verdict, max ULP and abs
  difference from the reference, attempts, seconds, error and output digests.

No TensorFlow, no Ray; storage only to read the outputs of repeats that disagree.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .records import NUMERIC_VERDICTS, CellResult, json_object

#: The key of the per-repeat list in a repeated cell's ``detail``.
DETAIL_KEY = "repeats"
#: The key of each repeat's output digests in its ``detail`` (written by ``harness.replay``).
DIGESTS_KEY = "outputs_sha256"


def output_spread(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ULP distance between two outputs of one cell (0.0: the same bits).

    ULPs are counted on the arrays' own dtype (``harness.compare.ulp_distance``:
    NaN against NaN is 0, against a number ``inf``). A difference no ULP count
    measures -- of shape, of dtype, of a string output -- is ``inf``.
    """
    from .compare import bits_equal, ulp_distance

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf
    if a.dtype.kind in "OSU":
        return 0.0 if np.array_equal(a, b) else math.inf
    if a.size == 0 or bits_equal(a, b):
        return 0.0
    if a.dtype.kind not in "fiub" and a.dtype.name != "bfloat16":  # complex and the like: no ULP order
        return math.inf
    return float(ulp_distance(a, b).max())


def spread_ulp(observations: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The largest ULP distance between the outputs of any two observations (repeats of one cell).

    0.0 when every observation has the same bits; ``inf`` when two have
    different output names, or differ where ULPs cannot measure it (see
    :func:`output_spread`).
    """
    worst = 0.0
    for a, b in itertools.combinations(observations, 2):
        if set(a) != set(b):
            return math.inf
        for name in a:
            worst = max(worst, output_spread(a[name], b[name]))
    return worst


def read_outputs(uri: str) -> dict[str, np.ndarray]:
    """The outputs of one observation file (its ``observation_uri``), read from storage."""
    from . import arrays
    from .storage import Storage

    return arrays.read_ipc(Storage.open(uri).read_bytes(""))[0]


def _decoded(value: Any) -> dict[str, Any]:
    """A JSON column as a dict, whether the record holds it as a dict or as the worker's JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return json_object(value)


def _digests(detail: Mapping[str, Any]) -> dict[str, str] | None:
    value = detail.get(DIGESTS_KEY)
    return dict(value) if isinstance(value, dict) else None


def _repeat_entry(index: int, part: CellResult, detail: Mapping[str, Any]) -> dict[str, Any]:
    fingerprint = _decoded(part.fingerprint)
    return {"repeat": index + 1, "pid": fingerprint.get("pid"), "node_id": part.node_id, "verdict": part.verdict,
            "max_ulp_diff": part.max_ulp_diff, "max_abs_diff": part.max_abs_diff, "attempts": part.attempts,
            "seconds": part.seconds, "error": part.error, DIGESTS_KEY: _digests(detail)}


def _failure_notes(parts: Sequence[CellResult]) -> list[str]:
    """``repeats 2, 3 of 3: error: ...``: every repeat after the first that produced no numbers, by distinct reason.

    A reason the first repeat already gives is not repeated.
    """
    first = (parts[0].verdict, parts[0].error)
    grouped: dict[tuple[str | None, str | None], list[int]] = {}
    for i, part in enumerate(parts[1:], 2):
        if part.verdict not in NUMERIC_VERDICTS and (part.verdict, part.error) != first:
            grouped.setdefault((part.verdict, part.error), []).append(i)
    notes = []
    for (verdict, error), which in grouped.items():
        label = f"repeat {which[0]}" if len(which) == 1 else f"repeats {', '.join(map(str, which))}"
        notes.append(f"{label} of {len(parts)}: {verdict}" + (f": {error}" if error else ""))
    return notes


def combine(parts: Sequence[CellResult],
            read: Callable[[str], Mapping[str, np.ndarray]] = read_outputs) -> CellResult:
    """The one row of a cell replayed ``len(parts)`` times (see the module docstring).

    Args:
        parts: each repeat's result, in repeat order: as its worker returned it
            (JSON columns as dicts or JSON text), with ``attempts`` its own
            dispatches (None: it never reached a worker).
        read: ``observation_uri -> outputs``, called only when repeats disagree.

    Returns:
        The first repeat's result with ``repeats``, ``flaky``,
        ``repeat_spread_ulp``, ``detail.repeats`` and, when a repeat produced no
        numbers, its verdict and a note in ``error``. ``attempts`` is left as the
        caller counts it (every repeat's dispatches).
    """
    first = parts[0]
    details = [_decoded(p.detail) for p in parts]
    produced = [i for i, d in enumerate(details) if _digests(d) is not None]  # repeats that produced outputs
    flaky = spread = None
    spread_note = None
    if len(produced) >= 2:
        digests = {json.dumps(_digests(details[i]), sort_keys=True) for i in produced}
        flaky = len(digests) > 1
        if not flaky:
            spread = 0.0
        else:
            unread = [i + 1 for i in produced if not parts[i].observation_uri]
            if unread:
                spread_note = f"repeat(s) {', '.join(map(str, unread))} stored no outputs to measure the spread from"
            else:
                try:
                    spread = spread_ulp([read(parts[i].observation_uri) for i in produced])
                except Exception as exc:  # the row stands; the spread is unknown, and the detail says why
                    spread_note = f"the repeats' outputs could not be read back: {type(exc).__name__}: {exc}"
    verdict, error = first.verdict, first.error
    notes = _failure_notes(parts)
    if notes:
        failed = next(p for p in parts[1:] if p.verdict not in NUMERIC_VERDICTS and (p.verdict, p.error) !=
                      (first.verdict, first.error))
        if verdict in NUMERIC_VERDICTS:  # a repeat that could not run is never dropped: the row cannot pass
            verdict = failed.verdict
        error = "; ".join(filter(None, [error, *notes]))
    detail = {**details[0], DETAIL_KEY: [_repeat_entry(i, p, d) for i, (p, d) in enumerate(zip(parts, details))]}
    if spread_note:
        detail["repeat_spread_note"] = spread_note
    return first.replace(verdict=verdict, error=error, detail=detail, repeats=sum(bool(p.attempts) for p in parts),
                         flaky=flaky, repeat_spread_ulp=spread)


def pids(cell: CellResult) -> list[Any]:
    """The worker pids of a repeated cell's repeats (from ``detail.repeats``), in repeat order."""
    entries = json_object(cell.detail).get(DETAIL_KEY)
    return [e.get("pid") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
