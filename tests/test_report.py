"""Tests of harness.report: console matrix, Markdown, HTML, JUnit XML, JSON, write_all."""

from __future__ import annotations

import datetime as dt
import html as html_lib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest_report_helpers import NIGHT_ONE, fingerprint, make_row, verdict_rows, verdict_table
from harness import history, report, results
from harness.records import CellResult

etree = pytest.importorskip("lxml.etree", reason="lxml validates the JUnit XML; pip install lxml")
lxml_html = pytest.importorskip("lxml.html")

XSD = Path(__file__).parent / "data" / "junit.xsd"
FORMATS = ("md", "html", "junit", "json")
EXTERNAL = re.compile(r"""(?:\b(?:src|href|action|xlink:href)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?)\s*(?:https?:)?//""",
                      re.IGNORECASE)


@pytest.fixture(scope="module")
def schema():
    return etree.XMLSchema(etree.parse(str(XSD)))


@pytest.fixture(scope="module")
def table():
    return verdict_table()


def big_table(scenarios=10, formats=4, environments=25):
    """scenarios x formats x environments cells, verdicts cycling through every kind."""
    grid = itertools.product(range(scenarios), range(formats), range(environments))
    return results.to_table([make_row(results.VERDICTS[i % len(results.VERDICTS)], f"s{s}", f"f{f}", f"env{e}")
                             for i, (s, f, e) in enumerate(grid)])


def junit_tree(table, schema, **kw):
    """Render JUnit, validate it against the XSD, return the root element."""
    text = report.render(table, "junit", **kw)
    root = etree.fromstring(text.encode("utf-8"))
    schema.assertValid(root)
    assert root.tag == "testsuites"
    return root


def html_doc(table, **kw):
    return lxml_html.document_fromstring(report.render(table, "html", **kw))


def assert_self_contained(text):
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)


# -- console --------------------------------------------------------------------------
def test_matrix_text_shows_every_verdict_compactly(table):
    text = report.matrix_text(table)
    for expected in ("bitwise", "tol 14ulp 1.2e-06", "tol 14ulp 1.2e-06 ✗", "MISMATCH 2.1e+03ulp 0.034 ✗",
                     "ERROR ✗ [1]", "CORRUPT ✗ [2]", "UNSCHED ✗ [3]"):
        assert expected in text
    assert "✓" not in text
    # every reason in full below the matrix, whatever its length or line breaks
    assert "[1] ValueError: Unknown layer: 'CustomDense'. Please ensure custom objects are registered." in text
    assert "[3] no node satisfies {'GPU': 1, 'accelerator_type:H100': 0.001} within 600 s" in text
    assert text.splitlines()[-2] == ("8 cells: 2 bitwise, 2 within tolerance, 1 mismatch, 1 corrupt, 1 error, "
                                     "1 unschedulable; 3 passed, 5 failed expectations")
    assert text.splitlines()[-1] == report.MATRIX_LEGEND


def test_matrix_text_orders_rows_and_columns_by_first_appearance(table):
    lines = report.matrix_text(table).splitlines()
    assert lines[0].split() == ["scenario/format", "save", "cpu-avx512", "cpu-amd", "gpu-a100"]
    assert [line.split()[0] for line in lines[2:5]] == ["mlp/keras", "mlp/h5", "cnn/savedmodel"]


def test_matrix_text_save_column_shows_the_worst_save_verdict():
    rows = [make_row("bitwise", environment="cpu-avx512"),
            make_row("bitwise", environment="cpu-amd", save_verdict="mismatch", save_max_ulp_diff=3000.0),
            make_row("bitwise", environment="gpu-a100", save_verdict="within_tolerance", save_max_ulp_diff=2.0)]
    body = report.matrix_text(results.to_table(rows)).splitlines()[2]
    assert body.split()[:3] == ["mlp/keras", "MISMATCH", "3.0e+03ulp"]


def test_empty_matrix_text():
    text = report.matrix_text(results.to_table([]))
    assert "no cells" in text and "0 cells" in text


def test_save_round_trip_failure_reads_as_such_not_as_a_contradiction():
    rows = [make_row("bitwise", environment="cpu-a", expected="bitwise", passed=False, save_verdict="error",
                     error="save round trip is error (expect_save: bitwise)"),
            make_row("within_tolerance", environment="cpu-b", expected="bitwise")]
    table = results.to_table(rows)
    line = report.matrix_text(table).splitlines()[2]
    assert "bitwise save✗ [1]" in line and "bitwise ✗" not in line
    assert "tol 14ulp 1.2e-06 ✗" in line  # the cell's own verdict missed: a plain ✗
    assert "| mlp/keras | **bitwise** save✗ \\[1\\] |" in report.render(table, "md")
    assert "bitwise save✗" in html_doc(table).find_class("cell")[0].text_content()


def test_notes_hold_every_full_reason_once_in_every_renderer():
    long = "FormatLimitation: h5 (legacy HDF5) cannot reload this model in Keras 3 " + "x" * 400 + " ; use keras"
    rows = [make_row("error", environment=e, error=long) for e in ("cpu-a", "cpu-b")]
    rows.append(make_row("error", environment="cpu-c", error=HOSTILE))
    table = results.to_table(rows)
    text = report.matrix_text(table)
    assert text.count("[1]") == 3 and text.count("[2]") == 2  # two cells share note 1; note 2 is one cell's
    notes = text.split("notes:\n", 1)[1]
    assert "".join(line.strip() for line in notes.splitlines()).count("; use keras") == 1  # wrapped, never cut
    assert "x" * 90 in text and "…" not in text
    assert "\x1b" not in text and "\x00" not in text
    md = report.render(table, "md")
    assert md.count("; use keras") == 1 + 2  # the note, and each failed cell's own section
    doc = html_doc(table)
    notes_html = doc.get_element_by_id("notes")
    assert [li.get("id") for li in notes_html.iter("li")] == ["note-1", "note-2"]
    assert "; use keras" in notes_html.text_content() and "<script>" in notes_html.text_content()  # shown, escaped
    assert "<script>alert" not in report.render(table, "html")


def test_training_time_in_console_markdown_html_and_facts():
    rows = [make_row("bitwise", environment="cpu-a", train_s=83.25),
            make_row("bitwise", scenario="cnn", environment="cpu-a", train_s=0.04)]
    table = results.to_table(rows)
    assert "training: mlp 83.2 s, cnn 0.0 s" in report.matrix_text(table)
    assert "| mlp/keras | bitwise | 0 | 0 | 83.2 |" in report.render(table, "md")
    headers = [th.text_content() for th in html_doc(table).get_element_by_id("matrix").find("tbody").iter("th")]
    assert headers == ["mlp/kerastrained in 83.2 s", "cnn/kerastrained in 0.0 s"]
    assert "train_s 83.2" in dict(report._facts(CellResult.from_row(rows[0])))["worker"]
    assert "training:" not in report.matrix_text(results.to_table([make_row("bitwise")]))  # older runs: no column


