"""The limitations the zoo's error cells name are still real in plain TF/Keras, and the cells that
only need a registration reload with it (`make test-slow`, ~2 min): when one stops being real after
an upgrade, drop its entry from harness.formats.LIMITATIONS and its expectation in test_zoo.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "verify_zoo_limitations.py"


@pytest.mark.slow
def test_every_explained_limitation_is_real_in_plain_keras(tmp_path):
    env = {**os.environ, "ZOO_VERIFY_OUT": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, str(SCRIPT), "all"], capture_output=True, text=True, env=env,
                         timeout=900).stdout
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines() if ":" in ln}
    for check in ("zoo-mobilenetv3-small/h5", "zoo-transformer-encoder/h5", "zoo-convnext-mini/h5",
                  "zoo-string-lookup/h5", "adapted-lookup/h5",
                  "zoo-tf-module/{keras,h5,savedmodel,weights}", "zoo-noise-augmentation/savedmodel",
                  "xla_string_inputs"):
        assert "REAL" in lines.get(check, ""), (check, out[-3000:])
    # not limitations: these h5 files reload with the in-memory model's bits once their classes are registered
    # (the cells say so, with the custom_objects), or once the package their config names is imported
    for check in ("zoo-numeric-preprocessing/h5", "zoo-multi-output-dtypes/h5", "zoo-keras-hub-resnet/h5"):
        assert "REGISTRATION" in lines.get(check, ""), (check, out[-3000:])
    assert "ORDER" in lines["zoo-keras-hub-bert/h5"] and "bit-identical" in lines["zoo-keras-hub-bert/h5"], out[-3000:]
