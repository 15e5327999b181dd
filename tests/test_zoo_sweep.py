"""A slice of the zoo through run_sweep on an embedded Ray: scenarios travel to
workers as pickles, so custom classes must be registered there (setup hook) and
a mixed-precision policy must not leak between scenarios sharing a worker."""

from __future__ import annotations

import json
import os

import pytest
import ray
import yaml

from harness.spec import parse_sweep
from harness.sweep import run_sweep

SWEEP = {
    "name": "zoo-slice",
    "scenarios": ["zoo-mixed-bfloat16", "zoo-custom-registered"],
    "formats": ["keras", "savedmodel", "weights"],
    "environments": {"cpu-default": {"expect": "bitwise"}},
    "timeouts": {"schedule_timeout_s": 120, "cell_timeout_s": 300},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def test_zoo_slice_on_ray_is_bitwise_with_every_parameter_restored(local_ray, scenarios, tmp_path):
    sweep = parse_sweep(yaml.safe_load(yaml.safe_dump(SWEEP)), source="zoo-slice.yaml")
    res = run_sweep(sweep, scenarios, out_dir=tmp_path / "run", storage=str(tmp_path / "store"))
    rows = res.table.to_pylist()
    assert len(rows) == 6
    for row in rows:
        cell = f"{row['scenario']}/{row['format']}"
        assert row["verdict"] == "bitwise" and row["save_verdict"] == "bitwise", (cell, row["error"])
        assert row["weights_equal"] is True and row["passed"] is True, cell
        fp, train_fp = json.loads(row["fingerprint"]), json.loads(row["train_fingerprint"])
        assert fp["pid"] != os.getpid() and train_fp["pid"] != os.getpid(), "must run in Ray workers"
        detail = json.loads(row["detail"])
        dtypes = {o["name"]: o["dtype_ref"] for o in detail["outputs"]}
        if row["scenario"] == "zoo-mixed-bfloat16":
            assert dtypes == {"logits": "bfloat16", "probs": "float32"}
        else:  # trained in a worker after (or beside) the bfloat16 one: still float32
            assert dtypes == {"output": "float32"}
    assert res.passed