# -- render dispatch -----------------------------------------------------------------
def test_render_rejects_unknown_format_naming_the_choices(table):
    with pytest.raises(ValueError, match="md, html, junit, json"):
        report.render(table, "pdf")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_table_renders(fmt, schema):
    empty = results.to_table([])
    text = report.render(empty, fmt)
    if fmt == "md":
        assert "No cells" in text and "0 cells" in text
    elif fmt == "junit":
        root = junit_tree(empty, schema)
        assert root.get("tests") == "0" and len(root.findall("testsuite")) == 1
    elif fmt == "json":
        assert json.loads(text)["cells"] == [] and json.loads(text)["summary"]["cells"] == 0
    else:
        doc = lxml_html.document_fromstring(text)
        assert doc.get_element_by_id("matrix").tag == "table"
        assert not doc.find_class("cell") and "No cells" in text


def test_thousand_cells_render_in_every_format(schema):
    big = big_table()
    matrix = report.render(big, "md").split("## Save round trip")[0]
    assert sum(bool(re.match(r"\| s\d/f\d \|", line)) for line in matrix.splitlines()) == 40
    assert len(list(junit_tree(big, schema).iter("testcase"))) == 1000
    assert len(json.loads(report.render(big, "json"))["cells"]) == 1000
    assert len(html_doc(big).find_class("cell")) == 1000
    # header, rows, "notes:" and one note per distinct error text (error, corrupt, unschedulable), summary, legend
    assert len(report.matrix_text(big).splitlines()) == 2 + 40 + 1 + 3 + 2


# -- Markdown ------------------------------------------------------------------------
def test_markdown_cells_and_failure_sections(table):
    md = report.render(table, "md")
    assert md.startswith("# Reproducibility report: nightly\n")
    assert "Run: `run-1`" in md
    assert "| mlp/keras | bitwise | within_tolerance (14 ulp, 1.2e-06) | **mismatch (2.1e+03 ulp, 0.034)** ✗ |" in md
    assert "| cnn/savedmodel | **error** ✗ \\[1\\] | **corrupt** ✗ \\[2\\] | **unschedulable** ✗ \\[3\\] |" in md
    assert "- \\[1\\] ValueError: Unknown layer: 'CustomDense'. Please ensure custom objects are registered." in md
    assert "## Save round trip" in md and "| mlp/keras | bitwise | 0 | 0 |" in md
    failures = md.split("## Failed expectations")[1]
    assert failures.count("\n### ") == 5
    assert "would pass with atol >= 0.034, or rtol >= 0.0088, or max_ulp >= 2.1e+03" in failures
    assert "tolerance applied: atol 1e-05, rtol 1e-06, max_ulp 16" in failures
    assert "ValueError: Unknown layer: 'CustomDense'." in failures


def test_markdown_fingerprint_differences_side_by_side(table):
    section = report.render(table, "md").split("### `mlp/h5` @ `cpu-amd`")[1].split("\n### ")[0]
    assert "| cpu_model | Intel(R) Xeon(R) Platinum 8375C | AMD EPYC 7R13 |" in section
    assert "| cpu_flags | 11 items; only here: avx512f, avx512bw | 9 items; only here: (none) |" in section
    assert "| onednn | true | false |" in section
    assert "| tf_version |" not in section and "| pid |" not in section


def test_markdown_escapes_table_breaking_text():
    md = report.render(results.to_table([make_row("bitwise", environment="a|b\nc")]), "md")
    assert "a\\|b c" in md


def test_markdown_fences_errors_containing_backticks():
    row = make_row("error", error="boom\n```\nnot the end")
    md = report.render(results.to_table([row]), "md")
    assert "````text\nboom\n```\nnot the end\n````" in md


def test_markdown_what_changed_section(table):
    changes = history.Changes(fixed=[{"scenario": "mlp", "format": "keras", "environment": "cpu-amd",
                                      "old_verdict": "error", "new_verdict": "bitwise"}])
    md = report.render(table, "md", changes=changes)
    assert "## What changed" in md and "`mlp/keras` @ `cpu-amd`: error -> bitwise" in md
    assert "## What changed" not in report.render(table, "md")


# -- JUnit ---------------------------------------------------------------------------
def test_junit_validates_and_counts(table, schema):
    root = junit_tree(table, schema)
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "nightly"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("8", "2", "3", "0")
    assert suite.get("timestamp") == "2025-03-01T02:00:00" and suite.get("time") == "20.000"
    assert len(suite.findall("testcase/failure")) == 2 and len(suite.findall("testcase/error")) == 3
    assert all(case.find("system-out") is not None for case in suite.iter("testcase"))


def _case(root, classname, name):
    (case,) = root.xpath(f"//testcase[@classname='{classname}'][@name='{name}']")
    return case


def test_junit_missed_bitwise_within_tolerance_is_a_failure(table, schema):
    case = _case(junit_tree(table, schema), "mlp.h5", "cpu-amd")
    failure = case.find("failure")
    assert failure.get("type") == "within_tolerance" and case.find("error") is None
    assert "expectation 'bitwise'" in failure.get("message")
    assert "would pass with" in failure.text


def test_junit_unschedulable_is_an_error(table, schema):
    error = _case(junit_tree(table, schema), "cnn.savedmodel", "gpu-a100").find("error")
    assert error.get("type") == "unschedulable"
    assert error.get("message").startswith("unschedulable: no node satisfies")


def test_junit_save_round_trip_failure_is_explained(schema):
    row = make_row("bitwise", expected="bitwise", passed=False, save_verdict="mismatch")
    failure = _case(junit_tree(results.to_table([row]), schema), "mlp.keras", "cpu-avx512").find("failure")
    assert "save round trip was mismatch" in failure.get("message")


def test_junit_passing_cells_have_no_failure(table, schema):
    case = _case(junit_tree(table, schema), "mlp.keras", "cpu-amd")
    assert case.find("failure") is None and case.find("error") is None
    assert "max_ulp_diff 14" in case.find("system-out").text


# Metrics may be anything a float holds (NaN/inf from broken outputs); wall times
# are what a clock gives, with a few broken values (null, NaN, negative).
_seconds_strategy = st.floats(0, 1e5) | st.sampled_from([None, math.nan, -1.0])
rows_strategy = st.lists(
    st.tuples(st.sampled_from(results.VERDICTS + (None,)), st.sampled_from(results.EXPECTATIONS),
              st.sampled_from([True, False, None]), st.text(max_size=40),
              st.floats(allow_nan=True, allow_infinity=True) | st.none(), _seconds_strategy),
    max_size=25)


def _random_table(draw):
    rows = [{**make_row("bitwise", f"s{i % 3}", "keras", f"env{i}"), "verdict": v, "expected": x, "passed": p,
             "error": err, "max_ulp_diff": ulp, "max_abs_diff": ulp, "seconds": secs}
            for i, (v, x, p, err, ulp, secs) in enumerate(draw)]
    return results.to_table(rows)


# Found by Hypothesis when seconds were drawn from every float: the JUnit time
# sum (1.8e308 + 1e292) overflowed to inf and failed the schema. Huge values stay valid decimals.
HUGE_SECONDS = [("bitwise", "bitwise", True, "", 0.0, 1.7976931348623157e308), ("bitwise", "bitwise", True, "", 0.0, 1e292),
                ("error", "any", False, "x", math.inf, math.inf)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows_strategy)
