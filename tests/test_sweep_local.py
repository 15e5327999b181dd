"""Whole sweeps on a real embedded Ray (one node): verdicts, placement, timeouts, resume."""

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import yaml

from harness import arrays, results
from harness.spec import parse_sweep
from harness.sweep import plan, run_sweep

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0, log_to_driver=False,
             logging_level="ERROR")
    yield ray.get_runtime_context().get_node_id()
    ray.shutdown()




def _sweep(doc: dict):
    return parse_sweep(yaml.safe_load(yaml.safe_dump(doc)), source="test.yaml")


MAIN = {
    "name": "local-main",
    "scenarios": ["seed-binary-classifier", "seed-dense-regression"],
    "formats": ["keras", "h5", "savedmodel"],
    "environments": {
        "cpu-default": {"expect": "bitwise"},
        "cpu-onednn-off": {"onednn": False},
        "cpu-xla": {"jit_compile": True},
        "needs-h100": {"accelerator_type": "H100"},
        "needs-gpu": {"num_gpus": 1},
    },
    "timeouts": {"schedule_timeout_s": 60, "cell_timeout_s": 120},
}


@pytest.fixture(scope="module")
def main_run(local_ray, scenarios, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-main")
    seen = []
    start = time.time()
    res = run_sweep(_sweep(MAIN), scenarios, out_dir=out, storage=store, progress=lambda d, n, r: seen.append((d, n)))
    return res, seen, time.time() - start


def _by_env(table):
    out = defaultdict(list)
    for row in table.to_pylist():
        out[row["environment"]].append(row)
    return out


def test_one_row_per_cell_and_progress(main_run):
    res, seen, _ = main_run
    assert res.table.num_rows == 2 * 3 * 5
    keys = {(r["scenario"], r["format"], r["environment"]) for r in res.table.to_pylist()}
    assert len(keys) == 30
    assert seen[-1] == (30, 30) and [d for d, _ in seen] == list(range(1, 31))
    on_disk = results.read_table(res.run_dir)
    assert on_disk.schema == results.SCHEMA and on_disk.num_rows == 30
    # each scenario's training time, from its TrainRecord, on every cell that replayed its artifacts
    train_s = defaultdict(set)
    for row in res.table.to_pylist():
        if row["verdict"] in results.NUMERIC_VERDICTS:
            train_s[row["scenario"]].add(row["train_s"])
    assert set(train_s) == set(MAIN["scenarios"])
    assert all(len(v) == 1 and 0 < next(iter(v)) < main_run[2] for v in train_s.values()), train_s


# Fingerprint keys that decide the numerics of a CPU reload (besides the probe batch size).
NUMERIC_KEYS = ("tf_version", "onednn", "intra_op_threads", "inter_op_threads", "jit_compile", "cpu_model")


def test_same_settings_reload_is_bitwise(main_run, local_ray):
    res, _, _ = main_run
    for row in _by_env(res.table)["cpu-default"]:
        assert row["verdict"] == "bitwise" and row["passed"] and row["weights_equal"]
        assert row["save_verdict"] == "bitwise"
        assert row["node_id"] == local_ray
        fp, train_fp = json.loads(row["fingerprint"]), json.loads(row["train_fingerprint"])
        assert fp["environment"] == "cpu-default" and fp["pid"] != train_fp["pid"]
        # Whatever this CPU's defaults are (oneDNN is on by default only with AVX-512),
        # cpu-default ran with exactly the training worker's settings.
        assert {k: fp[k] for k in NUMERIC_KEYS} == {k: train_fp[k] for k in NUMERIC_KEYS}


def test_environment_knobs_reach_the_worker_and_differences_are_surfaced(main_run):
    res, _, _ = main_run
    envs = _by_env(res.table)
    for row in envs["cpu-onednn-off"]:
        fp, train_fp = json.loads(row["fingerprint"]), json.loads(row["train_fingerprint"])
        assert fp["onednn"] is False and fp["env"]["TF_ENABLE_ONEDNN_OPTS"] == "0"
        assert row["verdict"] in ("bitwise", "within_tolerance") and row["passed"]
        if train_fp["onednn"] is False:
            # oneDNN was already off for training (e.g. an AVX2-only CPU): same settings, same bits.
            assert row["verdict"] == "bitwise", row
    for row in envs["cpu-xla"]:
        assert json.loads(row["fingerprint"])["jit_compile"] is True
    # Whether a knob moves the last bits depends on the CPU; what must hold
    # everywhere is that a difference is reported exactly, never hidden.
    for e in ("cpu-onednn-off", "cpu-xla"):
        for r in envs[e]:
            assert (r["verdict"] == "bitwise") == (r["max_ulp_diff"] == 0 == r["mismatch_fraction"])
            if r["verdict"] == "within_tolerance":
                assert r["mismatch_fraction"] > 0 and r["required_ulp"] == r["max_ulp_diff"] >= 1


def test_workers_are_reused_within_an_environment(main_run):
    res, _, _ = main_run
    for env in ("cpu-default", "cpu-onednn-off", "cpu-xla"):
        rows = _by_env(res.table)[env]
        pids = {json.loads(r["fingerprint"])["pid"] for r in rows}
        assert len(pids) < len(rows), f"{env}: TF imported once per cell ({len(pids)} pids for {len(rows)} cells)"


def test_environments_no_node_can_host_are_unschedulable_at_once(main_run):
    res, _, _ = main_run
    envs = _by_env(res.table)
    for env in ("needs-h100", "needs-gpu"):
        for row in envs[env]:
            # Decided by the precheck against the cluster's nodes, not by waiting
            # for the schedule timeout (whose message says "still pending after").
            assert row["verdict"] == "unschedulable" and not row["passed"]
            assert row["error"].startswith("no node of the cluster"), row["error"]
            assert not row["attempts"]
    assert all("accelerator_type:H100" in r["error"] for r in envs["needs-h100"])
    assert all("GPU" in r["error"] for r in envs["needs-gpu"])


def test_observations_and_artifacts_are_in_storage(main_run, store):
    res, _, _ = main_run
    for row in res.table.to_pylist():
        if row["verdict"] in results.NUMERIC_VERDICTS:
            path = Path(row["observation_uri"])
            assert path.is_file() and str(path).startswith(store)
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            assert table.num_rows == 64
            assert Path(row["artifact_uri"], "manifest.json").is_file()


def test_resume_runs_only_missing_cells(local_ray, scenarios, store, tmp_path):
    sweep = _sweep({**MAIN, "environments": {k: MAIN["environments"][k] for k in ("cpu-default", "cpu-xla")},
                    "scenarios": ["seed-binary-classifier"]})
    first = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store, only=["cpu-default"])
    assert first.table.num_rows == 3
    ran = []
    second = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store, resume=True,
                       progress=lambda d, n, r: ran.append(r.environment))
    assert ran == ["cpu-xla"] * 3
    assert second.table.num_rows == 6 and second.run_id == first.run_id
    assert set(second.table.column("run_id").to_pylist()) == {first.run_id}


