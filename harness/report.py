"""Reports of a results table: console matrix, Markdown, HTML, JUnit XML and JSON.

Every renderer is pure (a results table in, text out); :func:`write_all` is the
only function that writes files. A table may repeat a cell (a resumed run); the
last row of a ``(scenario, format, environment)`` cell wins everywhere. Each
render decodes the table once, in :func:`_layout` (with
:func:`harness.results.cells`), into typed :class:`harness.records.CellResult`
cells (JSON columns as dicts); renderers read their fields. Imports neither
TensorFlow nor Ray.

Example:
    >>> from harness import report, results
    >>> table = results.read_table("runs/2025-01-01T00-00-00-abcd")
    >>> print(report.matrix_text(table))
    >>> report.write_all(table, "runs/2025-01-01T00-00-00-abcd")
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
from tabulate import tabulate

from harness import charts
from harness import history as hist
from harness import results
from harness import text as text_
from harness.explain import Explanation, LayerDiff
from harness.compare import ACCURACY_TIERS, AS_ACCURATE, LESS_ACCURATE
from harness.records import FIELDS, CellResult, json_object, json_value, metric_delta_bound, unparsable
from harness.repeats import pids as repeat_pids
from harness.results import EXPECTATIONS, NUMERIC_VERDICTS, VERDICTS

#: Report formats and the file each is written to by :func:`write_all`.
FILES = {"md": "report.md", "html": "report.html", "junit": "report.xml", "json": "report.json"}

_SHORT = {"bitwise": "bitwise", "error": "ERROR", "corrupt": "CORRUPT", "unschedulable": "UNSCHED"}
_LABELS = {"bitwise": "bitwise", "within_tolerance": "within tolerance", "mismatch": "mismatch",
           "error": "error", "corrupt": "corrupt", "unschedulable": "unschedulable"}
_TIER_LABELS = {AS_ACCURATE: "as accurate", LESS_ACCURATE: "less accurate", "n/a": "n/a"}
#: Console tags of the accuracy tier (none for n/a, nor for bitwise cells: identical bits are as accurate).
_TIER_TAGS = {AS_ACCURATE: "=acc", LESS_ACCURATE: "<acc"}
#: Console and Markdown tag of a cell whose repeats disagree bitwise.
FLAKY_TAG = "flaky"
#: Fingerprint keys left out of "what differs" lists: a process id always differs.
_NOISE_KEYS = ("pid",)

Cell = CellResult
Key = tuple[str, str, str]


# -- shared structure ------------------------------------------------------------
@dataclasses.dataclass
class _Layout:
    """The matrix: rows (scenario, format), columns environments, cells by key."""

    rows: list[tuple[str, str]]
    environments: list[str]
    cells: dict[Key, Cell]

    def row_cells(self, scenario: str, fmt: str) -> list[Cell]:
        return [c for e in self.environments if (c := self.cells.get((scenario, fmt, e))) is not None]

    def ordered(self) -> list[Cell]:
        """Every cell, row by row, environments left to right."""
        return [c for s, f in self.rows for c in self.row_cells(s, f)]

    @functools.cached_property
    def notes(self) -> dict[str, int]:
        """Every distinct ``error`` text of the cells (the full reason of a cell that is not bitwise), numbered
        from 1 in matrix order. The matrix shows ``[n]`` in a cell; the text is listed below it, never cut."""
        texts = _unique(text_.one_line(c.error) for c in self.ordered() if c.error and c.error.strip())
        return {t: i for i, t in enumerate(texts, 1)}

    def note(self, cell: Cell | None) -> int | None:
        """The number of ``cell``'s note (None: it has no error text)."""
        return self.notes.get(text_.one_line(cell.error)) if cell is not None and cell.error else None

    @functools.cached_property
    def train_seconds(self) -> dict[str, float]:
        """Training time per scenario (``train_s``; the last row of a resumed run wins), in row order."""
        out: dict[str, float] = {}
        for cell in self.ordered():
            if hist.is_finite(cell.train_s):
                out[cell.scenario] = cell.train_s
        return out


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v is not None))


def _layout(table: pa.Table) -> _Layout:
    """The table's cells, decoded once (the last row of a cell wins, in first-appearance order).

    Raises:
        ResultsError: a row has an unknown verdict (see :func:`harness.results.cells`).
    """
    cells = hist.index_cells(results.cells(table))
    pairs = {(s, f) for s, f, _ in cells}
    scenarios, formats = _unique(k[0] for k in cells), _unique(k[1] for k in cells)
    rows = [(s, f) for s in scenarios for f in formats if (s, f) in pairs]
    return _Layout(rows, _unique(k[2] for k in cells), cells)


def _failed(cell: Cell) -> bool:
    return cell.passed is False


def _tier(cell: Cell) -> str | None:
    """The accuracy tier the matrix shows for ``cell``: ``as_accurate`` or ``less_accurate`` on a cell whose
    bits differ; None for n/a and for bitwise cells (identical bits are as accurate by definition)."""
    if cell.verdict in ("within_tolerance", "mismatch") and cell.accuracy in _TIER_TAGS:
        return cell.accuracy
    return None


def _num(value: Any) -> str:
    """A metric for humans: 3 significant digits, or n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _ulp(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    return f"{value:.3g}" if not math.isfinite(value) or value < 1000 else f"{value:.1e}"


def _first_line(text: str | None, limit: int = 300) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def _rank(verdict: str | None) -> int:
    return VERDICTS.index(verdict) if verdict in VERDICTS else len(VERDICTS)


def _save_cell(cells: list[Cell]) -> Cell:
    """The worst save round trip among a row's cells, as a cell (verdict and diffs only)."""
    known = [c for c in cells if c.save_verdict is not None]
    if not known:
        return CellResult()
    worst = max(known, key=lambda c: _rank(c.save_verdict))
    return CellResult(verdict=worst.save_verdict, max_ulp_diff=worst.save_max_ulp_diff,
                      max_abs_diff=worst.save_max_abs_diff)


def _run_ids(table: pa.Table) -> list[str]:
    return _unique(table["run_id"].to_pylist())


def _started(cells: Iterable[Cell]) -> _dt.datetime | None:
    """The earliest start among ``cells``, as a UTC datetime."""
    starts = [c.started_at for c in cells if c.started_at is not None]
    return _dt.datetime.fromtimestamp(min(starts), tz=_dt.timezone.utc) if starts else None