@example(HUGE_SECONDS)
def test_junit_counts_match_any_verdict_mix(schema, drawn):
    table = _random_table(drawn)
    suite = junit_tree(table, schema).find("testsuite")
    cells = table.to_pylist()
    errors = sum(c["verdict"] not in results.NUMERIC_VERDICTS for c in cells)
    failures = sum(c["verdict"] in results.NUMERIC_VERDICTS and c["passed"] is False for c in cells)
    assert (int(suite.get("tests")), int(suite.get("errors")), int(suite.get("failures"))) == (len(cells), errors, failures)
    assert len(suite.findall("testcase/error")) == errors and len(suite.findall("testcase/failure")) == failures


@settings(max_examples=40, deadline=None)
@given(rows_strategy)
def test_json_is_always_strict(drawn):
    text = report.render(_random_table(drawn), "json")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


@settings(max_examples=40, deadline=None)
@given(rows_strategy)
def test_every_error_text_is_one_whole_note_and_every_cell_points_at_its_own(drawn):
    from harness import text as text_

    table = _random_table(drawn)
    lines = report.matrix_text(table).splitlines()
    notes: dict[int, str] = {}
    if "notes:" in lines:
        for line in lines[lines.index("notes:") + 1:-2]:
            if line.startswith("    "):  # a wrapped line continues the note above
                notes[max(notes)] += " " + line[4:]
            elif line.startswith("["):
                number, rest = line[1:].split("] ", 1)
                notes[int(number)] = rest
    lay = report._layout(table)
    cells = lay.ordered()  # matrix order: rows, then environments left to right
    texts = list(dict.fromkeys(text_.one_line(c.error) for c in cells if c.error and c.error.strip()))
    assert list(notes.values()) == texts and list(notes) == list(range(1, len(texts) + 1))
    for cell in (c for c in cells if c.verdict is not None):  # a cell's [n] is the note of its own text
        expected = texts.index(text_.one_line(cell.error)) + 1 if cell.error and cell.error.strip() else None
        assert report._short(cell, lay.note(cell)).endswith(f" [{expected}]") == bool(expected)


# -- JSON ----------------------------------------------------------------------------
def test_json_round_trip_decodes_columns_and_nulls_non_finite_floats():
    rows = verdict_rows()
    rows[3].update(max_ulp_diff=math.nan, max_abs_diff=math.inf, detail={"outputs": {"y": {"max_abs_diff": math.nan}}})
    text = report.render(results.to_table(rows), "json")
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert doc["run_ids"] == ["run-1"] and doc["changes"] is None
    assert doc["summary"] == {"cells": 8, "passed": 3, "failed": 5, "not_judged": 0, "flaky": 0, "repeated": 0,
                              "verdicts": {"bitwise": 2, "within_tolerance": 2, "mismatch": 1, "corrupt": 1,
                                           "error": 1, "unschedulable": 1},
                              "accuracy": {"as_accurate": 0, "less_accurate": 0, "n/a": 0}}
    assert [e["name"] for e in doc["environments"]] == ["cpu-avx512", "cpu-amd", "gpu-a100"]
    mismatch = doc["cells"][2]
    assert mismatch["verdict"] == "mismatch"
    assert mismatch["max_ulp_diff"] is None and mismatch["max_abs_diff"] is None
    # JSON columns hold the harness's one JSON policy (records.to_json): a non-finite number is text
    assert mismatch["detail"] == {"outputs": {"y": {"max_abs_diff": "nan"}}}
    assert mismatch["fingerprint"]["gpus"][0]["compute_capability"] == "8.0"
    assert mismatch["node_labels"] == {"ray.io/node-type": "gpu-a100"}
    assert dt.datetime.fromisoformat(mismatch["started_at"]) == NIGHT_ONE


def test_json_includes_changes():
    changes = history.Changes(new_environments=["tpu-v5"])
    doc = json.loads(report.render(verdict_table(), "json", changes=changes))
    assert doc["changes"]["new_environments"] == ["tpu-v5"] and doc["changes"]["regressed"] is False


# -- HTML ----------------------------------------------------------------------------
def test_html_is_self_contained(table):
    text = report.render(table, "html", history=_history_of(table), changes=history.Changes())
    assert_self_contained(text)
    assert "http" not in text  # the fixture has no URLs in its data either


def test_external_url_check_catches_what_it_should():
    for bad in ('<script src="https://cdn.example/x.js">', "<link href='//fonts.example/css'>",
                "background:url( http://example/x.png)", '@import "https://example/x.css"'):
        with pytest.raises(AssertionError):
            assert_self_contained(bad)


def test_html_cells_carry_verdicts_and_data(table):
    doc = html_doc(table)
    cells = doc.find_class("cell")
    assert len(cells) == 8
    assert {c.get("data-verdict") for c in cells} == set(results.VERDICTS)
    for verdict in results.VERDICTS:
        assert any(f"v-{verdict}" in c.get("class").split() for c in cells)
    (mismatch,) = [c for c in cells if c.get("data-verdict") == "mismatch"]
    assert (mismatch.get("data-scenario"), mismatch.get("data-format"), mismatch.get("data-environment")) == \
        ("mlp", "keras", "gpu-a100")
    assert "failed" in mismatch.get("class").split() and "background:#" in mismatch.get("style")
    assert "max ulp 2.1e+03" in mismatch.get("title")
    detail = mismatch.find_class("detail")[0].text_content()
    for text in ("node-gpu-a100", "would pass with", "NVIDIA A100-SXM4-40GB", "ray.io/node-type"):
        assert text in detail


def test_html_mismatch_colour_darkens_with_ulp():
    def background(ulp):
        doc = html_doc(results.to_table([make_row("mismatch", max_ulp_diff=ulp)]))
        colour = re.search(r"background:#([0-9a-f]{6})", doc.find_class("cell")[0].get("style")).group(1)
        return sum(bytes.fromhex(colour))
    assert background(10.0) > background(1e4) > background(1e9) == background(math.inf)


def test_html_legend_and_fingerprints(table):
    doc = html_doc(table)
    legend = doc.get_element_by_id("legend").text_content()
    for label in ("bitwise", "within tolerance", "mismatch", "error", "corrupt", "unschedulable", "failed expectation"):
        assert label in legend
    fingerprints = doc.get_element_by_id("fingerprints")
    assert [th.text_content() for th in fingerprints.find("thead").iter("th")] == \
        ["key", history.TRAINING, "cpu-avx512", "cpu-amd", "gpu-a100"]
    rows = {tr.find("th").text_content(): tr for tr in fingerprints.find("tbody").iter("tr")}
    assert "differs" in rows["cpu_model"].get("class") and "differs" not in rows["tf_version"].get("class")
    assert [td.text_content() for td in rows["cpu_model"].find_class("diff")] == ["AMD EPYC 7R13", "AMD EPYC 7R13"]


def test_html_escapes_text():
    row = make_row("error", environment='<script>alert("x")</script>', error="<b>bold</b> & co")
    text = report.render(results.to_table([row]), "html")
    assert "<script>alert" not in text and "&lt;script&gt;" in text and "&lt;b&gt;bold" in text


