"""``repeats``: every cell replayed N times in N worker processes, one row, ``flaky`` and the spread.

The pure parts first (digests, the spread, how N results become one row, who
passes, reports, the history's verdict on a flaky cell), then real sweeps on
an embedded Ray with ``tests/scenarios/noisy.py``: ``test-noisy`` adds
unseeded noise at inference, ``test-steady`` is the same network without it.
A sweep with ``repeats: 3`` must call the first flaky with a spread above 0
and the second steady with a spread of 0, each from three different pids;
``harness nightly`` must count the flaky cell as flaky, not as a new failure,
and exit 0.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from conftest_report_helpers import NIGHT_ONE, make_row
from harness import arrays, history, report, results
from harness.records import Cell, CellResult
from harness.repeats import combine, output_spread, pids, spread_ulp
from harness.spec import parse_sweep
from harness.sweep import Collector, run_sweep

etree = pytest.importorskip("lxml.etree")
XSD = Path(__file__).parent / "data" / "junit.xsd"
TESTS = Path(__file__).resolve().parent

FLOATS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


# -- digests and the spread ------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(FLOATS, FLOATS)
def test_equal_digests_mean_identical_bits(a, b):
    same_bits = a.shape == b.shape and a.tobytes() == b.tobytes()
    assert (arrays.digest(a) == arrays.digest(b)) == same_bits
    assert arrays.digest(a) == arrays.digest(a.copy())


def test_digests_tell_signed_zeros_dtypes_shapes_and_strings_apart():
    z = np.zeros(3, np.float32)
    assert arrays.digest(z) != arrays.digest(-z)  # equal numbers, different bits
    assert arrays.digest(z) != arrays.digest(z.astype(np.float64))
    assert arrays.digest(z) != arrays.digest(z.reshape(3, 1))
    words = np.array([b"ab", b"c"], object)
    assert arrays.digest(words) == arrays.digest(np.array([b"ab", b"c"], object))
    assert arrays.digest(words) != arrays.digest(np.array([b"a", b"bc"], object))  # length-prefixed
    assert arrays.digest(words) != arrays.digest(np.array(["ab", "c"], object))


@settings(max_examples=200, deadline=None)
@given(FLOATS, st.data())
def test_spread_is_zero_for_the_same_bits_symmetric_and_the_worst_pair(a, data):
    b = a.copy()
    flip = data.draw(st.lists(st.integers(0, a.size - 1), max_size=3, unique=True)) if a.size else []
    flat = b.reshape(-1)
    for i in flip:  # the next float up: one ULP (from -0.0 that is +0.0 first, two: the harness counts -0 and +0 apart)
        if np.isfinite(flat[i]):
            with np.errstate(over="ignore"):  # the largest float steps up to inf: one ULP too
                flat[i] = np.float32(0.0) if flat[i] == 0 and np.signbit(flat[i]) else \
                    np.nextafter(flat[i], np.float32(np.inf))
    c = a.copy()
    assert output_spread(a, a) == 0.0 and spread_ulp([{"y": a}, {"y": a.copy()}]) == 0.0
    assert output_spread(a, b) == output_spread(b, a)
    assert (output_spread(a, b) == 0.0) == (a.tobytes() == b.tobytes())
    if a.tobytes() != b.tobytes() and not np.isnan(a).any():
        assert output_spread(a, b) == 1.0  # one step up, at most, per element
    three = spread_ulp([{"y": a}, {"y": b}, {"y": c}])
    assert three == max(output_spread(a, b), output_spread(b, c), output_spread(a, c))


def test_a_difference_ulps_cannot_measure_is_an_infinite_spread():
    a = np.zeros((2, 2), np.float32)
    assert output_spread(a, a.reshape(4)) == math.inf
    assert output_spread(a, a.astype(np.float64)) == math.inf
    assert output_spread(np.array([b"x"], object), np.array([b"y"], object)) == math.inf
    assert output_spread(np.array([b"x"], object), np.array([b"x"], object)) == 0.0
    assert output_spread(np.array([np.nan], np.float32), np.array([1.0], np.float32)) == math.inf
    assert output_spread(np.array([3], np.int64), np.array([5], np.int64)) == 2.0
    assert spread_ulp([{"y": a}, {"z": a}]) == math.inf


# -- N results, one row ----------------------------------------------------------------------------
def part(tmp_path: Path, repeat: int, outputs: dict | None, verdict: str = "bitwise", *, pid: int = 100,
         error: str | None = None, attempts: int | None = 1, **fields) -> CellResult:
    """One repeat's result as a worker returns it (JSON columns as text), its outputs written like replay's."""
    uri = None
    detail = {"outputs": [], "batch_size": 32}
    if outputs is not None:
        uri = str(tmp_path / f"obs-{repeat}.arrow")
        Path(uri).write_bytes(arrays.to_ipc_bytes(outputs))
        detail["outputs_sha256"] = {k: arrays.digest(v) for k, v in outputs.items()}
    return CellResult(scenario="s", format="keras", environment="e", verdict=verdict, error=error,
                      fingerprint=json.dumps({"pid": pid + repeat}), detail=json.dumps(detail), node_id="n1",
                      observation_uri=uri, attempts=attempts, max_ulp_diff=0.0 if outputs is not None else None,
                      **fields)


def test_repeats_that_agree_are_not_flaky_and_nothing_is_read_back(tmp_path):
    y = {"y": np.arange(6, dtype=np.float32)}
    parts = [part(tmp_path, r, y) for r in range(3)]
    row = combine(parts, read=lambda uri: pytest.fail("agreeing repeats need no reading"))
    assert (row.flaky, row.repeat_spread_ulp, row.repeats, row.verdict) == (False, 0.0, 3, "bitwise")
    assert pids(row) == [100, 101, 102] and row.fingerprint == parts[0].fingerprint
    assert [e["repeat"] for e in row.detail["repeats"]] == [1, 2, 3] and row.detail["batch_size"] == 32


def test_repeats_that_disagree_are_flaky_with_the_largest_distance_between_any_two(tmp_path):
    y = np.ones(4, np.float32)
    far = y.copy()
    far[2] = np.nextafter(np.nextafter(far[2], np.float32(2)), np.float32(2))  # 2 ULP from the first
    near = y.copy()
    near[0] = np.nextafter(near[0], np.float32(0))  # 1 ULP the other way: 3 from `far` at no single element
    parts = [part(tmp_path, 0, {"y": y}), part(tmp_path, 1, {"y": near}, "within_tolerance"),
             part(tmp_path, 2, {"y": far}, "within_tolerance")]
    row = combine(parts)
    assert row.flaky is True and row.repeat_spread_ulp == 2.0 and row.verdict == "bitwise"  # the first repeat's
    assert [e["verdict"] for e in row.detail["repeats"]] == ["bitwise", "within_tolerance", "within_tolerance"]


def test_a_repeat_that_could_not_run_is_never_dropped(tmp_path):
    y = {"y": np.zeros(2, np.float32)}
    parts = [part(tmp_path, 0, y), part(tmp_path, 1, None, "error", error="ActorDiedError: OOM"),
             part(tmp_path, 2, y)]
    row = combine(parts)
    assert row.verdict == "error" and row.error == "repeat 2 of 3: error: ActorDiedError: OOM"
    assert row.flaky is False and row.repeat_spread_ulp == 0.0  # the two that ran agree
    both = combine([part(tmp_path, 0, y), *(part(tmp_path, r, None, "unschedulable", error="no node",
                                                  attempts=None) for r in (1, 2))])
    assert both.verdict == "unschedulable" and both.error == "repeats 2, 3 of 3: unschedulable: no node"
    assert both.repeats == 1 and both.flaky is None and both.repeat_spread_ulp is None  # one produced outputs
    same = combine([part(tmp_path, r, None, "error", error="no artifact", attempts=None) for r in range(2)])
    assert same.error == "no artifact" and same.repeats == 0  # the same reason is said once


def test_a_spread_that_cannot_be_read_back_is_unknown_and_says_why(tmp_path):
    parts = [part(tmp_path, 0, {"y": np.zeros(2, np.float32)}), part(tmp_path, 1, {"y": np.ones(2, np.float32)})]
    Path(parts[1].observation_uri).unlink()
    row = combine(parts)
    assert row.flaky is True and row.repeat_spread_ulp is None
    assert "could not be read back" in row.detail["repeat_spread_note"]


def test_a_flaky_cell_fails_when_one_repeat_misses_the_expectation(tmp_path):
    sweep = parse_sweep({"name": "r", "scenarios": ["s"], "repeats": 2, "expect": "bitwise",
                         "environments": {"e": {}, "f": {}}}, source="r.yaml")
    y = np.zeros(2, np.float32)
    rows = {}
    with results.Journal(tmp_path / "run") as journal:
        sink = Collector(sweep, "run-1", journal, total=2, progress=lambda d, n, r: rows.setdefault(r.environment, r))
        for env, second, verdict in (("e", y + 1, "mismatch"), ("f", y, "bitwise")):
            (tmp_path / env).mkdir()
            parts = [part(tmp_path / env, 0, {"y": y}), part(tmp_path / env, 1, {"y": second}, verdict)]
            sink.add(Cell("s", "keras", env), parts[0], attempts=2, repeats=parts)
    flaky, steady = rows["e"], rows["f"]
    assert (flaky.verdict, flaky.flaky, flaky.passed) == ("bitwise", True, False)  # its second repeat missed
    assert (steady.verdict, steady.flaky, steady.passed, steady.repeats) == ("bitwise", False, True, 2)
    assert report.failure_mark(flaky) == "✗"  # not "save✗": the save round trip is not what failed
    table = results.Journal.table(tmp_path / "run")
    assert table.column("flaky").to_pylist() == [True, False] and table.column("attempts").to_pylist() == [2, 2]


# -- reports ---------------------------------------------------------------------------------------
def flaky_table():
    detail = {"outputs": {}, "repeats": [{"repeat": i, "pid": 300 + i, "verdict": "mismatch"} for i in (1, 2, 3)]}
    rows = [make_row("mismatch", "noisy", "keras", "cpu-avx512", expected="bitwise", repeats=3, flaky=True,
                     repeat_spread_ulp=5.0, detail=detail, attempts=3),
            make_row("bitwise", "steady", "keras", "cpu-avx512", expected="bitwise", repeats=3, flaky=False,
                     repeat_spread_ulp=0.0, attempts=3,
                     detail={"repeats": [{"repeat": i, "pid": 300 + i} for i in (1, 2, 3)]}),
            make_row("bitwise", "plain", "keras", "cpu-avx512", expected="bitwise", repeats=1)]
    return results.to_table(rows)


def test_console_and_markdown_tag_a_flaky_cell_and_count_it():
    table = flaky_table()
    text = report.matrix_text(table)
    noisy = next(line for line in text.splitlines() if line.startswith("noisy/keras"))
    assert "MISMATCH 5ulp" not in noisy and " flaky ✗" in noisy  # its own ULP vs the reference, then the tag
    assert "1 of 2 repeated cells flaky" in text and "flaky = its repeats disagree bitwise" in text
    steady = next(line for line in text.splitlines() if line.startswith("steady/keras"))
    assert "flaky" not in steady
    md = report.render(table, "md")
    assert "**mismatch (2.1e+03 ulp, 0.034) flaky** ✗" in md
    section = md.split("## Flaky cells", 1)[1].split("##", 1)[0]
    assert "`noisy/keras` @ `cpu-avx512`: 3 repeat(s) in 3 process(es) (pids 301, 302, 303): FLAKY, their " \
           "outputs up to 5 ulp apart (never counted as a regression)" in section
    assert "steady" not in section
    assert "- repeats: 3 repeat(s) in 3 process(es) (pids 301, 302, 303): FLAKY" in md  # the failure's facts
    plain = results.to_table([make_row("bitwise", repeats=1)])
    assert "flaky" not in report.matrix_text(plain).split("legend:")[0] and "## Flaky" not in report.render(plain, "md")


def test_junit_marks_a_repeated_cell_with_properties_and_a_flaky_failure_says_so():
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    root = etree.fromstring(report.render(flaky_table(), "junit").encode())
    schema.assertValid(root)
    cases = {c.get("classname"): c for c in root.iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases["noisy.keras"].find("properties")}
    assert props == {"flaky": "true", "repeats": "3", "repeat_spread_ulp": "5"}
    failure = cases["noisy.keras"].find("failure")
    assert failure.get("message").startswith("flaky (its 3 repeats disagree bitwise, up to 5 ulp apart): mismatch")
    assert {p.get("name"): p.get("value") for p in cases["steady.keras"].find("properties")}["flaky"] == "false"
    assert cases["plain.keras"].find("properties") is None  # not repeated: nothing to say
    # repeated, but only one repeat produced outputs: how many ran, and no flaky to claim either way
    lone = results.to_table([make_row("error", "lone", repeats=2, flaky=None, attempts=3)])
    root = etree.fromstring(report.render(lone, "junit").encode())
    schema.assertValid(root)
    assert {p.get("name"): p.get("value") for p in root.find(".//testcase/properties")} == {"repeats": "2"}


def test_json_summary_counts_and_html_mark_flaky_cells():
    table = flaky_table()
    doc = json.loads(report.render(table, "json"))
    assert (doc["summary"]["flaky"], doc["summary"]["repeated"]) == (1, 2)
    assert [c["flaky"] for c in doc["cells"]] == [True, False, None]
    page = report.render(table, "html")
    lxml_html = pytest.importorskip("lxml.html")
    tree = lxml_html.fromstring(page)
    cells = tree.xpath("//td[contains(concat(' ', @class, ' '), ' flaky ')]")
    assert [c.get("data-scenario") for c in cells] == ["noisy"]
    assert "flaky: its repeats disagree bitwise" in cells[0].get("title")
    assert "301, 302, 303" in cells[0].xpath("string(.//details)")  # the detail panel names the pids
    assert tree.xpath("//*[contains(@class, 'flaky-mark')]"), "the legend explains the mark"


# -- history: a flaky cell is never a regression ---------------------------------------------------
def test_a_flaky_cell_tonight_is_flaky_not_a_new_failure_and_old_histories_read_as_not_flaky(tmp_path):
    hist = tmp_path / "history"
    night1 = results.to_table([make_row("bitwise", "noisy", expected="bitwise", run_id="run-1")])
    old = night1.drop_columns(["repeats", "flaky", "repeat_spread_ulp"])  # written before the columns existed
    (hist / "date=2025-03-01").mkdir(parents=True)
    pq.write_table(old, hist / "date=2025-03-01" / "run-1.parquet")
    tonight = results.to_table([make_row("mismatch", "noisy", expected="bitwise", run_id="run-2", repeats=3,
                                         flaky=True, repeat_spread_ulp=7.0, started_at=NIGHT_ONE + dt.timedelta(days=1))])
    assert tonight.column("passed").to_pylist() == [False]  # it failed its expectation...
    history.append_run(tonight, str(hist))
    past = history.History.open(str(hist))
    assert past.read(["run_id", "flaky"]).sort_by("run_id").column("flaky").to_pylist() == [None, True]
    changes = history.compare(past, tonight)
    assert changes.counts == {"new": 0, "known": 0, "fixed": 0, "flaky": 1} and not changes.regressed  # ...flaky
    assert "Flaky (repeats disagree; not a regression)" in history.render_changes_md(changes)


# -- a real sweep on an embedded Ray ---------------------------------------------------------------
SWEEP = {
    "name": "repeats-e2e", "scenarios": ["test-noisy", "test-steady"], "formats": ["keras"],
    "repeats": 3, "expect": "any", "expect_save": "any",  # the noise misses any stricter expectation, by design
    # cpu-once runs once, on the first repeat's warm worker (the same process settings as cpu-default)
    "environments": {"cpu-default": {}, "cpu-once": {"repeats": 1}},
    "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180},
}


def _sweep(doc: dict, **changes):
    return parse_sweep(yaml.safe_load(yaml.safe_dump({**doc, **changes})), source=f"{doc['name']}.yaml")


@pytest.fixture(scope="module")
def repeated(scenarios, store, tmp_path_factory):
    """``SWEEP`` run once through the engine on an embedded Ray (started and stopped by ``run_sweep``)."""
    out = tmp_path_factory.mktemp("repeated")
    res = run_sweep(_sweep(SWEEP), scenarios, out_dir=out, storage=store)
    return res, {(r.scenario, r.environment): r for r in results.cells(res.table)}


def test_the_noisy_cell_is_flaky_with_a_spread_from_three_processes(repeated):
    res, rows = repeated
    assert res.table.num_rows == 4 and not res.harness_failures
    noisy = rows[("test-noisy", "cpu-default")]
    assert (noisy.repeats, noisy.flaky, noisy.attempts) == (3, True, 3), noisy.error
    assert noisy.repeat_spread_ulp > 0 and math.isfinite(noisy.repeat_spread_ulp)
    assert noisy.verdict == "mismatch" and noisy.passed  # its first repeat against the reference; `any` accepts it
    entries = noisy.detail["repeats"]
    assert [e["verdict"] for e in entries] == ["mismatch"] * 3
    assert len(set(pids(noisy))) == 3 and None not in pids(noisy)  # three different worker processes
    assert noisy.fingerprint["pid"] == pids(noisy)[0]  # the row is the first repeat's
    assert len({json.dumps(e["outputs_sha256"]) for e in entries}) == 3


def test_the_steady_cell_agrees_bit_for_bit_in_three_processes(repeated):
    _, rows = repeated
    steady = rows[("test-steady", "cpu-default")]
    assert (steady.verdict, steady.repeats, steady.flaky, steady.repeat_spread_ulp) == ("bitwise", 3, False, 0.0)
    assert len(set(pids(steady))) == 3 and steady.passed
    # repeat r of every cell ran on the r-th slot's one warm worker: the same three pids for both cells
    assert pids(steady) == pids(rows[("test-noisy", "cpu-default")])


def test_an_environment_with_repeats_1_runs_its_cells_once(repeated):
    _, rows = repeated
    for scenario in ("test-noisy", "test-steady"):
        once = rows[(scenario, "cpu-once")]
        assert (once.repeats, once.flaky, once.repeat_spread_ulp, once.attempts) == (1, None, None, 1)
        assert "repeats" not in once.detail
        # it shares the first repeat's worker (same process settings): one TensorFlow import for both
        assert once.fingerprint["pid"] == pids(rows[(scenario, "cpu-default")])[0]


def test_each_repeat_stores_its_own_outputs_and_the_spread_is_theirs(repeated, store):
    res, rows = repeated
    noisy = rows[("test-noisy", "cpu-default")]
    base = Path(store) / "runs" / res.run_id / "observations" / "test-noisy" / "keras"
    files = [base / "cpu-default.arrow", base / "cpu-default.repeat-2.arrow", base / "cpu-default.repeat-3.arrow"]
    outputs = [arrays.read_ipc(str(f))[0] for f in files]
    assert spread_ulp(outputs) == noisy.repeat_spread_ulp
    assert noisy.observation_uri.endswith("cpu-default.arrow")
    assert [e["outputs_sha256"] for e in noisy.detail["repeats"]] == \
        [{k: arrays.digest(v) for k, v in o.items()} for o in outputs]


def test_reports_of_the_run_show_the_flaky_cell(repeated):
    res, _ = repeated
    text = report.matrix_text(res.table)
    assert "1 of 2 repeated cells flaky" in text
    (noisy,) = [line for line in text.splitlines() if line.startswith("test-noisy/keras")]
    assert " flaky" in noisy
    (steady,) = [line for line in text.splitlines() if line.startswith("test-steady/keras")]
    assert "flaky" not in steady


def test_inline_repeats_run_in_this_one_process(repeated, scenarios, store, tmp_path):
    """--inline: the repeats run one after another here (the pids say so); unseeded noise still shows."""
    import os

    doc = {**SWEEP, "repeats": 2, "environments": {"cpu-default": {}}}
    res = run_sweep(_sweep(doc), scenarios, out_dir=tmp_path / "run", storage=store, inline=True)
    rows = {r.scenario: r for r in results.cells(res.table)}
    assert pids(rows["test-noisy"]) == pids(rows["test-steady"]) == [os.getpid()] * 2
    assert (rows["test-noisy"].flaky, rows["test-steady"].flaky) == (True, False)
    assert rows["test-steady"].repeat_spread_ulp == 0.0 and rows["test-noisy"].repeat_spread_ulp > 0


def test_nightly_counts_a_flaky_cell_as_flaky_never_as_a_new_failure(repeated, store, tmp_path):
    """Last night the noisy cell passed (``expect: any``); tonight it is judged ``bitwise`` and fails,
    but its repeats disagree: flaky, not a regression, exit 0."""
    from test_cli import RUN_TIMEOUT, explain, run_cli, write_sweep

    res, _ = repeated
    hist = tmp_path / "history"
    history.append_run(res.table, str(hist))  # last night, as `harness nightly` appends a run
    # (two repeats tonight: enough to disagree, one TensorFlow worker fewer than three)
    doc = {**SWEEP, "repeats": 2, "expect": "bitwise", "storage": str(store), "scenario_paths": [str(TESTS / "scenarios")]}
    sweep = write_sweep(tmp_path, "repeats-e2e.yaml", doc)
    out = tmp_path / "tonight"
    proc = run_cli("nightly", sweep, "--history", hist, "--out", out, "--only", "cpu-default", cwd=tmp_path,
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    assert "**0 new failure(s), 0 known failure(s), 0 fixed, 1 flaky**" in proc.stdout, explain(proc)
    assert "Regressed: **no**" in proc.stdout
    flaky_section = proc.stdout.split("Flaky (repeats disagree; not a regression)", 1)[1]
    assert "`test-noisy/keras` @ `cpu-default`" in flaky_section.split("\n\n", 2)[1]
    assert "FLAKY (2 repeats disagree" in proc.stderr  # the progress line
    rows = {r["scenario"]: r for r in results.read_table(out).to_pylist()}
    assert (rows["test-noisy"]["passed"], rows["test-noisy"]["flaky"]) == (False, True)
    assert (rows["test-steady"]["passed"], rows["test-steady"]["flaky"]) == (True, False)
    doc = json.loads((out / "report.json").read_text())
    assert doc["changes"]["counts"] == {"new": 0, "known": 0, "fixed": 0, "flaky": 1}
    assert (doc["summary"]["flaky"], doc["summary"]["repeated"]) == (1, 2)
    root = etree.parse(str(out / "report.xml")).getroot()
    etree.XMLSchema(etree.parse(str(XSD))).assertValid(root)
    (case,) = [c for c in root.iter("testcase") if c.get("classname") == "test-noisy.keras"]
    assert {p.get("name"): p.get("value") for p in case.find("properties")}["flaky"] == "true"
    assert case.find("failure").get("message").startswith("flaky (its 2 repeats disagree bitwise")
