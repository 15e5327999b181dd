"""The for-loop a user would write instead of the harness (the baseline of bench_sweep).

    python plain_sweep.py SWEEP.yaml WORKDIR

Sequential and plain: this process trains every scenario once (default
settings), saves it in every format, records the in-memory outputs and its
reload here; then, for each environment, one fresh Python process (the
environment's knobs set as environment variables before TensorFlow is
imported) reloads every artifact, predicts and compares with numpy. The
numbers are printed as JSON lines; nothing here uses the harness's code except
the scenario recipes themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent


def scenarios() -> dict:
    sys.path.insert(0, str(REPO))
    found = {}
    for path in sorted((REPO / "scenarios").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for s in [getattr(module, "SCENARIO", None), *getattr(module, "SCENARIOS", [])]:
            if s is not None:
                found[s.name] = s
    return found


def predict(fn, x: np.ndarray, batch: int, jit: bool = False) -> np.ndarray:
    import tensorflow as tf

    graph = tf.function(fn, jit_compile=jit, reduce_retracing=True)
    return np.concatenate([np.asarray(graph(tf.constant(x[i:i + batch]))) for i in range(0, len(x), batch)])


def load(fmt: str, path: Path):
    import keras
    import tensorflow as tf

    if fmt == "savedmodel":
        obj = tf.saved_model.load(str(path / "saved_model"))
        return obj.serve, obj
    model = keras.models.load_model(str(path / f"model.{fmt}"), compile=False)
    return (lambda x: model(x, training=False)), model


def train(sweep: dict, work: Path) -> None:
    import keras

    available = scenarios()
    for name in sweep["scenarios"]:
        s = available[name]
        keras.utils.set_random_seed(s.seed)
        model = s.build()
        model.compile(**s.compile)
        x, y = s.data(np.random.default_rng([s.seed, 0]))
        model.fit(x, y, verbose=0, **s.fit)
        probe = s.probe(np.random.default_rng([s.seed, 1]))
        in_memory = predict(lambda t: model(t, training=False), probe, sweep.get("batch_size", 32))
        for fmt in sweep["formats"]:
            path = work / name / fmt
            path.mkdir(parents=True, exist_ok=True)
            if fmt == "savedmodel":
                model.export(str(path / "saved_model"), format="tf_saved_model", verbose=False)
            else:
                model.save(str(path / f"model.{fmt}"))
            fn, _owner = load(fmt, path)
            reference = predict(fn, probe, sweep.get("batch_size", 32))
            print(json.dumps({"scenario": name, "format": fmt, "save_bitwise": bool(np.array_equal(
                reference.view(np.uint32), in_memory.view(np.uint32)))}))
            np.save(path / "probe.npy", probe)
            np.save(path / "reference.npy", reference)


def replay(sweep: dict, work: Path, env_name: str) -> None:
    env = sweep["environments"][env_name] or {}
    batch = env.get("batch_size", sweep.get("batch_size", 32))
    for name in sweep["scenarios"]:
        for fmt in sweep["formats"]:
            path = work / name / fmt
            probe, reference = np.load(path / "probe.npy"), np.load(path / "reference.npy")
            fn, _owner = load(fmt, path)
            observed = predict(fn, probe, batch, jit=bool(env.get("jit_compile")))
            a, b = reference.view(np.int32).astype(np.int64), observed.view(np.int32).astype(np.int64)
            ulp = int(np.max(np.abs(a - b))) if reference.shape == observed.shape else -1
            print(json.dumps({"scenario": name, "format": fmt, "environment": env_name, "max_ulp": ulp}))


def environment_variables(env: dict) -> dict[str, str]:
    out = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    if env.get("onednn") is not None:
        out["TF_ENABLE_ONEDNN_OPTS"] = "1" if env["onednn"] else "0"
    if env.get("cpu_isa"):
        out.update(TF_ENABLE_ONEDNN_OPTS="1", ONEDNN_MAX_CPU_ISA=env["cpu_isa"].upper())
    if env.get("threads"):
        n = str(env["threads"])
        out.update(TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS=n, OMP_NUM_THREADS=n)
    out.update({k: str(v) for k, v in (env.get("env") or {}).items()})
    return out


def main() -> None:
    sweep_file, work = sys.argv[1], Path(sys.argv[2])
    sweep = yaml.safe_load(open(sweep_file))
    if len(sys.argv) > 3:  # one environment, in a fresh process
        replay(sweep, work, sys.argv[3])
        return
    work.mkdir(parents=True, exist_ok=True)
    train(sweep, work)
    for env_name, env in sweep["environments"].items():
        subprocess.run([sys.executable, __file__, sweep_file, str(work), env_name], check=True,
                       env={**os.environ, **environment_variables(env or {})})


if __name__ == "__main__":
    main()
