"""Trend charts: numbers in, text out (inline SVG for HTML, block sparklines for Markdown/console).

The one place that draws a trend: :func:`svg` (titled panels with axes, for a
cell's required tolerance or the cells per night), :func:`spark_svg` (a
sparkline small enough for a matrix cell) and :func:`spark` (text blocks).
Pure functions with no TensorFlow, Ray or Arrow: the history module computes
what to plot (a cell's required tolerance over its last runs, non-bitwise cells
per night), these functions only draw it. Every name that reaches a chart goes
through :func:`harness.text.one_line` and XML escaping, so a hostile scenario or
environment name cannot inject markup; every coordinate is clamped to the
chart's own view box.

Example:
    >>> from harness import charts
    >>> svg = charts.svg([charts.Panel("required ULP", ["run-1", "run-2"], {"ulp": [0.0, 4.0]}, log=True)])
    >>> charts.spark([0, 1, 4, None])
    '▁▃█·'
    >>> charts.spark([0, 1, 10, 100], log=True)
    '▁▃▆█'
    >>> cell = charts.spark_svg([0.0, 2.0, None, 4.0], colours=["#1a9850", "#a6d96a", "#8073ac", "#a6d96a"], log=True)
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Mapping, Sequence

from harness import text

#: Series colours, in order (colour-blind safe: Okabe-Ito).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")
#: The SVG namespace declaration every chart carries (standalone files need it; HTML's parser implies it).
XMLNS = ' xmlns="http://www.w3.org/2000/svg"'
_BLOCKS = "▁▂▃▄▅▆▇█"
_MISSING = "·"
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 10, 22, 18  # plot margins inside a panel (px)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One chart: a value per run for each named series.

    Args:
        title: shown above the plot.
        labels: one label per run (x axis, oldest first): run ids or dates.
        series: name -> one value per label; None, NaN and infinities are gaps.
        log: logarithmic y axis; zeros sit on a floor of their own labelled 0
            (drawn hollow), negative values are gaps.
    """

    title: str
    labels: Sequence[str]
    series: Mapping[str, Sequence[float | None]]
    log: bool = False


def _e(value: object, limit: int = 80) -> str:
    """``value`` as XML text/attribute content: one line, control characters shown, markup escaped
    (and U+FFFE/U+FFFF, which no XML may hold, replaced)."""
    return html.escape(text.xml_chars(text.one_line(value, limit)), quote=True)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _decade(exponent: float) -> str:
    """The label of ``10 ** exponent`` on a log axis; written as a power where a float cannot hold it."""
    if -300 < exponent < 308:
        return _number(10.0 ** exponent)
    return f"1e{exponent:+.0f}"


def _plottable(value: float | None, log: bool) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= 0 if log else True


def _scale(values: list[float], log: bool) -> tuple[float, float, str]:
    """``(low, high, low_label)`` of the y axis in plotted units (log10 on a log axis).

    On a log axis zeros get a floor of their own, one decade below the smallest
    positive value, labelled ``0``: a zero never looks like a small difference.
    """
    if log:
        positive = [math.log10(v) for v in values if v > 0]
        low = math.floor(min(positive)) if positive else 0.0
        high = max(math.ceil(max(positive)) if positive else 1.0, low + 1)  # at least one decade
        if any(v == 0 for v in values):
            return low - 1, high, "0"
        return low, high, _decade(low)
    low, high = min(values + [0.0]), max(values + [0.0])
    if high == low:
        high = low + 1.0
    return low, high, _number(low)


def _plotted(value: float, log: bool, low: float) -> float:
    if not log:
        return value
    return math.log10(value) if value > 0 else low