def _history_of(table, nights=3):
    """``nights`` earlier copies of ``table`` (one day apart) as a history table."""
    parts = []
    for night in range(nights):
        copy = results.to_table([{**r, "run_id": f"old-{night}", "started_at": NIGHT_ONE - dt.timedelta(days=nights - night)}
                                 for r in table.to_pylist()])
        parts.append(copy.append_column("date", pa.array([f"2025-02-2{night}"] * len(copy))))
    return pa.concat_tables(parts)


def _spark_dots(svg) -> int:
    """How many dots a matrix cell's sparkline draws (``charts.spark_svg``: one ``h0`` segment per run)."""
    return sum(path.get("d").count("h0") for path in svg.find_class("dots"))


def test_html_sparkline_per_cell_with_history(table):
    doc = html_doc(table, history=_history_of(table))
    cells = doc.find_class("cell")
    assert all(len(c.find_class("spark")) == 1 for c in cells)
    assert all(_spark_dots(c.find_class("spark")[0]) == 4 for c in cells)  # 3 old runs + this one
    assert not html_doc(table).find_class("spark")


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="chromium is not installed (apt-get install chromium)")
WINDOW = (1400, 1000)  # a laptop browser window


def _chromium(tmp_path, *args):
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]
    return subprocess.run([*common, *args], capture_output=True, text=True, timeout=120, check=True).stdout


@needs_chromium
def test_html_in_headless_chromium(table, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report.render(table, "html", history=_history_of(table)), encoding="utf-8")
    png = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={png}", page.as_uri())
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert png.exists() and png.stat().st_size > 20_000
    assert '<table id="matrix">' in dom
    assert dom.count('class="cell ') == 8


QUICKSTART_ENVIRONMENTS = ["cpu-default", "cpu-onednn-off", "cpu-onednn-on", "cpu-single-thread", "cpu-xla",
                           "cpu-batch-1", "cpu-isa-avx2", "cpu-isa-avx"]
# Measured by the page itself once laid out: every table cell whose content is wider than the cell, and the
# matrix's box against the window. Written into the DOM, which --dump-dom returns.
_MEASURE = """<script>
document.querySelectorAll("#changes details").forEach(function(d){d.open=true;});
var over=[];document.querySelectorAll("td,th").forEach(function(e){
 if(e.scrollWidth>e.clientWidth+1)over.push(e.textContent.slice(0,60)+" "+e.scrollWidth+">"+e.clientWidth);});
var box=document.getElementById("matrix-box").getBoundingClientRect();
var page={overflow:over,matrix_right:box.right,table_width:document.getElementById("matrix").scrollWidth,
 window:window.innerWidth,page_width:document.documentElement.scrollWidth,panel:null};
var chart=document.querySelector("#matrix .detail .trend");
if(chart){var d=chart.closest("details");d.open=true;var p=chart.closest(".detail");
 page.panel={scroll:p.scrollWidth,client:p.clientWidth,chart:chart.getBoundingClientRect().width};}
var m=document.createElement("pre");m.id="measure";m.textContent=JSON.stringify(page);document.body.appendChild(m);</script>"""


def quickstart_like_table(night: int = 1, tiers: bool = False):
    """The quick start's shape (3 scenarios x 3 formats x 8 environments) with the longest texts it shows:
    Ray node ids, ULP and abs diffs, an error, a failed save round trip, a training time.

    ``night`` > 1 moves some cells (a cell breaks from night 2, another tonight; required tolerances
    drift); ``tiers`` adds accuracy tiers and a task metric (less accurate mismatches fail ``accurate``).
    """
    rows = []
    for i, (s, f, e) in enumerate(itertools.product(["seed-binary-classifier", "seed-linear-regression",
                                                     "seed-dense-regression"], ["keras", "h5", "savedmodel"],
                                                    QUICKSTART_ENVIRONMENTS)):
        node = f"{i:02d}" + "797559213729be1873e68a2b80164a0e15ef3f573ece35ee00735"
        kind = ("within_tolerance", "bitwise", "mismatch", "error", "bitwise")[i % 5]
        if night >= {9: 2, 64: 6}.get(i, night + 1):  # passing cells that break: on night 2, and tonight
            kind = "unschedulable"
        fp = dict(fingerprint(e), ray_node_id=node, hostname=f"ip-10-0-{i}-17.eu-west-1.compute.internal",
                  cpu_model="AMD EPYC 9R14" if night >= 3 else "AMD EPYC 7R13")
        save = dict(save_verdict="mismatch", save_max_ulp_diff=3.0, save_max_abs_diff=1.2e-07, passed=False) \
            if i % 5 == 1 else {}
        extra = {}
        if tiers and kind in ("within_tolerance", "mismatch"):
            less = kind == "mismatch"
            extra = dict(accuracy="less_accurate" if less else "as_accurate", expected="accurate", passed=not less,
                         rmse_vs_fp64=5.83e-4 if less else 2.37e-8, reference_rmse_vs_fp64=2.35e-8,
                         accuracy_note=f"output: rmse vs float64 {5.83e-4 if less else 2.37e-8:.3g} "
                                       f"{'>' if less else '<='} 3 x reference's 2.35e-08 + atol 1e-06/10",
                         metric="accuracy", reference_metric=0.75, observed_metric=0.734375, metric_delta=-0.015625)
        if kind == "within_tolerance":
            extra.update(required_ulp=float(1 + (i + night) % 7), required_atol=1e-7 * (1 + night % 3))
        rows.append(make_row(kind, s, f, e, node_id=node, fingerprint=fp, train_s=12.3, max_ulp_diff=88000.0,
                             max_abs_diff=2.4e-07, run_id=f"20261{night:03d}T021500Z-8b2e47",
                             started_at=NIGHT_ONE + dt.timedelta(days=night), **{**save, **extra}))
    return results.to_table(rows)


def _measure_in_chromium(tmp_path, html: str) -> dict:
    """Lay ``html`` out in headless chromium at the laptop window size; what :data:`_MEASURE` found."""
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    return json.loads(html_lib.unescape(re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S).group(1)))


def _assert_fits(measure: dict) -> None:
    assert measure["window"] == WINDOW[0]
    assert measure["overflow"] == []  # no text runs out of its table cell (node ids, hostnames, notes)
    assert measure["table_width"] <= WINDOW[0] - 48, measure  # the 8-environment matrix fits beside the margins
    assert measure["page_width"] <= WINDOW[0], measure  # nothing makes the page scroll sideways


def _screenshot(tmp_path, name: str) -> None:
    _chromium(tmp_path, f"--screenshot={tmp_path / 'shot.png'}", (tmp_path / "report.html").as_uri())
    shutil.copy(tmp_path / "shot.png", Path(os.environ.get("HARNESS_SCREENSHOT_DIR", tmp_path)) / name)


@needs_chromium
def test_html_matrix_of_the_quick_start_fits_a_laptop_window_and_no_cell_overflows(tmp_path):
    _assert_fits(_measure_in_chromium(tmp_path, report.render(quickstart_like_table(), "html")))
    _screenshot(tmp_path, "quickstart.png")