def _title(table: pa.Table, title: str | None) -> str:
    sweeps = _unique(table["sweep"].to_pylist())
    return title or ("Reproducibility report: " + ", ".join(sweeps) if sweeps else "Reproducibility report")


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts of a results table: cells, one per verdict, passed and failed expectations."""
    return _summarize(_layout(table))


def _summarize(lay: _Layout) -> dict[str, Any]:
    cells = list(lay.cells.values())
    verdicts = Counter(c.verdict for c in cells)
    tiers = Counter(c.accuracy for c in cells)
    return {
        "cells": len(cells),
        "verdicts": {v: verdicts.get(v, 0) for v in VERDICTS},
        "accuracy": {t: tiers.get(t, 0) for t in ACCURACY_TIERS},
        "passed": sum(c.passed is True for c in cells),
        "failed": sum(c.passed is False for c in cells),
        "not_judged": sum(c.passed is None for c in cells),
        "flaky": sum(c.flaky is True for c in cells),
        "repeated": sum(c.flaky is not None for c in cells),  # cells whose repeats could be compared
    }


def summary_line(table: pa.Table) -> str:
    """``N cells: a bitwise, ...; P passed, F failed expectations``."""
    return _summary_line(_layout(table))


def _summary_line(lay: _Layout) -> str:
    s = _summarize(lay)
    counts = ", ".join(f"{s['verdicts'][v]} {_LABELS[v]}" for v in VERDICTS)
    judged = f"; {s['not_judged']} not judged (optional environments no node can host)" if s["not_judged"] else ""
    tiers = ""
    if any(s["accuracy"].values()):
        tiers = "; vs float64: " + ", ".join(f"{n} {_TIER_LABELS[t]}" for t, n in s["accuracy"].items())
    flaky = f"; {s['flaky']} of {s['repeated']} repeated cells flaky" if s["repeated"] else ""
    return (f"{s['cells']} cells: {counts}{tiers}{flaky}; {s['passed']} passed, {s['failed']} failed "
            f"expectations{judged}")


def _joined(cell: Cell, names: Iterable[str]) -> str:
    values = [(n, getattr(cell, n)) for n in names]
    return ", ".join(f"{n} {_num(v)}" for n, v in values if v is not None)


def _outcome_text(cell: Cell) -> str:
    judged = {True: "passed", False: "FAILED"}.get(cell.passed, "not judged")
    return f"{cell.verdict} (expected {cell.expected}: {judged})"


def _repeats_text(cell: Cell) -> str:
    """``3 repeats in 3 processes (pids 11, 12, 13): FLAKY, their outputs up to 4 ulp apart``, or '' (not repeated)."""
    if cell.flaky is None and not (cell.repeats or 0) > 1:
        return ""
    pids = repeat_pids(cell)
    known = [p for p in pids if p is not None]
    text = f"{cell.repeats} repeat(s) in {len(set(known))} process(es)" + (
        f" (pids {', '.join(map(str, pids))})" if known else "")
    if cell.flaky is None:
        return f"{text}: fewer than two produced outputs to compare"
    if not cell.flaky:
        return f"{text}: identical bits"
    spread = (f"their outputs up to {_ulp(cell.repeat_spread_ulp)} ulp apart" if cell.repeat_spread_ulp is not None
              else "how far apart is unknown: " + str(json_object(cell.detail).get("repeat_spread_note", "")))
    return f"{text}: FLAKY, {spread} (never counted as a regression)"


def _facts(cell: Cell) -> list[tuple[str, str]]:
    """What is worth knowing about a cell, as (label, text) lines; empty lines left out."""
    labels = json_value(cell.node_labels)
    node = " ".join(filter(None, [cell.node_id, hist.format_value(labels, 400) if labels else ""]))
    facts = [
        ("verdict", _outcome_text(cell)),
        ("repeats", _repeats_text(cell)),
        ("metrics", _joined(cell, ("max_abs_diff", "max_rel_diff", "max_ulp_diff", "mismatch_fraction", "weights_equal"))),
        ("prediction impact", _impact_text(cell)),
        ("accuracy vs float64", _accuracy_text(cell)),
        ("rmse vs float64", _rmse_text(cell)),
        ("task metric", _metric_text(cell)),
        ("save round trip", _joined(cell, ("save_verdict", "save_max_abs_diff", "save_max_ulp_diff"))),
        ("tolerance applied", _joined(cell, ("atol", "rtol", "max_ulp"))),
        ("required tolerance", _required_text(cell)),
        ("node", node),
        ("worker", _joined(cell, ("tf_version", "attempts", "seconds", "train_s", "artifact_digest"))),
    ]
    return [(label, text) for label, text in facts if text]


def _flips(cell: Cell) -> int:
    """Decisions the cell's differences changed (0 when none, or no output decides anything)."""
    flips = cell.prediction_flips
    return int(flips) if flips is not None and flips == flips else 0


def _impact_text(cell: Cell) -> str:
    """``3 predictions changed their decision (worst output 4.7%); top-k rank moved by up to 2``, or ''."""
    if cell.prediction_flips is None or cell.verdict not in ("within_tolerance", "mismatch"):
        return ""
    flips, rank = _flips(cell), cell.max_rank_change
    text = (f"{flips} prediction(s) changed their decision (worst output {100 * (cell.prediction_flip_fraction or 0):.3g}%)"
            if flips else "no decision changed")
    return text + (f"; top-k rank moved by up to {int(rank)}" if rank else "")


def _accuracy_text(cell: Cell) -> str:
    """``as accurate (output: rmse vs float64 2.4e-08 <= 3 x reference's ...)``, or ''."""
    if cell.accuracy is None:
        return ""
    return f"{_TIER_LABELS.get(cell.accuracy, cell.accuracy)}" + (f" ({cell.accuracy_note})" if cell.accuracy_note else "")


def _allowance(cell: Cell) -> float | None:
    """The largest RMSE vs float64 still as accurate (``m x reference's RMSE + atol / 10``) of the output
    the cell's RMSE columns come from, read from ``detail.accuracy``; None when the detail does not hold it."""
    judged = json_object(json_object(cell.detail).get("accuracy")).get("outputs")
    for output in judged if isinstance(judged, list) else []:
        if (isinstance(output, dict) and output.get("rmse") == cell.rmse_vs_fp64
                and output.get("reference_rmse") == cell.reference_rmse_vs_fp64
                and hist.is_finite(output.get("allowance"))):
            return output["allowance"]
    return None


def _rmse_text(cell: Cell) -> str:
    """``observed 2.37e-08, reference 2.35e-08, allowance 7.06e-08``, or '' (no RMSE recorded)."""
    if cell.rmse_vs_fp64 is None and cell.reference_rmse_vs_fp64 is None:
        return ""
    allowance = _allowance(cell)
    return (f"observed {_num(cell.rmse_vs_fp64)}, reference {_num(cell.reference_rmse_vs_fp64)}"
            + (f", allowance {_num(allowance)}" if allowance is not None else ""))


def _metric_text(cell: Cell) -> str:
    """``accuracy 0.75 -> 0.7344 (delta -0.0156)``, or ''."""
    if cell.metric is None:
        return ""
    return (f"{cell.metric} {_num(cell.reference_metric)} -> {_num(cell.observed_metric)} "
            f"(delta {_num(cell.metric_delta)})")


def _required_text(cell: Cell) -> str:
    parts = [f"{label} >= {_num(value)}" for value, label in
             ((cell.required_atol, "atol"), (cell.required_rtol, "rtol"), (cell.required_ulp, "max_ulp"))
             if value is not None]
    return "would pass with " + ", or ".join(parts) if parts else ""


def _fingerprint_keys(*fingerprints: Mapping[str, Any]) -> list[str]:
    """Known keys first (in :data:`harness.history.FINGERPRINT_KEYS` order), then the rest sorted."""
    present = set().union(*fingerprints)
    known = [k for k in hist.FINGERPRINT_KEYS if k in present]
    return known + sorted(present - set(known))


def _diff_sides(train: Any, reload: Any) -> tuple[str, str]:
    """Both sides of a differing fingerprint value; string lists show only what the other lacks."""
    if isinstance(train, list) and isinstance(reload, list) and all(isinstance(v, str) for v in train + reload):
        def side(mine: list[str], other: list[str]) -> str:
            only = [v for v in mine if v not in other]
            return f"{len(mine)} items; only here: {', '.join(only) or '(none)'}"
        return side(train, reload), side(reload, train)
    return hist.format_value(train), hist.format_value(reload)


def fingerprint_diff(cell: Cell) -> list[tuple[str, Any, Any]]:
    """``(key, training value, reload value)`` for every fingerprint key of a cell that differs (pid ignored).

    ``cell`` is a :class:`~harness.records.CellResult` (for a results row: ``CellResult.from_row(row)``).
    """
    train, reload = json_object(cell.train_fingerprint), json_object(cell.fingerprint)
    return [(k, train.get(k), reload.get(k)) for k in _fingerprint_keys(train, reload)
            if k not in _NOISE_KEYS and train.get(k) != reload.get(k)]


# -- console -----------------------------------------------------------------------
def _abs(value: Any) -> str:
    """An absolute difference beside a ULP count: 2 significant digits (``2.4e-07``, ``0.034``)."""
    return f"{value:.2g}" if isinstance(value, (int, float)) else "?"


def failure_mark(cell: Cell) -> str:
    """``✗`` for a missed expectation, ``save✗`` when the cell met it but its save round trip missed
    ``expect_save`` (so ``bitwise save✗`` never reads as a contradiction), '' when it passed or was not judged."""
    if not _failed(cell):
        return ""
    try:
        met = cell.meets()
    except ValueError:  # an expectation this version does not know: not met
        met = False
    return "save✗" if met and not cell.flaky else "✗"  # a flaky cell's first repeat may meet what others missed


def _mark(cell: Cell) -> str:
    mark = failure_mark(cell)
    return f" {mark}" if mark else ""