def _panel(panel: Panel, width: int, height: int, y0: float) -> str:
    """The SVG elements of one panel, placed ``y0`` px from the top."""
    n = len(panel.labels)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    room = width - _LEFT - _RIGHT - 90 * len(panel.series)  # the series names sit right of the title
    parts = [f'<g transform="translate(0,{y0:.0f})">',
             f'<text x="{_LEFT}" y="13" font-size="11" font-weight="bold">{_e(panel.title, max(12, room // 7))}</text>']
    values = [float(v) for vals in panel.series.values() for v in vals if _plottable(v, panel.log)]
    if n == 0 or not values:
        parts.append(f'<text x="{_LEFT}" y="{_TOP + plot_h / 2:.0f}" font-size="10" fill="#777">no data</text></g>')
        return "".join(parts)
    low, high, low_label = _scale(values, panel.log)

    def x_of(i: int) -> float:
        return _LEFT + (plot_w / 2 if n == 1 else i * plot_w / (n - 1))

    def y_of(v: float) -> float:
        frac = (_plotted(v, panel.log, low) - low) / (high - low)
        return _TOP + plot_h - min(1.0, max(0.0, frac)) * plot_h

    bottom, right = _TOP + plot_h, _LEFT + plot_w
    parts += [f'<path d="M{_LEFT} {_TOP}V{bottom}H{right}" fill="none" stroke="#999" stroke-width="1"/>',
              f'<text x="{_LEFT - 4}" y="{_TOP + 4}" font-size="9" text-anchor="end">'
              f"{_e(_decade(high) if panel.log else _number(high))}</text>",
              f'<text x="{_LEFT - 4}" y="{bottom}" font-size="9" text-anchor="end">'
              f"{_e(low_label)}</text>",
              f'<text x="{_LEFT}" y="{height - 4}" font-size="9">{_e(panel.labels[0], 24)}</text>']
    if n > 1:
        parts.append(f'<text x="{right}" y="{height - 4}" font-size="9" text-anchor="end">'
                     f"{_e(panel.labels[-1], 24)}</text>")
    legend_x = width - _RIGHT
    for k, (name, vals) in enumerate(panel.series.items()):
        colour = PALETTE[k % len(PALETTE)]
        parts.append(f'<text x="{legend_x - k * 90}" y="13" font-size="10" text-anchor="end" '
                     f'fill="{colour}">{_e(name, 16)}</text>')
        points = [(i, float(v)) for i, v in enumerate(list(vals)[:n]) if _plottable(v, panel.log)]
        runs: list[list[tuple[int, float]]] = []
        for i, v in points:  # a gap (missing value) breaks the line
            if runs and runs[-1][-1][0] == i - 1:
                runs[-1].append((i, v))
            else:
                runs.append([(i, v)])
        for run in runs:
            if len(run) > 1:
                line = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in run)
                parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for i, v in points:
            hollow = panel.log and v == 0
            parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="2.5" '
                         f'fill="{"#fff" if hollow else colour}" stroke="{colour}">'
                         f"<title>{_e(panel.labels[i], 60)}: {_e(name, 40)} {_e(_number(v))}</title></circle>")
    return "".join(parts) + "</g>"


def svg(panels: Sequence[Panel], *, width: int = 360, panel_height: int = 120, label: str | None = None) -> str:
    """Panels stacked vertically in one self-contained ``<svg>`` (no scripts, no external references).

    Args:
        panels: the charts, top to bottom.
        width: width in px; each panel is ``panel_height`` px high.
        label: the accessible name (``aria-label`` and ``<title>``); default: the panels' titles.
    """
    height = max(1, len(panels)) * panel_height
    name = label if label is not None else "; ".join(p.title for p in panels)
    body = "".join(_panel(p, width, panel_height, k * panel_height) for k, p in enumerate(panels))
    return (f'<svg{XMLNS} class="trend" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(name, 200)}" '
            f'font-family="sans-serif"><title>{_e(name, 200)}</title>{body}</svg>')


