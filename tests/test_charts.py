"""Tests of harness.charts (pure SVG trend charts and block sparklines) and the history's chart helpers."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import example, given, settings, strategies as st

from harness import charts, history

SVG = "{http://www.w3.org/2000/svg}"
SETTINGS = settings(max_examples=80, deadline=None)

values = st.one_of(st.none(), st.just(0.0), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(min_value=0, max_value=1e30), st.integers(min_value=0, max_value=10**9))
names = st.text(min_size=0, max_size=40)  # any Unicode, controls and markup included


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything that is not well-formed XML
    assert root.tag == f"{SVG}svg"
    return root


def view_box(root: ET.Element) -> tuple[float, float]:
    _, _, width, height = map(float, root.get("viewBox").split())
    return width, height


def drawn_points(root: ET.Element) -> list[tuple[float, float]]:
    """Every coordinate the chart draws: circles and polyline vertices, in page coordinates."""
    points = []
    for group in root.iter(f"{SVG}g"):
        dy = float(group.get("transform").removeprefix("translate(0,").removesuffix(")"))
        points += [(float(c.get("cx")), float(c.get("cy")) + dy) for c in group.iter(f"{SVG}circle")]
        for line in group.iter(f"{SVG}polyline"):
            points += [(float(x), float(y) + dy) for x, y in (p.split(",") for p in line.get("points").split())]
    return points


def plottable(v, log: bool) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and (v >= 0 or not log)


@SETTINGS
@given(title=names, series_name=names,
       data=st.lists(st.tuples(names, values, values), min_size=0, max_size=40), log=st.booleans())
@example(title='<script>alert("x")</script>', series_name="]]><x/>", data=[("<b>&", 1.0, 0.0)], log=True)
@example(title="\x1b[31mred\x00", series_name="ulp", data=[("a", 0.0, None), ("b", 1e-300, 5e300)], log=True)
@example(title="no XML holds \ufffe", series_name="\uffff", data=[("\ufffe", 1.0, 2.0)], log=False)
@example(title="", series_name="", data=[("", None, 9.999999999999347e+307)], log=True)  # found: 10**309 as an axis label
def test_svg_is_valid_escaped_and_in_range(title, series_name, data, log):
    labels = [d[0] for d in data]
    series = {series_name: [d[1] for d in data], series_name + "2": [d[2] for d in data]}
    svg = charts.svg([charts.Panel(title, labels, series, log=log), charts.Panel("second", labels, series)])
    root = parse(svg)
    width, height = view_box(root)
    assert not list(root.iter(f"{SVG}script")) and not list(root.iter("script"))
    assert all(el.tag.startswith(SVG) for el in root.iter())  # nothing from a name became an element
    for x, y in drawn_points(root):
        assert 0 <= x <= width and 0 <= y <= height, (x, y, width, height)
    # one dot per plottable value: nothing is dropped, nothing invented (two series, two panels)
    expected = sum(plottable(v, log) for vals in series.values() for v in vals) + \
        sum(plottable(v, False) for vals in series.values() for v in vals)
    assert len(list(root.iter(f"{SVG}circle"))) == expected
    assert "\x1b" not in svg and "\x00" not in svg


def test_svg_values_keep_their_order_on_the_axis():
    root = parse(charts.svg([charts.Panel("ulp", ["a", "b", "c", "d"], {"ulp": [0.0, 1.0, 10.0, 1000.0]}, log=True)]))
    ys = [float(c.get("cy")) for c in root.iter(f"{SVG}circle")]
    assert ys == sorted(ys, reverse=True) and len(set(ys)) == 4  # 0 has a floor of its own, below 1
    xs = [float(c.get("cx")) for c in root.iter(f"{SVG}circle")]
    assert xs == sorted(xs) and len(set(xs)) == 4
    hollow = [c for c in root.iter(f"{SVG}circle") if c.get("fill") == "#fff"]
    assert len(hollow) == 1  # the zero


def test_svg_gaps_break_the_line_and_titles_carry_values():
    root = parse(charts.svg([charts.Panel("abs", ["r1", "r2", "r3", "r4"], {"abs": [1.0, None, 2.0, 3.0]})]))
    lines = list(root.iter(f"{SVG}polyline"))
    assert [len(line.get("points").split()) for line in lines] == [2]  # r3-r4; r1 stands alone
    titles = [t.text for c in root.iter(f"{SVG}circle") for t in c.iter(f"{SVG}title")]
    assert titles == ["r1: abs 1", "r3: abs 2", "r4: abs 3"]


def test_svg_without_data_says_so():
    root = parse(charts.svg([charts.Panel("nothing", [], {})]))
    assert "no data" in ET.tostring(root, encoding="unicode") and not list(root.iter(f"{SVG}circle"))


@SETTINGS
@given(st.lists(values, max_size=50), st.booleans())
def test_spark_one_character_per_value_in_order(vals, log):
    line = charts.spark(vals, log=log)
    assert len(line) == len(vals)
    for v, ch in zip(vals, line):
        assert (ch == "·") == (not plottable(v, log))
    shown = sorted((v, "▁▂▃▄▅▆▇█".index(ch)) for v, ch in zip(vals, line) if ch != "·")
    levels = [level for _, level in shown]
    assert levels == sorted(levels)  # a larger value never gets a lower block
    if shown:
        assert levels[0] == 0 and levels[-1] in (0, 7)  # the extremes take the lowest and the highest block


def test_spark_scales():
    assert charts.spark([0, 1, 10, 100], log=True) == "▁▃▆█"  # 0 a decade below 1
    assert charts.spark([1e-9, 1e-6, 0.0, None], log=True) == "▃█▁·"
    assert charts.spark([0, 1, 4, None]) == "▁▃█·"
    assert charts.spark([5, 5, 5]) == "▁▁▁" and charts.spark([None, -1.0], log=True) == "··"


def test_tolerance_and_nights_charts_from_history_data():
    points = [history.TrendPoint(f"run-{i}", f"2025-03-0{i}", "within_tolerance", True, float(i), 1e-7 * i,
                                 required_ulp=float(i), required_atol=1e-7 * i) for i in range(1, 5)]
    root = parse(history.tolerance_chart('mlp/keras/<env "x">', points))
    assert len(list(root.iter(f"{SVG}circle"))) == 8  # 4 runs x (ULP, atol)
    assert root.get("aria-label") == 'mlp/keras/<env "x">: required tolerance over 4 runs'  # escaped, parsed back
    nights = [{"run_id": f"run-{i}", "date": f"2025-03-0{i}", "cells": 10, "non_bitwise": i, "failed": 0}
              for i in range(1, 4)]
    root = parse(history.nights_chart(nights))
    assert len(list(root.iter(f"{SVG}circle"))) == 6


@pytest.mark.parametrize("log", [True, False])
def test_svg_of_constant_and_single_values(log):
    for series in ({"a": [3.0]}, {"a": [2.0, 2.0, 2.0]}, {"a": [0.0, 0.0]}):
        labels = [f"r{i}" for i in range(len(series["a"]))]
        root = parse(charts.svg([charts.Panel("t", labels, series, log=log)]))
        width, height = view_box(root)
        assert all(0 <= x <= width and 0 <= y <= height for x, y in drawn_points(root))


def spark_dots(root: ET.Element) -> list[tuple[float, float, str, bool]]:
    """``(x, y, colour, hollow)`` of every dot of a :func:`charts.spark_svg`, left to right."""
    def points(path: ET.Element) -> list[tuple[float, float]]:
        return [(float(x), float(y)) for x, y in re.findall(r"M([-\d.]+) ([-\d.]+)h0", path.get("d"))]

    paths = list(root.iter(f"{SVG}path"))
    hollow = {p for path in paths if path.get("class") == "gaps" for p in points(path)}
    return sorted((x, y, path.get("stroke"), (x, y) in hollow)
                  for path in paths if path.get("class") == "dots" for x, y in points(path))


@SETTINGS
@given(vals=st.lists(values, max_size=40), log=st.booleans(), label=names)
@example(vals=[0.0, 1.0, None, 10.0, math.nan, 1000.0], log=True, label='<script>"x"</script>\ufffe\x1b')
@example(vals=[5.0], log=False, label="one")
def test_spark_svg_one_dot_per_value_in_range_and_in_order(vals, log, label):
    from harness import text

    colours = [f"#{i:06x}" for i in range(len(vals))]
    root = parse(charts.spark_svg(vals, colours=colours, log=log, label=label))
    width, height = view_box(root)
    assert root.get("class") == "spark" and root.get("aria-label") == text.xml_chars(text.one_line(label, 200))
    assert all(el.tag.startswith(SVG) for el in root.iter())  # the label became no element
    dots = spark_dots(root)
    assert len(dots) == len(vals) and len({x for x, *_ in dots}) == len(vals)  # every value keeps its dot
    assert all(0 <= x <= width and 0 <= y <= height for x, y, *_ in dots)
    for (_, _, colour, hollow), v, wanted in zip(dots, vals, colours):  # left to right: value by value
        assert colour == wanted and hollow == (not plottable(v, log))  # the caller's colour; a gap is hollow
    shown = sorted((v, y) for v, (_, y, *_) in zip(vals, dots) if plottable(v, log))
    assert [y for _, y in shown] == sorted((y for _, y in shown), reverse=True)  # larger values never lower
    # the line joins neighbouring values only (a gap breaks it), and agrees with spark() on the levels
    (line,) = [p for p in root.iter(f"{SVG}path") if p.get("class") == "line"] or [None]
    drawn = len(re.findall(r"[ML]", line.get("d"))) if line is not None else 0
    runs = [len(list(g)) for k, g in itertools.groupby(vals, key=lambda v: plottable(v, log)) if k]
    assert drawn == sum(n for n in runs if n > 1)
    blocks = charts.spark(vals, log=log)
    for a, b in itertools.combinations([(ch, y) for ch, (_, y, *_) in zip(blocks, dots) if ch != "·"], 2):
        assert (a[0] < b[0]) <= (a[1] > b[1])  # a higher block is drawn higher


def test_spark_svg_of_equal_values_sits_on_the_baseline():
    dots = spark_dots(parse(charts.spark_svg([3.0, 3.0, 3.0], height=18)))
    assert [(x, y) for x, y, *_ in dots] == [(3.0, 15.0), (36.0, 15.0), (69.0, 15.0)]