def _short(cell: Cell | None, note: int | None = None) -> str:
    """Compact cell text: ``bitwise``, ``tol 14ulp 1.2e-06``, ``MISMATCH 2.1e+03ulp 0.034``, ``ERROR``
    (+ ``Kflip``, `` ✗`` or `` save✗``, and `` [n]`` pointing at the note with the cell's full reason)."""
    if cell is None or cell.verdict is None:
        return "-"
    verdict = cell.verdict
    if verdict == "within_tolerance":
        text = f"tol {_ulp(cell.max_ulp_diff)}ulp {_abs(cell.max_abs_diff)}"
    elif verdict == "mismatch":
        text = f"MISMATCH {_ulp(cell.max_ulp_diff)}ulp {_abs(cell.max_abs_diff)}"
    else:
        text = _SHORT.get(verdict, verdict.upper())
    if _flips(cell):
        text += f" {_flips(cell)}flip"
    if _tier(cell):
        text += f" {_TIER_TAGS[_tier(cell)]}"
    if cell.flaky:
        text += f" {FLAKY_TAG}"
    return text + _mark(cell) + (f" [{note}]" if note else "")


MATRIX_LEGEND = ("legend: bitwise = identical bits; tol Nulp A = within tolerance, at most N ULP and A absolute "
                 "difference from the reference; MISMATCH Nulp A = outside tolerance; Kflip = K predictions changed "
                 "their decision (top-1 class, 0.5 threshold or label); =acc / <acc = as accurate as / less accurate "
                 "than the reference, both measured against the model run in float64; flaky = its repeats disagree "
                 "bitwise (never counted as a regression); ✗ = missed its expectation; "
                 "save✗ = met it, but the save round trip missed expect_save; [n] = note n above (the full reason); "
                 "save = in-memory model vs its reload in the training environment")


def _train_text(lay: _Layout) -> str:
    """``training: a 2.1 s, b 0.3 s`` (empty when no row records a training time)."""
    seconds = lay.train_seconds
    return "training: " + ", ".join(f"{text_.one_line(s)} {v:.1f} s" for s, v in seconds.items()) if seconds else ""


def _notes_text(lay: _Layout, width: int = 110) -> list[str]:
    """``notes:`` then ``[n] full text`` per note, wrapped at ``width`` with a hanging indent, never cut."""
    lines = ["notes:"] if lay.notes else []
    for note, number in lay.notes.items():
        lines += textwrap.wrap(f"[{number}] {note}", width, subsequent_indent="    ", break_on_hyphens=False,
                               break_long_words=False)  # lines break at spaces only: the text is kept whole
    return lines


def matrix_text(table: pa.Table) -> str:
    """The results as a console matrix (tabulate), its notes, training times, a one-line summary, the legend.

    Rows are ``scenario/format`` with their save round trip (``save``, the worst
    over environments); columns are environments, in first-appearance order.
    """
    lay = _layout(table)
    if not lay.cells:
        return "no cells\n" + _summary_line(lay)
    body = [[text_.one_line(f"{s}/{f}"), _short(_save_cell(lay.row_cells(s, f))),
             *(_short(c, lay.note(c)) for c in (lay.cells.get((s, f, e)) for e in lay.environments))]
            for s, f in lay.rows]
    headers = ["scenario/format", "save", *map(text_.one_line, lay.environments)]
    grid = tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)
    return "\n".join([grid, *_notes_text(lay), *filter(None, [_train_text(lay)]), _summary_line(lay), MATRIX_LEGEND])


# -- Markdown ------------------------------------------------------------------------
def _md_escape(text: Any) -> str:
    return text_.markdown(text)


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    return lines + ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]


def _fence(text: str) -> list[str]:
    """A fenced block longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence]


def _md_cell(cell: Cell | None, note: int | None = None) -> str:
    """``within_tolerance (14 ulp, 1.2e-06)``; failed expectations in bold with ✗ (``save✗`` when only the
    save round trip missed); `` [n]`` points at the note holding the cell's full reason."""
    if cell is None or cell.verdict is None:
        return "-"
    text = cell.verdict
    if text in ("within_tolerance", "mismatch"):
        flips = f", {_flips(cell)} flipped" if _flips(cell) else ""
        tier = f", {_TIER_LABELS[_tier(cell)]}" if _tier(cell) else ""
        text += f" ({_ulp(cell.max_ulp_diff)} ulp, {_num(cell.max_abs_diff)}{flips}{tier})"
    if cell.flaky:
        text += f" {FLAKY_TAG}"
    text = f"**{text}**{_mark(cell)}" if _failed(cell) else text
    return text + (f" [{note}]" if note else "")


def _md_header(table: pa.Table, lay: _Layout, title: str | None) -> list[str]:
    started = _started(lay.cells.values())
    lines = [f"# {_md_escape(_title(table, title))}", "",
             "Run: " + (", ".join(text_.code(r) for r in _run_ids(table)) or "none")]
    if started is not None:
        lines.append(f"Started: {started:%Y-%m-%d %H:%M:%S} UTC")
    return lines + ["", _summary_line(lay), ""]


def _md_matrix(lay: _Layout) -> list[str]:
    rows = [[f"{s}/{f}", *(_md_cell(c, lay.note(c)) for c in (lay.cells.get((s, f, e)) for e in lay.environments))]
            for s, f in lay.rows]
    notes = [f"- {_md_escape(f'[{n}] {text}')}" for text, n in lay.notes.items()]
    return ["## Matrix", "", *_md_table(["scenario/format", *lay.environments], rows), "",
            *(["Notes (the full reason of each cell marked [n]):", "", *notes, ""] if notes else [])]


def _md_save(lay: _Layout) -> list[str]:
    rows = []
    for s, f in lay.rows:
        save = _save_cell(lay.row_cells(s, f))
        rows.append([f"{s}/{f}", save.verdict or "-", _ulp(save.max_ulp_diff), _num(save.max_abs_diff),
                     _num(lay.train_seconds.get(s))])
    headers = ["scenario/format", "save verdict", "max ulp", "max abs diff", "train s"]
    intro = ("In-memory model vs reload in the training environment (worst over environments), and the "
             "scenario's training time in this run (fit, save and reload every format).")
    return ["## Save round trip", "", intro, "", *_md_table(headers, rows), ""]


def _md_failure(cell: Cell) -> list[str]:
    lines = [f"### {text_.code(cell.scenario + '/' + cell.format)} @ {text_.code(cell.environment)}", ""]
    lines += [f"- {label}: {_md_escape(text)}" for label, text in _facts(cell)]
    if cell.error:
        lines += ["", "Error:", "", *_fence(text_.visible(cell.error))]
    diff = fingerprint_diff(cell)
    if diff:
        rows = [[k, *_diff_sides(train, reload)] for k, train, reload in diff]
        lines += ["", "Fingerprint differences:", "", *_md_table(["key", "training worker", "reload worker"], rows)]
    return lines + [""]


def _md_flaky(lay: _Layout) -> list[str]:
    """``## Flaky cells``: every cell whose repeats disagree, with its pids and spread (nothing without any)."""
    flaky = [c for c in lay.ordered() if c.flaky]
    if not flaky:
        return []
    lines = [f"- {text_.code(c.scenario + '/' + c.format)} @ {text_.code(c.environment)}: "
             f"{_md_escape(_repeats_text(c))}" for c in flaky]
    return ["## Flaky cells", "", "Cells whose repeats disagree bitwise (a flaky cell is never a regression):", "",
            *lines, ""]


def _markdown(table: pa.Table, changes: hist.Changes | None, title: str | None,
              explanations: Mapping[str, Explanation] | None = None) -> str:
    lay = _layout(table)
    lines = _md_header(table, lay, title)
    if changes is not None:  # a nightly report opens with what changed: new failures first
        lines += ["## What changed", "", hist.render_changes_md(changes)]
    if not lay.cells:
        lines += ["No cells: this run has no results.", ""]
    else:
        lines += _md_matrix(lay) + _md_save(lay)
        failures = [c for c in lay.ordered() if _failed(c)]
        lines += ["## Failed expectations", ""]
        lines += [line for c in failures for line in _md_failure(c)] or ["None.", ""]
        lines += _md_flaky(lay)
    explained = _explained(lay, explanations)
    if explained:
        lines += ["## Explanations", ""] + [line for e in explained for line in _md_explanation(e)]
    return "\n".join(lines).rstrip() + "\n"


