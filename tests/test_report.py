"""Tests of harness.report: console matrix, Markdown, HTML, JUnit XML, JSON, write_all."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest_report_helpers import NIGHT_ONE, make_row, verdict_rows, verdict_table
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
    for expected in ("bitwise", "tol 14ulp", "tol 14ulp ✗", "MISMATCH 2.1e+03ulp ✗", "ERROR ✗", "CORRUPT ✗", "UNSCHED ✗"):
        assert expected in text
    assert "✓" not in text
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
    assert len(report.matrix_text(big).splitlines()) == 2 + 40 + 2  # header, rows, summary, legend


# -- Markdown ------------------------------------------------------------------------
def test_markdown_cells_and_failure_sections(table):
    md = report.render(table, "md")
    assert md.startswith("# Reproducibility report: nightly\n")
    assert "Run: `run-1`" in md
    assert "| mlp/keras | bitwise | within_tolerance (14 ulp, 1.2e-06) | **mismatch (2.1e+03 ulp, 0.034)** ✗ |" in md
    assert "| cnn/savedmodel | **error** ✗ | **corrupt** ✗ | **unschedulable** ✗ |" in md
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


# -- JSON ----------------------------------------------------------------------------
def test_json_round_trip_decodes_columns_and_nulls_non_finite_floats():
    rows = verdict_rows()
    rows[3].update(max_ulp_diff=math.nan, max_abs_diff=math.inf, detail={"outputs": {"y": {"max_abs_diff": math.nan}}})
    text = report.render(results.to_table(rows), "json")
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert doc["run_ids"] == ["run-1"] and doc["changes"] is None
    assert doc["summary"] == {"cells": 8, "passed": 3, "failed": 5, "not_judged": 0,
                              "verdicts": {"bitwise": 2, "within_tolerance": 2, "mismatch": 1, "corrupt": 1,
                                           "error": 1, "unschedulable": 1}}
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


def test_html_sparkline_per_cell_with_history(table):
    doc = html_doc(table, history=_history_of(table))
    cells = doc.find_class("cell")
    assert all(len(c.find_class("spark")) == 1 for c in cells)
    assert all(len(c.find_class("spark")[0].findall(".//circle")) == 4 for c in cells)  # 3 old runs + this one
    assert not html_doc(table).find_class("spark")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_in_headless_chromium(table, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report.render(table, "html", history=_history_of(table)), encoding="utf-8")
    png = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]
    subprocess.run([*common, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=60, check=True)
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert png.exists() and png.stat().st_size > 20_000
    assert '<table id="matrix">' in dom
    assert dom.count('class="cell ') == 8


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
