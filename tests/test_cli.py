"""The ``harness`` command line end to end, in subprocesses.

Real TensorFlow and a real embedded Ray (the CLI's default ``--address local``
starts its own in each subprocess). Sweeps are kept small (one scenario, one
or two formats, one to three environments) and written into tmp dirs, each
with its own ``storage:``; runs of ``seed-linear-regression`` share one
module-wide store, so it is trained once (artifacts are content-addressed).

Covered: ``run`` (exit 0 and 1, matrix, progress lines, results.parquet,
report.md; ``--inline``; a user scenario directory outside the repo),
invalid input (exit 2, one ``harness: error:`` line, no traceback, nothing
written), ``validate`` and ``scenarios`` on the shipped files, ``report`` in
every format, ``nightly`` three times (a new failure, then a known one, a damaged
history file, ``--keep-days``), and ``history`` (``--cell`` with its first bad run, retention).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from lxml import html as lxml_html

from harness import results

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "scenarios" / "sweeps"
ARTICLE = ("seed-binary-classifier", "seed-linear-regression", "seed-dense-regression")
TEST_SCENARIOS = ("test-batch-nudge", "test-mlp", "test-multi-io", "test-tf-module", "test-slow-build", "test-labelled",
                  "test-noisy", "test-steady")

# Seconds: a Ray run trains (once per store), starts a TF worker per environment and replays.
RUN_TIMEOUT = 300
QUICK_TIMEOUT = 60

PROGRESS_RE = re.compile(r"^\[\s*(\d+)/(\d+)\] (\S+)/(\S+) @ (\S+): (\w+)(.*)$")


# -- helpers ---------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES="": the embedded Ray and TensorFlow see no GPU even on a
    # machine that has one, so "no node has a GPU" holds wherever the suite runs.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster: --address local starts our own
    return env


def run_cli(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
            timeout: float = QUICK_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m harness.cli ARGS`` in a subprocess; text output captured."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_sweep(directory: Path, name: str, doc: dict) -> Path:
    """Write ``doc`` as ``directory/name`` (YAML) and return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def linear_sweep(name: str, storage: str | os.PathLike, environments: dict, formats=("keras",)) -> dict:
    return {"name": name, "storage": str(storage), "scenarios": ["seed-linear-regression"],
            "formats": list(formats), "environments": environments,
            "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180}}


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def progress(stderr: str) -> dict[tuple[str, str, str], re.Match]:
    """Progress lines ``[i/n] scenario/format @ environment: verdict ...`` by cell."""
    found = {}
    for line in stderr.splitlines():
        m = PROGRESS_RE.match(line)
        if m:
            key = (m.group(3), m.group(4), m.group(5))
            assert key not in found, f"two progress lines for {key}:\n{stderr}"
            found[key] = m
    return found


def rows_by_cell(run_dir: Path) -> dict[tuple[str, str, str], dict]:
    table = results.read_table(run_dir)
    return {(r["scenario"], r["format"], r["environment"]): r for r in table.to_pylist()}


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one stderr line ``harness: error: ...`` containing every fragment, no traceback."""
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, explain(proc)
    line = lines[0]
    assert line.startswith("harness: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# -- fixtures --------------------------------------------------------------------------------
# `store` (conftest): storage shared by every seed-linear-regression sweep of this module.

GOOD_ENVS = {"cpu-default": {"expect": "bitwise"}, "cpu-single-thread": {"threads": 1}}


@pytest.fixture(scope="module")
def good_run(store, tmp_path_factory):
    """``harness run`` of 1 scenario x 2 formats x 2 environments, every expectation met."""
    work = tmp_path_factory.mktemp("good")
    sweep = write_sweep(work, "good.yaml", linear_sweep("cli-good", store, GOOD_ENVS, formats=("keras", "h5")))
    out = work / "run"
    proc = run_cli("run", sweep, "--out", out, cwd=work, timeout=RUN_TIMEOUT)
    return proc, out


FAILING_DOC = {
    "name": "cli-failing", "scenarios": ["seed-binary-classifier"], "formats": ["keras"],
    "environments": {
        # Informative: XLA usually moves the last bits of this model's outputs (a few ULP).
        "cpu-xla": {"jit_compile": True, "expect": "bitwise"},
        # Deterministic: no GPU here, so the precheck makes it unschedulable, which fails any expectation.
        "needs-gpu": {"num_gpus": 1},
    },
    "timeouts": {"schedule_timeout_s": 60, "cell_timeout_s": 180},
}


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    work = tmp_path_factory.mktemp("failing")
    sweep = write_sweep(work, "failing.yaml", {**FAILING_DOC, "storage": str(work / "store")})
    out = work / "run"
    proc = run_cli("run", sweep, "--out", out, cwd=work, timeout=RUN_TIMEOUT)
    return proc, out, sweep, work


# -- 1. run: everything passes ---------------------------------------------------------------
def test_run_all_expectations_met(good_run):
    proc, out = good_run
    assert proc.returncode == 0, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    cells = {("seed-linear-regression", f, e) for f in ("keras", "h5") for e in GOOD_ENVS}

    # stdout: the matrix (rows scenario/format, columns environments), the summary, the paths.
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("scenario/format"))
    columns = header.split()
    # Rows and columns follow the sweep's own order, whatever order cells finished in.
    assert columns == ["scenario/format", "save", *GOOD_ENVS], header
    row_order = [line.split()[0] for line in lines if line.startswith("seed-linear-regression/")]
    assert row_order == ["seed-linear-regression/keras", "seed-linear-regression/h5"]
    for fmt in ("keras", "h5"):
        row = next(line for line in lines if line.startswith(f"seed-linear-regression/{fmt} "))
        assert row.split()[columns.index("cpu-default")] == "bitwise", row
    assert re.search(r"^4 cells: .*; 4 passed, 0 failed expectations$", proc.stdout, re.M), proc.stdout
    assert f"results: {out / 'results.parquet'}" in proc.stdout

    # stderr: the plan line, then one progress line per cell, numbered 1..4.
    assert "harness: sweep 'cli-good': 4 cells (1 scenarios x 2 formats x 2 environments)" in proc.stderr
    seen = progress(proc.stderr)
    assert set(seen) == cells, proc.stderr
    assert sorted(int(m.group(1)) for m in seen.values()) == [1, 2, 3, 4]
    assert {m.group(2) for m in seen.values()} == {"4"}
    for (_, _, env), m in seen.items():
        assert "✗" not in m.group(0), m.group(0)
        assert m.group(6) in (("bitwise",) if env == "cpu-default" else ("bitwise", "within_tolerance"))
    assert "[1/4] seed-linear-regression/" in proc.stderr

    # results.parquet: one row per cell, the results schema, one run.
    table = results.read_table(out)
    assert table.num_rows == 4
    assert table.schema.equals(results.SCHEMA)
    rows = rows_by_cell(out)
    assert set(rows) == cells
    assert all(r["passed"] for r in rows.values())
    assert {r["sweep"] for r in rows.values()} == {"cli-good"}
    assert len({r["run_id"] for r in rows.values()}) == 1
    for fmt in ("keras", "h5"):
        r = rows[("seed-linear-regression", fmt, "cpu-default")]
        assert (r["verdict"], r["expected"], r["weights_equal"], r["save_verdict"]) == ("bitwise", "bitwise", True, "bitwise")
        assert r["node_id"], r  # ran on a Ray worker
        single = json.loads(rows[("seed-linear-regression", fmt, "cpu-single-thread")]["fingerprint"])
        assert (single["intra_op_threads"], single["inter_op_threads"]) == (1, 1)
        assert single["env"]["TF_NUM_INTRAOP_THREADS"] == "1"
    report_md = (out / "report.md").read_text()
    assert "seed-linear-regression" in report_md and "4 passed, 0 failed expectations" in report_md


# -- 2. run: failing expectations -> exit 1 -------------------------------------------------------
def test_run_unschedulable_environment_fails_the_run(failing):
    proc, out, _, _ = failing
    assert proc.returncode == 1, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    gpu = rows_by_cell(out)[("seed-binary-classifier", "keras", "needs-gpu")]
    assert (gpu["verdict"], gpu["expected"], gpu["passed"]) == ("unschedulable", "tolerance", False)
    assert "GPU" in gpu["error"], gpu["error"]
    line = progress(proc.stderr)[("seed-binary-classifier", "keras", "needs-gpu")].group(0)
    assert ": unschedulable  ✗ expected tolerance -- " in line, line
    assert re.search(r"^2 cells: .*; \d passed, [12] failed expectations$", proc.stdout, re.M), proc.stdout


def test_run_xla_bitwise_expectation_is_judged_consistently(failing):
    proc, out, _, _ = failing
    xla = rows_by_cell(out)[("seed-binary-classifier", "keras", "cpu-xla")]
    assert xla["expected"] == "bitwise"
    assert xla["verdict"] in ("bitwise", "within_tolerance", "mismatch"), xla
    assert xla["passed"] is (xla["verdict"] == "bitwise")
    line = progress(proc.stderr)[("seed-binary-classifier", "keras", "cpu-xla")].group(0)
    if xla["passed"]:
        assert "✗" not in line, line
    else:
        assert line.endswith("  ✗ expected bitwise"), line
    if xla["verdict"] != "bitwise":  # the usual case on x86-64: a few ULP, shown in the progress line
        assert xla["max_ulp_diff"] > 0 and xla["mismatch_fraction"] > 0
        assert re.search(rf": {xla['verdict']} max [\d.e+-]+ ulp, [\d.e+-]+ abs(, [^✗]+)?  ✗ expected bitwise$", line), line


def test_run_exit_code_agrees_with_results(failing, tmp_path):
    """XLA alone (inline: jit_compile is a prediction-time knob): exit 0 iff every cell passed."""
    _, _, sweep, work = failing
    out = tmp_path / "xla-only"
    proc = run_cli("run", sweep, "--only", "cpu-xla", "--inline", "--out", out, cwd=work, timeout=RUN_TIMEOUT)
    assert proc.returncode in (0, 1), explain(proc)
    rows = rows_by_cell(out)
    assert set(rows) == {("seed-binary-classifier", "keras", "cpu-xla")}
    passed = all(r["passed"] for r in rows.values())
    assert proc.returncode == (0 if passed else 1), explain(proc)
    assert ("✗" in proc.stderr) is (not passed), proc.stderr


# -- 3. invalid input -> exit 2, one line, nothing written --------------------------------------
BASE = {"name": "bad", "scenarios": ["seed-linear-regression"], "formats": ["keras"],
        "environments": {"cpu": {}}}

INVALID = {
    # id: (sweep document, or raw YAML text; extra CLI args; fragments of the error line)
    "yaml-syntax": ("scenarios: [seed-linear-regression\nenvironments: {cpu: {}}\n", [],
                    ["bad.yaml", "invalid YAML at line 2"]),
    "top-level-typo": ({"scenarios": ["seed-linear-regression"], "enviroments": {"cpu": {}}}, [],
                       ["bad.yaml", "enviroments", "unknown field", "did you mean 'environments'?"]),
    "environment-field-typo": ({**BASE, "environments": {"cpu": {"thread": 1}}}, [],
                               ["bad.yaml", "environments.cpu.thread", "did you mean 'threads'?"]),
    "negative-atol": ({**BASE, "tolerance": {"atol": -1}}, [],
                      ["bad.yaml", "tolerance.atol", "expected a number >= 0, got -1"]),
    "rtol-not-a-number": ({**BASE, "environments": {"cpu": {"tolerance": {"rtol": "abc"}}}}, [],
                          ["bad.yaml", "environments.cpu.tolerance.rtol", "'abc'"]),
    "unknown-expectation": ({**BASE, "environments": {"cpu": {"expect": "bitwize"}}}, [],
                            ["bad.yaml", "environments.cpu.expect", "did you mean 'bitwise'?"]),
    "unknown-scenario": ({**BASE, "scenarios": ["seed-linear-regresion"]}, [],
                         ["bad.yaml", "scenarios", "unknown scenario 'seed-linear-regresion'",
                          "did you mean 'seed-linear-regression'?", "known: ", *sorted(ARTICLE)]),
    "unknown-format": ({**BASE, "formats": ["keras", "onnx"]}, [],
                       ["bad.yaml", "formats.1", "'onnx' is not one of keras, h5"]),
    "only-unknown-name": (BASE, ["--only", "nope"], ["bad.yaml", "--only", "'nope'"]),
    "scenarios-path-missing": (BASE, ["--scenarios-path", "no-such-dir"], ["no-such-dir", "scenarios-path"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_validate_rejects_invalid_input(case, tmp_path):
    doc, extra, fragments = INVALID[case]
    if isinstance(doc, str):
        (tmp_path / "bad.yaml").write_text(doc)
    else:
        write_sweep(tmp_path, "bad.yaml", doc)
    assert_one_line_error(run_cli("validate", "bad.yaml", *extra, cwd=tmp_path), *fragments)


def test_validate_missing_sweep_file(tmp_path):
    assert_one_line_error(run_cli("validate", "missing.yaml", cwd=tmp_path), "missing.yaml", "cannot read sweep file")


@pytest.mark.parametrize("body, fragment", [
    ("raise RuntimeError('boom while importing')", "line 2: RuntimeError: boom while importing"),
    ("import sys; sys.exit(0)", "line 2: it called sys.exit(0) at import"),
    ("raise SystemExit(3)", "line 2: it called sys.exit(3) at import"),
    ("raise KeyboardInterrupt", "line 2: KeyboardInterrupt raised at import"),
    ("raise BaseException('odd')", "line 2: BaseException: odd"),
], ids=["error", "sys-exit-0", "system-exit", "keyboard-interrupt", "base-exception"])
def test_scenario_module_that_raises_on_import(tmp_path, body, fragment):
    """Whatever a module raises at import -- even sys.exit(0) -- is exit 2 naming it, never a silent exit 0."""
    mods = tmp_path / "broken-scenarios"
    mods.mkdir()
    (mods / "broken.py").write_text(f"# a scenario module\n{body}\n")
    write_sweep(tmp_path, "bad.yaml", BASE)
    fragments = [str(mods / "broken.py"), "failed to import scenario module", fragment]
    assert_one_line_error(run_cli("validate", "bad.yaml", "--scenarios-path", mods, cwd=tmp_path), *fragments)
    assert_one_line_error(run_cli("scenarios", "--scenarios-path", mods, cwd=tmp_path), *fragments)
    assert_one_line_error(run_cli("run", "bad.yaml", "--scenarios-path", mods, "--out", tmp_path / "out",
                                  cwd=tmp_path), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("doc, extra, fragments", [
    ({**BASE, "environments": {"cpu": {"thread": 1}}}, [], ["bad.yaml", "environments.cpu.thread", "'threads'"]),
    (BASE, ["--only", "nope"], ["bad.yaml", "--only", "'nope'"]),
], ids=["environment-field-typo", "only-unknown-name"])
def test_run_rejects_invalid_input_before_writing_anything(doc, extra, fragments, tmp_path):
    write_sweep(tmp_path, "bad.yaml", {**doc, "storage": str(tmp_path / "store")})
    out = tmp_path / "run"
    proc = run_cli("run", "bad.yaml", "--out", out, *extra, cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert proc.stdout == ""
    assert not (out / "results.parquet").exists()
    assert not out.exists() and not (tmp_path / "store").exists()


# -- 4. validate / scenarios on the shipped files ------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart.yaml", "hardware-matrix.yaml"])
def test_validate_shipped_sweeps(name):
    path = SWEEPS / name
    doc = yaml.safe_load(path.read_text())
    cells = len(doc["scenarios"]) * len(doc["formats"]) * len(doc["environments"])
    proc = run_cli("validate", path.relative_to(REPO), cwd=REPO)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith(f"{path.relative_to(REPO)}: ok -- sweep {doc['name']!r}"), proc.stdout
    assert f"= {cells} cells" in proc.stdout, proc.stdout


def test_only_repeated_keeps_every_name():
    """``--only a b --only c`` means [a, b, c]: each dimension named is restricted to the names given."""
    path = (SWEEPS / "quickstart.yaml").relative_to(REPO)
    proc = run_cli("validate", path, "--only", "cpu-default", "--only", "cpu-xla", cwd=REPO)
    assert proc.returncode == 0, explain(proc)
    assert "= 18 cells" in proc.stdout, proc.stdout  # 3 scenarios x 3 formats x 2 environments
    proc = run_cli("validate", path, "--only", "cpu-default", "keras", "--only", "cpu-xla",
                   "--only", "seed-linear-regression", cwd=REPO)
    assert proc.returncode == 0, explain(proc)
    assert "= 2 cells" in proc.stdout, proc.stdout  # 1 scenario x 1 format x 2 environments


def test_scenarios_lists_article_and_test_scenarios():
    builtin = run_cli("scenarios", cwd=REPO)
    assert builtin.returncode == 0, explain(builtin)
    listed = {line.split()[0] for line in builtin.stdout.splitlines()[2:] if line.strip()}
    zoo = set(yaml.safe_load((REPO / "scenarios/sweeps/zoo.yaml").read_text())["scenarios"])
    assert len(zoo) >= 10 and listed == set(ARTICLE) | zoo, builtin.stdout
    assert "scenarios/article.py" in builtin.stdout and "scenarios/zoo/" in builtin.stdout

    extra = run_cli("scenarios", "--scenarios-path", "tests/scenarios", cwd=REPO)
    assert extra.returncode == 0, explain(extra)
    listed = {line.split()[0] for line in extra.stdout.splitlines()[2:] if line.strip()}
    assert listed == set(ARTICLE) | zoo | set(TEST_SCENARIOS), extra.stdout


# -- 5. a user scenario directory outside the repo, through Ray ------------------------------
USER_SCENARIO = '''
"""A user's scenario, not importable by name anywhere: Ray workers get it by value."""
import numpy as np

from harness import Scenario

HIDDEN = 4


def _layers(keras):
    return [keras.Input((3,)), keras.layers.Dense(HIDDEN, activation="tanh"), keras.layers.Dense(2)]


def build():
    import keras

    return keras.Sequential(_layers(keras))


def data(rng):
    x = rng.normal(size=(32, 3)).astype(np.float32)
    return x, np.stack([x.sum(axis=1), x[:, 0] - x[:, 1]], axis=1).astype(np.float32)


SCENARIO = Scenario(name="user-tiny-mlp", build=build, data=data,
                    probe=lambda rng: rng.normal(size=(16, 3)).astype(np.float32),
                    compile={"optimizer": "sgd", "loss": "mse"}, fit={"epochs": 2}, seed=7,
                    description="a user's 3-4-2 MLP")
'''


def test_user_scenario_directory_runs_on_ray_workers(tmp_path):
    user_dir = tmp_path / "my scenarios"  # outside the repo, no __init__.py, a space in the path
    user_dir.mkdir()
    (user_dir / "tiny_mlp.py").write_text(textwrap.dedent(USER_SCENARIO))
    sweep = write_sweep(tmp_path, "user.yaml", {
        "name": "cli-user", "storage": str(tmp_path / "store"), "scenarios": ["user-tiny-mlp"],
        "formats": ["keras"], "environments": {"cpu-default": {"expect": "bitwise"}},
        "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 180}})

    listed = run_cli("scenarios", "--scenarios-path", user_dir, cwd=tmp_path)
    assert listed.returncode == 0 and "user-tiny-mlp" in listed.stdout, explain(listed)
    assert_one_line_error(run_cli("validate", sweep, cwd=tmp_path), "unknown scenario 'user-tiny-mlp'")

    out = tmp_path / "run"
    proc = run_cli("run", sweep, "--scenarios-path", user_dir, "--out", out, cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    row = rows_by_cell(out)[("user-tiny-mlp", "keras", "cpu-default")]
    assert (row["verdict"], row["passed"], row["weights_equal"]) == ("bitwise", True, True), row
    assert row["node_id"], row
    assert "user-tiny-mlp/keras" in proc.stdout
    assert progress(proc.stderr)[("user-tiny-mlp", "keras", "cpu-default")].group(6) == "bitwise"


# -- 6. report ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["md", "html", "junit", "json"])
def test_report_formats(fmt, good_run, tmp_path):
    _, run_dir = good_run
    assert (run_dir / "results.parquet").exists(), "the good run did not write results"
    if fmt == "md":  # to stdout
        proc = run_cli("report", run_dir, cwd=tmp_path)
        assert proc.returncode == 0, explain(proc)
        text = proc.stdout
        assert "4 passed, 0 failed expectations" in text and "seed-linear-regression" in text
        assert "cpu-single-thread" in text
        return
    target = tmp_path / f"report.{fmt}"
    proc = run_cli("report", run_dir, "--format", fmt, "--out", target, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == ""
    assert f"wrote {target}" in proc.stderr
    text = target.read_text()
    if fmt == "html":
        assert text.lstrip().lower().startswith("<!doctype html")
        assert 'id="matrix"' in text and "cpu-single-thread" in text
    elif fmt == "junit":
        etree = pytest.importorskip("lxml.etree")
        schema = etree.XMLSchema(etree.parse(str(REPO / "tests" / "data" / "junit.xsd")))
        assert schema.validate(etree.fromstring(text.encode())), schema.error_log
        root = ET.fromstring(text.encode())
        cases = list(root.iter("testcase"))
        assert len(cases) == 4
        assert {(c.get("classname"), c.get("name")) for c in cases} == {
            (f"seed-linear-regression.{f}", e) for f in ("keras", "h5") for e in GOOD_ENVS}
        assert root.get("tests") == "4" and root.get("failures") == "0" and root.get("errors") == "0"
        assert not list(root.iter("failure")) and not list(root.iter("error"))
    else:
        doc = json.loads(text)
        assert doc["summary"]["cells"] == 4 and doc["summary"]["passed"] == 4
        assert len(doc["cells"]) == 4
        assert {e["name"] for e in doc["environments"]} == set(GOOD_ENVS)


def test_run_publishes_its_directory_to_storage_and_report_reads_it_there(good_run, store, tmp_path):
    proc, out = good_run
    found = re.search(r"^storage: (\S+)/runs/(\S+)$", proc.stdout, re.M)
    assert found and found.group(1) == store, proc.stdout
    run_id = found.group(2)
    published = Path(store) / "runs" / run_id
    assert {"results.parquet", "run.json", "report.md"} <= {p.name for p in published.iterdir()}
    assert (published / "report.md").read_text() == (out / "report.md").read_text()
    assert json.loads((published / "run.json").read_text())["run_id"] == run_id
    # Through the storage layer (a URI), as from a machine without the run directory.
    shown = run_cli("report", f"file://{published}", cwd=tmp_path)
    assert shown.returncode == 0, explain(shown)
    assert f"Run {run_id}" in shown.stdout and "4 passed, 0 failed expectations" in shown.stdout


def test_report_of_a_run_published_to_s3(good_run, s3_server, tmp_path, capsys):
    from harness.cli import main
    from harness.run import Run

    _, out = good_run
    s3_server.make_bucket("published")
    uri = s3_server.uri("published", "store")
    Run(tmp_path, "RUN-1", "good", "in memory", "", uri).publish(
        {"results.parquet": (out / "results.parquet").read_bytes()})
    base, query = uri.split("?", 1)
    assert main(["report", f"{base}/runs/RUN-1?{query}", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["cells"] == 4 and doc["summary"]["passed"] == 4
    assert main(["report", f"{base}/runs/RUN-2?{query}"]) == 2  # nothing published there: invalid input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://published/store/runs/RUN-2/results.parquet: no results here" in err[0], err


def test_report_without_results_is_invalid_input(tmp_path):
    (tmp_path / "empty-run").mkdir()
    assert_one_line_error(run_cli("report", "empty-run", cwd=tmp_path), "empty-run", "no results here")


# -- 7. nightly three times, then history ----------------------------------------------------
NIGHTLY_ENVS = {"cpu-default": {"expect": "bitwise"}, "cpu-single-thread": {"threads": 1}}
FAILING_CELL = "seed-linear-regression/keras/cpu-single-thread"
OLD_NIGHT = "2020-01-01"  # a partition for --keep-days to delete, with a damaged and a foreign file


def seed_history(hist: Path) -> dict[str, str]:
    """An old run of another sweep, a damaged file and a foreign Parquet file; {relative path: why skipped}."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest_report_helpers import make_row
    from harness import history

    old = make_row(run_id="old-run", sweep="cli-nightly-old",
                   started_at=dt.datetime.fromisoformat(f"{OLD_NIGHT}T02:00:00+00:00"))
    history.append_run(results.to_table([old]), str(hist))
    (hist / f"date={OLD_NIGHT}" / "broken.parquet").write_bytes(b"PAR1 a torn upload")
    (hist / "date=2020-01-02").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), hist / "date=2020-01-02" / "foreign.parquet")
    return {f"date={OLD_NIGHT}/broken.parquet": "unreadable", "date=2020-01-02/foreign.parquet": "no column 'run_id'"}


@pytest.fixture(scope="module")
def nights(store, tmp_path_factory):
    """Night 1 passes; nights 2 and 3 (same sweep name) ask cpu-single-thread for a GPU, so it fails:
    new on night 2, known on night 3 (which also applies --keep-days 30). The history starts with
    an old partition holding another sweep's run, a damaged file and a foreign one."""
    work = tmp_path_factory.mktemp("nightly")
    hist = work / "history"
    hist.mkdir()
    skipped = seed_history(hist)
    night1 = write_sweep(work / "n1", "nightly.yaml", linear_sweep("cli-nightly", store, NIGHTLY_ENVS))
    stricter = {**NIGHTLY_ENVS, "cpu-single-thread": {**NIGHTLY_ENVS["cpu-single-thread"], "num_gpus": 1}}
    night2 = write_sweep(work / "n2", "nightly.yaml", linear_sweep("cli-nightly", store, stricter))
    procs, outs = [], []
    for i, (sweep, extra) in enumerate(((night1, ()), (night2, ()), (night2, ("--keep-days", "30"))), 1):
        out = work / f"out{i}"
        procs.append(run_cli("nightly", sweep, "--history", hist, "--out", out, *extra, cwd=work,
                             timeout=RUN_TIMEOUT))
        outs.append(out)
    return procs, outs, hist, skipped


def run_ids_of(outs) -> list[str]:
    return [results.read_table(out).column("run_id")[0].as_py() for out in outs]


def test_nightly_flags_the_newly_failing_cell(nights):
    (p1, p2, _), (out1, out2, _), _, skipped = nights
    assert p1.returncode == 0, explain(p1)
    assert all(r["passed"] for r in rows_by_cell(out1).values())
    assert "Regressed: **no**" in p1.stdout

    assert p2.returncode == 1, explain(p2)
    assert "Traceback" not in p2.stderr, explain(p2)
    rows = rows_by_cell(out2)
    bad = rows[("seed-linear-regression", "keras", "cpu-single-thread")]
    assert (bad["verdict"], bad["passed"]) == ("unschedulable", False)
    assert rows[("seed-linear-regression", "keras", "cpu-default")]["passed"] is True
    assert "Regressed: **yes**" in p2.stdout
    assert "**1 new failure(s), 0 known failure(s), 0 fixed, 0 flaky**" in p2.stdout
    run1, run2 = run_ids_of((out1, out2))
    section = p2.stdout.split("**New failures** (1):", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    assert len(section) == 1, p2.stdout
    assert re.fullmatch(rf"- `seed-linear-regression/keras` @ `cpu-single-thread`: "
                        rf"(bitwise|within_tolerance) -> unschedulable; first bad: `{run2}` \(\d{{4}}-\d\d-\d\d\), "
                        rf"failing 1 run\(s\); last good: `{run1}` \(\d{{4}}-\d\d-\d\d\); "
                        rf"since then: fingerprints not comparable \(the cell did not run\)", section[0]), p2.stdout


def test_nightly_reports_and_skips_damaged_history_files(nights):
    procs, outs, _, skipped = nights
    for proc, out in zip(procs, outs):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("harness: warning: history file")]
        assert len(warnings) == len(skipped), explain(proc)
        for rel, why in skipped.items():
            assert any(rel in w and why in w and "skipped" in w for w in warnings), explain(proc)
        report = (out / "report.md").read_text()
        assert f"**Skipped history files** ({len(skipped)}):" in report
        assert report.index("## What changed") < report.index("## Matrix")  # the report opens with it


def test_nightly_known_failure_first_bad_and_retention(nights):
    (_, _, p3), outs, hist, _ = nights
    run1, run2, run3 = run_ids_of(outs)
    assert p3.returncode == 0, explain(p3)  # a known failure is not a regression
    assert "Regressed: **no**" in p3.stdout
    assert "**0 new failure(s), 1 known failure(s), 0 fixed, 0 flaky**" in p3.stdout
    line = p3.stdout.split("**Known failures** (1):", 1)[1].strip().splitlines()[0]
    assert f"first bad: `{run2}`" in line and "failing 2 run(s)" in line and f"last good: `{run1}`" in line, line
    doc = json.loads((outs[2] / "report.json").read_text())
    assert doc["changes"]["counts"] == {"new": 0, "known": 1, "fixed": 0, "flaky": 0}
    (known,) = doc["changes"]["known_failing"]
    assert (known["first_bad"]["run_id"], known["last_good"]["run_id"]) == (run2, run1)
    assert doc["changes"]["previous_run"]["run_id"] == run2
    assert [n["run_id"] for n in doc["changes"]["nights"]] == [run1, run2, run3]
    assert [n["failed"] for n in doc["changes"]["nights"]] == [0, 1, 1]
    page = lxml_html.document_fromstring((outs[2] / "report.html").read_text())  # the HTML opens with the same
    assert page.body.find(".//h2").text_content() == "What changed"
    section = page.get_element_by_id("changes")
    assert {li.get("data-kind"): int(li.get("data-count"))
            for li in section.find_class("counts")[0].iter("li")} == doc["changes"]["counts"]
    (row,) = section.find(".//table[@data-kind='known']/tbody").iter("tr")
    assert run2 in row[2].text_content() and row[3].text_content() == "2" and run1 in row[4].text_content()
    assert len(section.find_class("trend")) == 1  # non-bitwise and failed cells over the three nights
    freed = [line for line in p3.stdout.splitlines() if line.startswith("history retention:")]
    assert len(freed) == 1 and "freed 2 partition(s) (2020-01-01 .. 2020-01-02)" in freed[0], p3.stdout
    assert "3 file(s)" in freed[0]
    assert not [p for p in hist.iterdir() if p.name.startswith("date=2020")]  # the old partitions are gone
    assert sorted(f.stem for f in hist.glob("date=*/*.parquet")) == sorted([run1, run2, run3])


def test_nightly_writes_every_report_and_the_history(nights):
    procs, outs, hist, _ = nights
    for proc, out in zip(procs, outs):
        for name in ("report.md", "report.html", "report.xml", "report.json", "results.parquet"):
            assert (out / name).is_file(), (name, explain(proc))
        assert str(out / "report.html") in proc.stdout
    doc = json.loads((outs[1] / "report.json").read_text())
    assert doc["changes"]["regressed"] is True
    assert [(c["environment"], c["new_verdict"]) for c in doc["changes"]["newly_failing"]] == [
        ("cpu-single-thread", "unschedulable")]
    run_ids = run_ids_of(outs)
    assert len(set(run_ids)) == 3


def test_history_lists_runs_and_a_cell_trend(nights, tmp_path):
    _, outs, hist, _ = nights
    run_ids = run_ids_of(outs)

    listed = run_cli("history", hist, cwd=tmp_path)
    assert listed.returncode == 0, explain(listed)
    lines = [line for line in listed.stdout.splitlines() if line.startswith(tuple(run_ids))]
    assert [line.split()[0] for line in lines] == run_ids, listed.stdout  # oldest first
    assert all("cli-nightly" in line for line in lines)

    trend = run_cli("history", hist, "--cell", "seed-linear-regression/keras/cpu-default", cwd=tmp_path)
    assert trend.returncode == 0, explain(trend)
    points = [line.split() for line in trend.stdout.splitlines() if line.startswith(tuple(run_ids))]
    assert [p[0] for p in points] == run_ids and all("bitwise" in p for p in points), trend.stdout
    assert "first bad:" not in trend.stdout and "not failing in its latest run" in trend.stdout

    failing = run_cli("history", hist, "--cell", FAILING_CELL, cwd=tmp_path)
    assert failing.returncode == 0, explain(failing)
    verdicts = {line.split()[0]: line.split()[2] for line in failing.stdout.splitlines()
                if line.startswith(tuple(run_ids))}
    assert verdicts[run_ids[0]] in ("bitwise", "within_tolerance"), failing.stdout
    assert verdicts[run_ids[1]] == verdicts[run_ids[2]] == "unschedulable", failing.stdout
    first_bad = [line for line in failing.stdout.splitlines() if line.startswith("first bad:")]
    assert len(first_bad) == 1 and re.fullmatch(
        rf"first bad: {run_ids[1]} \(\d{{4}}-\d\d-\d\d\), failing 2 run\(s\); "
        rf"last good: {run_ids[0]} \(\d{{4}}-\d\d-\d\d\)", first_bad[0]), failing.stdout

    assert_one_line_error(run_cli("history", hist, "--cell", "seed-linear-regression/keras", cwd=tmp_path),
                          "--cell", "SCENARIO/FORMAT/ENVIRONMENT")


def test_history_cell_trend_is_oldest_first_for_unschedulable_cells(nights, tmp_path):
    _, outs, hist, _ = nights
    run_ids = run_ids_of(outs)
    trend = run_cli("history", hist, "--cell", FAILING_CELL, "--last", "2", cwd=tmp_path)
    assert trend.returncode == 0, explain(trend)
    assert [line.split()[0] for line in trend.stdout.splitlines() if line.startswith(tuple(run_ids))] == run_ids[1:]
    assert f"first bad: {run_ids[1]}" in trend.stdout  # the streak is the whole history's, not --last's


def test_history_retention_without_a_run(tmp_path):
    hist = tmp_path / "history"
    hist.mkdir()
    seed_history(hist)
    dry = run_cli("history", hist, "--keep-days", "30", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, explain(dry)
    assert "history retention: would free 2 partition(s) (2020-01-01 .. 2020-01-02)" in dry.stdout
    assert len(list(hist.glob("date=*/*.parquet"))) == 3  # nothing deleted
    done = run_cli("history", hist, "--keep-days", "30", cwd=tmp_path)
    assert done.returncode == 0 and "history retention: freed 2 partition(s)" in done.stdout, explain(done)
    assert list(hist.iterdir()) == []
    assert_one_line_error(run_cli("history", hist, "--keep-days", "-1", cwd=tmp_path), "--keep-days -1", ">= 0")
    assert_one_line_error(run_cli("history", hist, "--dry-run", cwd=tmp_path), "--dry-run", "--keep-days")


# -- 8. run --inline ------------------------------------------------------------------------
def test_run_inline_one_environment(store, tmp_path):
    sweep = write_sweep(tmp_path, "inline.yaml", linear_sweep("cli-inline", store, {"cpu-default": {"expect": "bitwise"}}))
    out = tmp_path / "run"
    proc = run_cli("run", sweep, "--inline", "--out", out, cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    row = rows_by_cell(out)[("seed-linear-regression", "keras", "cpu-default")]
    assert (row["verdict"], row["passed"]) == ("bitwise", True)
    assert not row["node_id"], row  # no Ray worker was involved
    assert progress(proc.stderr)[("seed-linear-regression", "keras", "cpu-default")].group(0) == \
        "[1/1] seed-linear-regression/keras @ cpu-default: bitwise"
    assert (out / "report.md").is_file()
    assert re.search(r"^1 cells: 1 bitwise.*; 1 passed, 0 failed expectations$", proc.stdout, re.M), proc.stdout


# -- 9. SIGKILL of the driver, then --resume ----------------------------------------------------
# In `make test` the next test kills the driver and resumes too (through storage alone), and so does the
# multi-host rig (tests/multihost/test_faults.py); this one, resuming in place, runs with `make test-slow`.
@pytest.mark.slow
def test_sigkill_of_the_driver_then_resume_loses_nothing(store, tmp_path):
    import signal
    import time

    gate = tmp_path / "gate"  # one cell waits in build() until gate/all exists: the run is mid-sweep
    gate.mkdir()
    doc = {"name": "cli-kill", "storage": str(store), "scenario_paths": [str(REPO / "tests" / "scenarios")],
           "scenarios": ["seed-linear-regression", "test-slow-build"], "formats": ["keras", "weights"],
           "environments": {"cpu-default": {"expect": "bitwise"},
                            "gated": {"env": {"HARNESS_TEST_BUILD_GATE": str(gate)}, "expect": "bitwise"}},
           "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 300}}
    sweep = write_sweep(tmp_path, "kill.yaml", doc)
    out = tmp_path / "run"
    journal = out / results.JOURNAL
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(sweep), "--out", str(out)],
                              cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline and driver.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) == 7:
                break
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read()
        assert len(journal.read_text().splitlines()) == 7, "seven cells finish; the eighth waits at the gate"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the embedded Ray the driver started
        except ProcessLookupError:
            pass
    before = {(r["scenario"], r["format"], r["environment"]): r for r in results.Journal.read(out)}
    assert len(before) == 7 and not (out / "results.parquet").exists()

    (gate / "all").write_text("go")
    proc = run_cli("run", sweep, "--out", out, "--resume", cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    assert len(progress(proc.stderr)) == 1, proc.stderr  # only the missing cell ran again
    table = results.read_table(out)
    rows = rows_by_cell(out)
    assert table.num_rows == len(rows) == 8
    assert {r["run_id"] for r in rows.values()} == {next(iter(before.values()))["run_id"]}
    for key, old in before.items():
        assert rows[key]["verdict"] == old["verdict"] and rows[key]["attempts"] == old["attempts"]
        assert rows[key]["started_at"].timestamp() == pytest.approx(old["started_at"], abs=1e-5)
    assert rows[("test-slow-build", "weights", "gated")]["verdict"] == "bitwise"
    assert not (out / results.JOURNAL).exists()  # folded into results.parquet


def test_sigkill_of_the_driver_then_resume_from_storage_alone_in_another_directory(s3_server, tmp_path):
    """The driver's directory is gone with its host: ``--resume --run-id`` rebuilds the run from storage."""
    import signal
    import time

    from s3_helpers import DUMMY_AWS_ENV

    s3_server.make_bucket("cli-resume")
    storage = s3_server.uri("cli-resume", "store")
    gate = tmp_path / "gate"  # test-slow-build's build() waits for gate/all: in --inline, its training waits
    gate.mkdir()
    sweep = write_sweep(tmp_path, "kill.yaml", {
        "name": "cli-kill-storage", "storage": storage, "scenario_paths": [str(REPO / "tests" / "scenarios")],
        "scenarios": ["seed-linear-regression", "test-slow-build"], "formats": ["weights"],
        "environments": {"cpu-default": {"expect": "bitwise"}}})
    env = {**_env(), **DUMMY_AWS_ENV, "HARNESS_TEST_BUILD_GATE": str(gate)}
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        driver = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(sweep), "--inline", "--out",
                                   str(tmp_path / "first")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                  stderr=err, text=True, start_new_session=True)
    base, query = storage.split("?", 1)
    run_id = published = None
    try:
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline and driver.poll() is None:
            found = re.search(r"\(run (\S+)\)$", log.read_text(), re.M)
            if found:
                run_id = found.group(1)
                try:  # the finished cell is in storage within seconds, not at the end of the run
                    published = results.read_table(f"{base}/runs/{run_id}?{query}")
                except FileNotFoundError:
                    pass
                if published is not None and published.num_rows == 1:
                    break
            time.sleep(0.2)
        assert driver.poll() is None, log.read_text()
        assert run_id and published is not None and published.num_rows == 1, log.read_text()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = published.to_pylist()[0]
    assert (before["scenario"], before["verdict"]) == ("seed-linear-regression", "bitwise")

    (gate / "all").write_text("go")
    second = tmp_path / "second"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(sweep), "--inline", "--resume",
                           "--run-id", run_id, "--out", str(second)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    assert [m.group(0) for m in progress(proc.stderr).values()] == \
        ["[2/2] test-slow-build/weights @ cpu-default: bitwise"], explain(proc)  # the other cell is kept
    rows = rows_by_cell(second)
    assert len(rows) == 2 and {r["run_id"] for r in rows.values()} == {run_id}
    kept = rows[("seed-linear-regression", "weights", "cpu-default")]
    assert kept["started_at"] == before["started_at"] and kept["observation_uri"] == before["observation_uri"]
    assert f"storage: {base}/runs/{run_id}" in proc.stdout
    final = results.read_table(f"{base}/runs/{run_id}?{query}")
    assert final.num_rows == 2 and set(final.column("run_id").to_pylist()) == {run_id}
    from harness.storage import Storage

    assert Storage.open(storage).listdir(f"runs/{run_id}/journal") == []  # folded into results.parquet


def test_resume_from_storage_refuses_what_it_cannot_resume(store, good_run, tmp_path):
    _, good_out = good_run
    sweep = write_sweep(tmp_path, "good.yaml", linear_sweep("cli-good", store, GOOD_ENVS, formats=("keras", "h5")))
    out = tmp_path / "out"
    proc = run_cli("run", sweep, "--run-id", "20260101T000000Z-abcdef", "--out", out, cwd=tmp_path)
    assert_one_line_error(proc, "--run-id 20260101T000000Z-abcdef: only with --resume")
    proc = run_cli("run", sweep, "--resume", "--run-id", "20260101T000000Z-abcdef", "--out", out, cwd=tmp_path)
    assert_one_line_error(proc, f"{store}/runs/20260101T000000Z-abcdef: no run '20260101T000000Z-abcdef'",
                          "check --run-id and --storage")
    run_id = json.loads((good_out / "run.json").read_text())["run_id"]
    other = write_sweep(tmp_path, "other.yaml", linear_sweep("cli-other", store, GOOD_ENVS))
    proc = run_cli("run", other, "--resume", "--run-id", run_id, "--out", out, cwd=tmp_path)
    assert_one_line_error(proc, f"runs/{run_id}: --resume: it holds a run of sweep 'cli-good', not 'cli-other'")
    proc = run_cli("run", sweep, "--resume", "--run-id", run_id, "--out", good_out.parent / "elsewhere",
                   "--only", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and not out.exists() and not (good_out.parent / "elsewhere").exists(), explain(proc)


# -- 10. failures of the harness itself: exit 3, one line; foreign run directories: exit 2 ---------------
def _unusable_storage(kind: str, tmp_path: Path, request) -> str:
    if kind == "a-file":
        path = tmp_path / "store-is-a-file"
        path.write_text("not a directory")
        return str(path)
    if kind == "read-only":
        if os.geteuid() == 0:  # root writes into a mode-0500 directory: use a read-only filesystem instead
            return "/proc/harness-store"
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o500)
        request.addfinalizer(lambda: path.chmod(0o700))
        return str(path / "store")
    s3 = request.getfixturevalue("s3_server")
    return s3.uri("no-such-bucket", "prefix")


@pytest.mark.parametrize("kind", ["a-file", "read-only", "s3-no-bucket"])
def test_unusable_storage_is_exit_3_one_line(kind, tmp_path, request):
    storage = _unusable_storage(kind, tmp_path, request)
    sweep = write_sweep(tmp_path, "s.yaml", linear_sweep("cli-storage", storage, {"cpu-default": {}}))
    env = {**_env(), **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(sweep), "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=QUICK_TIMEOUT)
    assert proc.returncode == 3, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1 and "cannot be used" in errors[0], explain(proc)


def test_resume_refuses_another_sweeps_run_and_junk_results(store, good_run, tmp_path):
    _, good_out = good_run
    other = write_sweep(tmp_path, "other.yaml", linear_sweep("cli-other", store, GOOD_ENVS))
    before = (good_out / "results.parquet").read_bytes()
    proc = run_cli("run", other, "--out", good_out, "--resume", cwd=tmp_path)
    line = assert_one_line_error(proc, str(good_out), "--resume", "'cli-good'", "not 'cli-other'")
    assert "another --out" in line
    assert (good_out / "results.parquet").read_bytes() == before  # nothing adopted, nothing overwritten

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "results.parquet").write_bytes(b"PAR1 truncated")
    for args in (("run", other, "--out", junk, "--resume"), ("report", junk)):
        proc = run_cli(*args, cwd=tmp_path)
        assert_one_line_error(proc, str(junk / "results.parquet"), "not a results table")


def test_progress_line_keeps_the_whole_error_and_marks_a_save_failure_as_such(capsys):
    from conftest_report_helpers import make_row

    from harness import cli
    from harness.records import CellResult

    advice = "x" * 300 + " ; use keras or savedmodel"
    cli._progress(1, 2, CellResult.from_row(make_row("error", error=advice)))
    cli._progress(2, 2, CellResult.from_row(make_row("bitwise", expected="bitwise", passed=False,
                                                     error="save round trip is error (expect_save: bitwise)")))
    first, second = capsys.readouterr().err.splitlines()
    assert first.endswith("error  ✗ expected tolerance -- " + advice)  # never cut before the advice
    assert "bitwise  save✗ (expect_save) -- save round trip is error" in second and "✗ expected" not in second