def test_schedule_and_cell_timeouts_do_not_stop_the_sweep(local_ray, scenarios, store, tmp_path):
    sweep = _sweep({
        "name": "timeouts", "scenarios": ["test-slow-build", "seed-linear-regression"], "formats": ["weights"],
        "precheck": False, "scenario_paths": [str(TESTS / "scenarios")],
        "timeouts": {"schedule_timeout_s": 30, "cell_timeout_s": 8},
        "environments": {
            "fast": {"expect": "bitwise"},
            "ghost": {"resources": {"ghost": 1}},
            "slow": {"env": {"HARNESS_TEST_BUILD_SLEEP": "120"}, "expect": "bitwise"},
        },
    })
    res = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store)
    cells = {(r["scenario"], r["environment"]): r for r in res.table.to_pylist()}
    assert len(cells) == res.table.num_rows == 6
    for name in ("test-slow-build", "seed-linear-regression"):
        assert cells[(name, "fast")]["verdict"] == "bitwise" and cells[(name, "fast")]["passed"], cells[(name, "fast")]["error"]
        ghost = cells[(name, "ghost")]
        assert ghost["verdict"] == "unschedulable" and "schedule_timeout_s=30" in ghost["error"]
        assert "ghost=1" in ghost["error"]
    # The slow scenario's build sleeps 120 s: only the cell timeout can have ended it as an error...
    stuck = cells[("test-slow-build", "slow")]
    assert stuck["verdict"] == "error" and "timed out after 8s" in stuck["error"]
    # ... and the environment went on with a fresh worker for its next cell.
    after = cells[("seed-linear-regression", "slow")]
    assert after["verdict"] == "bitwise" and after["passed"] and after["attempts"] == 1


def test_relative_storage_is_resolved_once_on_the_driver(local_ray, scenarios, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = _sweep({"name": "relative", "scenarios": ["seed-linear-regression"], "formats": ["keras"],
                    "storage": "rel/store", "environments": {"cpu-default": {"expect": "bitwise"}}})
    res = run_sweep(sweep, scenarios, out_dir=tmp_path / "run")
    row = res.table.to_pylist()[0]
    assert row["verdict"] == "bitwise", row["error"]
    store = tmp_path / "rel" / "store"
    # Workers got an absolute path: what they wrote is under the driver's cwd, whatever theirs is.
    for uri in (row["artifact_uri"], row["observation_uri"], res.results_uri):
        assert Path(uri).is_absolute() and Path(uri).resolve().is_relative_to(store.resolve()), uri
    assert Path(row["observation_uri"]).is_file()


def test_inline_mode_runs_without_ray_and_refuses_to_fake_env_vars(scenarios, store, tmp_path):
    # The opposite of whatever this shell has, so the variable really differs from this process's.
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0"
    sweep = _sweep({"name": "inline", "scenarios": ["seed-linear-regression"], "formats": ["keras"],
                    "environments": {"cpu-default": {"expect": "bitwise"}, "cpu-onednn-off": {"onednn": onednn}}})
    res = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store, inline=True)
    envs = _by_env(res.table)
    assert envs["cpu-default"][0]["verdict"] == "bitwise"
    off = envs["cpu-onednn-off"][0]
    assert off["verdict"] == "error" and "not --inline" in off["error"]
    assert res.passed is False