def _levels(values: Sequence[float | None], log: bool) -> list[float | None]:
    """Each value's height on one shared scale, 0 (lowest) to 1 (highest; all equal: 0), None for a gap.

    With ``log``, values are compared as ``log10(v)`` and zeros sit a decade
    below the smallest positive value (as on :func:`svg`'s log axes); negative
    values are gaps on a log scale.
    """
    shown: list[float | None] = [float(v) if _plottable(v, log) else None for v in values]
    if log:
        positive = [math.log10(v) for v in shown if v]
        floor = min(positive) - 1 if positive else 0.0
        shown = [None if v is None else math.log10(v) if v > 0 else floor for v in shown]
    present = [v for v in shown if v is not None]
    if not present:
        return [None] * len(shown)
    low, high = min(present), max(present)
    return [None if v is None else 0.0 if high == low else (v - low) / (high - low) for v in shown]


def spark(values: Sequence[float | None], *, log: bool = False) -> str:
    """A block sparkline for Markdown and the console: one character per value, ``·`` for a gap.

    The lowest value maps to ``▁``, the highest to ``█``. With ``log``, values
    are compared as ``log10(v)`` and zeros sit a decade below the smallest
    positive value (as on :func:`svg`'s log axes): 0, 1, 10 and 1000 ULP, or
    an atol of 1e-9 and 1e-6, stay apart. Negative values are gaps on a log scale.
    """
    top = len(_BLOCKS) - 1
    return "".join(_MISSING if level is None else _BLOCKS[round(level * top)] for level in _levels(values, log))


def spark_svg(values: Sequence[float | None], *, colours: Sequence[str] | None = None, log: bool = False,
              width: int = 72, height: int = 18, label: str = "trend") -> str:
    """A sparkline small enough for a table cell, as inline SVG: a line through the values, one dot per value.

    Scaled like :func:`spark`. Dot ``i`` is drawn in ``colours[i]`` (default
    the palette's first); a gap breaks the line and its dot sits hollow on the
    baseline, so every value keeps its dot. ``label`` is the accessible name.
    A matrix has one per cell, so it is drawn compactly: the line is one
    ``path``, the dots are round-capped zero-length segments, one ``path`` per
    colour (``class="dots"``; hollow ones get a white ``class="gaps"`` core).
    """
    levels = _levels(values, log)
    n = len(levels)
    step = (width - 6) / (n - 1) if n > 1 else 0.0
    radius = max(1.0, min(2.2, step / 2.5)) if n > 1 else 2.2  # dots of 30 runs in 72 px stay apart

    def at(i: int, level: float | None) -> str:
        x = width / 2 if n == 1 else 3 + i * step
        return f"{x:.1f} {height - 3 - (level or 0.0) * (height - 6):.1f}"

    line, run = [], 0  # run: how many values in a row the line has joined so far
    for i, level in enumerate(levels):  # a gap breaks the line
        run = 0 if level is None else run + 1
        if run:
            line.append(("L" if run > 1 else "M") + at(i, level))
    drawn = "".join(seg for k, seg in enumerate(line)
                    if seg[0] == "L" or k + 1 < len(line) and line[k + 1][0] == "L")  # no lone moves
    parts = [f'<rect width="{width}" height="{height}" rx="3" fill="#fff" opacity=".85"/>']
    if drawn:
        parts.append(f'<path class="line" d="{drawn}" fill="none" stroke="#555" stroke-width="1"/>')
    dots: dict[str, list[str]] = {}
    for i, level in enumerate(levels):
        colour = _e(colours[i] if colours is not None and i < len(colours) else PALETTE[0], 32)
        dots.setdefault(colour, []).append(f"M{at(i, level)}h0")
    for colour, segments in dots.items():
        parts.append(f'<path class="dots" d="{"".join(segments)}" stroke="{colour}" stroke-width="{2 * radius:.1f}" '
                     'stroke-linecap="round"/>')
    gaps = "".join(f"M{at(i, None)}h0" for i, level in enumerate(levels) if level is None)
    if gaps:
        parts.append(f'<path class="gaps" d="{gaps}" stroke="#fff" stroke-width="{2 * radius - 1.6:.1f}" '
                     'stroke-linecap="round"/>')
    return (f'<svg{XMLNS} class="spark" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label, 200)}">{"".join(parts)}</svg>')