@needs_chromium
def test_html_nightly_with_trends_and_tiers_fits_a_laptop_window(tmp_path):
    uri = str(tmp_path / "history")
    nights = 6
    for night in range(1, nights + 1):
        history.append_run(quickstart_like_table(night, tiers=True), uri)
    tonight = quickstart_like_table(nights, tiers=True)
    past = history.History.open(uri)
    recent = past.recent("nightly", history.TREND_RUNS, tonight)
    changes = history.compare(past, tonight, recent=recent)
    assert changes.counts["new"] == 1 and changes.counts["known"] > 20 and changes.drifting  # what is laid out
    assert len(changes.nights) == nights
    assert any("cpu_model" in (e["changed_since_good"] or {}) for e in changes.known_failing)  # a filled streak row
    html = report.render(tonight, "html", history=recent, changes=changes)
    assert "&lt;acc" in html and 'class="trend"' in html and 'class="cell v-mismatch failed less-accurate"' in html
    measure = _measure_in_chromium(tmp_path, html)
    _assert_fits(measure)  # the What changed tables and charts too
    panel = measure["panel"]
    assert panel is not None and panel["scroll"] <= panel["client"] + 1, panel  # a cell's chart fits its panel
    _screenshot(tmp_path, "nightly.png")


# -- write_all -------------------------------------------------------------------------
def test_write_all_writes_every_format_atomically(table, tmp_path, schema):
    out = tmp_path / "run"
    paths = report.write_all(table, out, title="Nightly")
    assert paths == {"md": out / "report.md", "html": out / "report.html", "junit": out / "report.xml",
                     "json": out / "report.json"}
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "report.xml"]
    assert paths["md"].read_text(encoding="utf-8") == report.render(table, "md", title="Nightly")
    schema.assertValid(etree.parse(str(paths["junit"])))
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["title"] == "Nightly"