def test_plan_only_filters_each_dimension():
    sweep = _sweep(MAIN)
    cells = plan(sweep, ["cpu-xla", "keras"])
    assert {(c.format, c.environment) for c in cells} == {("keras", "cpu-xla")} and len(cells) == 2
    with pytest.raises(ValueError, match="'nope' is not a scenario, format or environment"):
        plan(sweep, ["nope"])


def test_training_no_node_can_host_makes_every_cell_unschedulable(local_ray, scenarios, store, tmp_path):
    sweep = _sweep({"name": "no-trainer", "scenarios": ["seed-linear-regression"], "formats": ["keras", "h5"],
                    "training": {"resources": {"trainer": 1}}, "precheck": False,
                    "timeouts": {"schedule_timeout_s": 3},
                    "environments": {"cpu-default": {}, "cpu-xla": {"jit_compile": True}}})
    res = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store)
    rows = res.table.to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["verdict"] == "unschedulable" and row["error"].startswith("training: still pending")
        assert "trainer=1" in row["error"]


def test_resume_refuses_a_changed_plan_of_the_same_sweep(scenarios, store, tmp_path):
    from harness.run import RunDirError

    doc = {"name": "replan", "scenarios": ["seed-linear-regression"], "formats": ["keras"],
           "environments": {"cpu-default": {"expect": "bitwise"}}}
    first = run_sweep(_sweep(doc), scenarios, out_dir=tmp_path, storage=store, inline=True)
    assert first.table.num_rows == 1
    changed = {**doc, "environments": {"cpu-default": {"expect": "bitwise", "tolerance": {"max_ulp": 4}}}}
    with pytest.raises(RunDirError, match="planned from another version of sweep 'replan'"):
        run_sweep(_sweep(changed), scenarios, out_dir=tmp_path, storage=store, inline=True, resume=True)
    again = run_sweep(_sweep(doc), scenarios, out_dir=tmp_path, storage=store, inline=True, resume=True)
    assert again.run_id == first.run_id and again.table.num_rows == 1


def test_emulated_cpu_families(local_ray, scenarios, store, tmp_path):
    """cpu_isa caps oneDNN's kernels; levels above this CPU are unschedulable (optional: not judged).

    Which levels exist here comes from this machine's own CPU flags, never from a hard-coded CPU.
    """
    from harness import fingerprint, isa

    flags = fingerprint.cpu_info()["cpu_flags"]
    native = isa.native(flags)
    above = next((level for level in isa.ISA_LEVELS if isa.missing_flags(level, flags)), None)
    envs = {"cpu-default": {"expect": "bitwise"}, "onednn-on": {"onednn": True, "expect": "any"},
            "isa-native": {"cpu_isa": native, "expect": "any"}, "isa-avx": {"cpu_isa": "avx", "expect": "any"}}
    if above:
        envs["isa-above"] = {"cpu_isa": above, "optional": True}
    sweep = _sweep({"name": "isa", "scenarios": ["test-mlp"], "formats": ["keras"], "environments": envs,
                    "scenario_paths": [str(TESTS / "scenarios")]})
    res = run_sweep(sweep, scenarios, out_dir=tmp_path, storage=store)
    rows = _by_env(res.table)
    fps = {env: json.loads(rows[env][0]["fingerprint"]) for env in ("onednn-on", "isa-native", "isa-avx")}
    assert fps["isa-avx"]["onednn"] is True and fps["isa-avx"]["onednn_max_isa"] == "avx"
    assert fps["isa-native"]["onednn_max_isa"] == native and fps["isa-native"]["cpu_isa_native"] == native
    assert "--xla_cpu_max_isa=AVX" in fps["isa-avx"]["env"]["XLA_FLAGS"]
    obs = {env: arrays.read_ipc(rows[env][0]["observation_uri"])[0]["output"] for env in fps}
    # A cap at the CPU's own level changes nothing against oneDNN on without a cap ...
    assert np.array_equal(obs["isa-native"].view(np.uint32), obs["onednn-on"].view(np.uint32))
    # ... while AVX (no FMA) picks other kernels, whose bits differ from the reference's (FMA or not).
    avx = rows["isa-avx"][0]
    assert avx["verdict"] in ("within_tolerance", "mismatch") and avx["max_ulp_diff"] > 0, avx
    if above:
        row = rows["isa-above"][0]
        assert row["verdict"] == "unschedulable" and row["passed"] is None and res.passed
        assert f"cpu_isa {above!r} needs CPU flags" in row["error"]
        assert all(flag in row["error"] for flag in isa.missing_flags(above, flags))