# -- explanations (harness explain) ---------------------------------------------------------
_LAYER_HEADERS = ["#", "layer", "outputs", "max ulp", "max abs diff", "mismatch fraction", "growth",
                  "vs float64", "rmse vs fp64", "reference's rmse vs fp64"]


def _explained(lay: _Layout, explanations: Mapping[str, Explanation] | None) -> list[Explanation]:
    """The explanations of the layout's cells that found something, in matrix order."""
    if not explanations:
        return []
    order = [c.name for c in lay.ordered()]
    return [explanations[k] for k in order if k in explanations and explanations[k].message is None]


def _growth(layer: LayerDiff) -> str:
    if layer.growth is None:
        return "-"
    return "starts here" if math.isinf(layer.growth) else f"x{layer.growth:.3g}"


def _layer_row(layer: LayerDiff) -> list[str]:
    judged = layer.accuracy is not None  # "-": not judged against float64 (see the explanation's accuracy fact)
    return [str(layer.index), layer.name, layer.bits, _ulp(layer.max_ulp_diff), _num(layer.max_abs_diff),
            _num(layer.mismatch_fraction), _growth(layer), layer.accuracy or "-",
            _num(layer.rmse_vs_fp64) if judged else "-", _num(layer.reference_rmse_vs_fp64) if judged else "-"]


def _explanation_facts(exp: Explanation) -> list[tuple[str, str]]:
    loc, facts = exp.localisation, []
    if exp.summary:
        facts.append(("setting", exp.summary))
    if loc is not None and loc.error:
        facts.append(("layers", f"cannot localise: {loc.error}"))
    elif loc is not None:
        facts.append(("starts at layer", loc.first or "(every layer the same)"))
        facts.append(("grows most at", loc.growth or "-"))
        if loc.accuracy_fact() is not None:
            facts.append(loc.accuracy_fact())
        if loc.note:
            facts.append(("traced", loc.note))
    facts += [("knob", f.sentence()) for f in exp.findings]
    if exp.unattributable:
        facts.append(("not attributable here", "; ".join(exp.unattributable)))
    return facts


def _md_explanation(exp: Explanation) -> list[str]:
    scenario, fmt, env = exp.cell.split("/")
    lines = [f"### {text_.code(scenario + '/' + fmt)} @ {text_.code(env)}: {_md_escape(exp.verdict)}", ""]
    lines += [f"- {label}: {_md_escape(text)}" for label, text in _explanation_facts(exp)]
    layers = exp.localisation.layers if exp.localisation else ()
    if layers:
        lines += ["", *_md_table(_LAYER_HEADERS, [_layer_row(d) for d in layers])]
    return lines + [""]


# -- HTML ------------------------------------------------------------------------------
# The page's markup lives in harness/templates/report.html.j2 (Jinja2, autoescape on);
# the functions below build its view model: texts, colours, coordinates. SVG reaches the
# template as Markup only from harness.charts (which escapes every label itself).
#: The page's colours of meaning, one owner: verdict backgrounds (and ink on them) here, the CSS
#: classes are generated from them (:func:`_colour_css`), charts and bars take them from here too.
_COLOURS = {"bitwise": "#1a9850", "within_tolerance": "#a6d96a", "mismatch": "#d73027",
            "error": "#8073ac", "corrupt": "#c51b7d", "unschedulable": "#bdbdbd"}
_INK = {"within_tolerance": "#1b1b1b", "unschedulable": "#222"}  # text on light backgrounds; white elsewhere
#: Marks drawn over a cell's colour: a missed expectation (outline) and a less accurate cell (a corner).
_MARKS = {"failed": "#111111", LESS_ACCURATE: "#08519c"}
_MISMATCH_LOW, _MISMATCH_HIGH = (253, 174, 97), (103, 0, 13)  # orange at 1 ulp, dark red at 1e8 ulp
_MISMATCH_DECADES = 8
#: What =acc and <acc mean, in the legend and a cell's tooltip.
_TIER_MEANING = {AS_ACCURATE: "as accurate as the reference, both measured against the model run in float64",
                 LESS_ACCURATE: "less accurate than the reference, both measured against the model run in float64"}
#: Required-tolerance charts one page draws at most (about 10 KB each): a nightly of 10,000 cells stays a page.
_TREND_CHARTS = 200
#: Groups of "What changed" (known, fixed, flaky) with more cells than this start folded; new failures never do.
_GROUP_OPEN = 10
TEMPLATE = "report.html.j2"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:14px;margin:14px 0 6px}
.meta{color:#555;margin:2px 0}.summary{font-weight:600;margin:10px 0}
table{border-collapse:collapse}
.scroll{max-width:100%;overflow-x:auto}
#matrix-box{max-height:85vh;overflow:auto}
#matrix th,#matrix td{border:2px solid #fff;padding:4px 6px;text-align:center;white-space:nowrap;font-size:12px}
#matrix thead th{background:#eceff3;position:sticky;top:0;z-index:2}
#matrix thead th.env{white-space:normal;overflow-wrap:anywhere;min-width:6em;max-width:9em}
#matrix tbody th,#matrix thead th.corner{background:#f6f7f9;text-align:left;font-weight:600;position:sticky;left:0;
 z-index:3;white-space:normal;overflow-wrap:anywhere;min-width:12em;max-width:18em}
#matrix thead th.corner{z-index:4}
#matrix tbody th .train{display:block;font-weight:400;color:#666;font-size:11px}
#matrix td.cell,#matrix td.save{min-width:5.5em;max-width:8.5em;white-space:normal}
#matrix td.cell{position:relative}
#matrix .w{white-space:nowrap}
#notes{font-size:12px;margin:8px 0;padding-left:0;list-style:none;max-width:110em}
#notes li{overflow-wrap:anywhere;margin:2px 0}
td.cell summary{cursor:pointer;list-style:none}
td.cell summary::-webkit-details-marker{display:none}
.spark{display:block;margin:3px auto 0}
.detail{position:absolute;z-index:5;top:100%;left:0;width:34em;max-height:28em;overflow:auto;
 text-align:left;white-space:normal;background:#fff;color:#222;border:1px solid #888;
 border-radius:4px;box-shadow:0 4px 14px rgba(0,0,0,.25);padding:8px 10px;font-size:12px}
