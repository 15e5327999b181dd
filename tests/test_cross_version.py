"""Reload artifacts saved by this TensorFlow under another one (pip runtime_env).

Slow: Ray builds a virtualenv with tensorflow-cpu 2.20 the first time (~50 s).
Run with `make test-slow`.
"""

import json

import pytest
import yaml

from harness.scenario import discover
from harness.spec import FORMATS, parse_sweep
from harness.sweep import run_sweep

pytestmark = pytest.mark.slow


def test_artifacts_saved_by_this_tf_reload_under_tf_2_20(tmp_path):
    import importlib.metadata as md

    doc = {"name": "cross-version", "scenarios": ["seed-linear-regression"], "formats": list(FORMATS),
           "timeouts": {"schedule_timeout_s": 900, "cell_timeout_s": 900},
           "environments": {"cpu-default": {"expect": "bitwise"},
                            "tf-2.20": {"runtime_env": {"pip": ["tensorflow-cpu==2.20.0"]}, "expect": "any"}}}
    sweep = parse_sweep(yaml.safe_load(yaml.safe_dump(doc)), source="cross-version.yaml")
    res = run_sweep(sweep, discover(), out_dir=tmp_path / "run", storage=str(tmp_path / "store"))
    rows = res.table.to_pylist()
    assert len(rows) == 2 * len(FORMATS)
    # Whichever distribution provides `tensorflow` here: tensorflow-cpu (the `cpu` extra) or tensorflow (`gpu`).
    ours = md.version(md.packages_distributions()["tensorflow"][0])
    for row in rows:
        fp = json.loads(row["fingerprint"])
        train_fp = json.loads(row["train_fingerprint"])
        assert train_fp["tf_version"] == ours
        if row["environment"] == "tf-2.20":
            assert fp["tf_version"] == "2.20.0" and "runtime_resources/pip" in fp["executable"]
            # Either it loads and is compared, or the error says why it cannot load.
            assert row["verdict"] in ("bitwise", "within_tolerance", "mismatch") or "failed" in row["error"]
            if row["verdict"] in ("bitwise", "within_tolerance"):
                assert row["weights_equal"] is True
        else:
            assert fp["tf_version"] == ours and row["verdict"] == "bitwise"
