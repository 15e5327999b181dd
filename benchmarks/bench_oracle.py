"""What the float64 oracle costs at training: its seconds as a ratio of the training step's.

For every scenario of the quick start and of the zoo, ``harness.train.train`` runs once
(``retrain``: fit, save in the sweep's formats, reload each in this process) and reports
the seconds it spent on the oracle (``TrainRecord.oracle_seconds``: rebuilding the model
in float64 through Keras's saving, casting the weights, predicting the probe). The ratio
is ``oracle / (train - oracle)``: the overhead the oracle adds to what training cost
before it existed. One training per scenario (training takes seconds to minutes, and the
ratio compares two parts of the very same run, so load hits both alike).

Run alone: ``.venv/bin/python benchmarks/bench_oracle.py`` (prints one line per scenario).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from _util import Row, fmt_time  # noqa: E402

SWEEPS = ("quickstart", "zoo")
#: The oracle may add at most this share of a sweep's training time (sum over its scenarios).
LIMIT_SWEEP = 0.5


def _sweep(name: str):
    from harness.spec import load_sweep

    return load_sweep(HERE.parent / "scenarios" / "sweeps" / f"{name}.yaml")


def measure(workdir: str) -> dict[str, list[tuple[str, float, float]]]:
    """``{sweep: [(scenario, train seconds without the oracle, oracle seconds)]}``, training each scenario once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from harness.scenario import discover
    from harness.train import train

    scenarios = discover()
    out: dict[str, list[tuple[str, float, float]]] = {}
    for name in SWEEPS:
        sweep = _sweep(name)
        out[name] = []
        for scenario in sweep.scenarios:
            record = train(scenarios[scenario], list(sweep.formats), workdir, sweep.training,
                           batch_size=sweep.batch_size, retrain=True)
            out[name].append((scenario, record.seconds - record.oracle_seconds, record.oracle_seconds))
            print(f"    oracle {scenario}: {record.oracle_seconds:.2f} s of {record.seconds:.2f} s "
                  f"({record.oracle_seconds / (record.seconds - record.oracle_seconds):.3f}x)", flush=True)
    return out


def run(workdir: str) -> list[Row]:
    rows: list[Row] = []
    for sweep, measured in measure(workdir).items():
        for scenario, train_s, oracle_s in measured:
            rows.append(Row(f"oracle / training: {scenario}", fmt_time(oracle_s), f"train {fmt_time(train_s)}",
                            oracle_s / train_s))
        train_total = sum(t for _, t, _ in measured)
        oracle_total = sum(o for _, _, o in measured)
        rows.append(Row(f"oracle / training: {sweep}.yaml, {len(measured)} scenarios", fmt_time(oracle_total),
                        f"train {fmt_time(train_total)}", oracle_total / train_total, LIMIT_SWEEP))
    return rows


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="harness-bench-oracle-") as tmp:
        for row in run(tmp):
            print(f"{row.name}: {row.ours} vs {row.baseline} = {row.ratio:.3f}x {row.target}")