# -- hostile strings: nothing user-provided becomes markup or reaches the terminal raw -----------------
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\x1b[31mred\x00\nsecond line | `tick` [l](javascript:x)"


def test_markdown_and_console_escape_every_user_string():
    rows = [make_row("mismatch", HOSTILE, "keras", "env<b>\x1b", error=HOSTILE),
            {**make_row("error", "ok-scenario", "h5", "cpu"), "error": HOSTILE,
             "node_labels": json.dumps({"zone": HOSTILE})}]
    table = results.to_table(rows)
    assert "\x1b" not in report.matrix_text(table) and "\x00" not in report.matrix_text(table)  # the terminal
    for text in (report.render(table, "md"), report.render(table, "md", title=HOSTILE)):
        # Code spans and fenced blocks show their content literally (CommonMark): only outside them
        # could a tag or a link become markup.
        prose = _outside_code(text)
        assert "<script" not in prose and "<img" not in prose and "<b>" not in prose
        assert not re.search(r"(?<!\\)\]\(javascript:", prose)  # an escaped \] is no link
        assert "\x1b" not in text and "\x00" not in text
    md = report.render(table, "md", title=HOSTILE)
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert all("second line" in h for h in headings if "script" in h)  # a newline never breaks a heading
    assert "&lt;script&gt;" in md or "&lt;script>" in md  # shown, escaped, not dropped
    assert "\\x1b" in md  # the control character is visible as an escape


def _outside_code(markdown: str) -> str:
    """``markdown`` without its fenced blocks and inline code spans."""
    kept, fence = [], None
    for line in markdown.splitlines():
        run = re.match(r"^(`{3,})", line)
        if fence is None and run:
            fence = run.group(1)
        elif fence is not None and line.startswith(fence) and not line[len(fence):].strip():
            fence = None
        elif fence is None:
            kept.append(re.sub(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", "", line))
    return "\n".join(kept)


@pytest.mark.parametrize("value, fragment", [("a|b", "a\\|b"), ("x\ny", "x y"), ("\x07", "\\x07")])
def test_text_helpers(value, fragment):
    from harness import text

    assert fragment in text.markdown(value)
    assert "\n" not in text.one_line(value) and "\x07" not in text.visible(value)
    assert text.code("a`b").startswith("``") and "\n" not in text.code("x\ny")


# -- explanations and prediction impact in reports --------------------------------------------
def _explanation(cell: str, first: str = "dense_1"):
    from harness.explain import Explanation, Knob, KnobFinding, LayerDiff, Localisation

    layers = (LayerDiff(0, "dense", "same", 0.0, 0.0, 0.0, 0.0, 0.0, None),
              LayerDiff(1, first, "differs", 4.0, 2.4e-7, 0.25, 0.0, 1e-7, math.inf),
              LayerDiff(2, "head", "differs", 9.0, 5e-7, 0.5, 1e-7, 3e-7, 3.0))
    loc = Localisation("keras", None, layers, first, "head")
    knob = Knob("jit_compile", False, True)
    return Explanation(cell, "within_tolerance", localisation=loc,
                       findings=(KnobFinding(knob, True, 4.0, True, 0.0),), summary="explained by XLA")


def test_reports_show_explanations_with_a_layer_table_and_a_depth_chart():
    rows = [make_row("within_tolerance", environment="cpu-xla"), make_row("bitwise", environment="cpu-default")]
    table = results.to_table(rows)
    exp = _explanation("mlp/keras/cpu-xla")
    md = report.render(table, "md", explanations={exp.cell: exp})
    section = md.split("## Explanations", 1)[1]
    assert "- setting: explained by XLA" in section and "- starts at layer: dense_1" in section
    assert "| 1 | dense_1 | differs | 4 | 2.4e-07 | 0.25 | starts here |" in section
    assert "| 2 | head | differs | 9 | 5e-07 | 0.5 | x3 |" in section
    html = report.render(table, "html", explanations={exp.cell: exp})
    assert '<section id="explanations">' in html and html.count("<rect") == 3
    assert 'stroke="#111"' in html  # the first divergent layer is outlined
    doc = json.loads(report.render(table, "json", explanations={exp.cell: exp}))
    assert doc["explanations"][0]["localisation"]["first"] == "dense_1"
    # an explanation of a cell the table does not have, or one with nothing to explain, is not shown
    from harness.explain import Explanation

    other = Explanation("mlp/keras/cpu-default", "bitwise", message="bitwise: nothing to explain")
    assert "## Explanations" not in report.render(table, "md", explanations={other.cell: other,
                                                                            "x/y/z": _explanation("x/y/z")})


def test_hostile_layer_names_are_escaped_in_explanations():
    rows = [make_row("within_tolerance", environment="cpu-xla")]
    table = results.to_table(rows)
    exp = _explanation("mlp/keras/cpu-xla", first="<script>alert(1)</script>|x\n# heading")
    html = report.render(table, "html", explanations={exp.cell: exp})
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html
    md = report.render(table, "md", explanations={exp.cell: exp})
    assert "<script>" not in md and "\n# heading" not in md


def test_prediction_flips_show_in_console_markdown_and_facts():
    rows = [make_row("within_tolerance", environment="cpu-xla", prediction_flips=3, prediction_flip_fraction=0.047,
                     max_rank_change=2),
            make_row("within_tolerance", environment="cpu-amd", prediction_flips=0, prediction_flip_fraction=0.0)]
    table = results.to_table(rows)
    text = report.matrix_text(table)
    assert "3flip" in text and text.count("flip") == 2  # the cell with flips, and the legend
    md = report.render(table, "md")
    assert "3 flipped" in md
    facts = dict(report._facts(CellResult.from_row(rows[0])))
    assert facts["prediction impact"] == ("3 prediction(s) changed their decision (worst output 4.7%); "
                                          "top-k rank moved by up to 2")
    assert dict(report._facts(CellResult.from_row(rows[1])))["prediction impact"] == "no decision changed"


# -- typed cells ------------------------------------------------------------------------------
def test_cells_are_decoded_once_into_typed_records(table):
    cells = report._layout(table).ordered()
    assert all(isinstance(c, CellResult) for c in cells)
    assert cells[0].fingerprint["cpu_model"] == "Intel(R) Xeon(R) Platinum 8375C"
    assert isinstance(cells[0].started_at, float)
    assert report.outcome(cells[0]) == "ok" and report.fingerprint_diff(cells[0])


def test_broken_json_columns_render_as_before():
    row = {**make_row("mismatch"), "fingerprint": "not json", "train_fingerprint": "[1, 2]", "node_labels": "{"}
    table = results.to_table([row])
    cell = report._layout(table).ordered()[0]
    assert report.fingerprint_diff(cell) == []  # neither side is a fingerprint object
    assert dict(report._facts(cell))["node"] == "node-cpu-avx512"  # unparsable labels are left out
    doc = json.loads(report.render(table, "json"))
    assert doc["cells"][0]["fingerprint"] == "not json" and doc["cells"][0]["train_fingerprint"] == [1, 2]
    assert doc["environments"][0]["fingerprint"] is None


@pytest.mark.parametrize("column", ["verdict", "save_verdict"])
def test_unknown_verdict_in_a_damaged_table_is_a_results_error(column):
    table = results.to_table([{**make_row("bitwise"), column: "<b>weird\x1b"}])
    for render in (report.matrix_text, lambda t: report.render(t, "md")):
        with pytest.raises(results.ResultsError, match=rf"cell 'mlp/keras/cpu-avx512': unknown {column} '<b>weird\\x1b'"):
            render(table)


# -- accuracy tiers and task metrics -----------------------------------------------------------------
def tier_table():
    note_as = "output: rmse vs float64 2.37e-08 <= 3 x reference's 2.35e-08 + atol 1e-06/10"
    note_less = "output: rmse vs float64 0.000583 > 3 x reference's 2.35e-08 + atol 1e-06/10"
    return results.to_table([
        make_row("within_tolerance", environment="cpu-xla", expected="accurate", passed=True,
                 accuracy="as_accurate", rmse_vs_fp64=2.37e-8, reference_rmse_vs_fp64=2.35e-8, accuracy_note=note_as),
        make_row("mismatch", environment="serve-bf16", expected="accurate", passed=False, accuracy="less_accurate",
                 rmse_vs_fp64=5.83e-4, reference_rmse_vs_fp64=2.35e-8, accuracy_note=note_less),
        make_row("mismatch", environment="serve-bf16-metric", expected="metric_delta<=0.001", passed=False,
                 accuracy="less_accurate", accuracy_note=note_less, metric="accuracy", reference_metric=0.75,
                 observed_metric=0.734375, metric_delta=-0.015625),
        make_row("within_tolerance", scenario="module", environment="cpu-xla", accuracy="n/a",
                 accuracy_note="the scenario produced a plain TwoLayerMLP, not a Keras model"),
    ])


def test_console_tags_the_tier_and_counts_it():
    text = report.matrix_text(tier_table())
    row = next(line for line in text.splitlines() if line.startswith("mlp/keras"))
    assert "tol 14ulp 1.2e-06 =acc" in row and "MISMATCH 2.1e+03ulp 0.034 <acc ✗" in row
    module = next(line for line in text.splitlines() if line.startswith("module/keras"))
    assert "acc" not in module  # n/a: no tag
    assert "; vs float64: 1 as accurate, 2 less accurate, 1 n/a; 2 passed, 2 failed expectations" in text
    assert "=acc / <acc = as accurate as / less accurate than the reference" in text


def test_markdown_and_junit_say_why_a_tier_failed(schema):
    table = tier_table()
    md = report.render(table, "md")
    assert "within_tolerance (14 ulp, 1.2e-06, as accurate)" in md
    assert "- accuracy vs float64: less accurate (output: rmse vs float64 0.000583 > 3 x" in md
    assert "- task metric: accuracy 0.75 -> 0.734 (delta -0.0156)" in md
    root = junit_tree(table, schema)
    less = _case(root, "mlp.keras", "serve-bf16").find("failure")
    assert less.get("message").startswith("mismatch does not meet expectation 'accurate' (less accurate (output: rmse")
    metric = _case(root, "mlp.keras", "serve-bf16-metric").find("failure")
    assert metric.get("message").startswith("mismatch does not meet expectation 'metric_delta<=0.001' "
                                            "(accuracy 0.75 -> 0.734 (delta -0.0156)")
    out = _case(root, "module.keras", "cpu-xla").find("system-out").text
    assert "accuracy vs float64: n/a (the scenario produced a plain TwoLayerMLP, not a Keras model)" in out
    doc = json.loads(report.render(table, "json"))
    assert doc["summary"]["accuracy"] == {"as_accurate": 1, "less_accurate": 2, "n/a": 1}
    assert doc["cells"][0]["accuracy"] == "as_accurate" and doc["cells"][2]["metric_delta"] == -0.015625


def judged_row(environment: str, noise: float, **overrides):
    """A row whose accuracy columns and ``detail.accuracy`` come from ``compare.judge_accuracy`` on real arrays:
    a float64 oracle, its float32 reference, and the reference moved by ``noise`` (relative)."""
    import numpy as np

    from harness.compare import judge_accuracy

    oracle = {"output": np.linspace(-3.0, 3.0, 64) / 7.0, "logits": np.linspace(0.1, 0.9, 64) / 3.0}
    reference = {k: v.astype(np.float32) for k, v in oracle.items()}
    observed = {k: (v * np.float32(1 + noise)).astype(np.float32) for k, v in reference.items()}
    acc = judge_accuracy(oracle, reference, observed, {"output": 1e-6, "logits": 1e-6})
    verdict = "within_tolerance" if acc.tier == "as_accurate" else "mismatch"
    row = make_row(verdict, environment=environment, accuracy=acc.tier, rmse_vs_fp64=acc.rmse,
                   reference_rmse_vs_fp64=acc.reference_rmse, accuracy_note=acc.note,
                   detail={"outputs": {}, "accuracy": acc.to_dict()}, **overrides)
    return row, acc


def _cell(doc, scenario, fmt, environment):
    (td,) = [td for td in doc.find_class("cell") if (td.get("data-scenario"), td.get("data-format"),
                                                      td.get("data-environment")) == (scenario, fmt, environment)]
    return td


def _facts_of(td) -> dict[str, str]:
    dl = td.find_class("detail")[0].find("dl")
    return {dt_.text_content(): dd.text_content() for dt_, dd in zip(dl.iter("dt"), dl.iter("dd"))}


def test_html_shows_the_tier_in_text_tooltip_facts_and_legend_and_marks_less_accurate_cells():
    from harness.compare import LESS_ACCURATE

    as_row, as_acc = judged_row("cpu-xla", 1e-9)
    less_row, less_acc = judged_row("serve-bf16", 1e-3, expected="accurate", metric="accuracy",
                                    reference_metric=0.75, observed_metric=0.734375, metric_delta=-0.015625)
    assert (as_acc.tier, less_acc.tier) == ("as_accurate", "less_accurate")  # the arrays say so, not the test
    rows = [as_row, less_row,
            make_row("within_tolerance", scenario="module", environment="cpu-xla", accuracy="n/a",
                     accuracy_note="the scenario produced a plain TwoLayerMLP, not a Keras model"),
            make_row("bitwise", environment="cpu-default", accuracy="as_accurate")]
    html = report.render(results.to_table(rows), "html")
    doc = lxml_html.document_fromstring(html)

    tol = _cell(doc, "mlp", "keras", "cpu-xla")
    assert "=acc" in tol.find("details/summary").text_content() and tol.get("data-accuracy") == "as_accurate"
    assert "=acc as accurate as the reference" in tol.get("title") and "less-accurate" not in tol.get("class")
    facts = _facts_of(tol)
    assert facts["accuracy vs float64"] == f"as accurate ({as_acc.note})"
    assert facts["rmse vs float64"] == (f"observed {as_acc.rmse:.3g}, reference {as_acc.reference_rmse:.3g}, "
                                        f"allowance {as_acc.decisive.allowance:.3g}")

    less = _cell(doc, "mlp", "keras", "serve-bf16")
    assert "<acc" in less.find("details/summary").text_content() and less.get("data-accuracy") == "less_accurate"
    assert "less-accurate" in less.get("class").split() and "<acc less accurate than the reference" in less.get("title")
    facts = _facts_of(less)
    assert facts["accuracy vs float64"].startswith(f"less accurate ({less_acc.decisive.name}: rmse vs float64")
    assert facts["rmse vs float64"].endswith(f"allowance {less_acc.decisive.allowance:.3g}")
    assert facts["task metric"] == "accuracy 0.75 -> 0.734 (delta -0.0156)"

    for quiet in (_cell(doc, "module", "keras", "cpu-xla"), _cell(doc, "mlp", "keras", "cpu-default")):
        text = quiet.find("details/summary").text_content() + quiet.get("title")  # n/a, and bitwise: no tier shown
        assert "=acc" not in text and "<acc" not in text
        assert quiet.get("data-accuracy") is None and "less-accurate" not in quiet.get("class")
    assert _facts_of(_cell(doc, "module", "keras", "cpu-xla"))["accuracy vs float64"].startswith("n/a (the scenario")
    assert "rmse vs float64" not in _facts_of(_cell(doc, "module", "keras", "cpu-xla"))

    legend = doc.get_element_by_id("legend")
    assert "=acc as accurate as the reference" in legend.text_content()
    (mark,) = legend.find_class("tier-mark")
    assert "<acc less accurate" in mark.getparent().text_content()
    style = doc.find(".//style").text
    # the corner of a less accurate cell and every verdict's colour come from the report's colour owner
    assert re.search(r"td\.cell\.less-accurate::after[^{]*\{[^}]*" + report._MARKS[LESS_ACCURATE], style)
    for verdict, colour in report._COLOURS.items():
        assert re.search(rf"\.v-{verdict}\{{background:[^}}]*{colour}", style), verdict


# -- the nightly in HTML: what changed first, trends ---------------------------------------------
HOSTILE_NAME = '<script>alert(1)</script><img src=x onerror=alert(2)>&amp;"\x1b'
HOSTILE_ENV = 'cpu-"c"<i>'
KNOWN = (HOSTILE_NAME, "keras", "cpu-a")   # passes night 1, mismatch from night 2 on; cpu_model moves on night 3
NEW = ("mlp", "keras", "cpu-b")             # passes nights 1-3, fails tonight (night 4)
FIXED = ("mlp", "keras", "cpu-a")           # error on night 3, bitwise tonight
DRIFTING = (HOSTILE_NAME, "keras", HOSTILE_ENV)  # within tolerance, its required ULP / atol move every night
STEADY = ("mlp", "keras", HOSTILE_ENV)       # within tolerance, the same 14 ULP / 1.2e-06 every night
TONIGHT = 4


def nightly_rows(night: int) -> list[dict]:
    rows = []
    for key in itertools.product((HOSTILE_NAME, "mlp"), ("keras",), ("cpu-a", "cpu-b", HOSTILE_ENV)):
        verdict, extra = "bitwise", {"required_ulp": 0.0, "required_atol": 0.0}  # as a bitwise cell records them
        if key == KNOWN and night >= 2:
            verdict, extra = "mismatch", {}
        if key == NEW and night == TONIGHT or key == FIXED and night == 3:
            verdict, extra = "error", {}
        if key == DRIFTING:
            verdict = "within_tolerance"
            extra = dict(required_ulp=float(2 ** night), max_ulp_diff=float(2 ** night), required_atol=1e-7 * night)
        if key == STEADY:
            verdict, extra = "within_tolerance", {}
        fp = fingerprint(key[2], pid=night, cpu_model="AMD EPYC 9R14" if night >= 3 else "AMD EPYC 7R13")
        rows.append(make_row(verdict, *key, run_id=f"run-{night}", started_at=NIGHT_ONE + dt.timedelta(days=night),
                             fingerprint=fp, **extra))
    return rows


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """Four nights in a history, tonight's compared as ``harness nightly`` does: (html, changes, recent, tonight)."""
    uri = str(tmp_path_factory.mktemp("history") / "h")
    for night in range(1, TONIGHT + 1):
        history.append_run(results.to_table(nightly_rows(night)), uri)
    tonight = results.to_table(nightly_rows(TONIGHT))
    past = history.History.open(uri)
    recent = past.recent("nightly", history.TREND_RUNS, tonight)
    changes = history.compare(past, tonight, recent=recent)
    return report.render(tonight, "html", history=recent, changes=changes), changes, recent, tonight


def test_html_opens_with_what_changed_and_its_counts(nightly):
    html, changes, _, _ = nightly
    doc = lxml_html.document_fromstring(html)
    body = [el for el in doc.body.iter() if el.tag in ("h2", "section", "table")]
    assert body[0].tag == "h2" and body[0].text_content() == "What changed"  # the first section of the page
    order = [el.get("id") for el in doc.body.iter() if el.get("id") in ("changes", "matrix", "fingerprints")]
    assert order == ["changes", "matrix", "fingerprints"]
    section = doc.get_element_by_id("changes")
    counts = {li.get("data-kind"): int(li.get("data-count")) for li in section.find_class("counts")[0].iter("li")}
    assert counts == changes.counts == {"new": 1, "known": 1, "fixed": 1, "flaky": 0}
    shown = {li.get("data-kind"): int(li.find("b").text) for li in section.find_class("counts")[0].iter("li")}
    assert shown == counts
    assert "Regressed: yes" in section.text_content() and "previous run run-3" in section.text_content()
    assert "Fixed (1)" in section.text_content() and "mlp/keras @ cpu-a: error -> bitwise" in section.text_content()


def _failing_rows(doc, kind):
    (table,) = [t for t in doc.get_element_by_id("changes").iter("table") if t.get("data-kind") == kind]
    return [[td for td in tr.iter("td")] for tr in table.find("tbody").iter("tr")]


def test_html_failing_cells_name_first_bad_last_good_and_what_changed_since(nightly):
    html, changes, _, _ = nightly
    doc = lxml_html.document_fromstring(html)
    (new,) = _failing_rows(doc, "new")
    assert [td.text_content() for td in new[:5]] == ["mlp/keras @ cpu-b", "bitwise -> error", "run-4 (2025-03-05)", "1",
                                                    "run-3 (2025-03-04)"]
    assert [li.text_content() for li in new[5].iter("li")] == ["no fingerprint key changed"]
    (known,) = _failing_rows(doc, "known")
    assert [td.text_content() for td in known[1:5]] == ["mismatch -> mismatch", "run-2 (2025-03-03)", "3",
                                                       "run-1 (2025-03-02)"]
    assert [li.text_content() for li in known[5].iter("li")] == ["cpu_model: AMD EPYC 7R13 -> AMD EPYC 9R14"]
    (entry,) = changes.known_failing  # the row says what compare found
    assert entry["first_bad"]["run_id"] == "run-2" and entry["last_good"]["run_id"] == "run-1"
    # each failing cell links to its own cell in the matrix
    for row, key in ((new, NEW), (known, KNOWN)):
        target = doc.get_element_by_id(row[0].find("a").get("href").lstrip("#"))
        assert (target.get("data-scenario"), target.get("data-format"), target.get("data-environment")) == key


def test_html_hostile_names_in_what_changed_and_charts_are_escaped(nightly):
    from harness import text

    html, _, _, _ = nightly
    assert "<script>alert" not in html and "<img src=x" not in html and "\x1b" not in html.split('id="matrix"')[0]
    doc = lxml_html.document_fromstring(html)
    assert len(list(doc.iter("script"))) == 1 and not list(doc.iter("img"))  # only the page's own script
    (known,) = _failing_rows(doc, "known")
    assert known[0].text_content() == text.one_line(f"{HOSTILE_NAME}/keras @ cpu-a")  # shown, literally
    drift = [tr[0].text_content() for tr in doc.get_element_by_id("changes").find_class("drifting")[0].iter("tr")]
    assert text.one_line(f"{HOSTILE_NAME}/keras @ {HOSTILE_ENV}") in drift
    chart = _cell(doc, *DRIFTING).find_class("trend")[0]
    assert chart.get("aria-label") == text.one_line(f"{HOSTILE_NAME}/keras @ {HOSTILE_ENV}") + \
        ": required tolerance over 4 runs"


def test_html_trend_charts_are_valid_xml_and_drawn_for_every_cell_with_history(nightly):
    html, changes, recent, tonight = nightly
    assert_self_contained(html)
    assert "http" not in html  # inline SVG needs no namespace URL either
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    for svg in svgs:  # every chart the page carries is well-formed XML on its own
        root = etree.fromstring(svg.encode("utf-8"))
        assert root.tag == "svg"
        assert not list(root.iter("script")) and not [el for el in root.iter() if el.get("href")]
    doc = lxml_html.document_fromstring(html)
    section = doc.get_element_by_id("changes")
    (nights_chart,) = section.find_class("trend")
    assert len(nights_chart.findall(".//circle")) == 2 * len(changes.nights) == 2 * TONIGHT  # non-bitwise, failed
    assert [tr[0].text_content() for tr in section.find_class("drifting")[0].find("tbody").iter("tr")] == \
        [report._cell_label(e) for e in changes.drifting]
    trends = history.trends(recent, last=history.TREND_RUNS)
    charted = []
    for cell in report._layout(tonight).ordered():
        td = _cell(doc, *cell.key)
        points = trends[cell.key]
        assert len(points) == TONIGHT and _spark_dots(td.find_class("spark")[0]) == TONIGHT  # every cell: a sparkline
        measured = [{v for p in points if history.is_finite(v := getattr(p, name))}
                    for name in ("required_ulp", "required_atol")]
        charts_ = td.find_class("detail")[0].find_class("trend")
        assert len(charts_) == any(len(values) > 1 for values in measured)  # drawn where the tolerance moved
        if charts_:
            charted.append(cell.key)
            assert len(charts_[0].findall(".//circle")) == sum(
                history.is_finite(v) for p in points for v in (p.required_ulp, p.required_atol))
    assert charted == [KNOWN, DRIFTING]  # the rest say in words what their tolerance was
    facts = {key: _facts_of(_cell(doc, *key))["required tolerance trend"] for key in (NEW, STEADY)}
    assert facts == {NEW: f"0 or not measured in each of the last {TONIGHT} runs",
                     STEADY: f"ULP 14, atol 1.2e-06 in every one of the last {TONIGHT} runs that measured it"}


def test_html_draws_a_bounded_number_of_tolerance_charts_failing_cells_first(nightly, monkeypatch):
    _, changes, recent, tonight = nightly
    monkeypatch.setattr(report, "_TREND_CHARTS", 1)
    doc = html_doc(tonight, history=recent, changes=changes)
    assert [td.get("data-environment") for td in doc.find_class("cell") if td.find_class("trend")] == [KNOWN[2]]
    said = _facts_of(_cell(doc, *DRIFTING))["required tolerance trend"]
    assert said.startswith("ULP 2 -> 16 (max 16); atol 1e-07 -> 4e-07 (max 4e-07) over the last 4 runs (not drawn")


def test_html_without_history_has_no_trends_and_a_first_night_says_so(tmp_path):
    tonight = results.to_table(nightly_rows(1))
    changes = history.compare(history.History.open(str(tmp_path / "h")), tonight)
    doc = html_doc(tonight, changes=changes)
    section = doc.get_element_by_id("changes")
    assert "No previous run of this sweep in the history" in section.text_content()
    assert {li.get("data-kind"): int(li.get("data-count")) for li in section.find_class("counts")[0].iter("li")} == \
        {"new": 0, "known": 0, "fixed": 0, "flaky": 0}
    assert not doc.find_class("trend") and not doc.find_class("spark")  # one run: nothing to draw
    assert "What changed" not in report.render(tonight, "html")  # a plain report has no such section


def test_html_long_groups_fold_and_are_capped_new_failures_never_fold():
    def entry(i):
        return {"scenario": f"s{i}", "format": "keras", "environment": "cpu", "old_verdict": "mismatch",
                "new_verdict": "mismatch"}

    many = history.LIST_LIMIT + 5
    changes = history.Changes(newly_failing=[entry(i) for i in range(many)], known_failing=[entry(i) for i in range(many)],
                              fixed=[entry(0)], previous_run={"run_id": "run-0", "date": None})
    section = html_doc(verdict_table(), changes=changes).get_element_by_id("changes")
    groups = {d.get("data-kind"): d for d in section.iter("details")}
    assert groups["new"].get("open") is not None and groups["fixed"].get("open") is not None
    assert groups["known"].get("open") is None  # more than report._GROUP_OPEN cells: one click away, counted above
    for kind in ("new", "known"):
        rows = list(groups[kind].find(".//tbody").iter("tr"))
        assert len(rows) == history.LIST_LIMIT + 1 and rows[-1].text_content() == "… and 5 more (see the matrix)"
        assert all(len(row) == 3 and row[2].text_content() == "no history" for row in rows[:-1])  # diff_runs: no streak
    assert "previous run run-0 (date unknown)" in section.text_content()