.detail dl{display:grid;grid-template-columns:max-content 1fr;gap:1px 10px;margin:0}
.detail dt{color:#555}.detail dd{margin:0;overflow-wrap:anywhere}
.detail pre{white-space:pre-wrap;background:#f6f7f9;padding:6px;margin:6px 0}
.detail .trend,#changes .trend{display:block;margin:6px 0}
.v-none{background:#fafafa;color:#999}
#legend{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:12px 0}
#legend .item{display:flex;align-items:center;gap:6px}
#legend .swatch{display:inline-block;width:22px;height:16px;border-radius:3px;border:1px solid #999;position:relative}
#legend .ramp{display:inline-block;width:120px;height:16px;border-radius:3px;border:1px solid #999}
#legend .failed-mark{background:#fff}
#matrix td.cell.flaky,#legend .flaky-mark{border-style:dashed;border-color:#111}
#fingerprints th,#fingerprints td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top;font-size:12px;
 max-width:28em;overflow-wrap:anywhere}
#fingerprints td{min-width:8em}
#fingerprints tbody th{white-space:nowrap}
#fingerprints thead th{background:#eceff3}
#fingerprints tr.differs th{color:#b2182b}
#fingerprints td.diff{background:#fde0c5;font-weight:600}
#fingerprints details summary{cursor:pointer;color:#2166ac}
#explanations dl{display:grid;grid-template-columns:max-content 1fr;gap:1px 10px}
#explanations dd{margin:0}.depth{display:block;margin:8px 0}
table.layers th,table.layers td{border:1px solid #ddd;padding:2px 8px;font-size:12px;text-align:left}
#changes{max-width:100%}
#changes .counts{display:flex;flex-wrap:wrap;gap:10px;list-style:none;padding:0;margin:8px 0}
#changes .counts li{border:1px solid #ccc;border-radius:4px;padding:4px 10px;background:#f6f7f9}
#changes .counts li b{font-size:16px;margin-right:4px}
#changes .counts li.new.some{border-color:#b2182b;background:#fde0dd}
#changes details.group>summary{cursor:pointer}#changes details.group>summary h3{display:inline-block}
#changes table.failing{width:100%;table-layout:fixed}
#changes table.failing th,#changes table.failing td{border:1px solid #ddd;padding:3px 6px;text-align:left;
 vertical-align:top;font-size:12px;overflow-wrap:anywhere}
#changes table.failing thead th{background:#eceff3}
#changes col.c-cell{width:24%}#changes col.c-verdict{width:15%}#changes col.c-run{width:16%}
#changes col.c-n{width:7%}#changes col.c-changed{width:22%}
#changes table.failing ul{margin:0;padding-left:1.1em}
#changes ul.plain{font-size:12px;margin:4px 0;padding-left:1.3em}
#changes ul.plain li{overflow-wrap:anywhere}
#changes table.drifting{table-layout:auto}
#changes td.spark-cell{width:100px}#changes td.spark-cell .spark{margin:0}
"""

# Only one detail panel open at a time; Escape closes it; a link to #cell-N (from "What changed")
# opens that cell's panel and brings it into view.
_JS = """
document.addEventListener("toggle",function(e){var d=e.target;if(d.open&&d.closest("#matrix")){
document.querySelectorAll("#matrix details[open]").forEach(function(o){if(o!==d)o.open=false;});}},true);
document.addEventListener("keydown",function(e){if(e.key==="Escape"){
document.querySelectorAll("#matrix details[open]").forEach(function(o){o.open=false;});}});
function openCell(id){var td=document.getElementById(id);if(!td||!td.closest("#matrix"))return;
var d=td.querySelector("details");if(d)d.open=true;td.scrollIntoView({block:"center",inline:"center"});}
window.addEventListener("hashchange",function(){openCell(location.hash.slice(1));});
if(location.hash)openCell(location.hash.slice(1));
"""


def _colour_css() -> str:
    """CSS of every colour of meaning: verdict classes, the mismatch ramp, the failed and less accurate marks."""
    rules = []
    for verdict, colour in _COLOURS.items():
        background = (f"repeating-linear-gradient(45deg,#e4e4e4 0 5px,{colour} 5px 10px)"
                      if verdict == "unschedulable" else colour)  # striped: it never ran
        rules.append(f".v-{verdict}{{background:{background};color:{_INK.get(verdict, '#fff')}}}")
    rules.append(f"#legend .ramp{{background:linear-gradient(90deg,rgb{_MISMATCH_LOW},rgb{_MISMATCH_HIGH})}}")
    rules.append(f"td.cell.failed,#legend .failed-mark{{outline:3px solid {_MARKS['failed']};outline-offset:-4px}}")
    # A less accurate cell gets a corner (on a white edge, to show on red and green alike).
    corner = "content:'';position:absolute;top:0;right:0;width:0;height:0;border-style:solid;"
    rules.append("td.cell.less-accurate::before,#legend .tier-mark::before{" + corner +
                 "border-width:0 15px 15px 0;border-color:transparent #fff transparent transparent}")
    rules.append("td.cell.less-accurate::after,#legend .tier-mark::after{" + corner +
                 f"border-width:0 12px 12px 0;border-color:transparent {_MARKS[LESS_ACCURATE]} transparent transparent}}")
    return "\n".join(rules)


@functools.lru_cache(maxsize=1)
def _template() -> "jinja2.Template":
    """The report page's template (package data of ``harness``), loaded once per process."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("harness", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE)


def _svg(markup: str | None) -> Any:
    """An SVG string from :mod:`harness.charts` (which escapes every label it draws), marked safe for the
    template; inline in HTML it needs no namespace declaration (so the page names no URL at all)."""
    from markupsafe import Markup

    return None if markup is None else Markup(markup.replace(charts.XMLNS, "", 1))


def _mismatch_rgb(ulp: Any) -> tuple[tuple[int, int, int], float]:
    """Colour of a mismatch on a log10 ULP scale, and its position 0..1 on that scale."""
    if ulp is None:
        t = 0.0
    elif not hist.is_finite(ulp):
        t = 1.0  # NaN/inf outputs: as bad as it gets
    else:
        t = min(max(math.log10(max(ulp, 1.0)) / _MISMATCH_DECADES, 0.0), 1.0)
    rgb = tuple(round(lo + (hi - lo) * t) for lo, hi in zip(_MISMATCH_LOW, _MISMATCH_HIGH))
    return rgb, t


def _colour(verdict: str | None, ulp: Any) -> str:
    if verdict == "mismatch":
        return "#%02x%02x%02x" % _mismatch_rgb(ulp)[0]
    return _COLOURS.get(verdict, "#999999")


def _mismatch_style(cell: Cell) -> str:
    """Inline style of a mismatch cell (its colour graded by ULP); '' for other verdicts."""
    if cell.verdict != "mismatch":
        return ""
    _, t = _mismatch_rgb(cell.max_ulp_diff)
    return f'background:{_colour("mismatch", cell.max_ulp_diff)};color:{"#fff" if t > 0.3 else "#222"}'


def _verdict_class(verdict: str | None) -> str:
    return f"v-{verdict}" if verdict in _COLOURS else "v-none"


def _spark(points: list[hist.TrendPoint]) -> Any:
    """Max ULP diff (log scale) over runs, one dot per run in its verdict's colour (None: fewer than 2 runs)."""
    if len(points) < 2:
        return None
    return _svg(charts.spark_svg([p.max_ulp_diff for p in points], log=True,
                                 colours=[_colour(p.verdict, p.max_ulp_diff) for p in points],
                                 label=f"max ulp trend over {len(points)} runs"))


def _measured(points: list[hist.TrendPoint], name: str) -> list[float]:
    """The finite values of ``required_ulp`` or ``required_atol`` over a cell's runs, oldest first."""
    return [v for p in points if hist.is_finite(v := getattr(p, name))]


def _tolerance_moved(points: list[hist.TrendPoint]) -> bool:
    """Whether the cell's required ULP or atol was not the same in every run that measured it."""
    return any(len(set(_measured(points, name))) > 1 for name in ("required_ulp", "required_atol"))


def _charted(lay: _Layout, points: Mapping[Key, list[hist.TrendPoint]]) -> set[Key]:
    """The cells whose required-tolerance chart the page draws: those whose tolerance moved over their runs
    (a flat one is said in words), failing cells first, then the widest ULP spread; at most :data:`_TREND_CHARTS`."""
    def spread(key: Key) -> float:
        ulps = _measured(points[key], "required_ulp")
        return (max(ulps) + 1) / (min(ulps) + 1) if ulps else 1.0

    moved = [key for key, pts in points.items() if _tolerance_moved(pts)]
    moved.sort(key=lambda key: (not _failed(lay.cells[key]), -spread(key)))
    return set(moved[:_TREND_CHARTS])


def _tolerance_trend(cell: Cell, points: list[hist.TrendPoint], charted: bool) -> tuple[Any, str]:
    """A cell's required ULP and atol over its runs as a chart (:func:`harness.history.tolerance_chart`),
    or a line saying what they were; (None, '') without history."""
    n = len(points)
    if n < 2:
        return None, ""
    if charted:
        return _svg(hist.tolerance_chart(f"{cell.scenario}/{cell.format} @ {cell.environment}", points)), ""
    ulps, atols = _measured(points, "required_ulp"), _measured(points, "required_atol")
    if not any(v > 0 for v in ulps + atols):
        return None, f"0 or not measured in each of the last {n} runs"
    if not _tolerance_moved(points):
        same = ", ".join(f"{name} {_num(values[0])}" for name, values in (("ULP", ulps), ("atol", atols)) if values)
        return None, f"{same} in every one of the last {n} runs that measured it"
    return None, (f"ULP {hist.values_summary(ulps)}; atol {hist.values_summary(atols)} over the last {n} runs "
                  f"(not drawn: the page draws {_TREND_CHARTS} charts, failing cells and the widest drift first)")


def _value_view(value: Any) -> dict[str, Any]:
    """A fingerprint value: ``n`` items folded into a <details> for long lists, else plain text."""
    if isinstance(value, list) and len(value) > 6:
        items = ", ".join(v if isinstance(v, str) else hist.format_value(v) for v in value)
        return {"n": len(value), "text": items}
    return {"n": None, "text": hist.format_value(value, limit=300)}


def _tooltip(cell: Cell) -> str:
    parts = [f"{cell.scenario}/{cell.format} @ {cell.environment}: {cell.verdict}",
             f"expected {cell.expected}", f"max ulp {_ulp(cell.max_ulp_diff)}",
             f"max abs {_num(cell.max_abs_diff)}"]
    if _flips(cell):
        parts.append(f"{_flips(cell)} prediction(s) changed their decision")
    if tier := _tier(cell):
        parts.append(f"{_TIER_TAGS[tier]} {_TIER_MEANING[tier]}")
    if cell.flaky:
        parts.append("flaky: its repeats disagree bitwise")
    if _failed(cell):
        parts.append("FAILED expectation")
    if first := _first_line(cell.error):
        parts.append(first)
    return "; ".join(parts)


def _detail_view(cell: Cell, trend: list[hist.TrendPoint], charted: bool) -> dict[str, Any]:
    """The click-to-open panel of a cell: facts, required tolerance over the runs, error, fingerprint
    differences, fingerprint."""
    fingerprint = json_object(cell.fingerprint)
    chart, no_chart = _tolerance_trend(cell, trend, charted)
    facts = _facts(cell) + ([("required tolerance trend", no_chart)] if no_chart else [])
    return {"name": f"{cell.scenario}/{cell.format} @ {cell.environment}", "facts": facts, "trend": chart,
            "error": cell.error, "diff": [(k, *_diff_sides(t, r)) for k, t, r in fingerprint_diff(cell)],
            "fingerprint": [(k, _value_view(fingerprint[k])) for k in _fingerprint_keys(fingerprint)]}


def _cell_ids(lay: _Layout) -> dict[Key, str]:
    """An element id per matrix cell (``cell-1``, ... in matrix order): names may hold anything, numbers not."""
    return {cell.key: f"cell-{i}" for i, cell in enumerate(lay.ordered(), 1)}


def _cell_view(cell: Cell, note: int | None, trend: list[hist.TrendPoint], element_id: str,
               charted: bool) -> dict[str, Any]:
    scenario, fmt, environment = cell.key
    tier = _tier(cell)
    classes = " ".join(filter(None, ["cell", _verdict_class(cell.verdict), "failed" if _failed(cell) else "",
                                     "less-accurate" if tier == LESS_ACCURATE else "",
                                     "flaky" if cell.flaky else ""]))
    return {"id": element_id, "classes": classes, "scenario": scenario, "format": fmt, "environment": environment,
            "verdict": cell.verdict, "accuracy": tier, "title": _tooltip(cell), "style": _mismatch_style(cell),
            "text": _short(cell, note), "spark": _spark(trend), "detail": _detail_view(cell, trend, charted)}


def _trend_with_current(trends: Mapping[Key, list[hist.TrendPoint]], key: Key, cell: Cell) -> list[hist.TrendPoint]:
    """The cell's history, ending with the current run if the history does not have it yet."""
    points = list(trends.get(key, []))
    if cell.run_id not in {p.run_id for p in points}:
        points.append(hist.TrendPoint.of(cell))  # a run not in the history has no date
    return points[-hist.TREND_RUNS:]


def _matrix_view(lay: _Layout, history: pa.Table | None, ids: Mapping[Key, str]) -> dict[str, Any]:
    trends = hist.trends(history, last=hist.TREND_RUNS) if history is not None else {}
    points = {key: _trend_with_current(trends, key, cell) if trends else [] for key, cell in lay.cells.items()}
    charted = _charted(lay, points)
    rows = []
    for s, f in lay.rows:
        save = _save_cell(lay.row_cells(s, f))
        cells = []
        for env in lay.environments:
            cell = lay.cells.get((s, f, env))
            cells.append(None if cell is None else
                         _cell_view(cell, lay.note(cell), points[cell.key], ids[cell.key], cell.key in charted))
        train = lay.train_seconds.get(s)
        rows.append({"scenario": s, "format": f, "cells": cells, "train": None if train is None else f"{train:.1f} s",
                     "save": {"classes": _verdict_class(save.verdict), "style": _mismatch_style(save),
                              "text": _short(save)}})
    return {"environments": lay.environments, "rows": rows, "notes": list(lay.notes.items())}


def _legend_items() -> list[dict[str, Any]]:
    def item(label: str = "", swatch: str = "", ramp: int | None = None) -> dict[str, Any]:
        return {"label": label, "swatch": swatch, "ramp": ramp}

    items = [item(_LABELS[v], _verdict_class(v)) for v in ("bitwise", "within_tolerance")]
    items.append(item(ramp=_MISMATCH_DECADES))
    items += [item(_LABELS[v], _verdict_class(v)) for v in ("error", "corrupt", "unschedulable")]
    items += [item("✗ failed expectation", "failed-mark"), item("save✗ only the save round trip missed expect_save"),
              item(f"{_TIER_TAGS[AS_ACCURATE]} {_TIER_MEANING[AS_ACCURATE]}"),
              item(f"{_TIER_TAGS[LESS_ACCURATE]} {_TIER_MEANING[LESS_ACCURATE]}",
                   f"{_verdict_class('within_tolerance')} tier-mark"),
              item("flaky: its repeats disagree bitwise (never a regression)", "flaky-mark"),
              item("[n] full reason in note n"), item("click a cell for details")]
    return items


# -- HTML: what changed (the nightly) ---------------------------------------------------
#: (key in Changes.counts, heading, Changes field, count label) of each group, in the page's order.
_CHANGE_GROUPS = (("new", "New failures", "newly_failing", "new failure(s)"),
                  ("known", "Known failures", "known_failing", "known failure(s)"),
                  ("fixed", "Fixed", "fixed", "fixed"),
                  ("flaky", "Flaky (repeats disagree; not a regression)", "flaky", "flaky"))


def _cell_label(entry: Mapping[str, Any]) -> str:
    return text_.one_line(f"{entry['scenario']}/{entry['format']} @ {entry['environment']}")


def _entry_key(entry: Mapping[str, Any]) -> Key:
    return entry["scenario"], entry["format"], entry["environment"]


def _run_view(run: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``{"run_id", "date"}`` of a run named by the changes (None: no such run)."""
    if not run:
        return None
    return {"run_id": text_.one_line(run.get("run_id")), "date": run.get("date") or "date unknown"}


def _failing_row(entry: Mapping[str, Any], ids: Mapping[Key, str]) -> dict[str, Any]:
    """One cell of a group: verdict last night and tonight, for a failing one its streak and what changed
    since it last passed; ``href`` is its cell in the matrix (None: not in tonight's matrix)."""
    streak = "first_bad" in entry  # only from history.compare, not from a plain diff_runs
    return {"cell": _cell_label(entry), "href": ids.get(_entry_key(entry)),
            "verdicts": f"{entry.get('old_verdict') or '-'} -> {entry.get('new_verdict')}",
            "streak": streak, "first_bad": _run_view(entry.get("first_bad")),
            "failing_runs": entry.get("failing_runs"), "last_good": _run_view(entry.get("last_good")),
            "changed": hist.describe_delta(entry.get("changed_since_good"))
            if streak and entry.get("last_good") else []}


def _shown(items: list[Any]) -> tuple[list[Any], int]:
    """The first :data:`harness.history.LIST_LIMIT` items (as the Markdown report), and how many more there are."""
    return items[:hist.LIST_LIMIT], max(0, len(items) - hist.LIST_LIMIT)


def _change_groups(changes: hist.Changes, ids: Mapping[Key, str]) -> list[dict[str, Any]]:
    groups = []
    for key, title, field, _ in _CHANGE_GROUPS:
        entries, more = _shown(getattr(changes, field))
        groups.append({"key": key, "title": title, "count": changes.counts[key], "more": more,
                       "open": key == "new" or changes.counts[key] <= _GROUP_OPEN,
                       "failing": key in ("new", "known"), "rows": [_failing_row(e, ids) for e in entries]})
    return [g for g in groups if g["count"]]


def _other_changes(changes: hist.Changes) -> list[dict[str, Any]]:
    """Differences, fingerprints, environments and cells that changed, as titled lists of plain lines."""
    lists = [
        ("Difference changed", [f"{_cell_label(e)}: {e['metric']} {_num(e['old'])} -> {_num(e['new'])}"
                                for e in changes.diff_changes]),
        ("Fingerprint changed", [f"{text_.one_line(e['environment'])}: " + "; ".join(hist.describe_delta(e["changes"]))
                                 for e in changes.fingerprint_changes]),
        ("New environments", [text_.one_line(e) for e in changes.new_environments]),
        ("Vanished environments", [text_.one_line(e) for e in changes.vanished_environments]),
        ("New cells", [_cell_label(e) for e in changes.new_cells]),
        ("Vanished cells", [_cell_label(e) for e in changes.vanished_cells]),
    ]
    return [_titled_list(title, items) for title, items in lists if items]


def _titled_list(title: str, items: list[str]) -> dict[str, Any]:
    shown, more = _shown(items)
    return {"title": title, "count": len(items), "lines": shown, "more": more}


def _drift_row(entry: Mapping[str, Any], ids: Mapping[Key, str]) -> dict[str, Any]:
    """A drifting cell (:func:`harness.history.drifting_cells`): its required ULP and atol as sparklines and
    numbers; the full chart is in the cell's own panel of the matrix (``href``)."""
    def trend(values: list[float | None], what: str) -> dict[str, Any]:
        return {"spark": _svg(charts.spark_svg(values, log=True, width=96, label=f"required {what} over {len(values)} runs")),
                "text": hist.values_summary(values)}

    return {"cell": _cell_label(entry), "href": ids.get(_entry_key(entry)),
            "ulp": trend(entry["required_ulp"], "ULP"), "atol": trend(entry["required_atol"], "atol")}


def _trends_view(changes: hist.Changes, ids: Mapping[Key, str]) -> dict[str, Any] | None:
    """Cells per night as a chart, and the cells whose required tolerance drifted (None: fewer than two runs)."""
    nights = changes.nights
    if len(nights) < 2:
        return None
    counts = [n["non_bitwise"] for n in nights]
    failed = [n["failed"] for n in nights]
    return {"title": f"Trends (last {len(nights)} runs, {nights[0]['date']} .. {nights[-1]['date']})",
            "summary": (f"non-bitwise cells per night {counts[0]} -> {counts[-1]} (of {nights[-1]['cells']}); "
                        f"failed {failed[0]} -> {failed[-1]}"),
            "nights": _svg(hist.nights_chart(nights)), "drifting": [_drift_row(e, ids) for e in changes.drifting]}


def _changes_view(changes: hist.Changes, ids: Mapping[Key, str]) -> dict[str, Any]:
    """The "What changed" section: the run compared with, the four counts, the failing cells with their
    first bad / last good run, the other changes and the trends of the last runs."""
    counts = changes.counts
    groups, other = _change_groups(changes, ids), _other_changes(changes)
    return {"regressed": changes.regressed, "previous": _run_view(changes.previous_run),
            "counts": [{"key": key, "n": counts[key], "label": label} for key, _, _, label in _CHANGE_GROUPS],
            "groups": groups, "other": other, "quiet": changes.previous_run is not None and not groups and not other,
            "trends": _trends_view(changes, ids),
            "skipped": _titled_list("Skipped history files", [text_.one_line(p) for p in changes.skipped_files])
            if changes.skipped_files else None}


def _environment_fingerprints(lay: _Layout) -> dict[str, dict[str, Any]]:
    """One fingerprint per column: the training worker's, then each environment's first."""
    columns: dict[str, dict[str, Any]] = {}
    for cell in lay.ordered():
        for name, value in ((hist.TRAINING, cell.train_fingerprint), (cell.environment, cell.fingerprint)):
            if not columns.get(name):
                columns[name] = json_object(value)
    order = [hist.TRAINING, *lay.environments]
    return {name: columns[name] for name in order if columns.get(name)}


def _fingerprint_row(key: str, values: list[Any]) -> dict[str, Any]:
    canonical = [json.dumps(v, sort_keys=True, default=str) for v in values]
    common = Counter(canonical).most_common(1)[0][0]
    differs = len(set(canonical)) > 1
    return {"key": key, "differs": differs,
            "cells": [{"diff": differs and c != common, "value": _value_view(v)} for v, c in zip(values, canonical)]}


def _fingerprints_view(lay: _Layout) -> dict[str, Any]:
    columns = _environment_fingerprints(lay)
    rows = [_fingerprint_row(k, [fp.get(k) for fp in columns.values()]) for k in _fingerprint_keys(*columns.values())]
    return {"columns": list(columns), "rows": rows}


def _depth_chart(layers: list[LayerDiff], width: int = 480, height: int = 120) -> dict[str, Any]:
    """One bar per layer call in depth order, height log10(1 + max ULP), coloured by whether its
    outputs' bits differ; the first layer whose bits differ is outlined."""
    values = [math.log10(1 + d.max_ulp_diff) if d.max_ulp_diff is not None and math.isfinite(d.max_ulp_diff)
              else 0.0 for d in layers]
    top = max(max(values), 1.0)
    step = width / len(layers)
    first = next((d.index for d in layers if d.differs), None)
    bars = []
    for d, v in zip(layers, values):
        h = max(2.0, (height - 14) * v / top)
        bars.append({"x": f"{d.index * step + 1:.1f}", "y": f"{height - 12 - h:.1f}", "w": f"{max(step - 2, 1):.1f}",
                     "h": f"{h:.1f}", "colour": _COLOURS["mismatch" if d.differs else "bitwise"], "first": d.index == first,
                     "title": f"{d.index} {d.name}: {d.bits}, max {_ulp(d.max_ulp_diff)} ulp"})
    return {"width": width, "height": height, "axis": height - 12, "bars": bars, "top": f"{10 ** top - 1:.3g}"}


def _explanation_view(exp: Explanation) -> dict[str, Any]:
    layers = list(exp.localisation.layers) if exp.localisation else []
    return {"cell": exp.cell, "verdict": exp.verdict, "facts": _explanation_facts(exp),
            "layers": [_layer_row(d) for d in layers], "chart": _depth_chart(layers) if layers else None}


def _html(table: pa.Table, history: pa.Table | None, changes: hist.Changes | None, title: str | None,
          explanations: Mapping[str, Explanation] | None = None) -> str:
    from markupsafe import Markup

    lay = _layout(table)
    ids = _cell_ids(lay)
    started = _started(lay.cells.values())
    meta = [f"Run: {', '.join(_run_ids(table)) or 'none'}"]
    if started is not None:
        meta.append(f"Started: {started:%Y-%m-%d %H:%M:%S} UTC")
    return _template().render(
        title=_title(table, title), meta=meta, summary=_summary_line(lay), legend_items=_legend_items(),
        matrix_view=_matrix_view(lay, history, ids), fingerprint_view=_fingerprints_view(lay),
        explained=[_explanation_view(e) for e in _explained(lay, explanations)], layer_headers=_LAYER_HEADERS,
        changes=_changes_view(changes, ids) if changes is not None else None,
        css=Markup(_CSS + _colour_css()), js=Markup(_JS)) + "\n"


# -- JUnit XML ---------------------------------------------------------------------------
def _element(parent: ET.Element | None, tag: str, text: str | None = None, **attrs: Any) -> ET.Element:
    clean = {k: text_.xml_chars(v) for k, v in attrs.items() if v is not None}
    element = ET.Element(tag, clean) if parent is None else ET.SubElement(parent, tag, clean)
    if text:
        element.text = text_.xml_chars(text)
    return element


def outcome(cell: Cell) -> str:
    """``error`` (the cell did not produce numbers), ``failure`` (expectation missed) or ``ok``.

    ``cell`` is a :class:`~harness.records.CellResult`.
    """
    if cell.verdict not in NUMERIC_VERDICTS:
        return "error"
    return "failure" if _failed(cell) else "ok"


def _seconds(cells: Iterable[Cell]) -> str:
    """JUnit ``time``: the sum of the cells' finite, positive seconds, as a plain decimal.

    A sum past the largest float (only from corrupt rows) is capped there, never ``inf``.
    """
    values = [c.seconds for c in cells if hist.is_finite(c.seconds) and c.seconds > 0]
    try:
        total = math.fsum(values)
    except OverflowError:
        total = sys.float_info.max
    return f"{min(total, sys.float_info.max):.3f}"


def _exact(value: float) -> str:
    """A count such as a ULP distance, every digit of it (``12345678901``, ``inf``)."""
    return str(int(value)) if math.isfinite(value) and float(value).is_integer() else str(value)


def _flaky_prefix(cell: Cell) -> str:
    """``flaky (its 3 repeats disagree, up to 4 ulp apart): `` for a flaky cell's JUnit messages, else ''."""
    if not cell.flaky:
        return ""
    spread = f", up to {_ulp(cell.repeat_spread_ulp)} ulp apart" if cell.repeat_spread_ulp is not None else ""
    return f"flaky (its {cell.repeats} repeats disagree bitwise{spread}): "


def _failure_message(cell: Cell) -> str:
    return _flaky_prefix(cell) + _expectation_message(cell)


def _expectation_message(cell: Cell) -> str:
    verdict, expected = cell.verdict, cell.expected
    known = expected in EXPECTATIONS or metric_delta_bound(expected) is not None
    if known and cell.meets():
        if cell.flaky:
            return f"the first repeat's {verdict} meets expectation {expected!r}, another repeat does not"
        return f"{verdict} meets expectation {expected!r} but the save round trip was {cell.save_verdict}"
    why = f"max {_ulp(cell.max_ulp_diff)} ulp, max abs diff {_num(cell.max_abs_diff)}"
    if expected == "accurate":
        why = f"{_accuracy_text(cell) or 'no accuracy tier'}; {why}"
    elif metric_delta_bound(expected) is not None:
        why = f"{_metric_text(cell) or 'no task metric'}; {why}"
    if cell.weights_equal is False and (expected == "accurate" or metric_delta_bound(expected) is not None):
        why = f"parameters not restored exactly; {why}"
    return f"{verdict} does not meet expectation {expected!r} ({why})"


def _error_message(cell: Cell) -> str:
    first = _first_line(cell.error)
    return _flaky_prefix(cell) + (f"{cell.verdict}: {first}" if first else str(cell.verdict))


def _testcase(suite: ET.Element, cell: Cell) -> None:
    case = _element(suite, "testcase", classname=f"{cell.scenario}.{cell.format}",
                    name=cell.environment, time=_seconds([cell]))
    if cell.flaky is not None or (cell.repeats or 0) > 1:  # repeated: <properties> first, as pytest writes them
        props = _element(case, "properties")
        if cell.flaky is not None:  # (null: fewer than two repeats produced outputs to compare)
            _element(props, "property", name="flaky", value=str(cell.flaky).lower())
        _element(props, "property", name="repeats", value=cell.repeats)
        if cell.repeat_spread_ulp is not None:
            _element(props, "property", name="repeat_spread_ulp", value=_exact(cell.repeat_spread_ulp))
    kind = outcome(cell)
    if kind == "failure":
        body = "\n".join(filter(None, [_required_text(cell), cell.error]))
        _element(case, "failure", body, message=_failure_message(cell), type=cell.verdict)
    elif kind == "error":
        _element(case, "error", cell.error, message=_error_message(cell), type=str(cell.verdict))
    _element(case, "system-out", "\n".join(f"{k}: {v}" for k, v in _facts(cell)))


def _timestamp(cells: list[Cell]) -> str | None:
    started = _started(cells)
    return f"{started:%Y-%m-%dT%H:%M:%S}" if started is not None else None


def _counts(cells: list[Cell]) -> dict[str, str]:
    kinds = Counter(outcome(c) for c in cells)
    return {"tests": str(len(cells)), "failures": str(kinds["failure"]), "errors": str(kinds["error"])}


def _junit(table: pa.Table, title: str | None) -> str:
    cells = _layout(table).ordered()
    name = title or "harness"
    suites: dict[str, list[Cell]] = {}
    for cell in cells:
        suites.setdefault(cell.sweep or name, []).append(cell)
    root = _element(None, "testsuites", name=name, time=_seconds(cells), **_counts(cells))
    for sweep, members in (suites or {name: []}).items():
        suite = _element(root, "testsuite", name=sweep, skipped="0", time=_seconds(members),
                         timestamp=_timestamp(members), **_counts(members))
        for cell in members:
            _testcase(suite, cell)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# -- JSON ------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Strict-JSON value: NaN/inf -> None, datetimes -> ISO 8601, containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _json_cell(cell: Cell) -> dict[str, Any]:
    """Every column in schema order; JSON text that did not parse as itself, ``started_at`` as a UTC datetime."""
    out = {}
    for f in FIELDS:
        value = getattr(cell, f.name)
        if f.metadata["json"] and unparsable(value):
            value = value["unparsable"]
        elif f.name == "started_at" and value is not None:
            value = _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc)
        out[f.name] = value
    return out


def _json_environments(lay: _Layout) -> list[dict[str, Any]]:
    fingerprints = _environment_fingerprints(lay)
    out = []
    for env in lay.environments:
        cells = [c for c in lay.cells.values() if c.environment == env]
        out.append({"name": env, "cells": len(cells), "passed": sum(c.passed is True for c in cells),
                    "failed": sum(_failed(c) for c in cells), "fingerprint": fingerprints.get(env)})
    return out


def _json(table: pa.Table, changes: hist.Changes | None, title: str | None,
          explanations: Mapping[str, Explanation] | None = None) -> str:
    lay = _layout(table)
    started = _started(lay.cells.values())
    doc = {
        "title": _title(table, title),
        "run_ids": _run_ids(table),
        "started_at": started,
        "summary": _summarize(lay),
        "environments": _json_environments(lay),
        "cells": [_json_cell(c) for c in lay.ordered()],
        "changes": changes.to_dict() if changes is not None else None,
        "explanations": [e.to_dict() for e in _explained(lay, explanations)],
    }
    return json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n"


# -- public entry points ----------------------------------------------------------------------
def render(table: pa.Table, fmt: str, *, history: pa.Table | None = None,
           changes: hist.Changes | None = None, title: str | None = None,
           explanations: Mapping[str, Explanation] | None = None) -> str:
    """Render a results table as text in one report format.

    Args:
        table: a results table (``harness.results.SCHEMA``).
        fmt: ``md``, ``html``, ``junit`` or ``json``.
        history: previous runs (``harness.history.History.recent``, or
            ``load_history``); the HTML report draws each cell's max ULP over
            its last :data:`harness.history.TREND_RUNS` runs as a sparkline and,
            in its detail panel, its required ULP and atol as a chart.
        changes: ``harness.history.compare`` (or ``diff_runs``) against the
            previous run; the Markdown and HTML reports open with a "What
            changed" section (``changes`` in JSON): new / known / fixed / flaky
            counts, each failing cell's first bad and last good run, and in
            HTML the non-bitwise cells per night as a chart.
        title: report title (default: "Reproducibility report: <sweep>").
        explanations: ``harness.explain.load_explanations`` of the run; the
            Markdown and HTML reports show each (summary, findings, per-layer
            table; in HTML a chart of divergence by depth), JSON includes them.

    Raises:
        ValueError: ``fmt`` is not one of the formats above.
    """
    if fmt == "md":
        return _markdown(table, changes, title, explanations)
    if fmt == "html":
        return _html(table, history, changes, title, explanations)
    if fmt == "junit":
        return _junit(table, title)
    if fmt == "json":
        return _json(table, changes, title, explanations)
    raise ValueError(f"unknown report format {fmt!r}; use one of {', '.join(FILES)}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="replace")  # lone surrogates from raw stderr
    os.replace(tmp, path)


def write_all(table: pa.Table, out_dir: str | os.PathLike, *, history: pa.Table | None = None,
              changes: hist.Changes | None = None, title: str | None = None,
              explanations: Mapping[str, Explanation] | None = None) -> dict[str, Path]:
    """Write report.md, report.html, report.xml (JUnit) and report.json into ``out_dir``.

    Each file is written atomically (temporary file + rename).

    Returns:
        ``{"md": path, "html": path, "junit": path, "json": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt, name in FILES.items():
        written[fmt] = out / name
        _write_atomic(written[fmt], render(table, fmt, history=history, changes=changes, title=title,
                                           explanations=explanations))
    return written
