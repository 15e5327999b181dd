"""compare.compare_arrays: speed against what a user would write, and peak memory.

Baselines (same process, interleaved with ours):

* tolerance path: ``np.isclose(obs, ref, rtol, atol).all()`` plus
  ``np.abs(obs - ref).max()`` -- a pass/fail and a max abs diff, nothing else.
  ``compare_arrays`` additionally computes ULP distances, relative diffs, the
  mismatch fraction, NaN/Inf agreement and the minimum required tolerances.
* bitwise path (identical arrays): ``np.array_equal(ref, obs)``.
* memory: peak extra bytes while comparing a 1e7 float32 pair, as a multiple of
  the input bytes (both arrays); the isclose baseline's peak is shown alongside.
"""

from __future__ import annotations

import math

import numpy as np

from _util import Row, fmt_bytes, peak_extra_bytes, timed_row
from harness.compare import Tolerance, compare_arrays

# Targets (see benchmarks/README.md for how they were chosen and what they should become).
LIMIT_TOLERANCE = {10**6: 4.0, 10**7: 4.0}  # compare_arrays / (isclose + abs max); measured 1.1-1.7x
LIMIT_BITWISE = 1.5                           # compare_arrays(identical) / np.array_equal
LIMIT_PEAK_PAIR = 1.0                         # peak extra bytes / (ref.nbytes + obs.nbytes) at 1e7; measured 0.13x

ULP_NOISE = 3
_TOL = Tolerance()


def noisy_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 reference and a copy with up to ``ULP_NOISE`` ULP of noise per element."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n, dtype=np.float32)
    ref[np.abs(ref) < 1e-30] = 1.0  # keep the integer trick below away from the sign boundary
    bits = ref.view(np.int32) + rng.integers(-ULP_NOISE, ULP_NOISE + 1, n, dtype=np.int32)
    obs = bits.view(np.float32)
    return ref, obs


def _baseline(ref: np.ndarray, obs: np.ndarray, atol: float, rtol: float):
    return bool(np.isclose(obs, ref, rtol=rtol, atol=atol).all()), float(np.abs(obs - ref).max())


def run(repeat: int) -> list[Row]:
    return _run_size(10**6, repeat) + _run_size(10**7, repeat, memory=True)


def _run_size(n: int, repeat: int, memory: bool = False) -> list[Row]:
    size = f"1e{round(math.log10(n))}"
    atol, rtol, _ = _TOL.for_dtype(np.dtype(np.float32))
    ref, obs = noisy_pair(n)
    result = compare_arrays("y", ref, obs, _TOL)
    # Sanity: the case is the one we mean to time (tolerance path, nothing rejected).
    assert result.verdict == "within_tolerance", result
    assert 0 < result.max_ulp_diff <= ULP_NOISE, result.max_ulp_diff
    assert _baseline(ref, obs, atol, rtol)[0]
    same = ref.copy()
    assert compare_arrays("y", ref, same, _TOL).verdict == "bitwise"

    rows = [
        timed_row(f"compare_arrays {size} f32, {ULP_NOISE}-ULP noise vs isclose+abs.max",
                  lambda: compare_arrays("y", ref, obs, _TOL), lambda: _baseline(ref, obs, atol, rtol),
                  repeat=repeat, min_time=1.0, limit=LIMIT_TOLERANCE[n]),
        timed_row(f"compare_arrays {size} f32 identical vs np.array_equal",
                  lambda: compare_arrays("y", ref, same, _TOL), lambda: np.array_equal(ref, same),
                  repeat=repeat, min_time=0.5, limit=LIMIT_BITWISE),
    ]
    if memory:
        input_bytes = ref.nbytes + obs.nbytes
        ours_peak, _ = peak_extra_bytes(lambda: compare_arrays("y", ref, obs, _TOL))
        base_peak, _ = peak_extra_bytes(lambda: _baseline(ref, obs, atol, rtol))
        rows.append(Row(f"compare_arrays {size} f32: peak extra mem / input",
                        fmt_bytes(ours_peak),
                        f"input {fmt_bytes(input_bytes)}; isclose {base_peak / input_bytes:.1f}x",
                        ours_peak / input_bytes, LIMIT_PEAK_PAIR))
    return rows
