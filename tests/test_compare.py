"""Unit and property tests for harness/compare.py (pure numpy)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from harness.compare import (
    DEFAULT_TOLERANCES,
    Comparison,
    Tolerance,
    compare_arrays,
    WeightCheck,
    compare_digests,
    compare_outputs,
    ordered_bits,
    ulp_distance,
    worst,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
SETTINGS = settings(max_examples=60, deadline=None)
RANK = {"bitwise": 0, "within_tolerance": 1, "mismatch": 2}
EXACT = Tolerance(atol=0, rtol=0, max_ulp=0)


def _float_elems(dtype, allow_nonfinite=True):
    width = np.dtype(dtype).itemsize * 8
    return st.floats(width=width, allow_nan=allow_nonfinite, allow_infinity=allow_nonfinite)


@st.composite
def float_pairs(draw, allow_nonfinite=True):
    """(ref, obs) of one float dtype and shape; obs shares some elements with ref,
    some are a few ULPs away, the rest are independent."""
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
    ref = draw(hnp.arrays(dtype, shape, elements=_float_elems(dtype, allow_nonfinite)))
    other = draw(hnp.arrays(dtype, shape, elements=_float_elems(dtype, allow_nonfinite)))
    kind = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
    steps = draw(hnp.arrays(np.int8, shape, elements=st.integers(-3, 3)))
    utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    bumped = ref.copy()
    for _ in range(3):  # walk a few representable values up or down
        with np.errstate(over="ignore"):
            up = np.nextafter(bumped, np.asarray(np.inf, dtype))
            down = np.nextafter(bumped, np.asarray(-np.inf, dtype))
        bumped = np.where(steps > 0, up, np.where(steps < 0, down, bumped))
        steps = steps - np.sign(steps)
    obs = np.where(kind == 0, ref, np.where(kind == 1, bumped, other)).astype(dtype)
    # np.where may canonicalise nothing, but keep ref's exact bits where kind == 0.
    obs.view(utype)[...] = np.where(kind == 0, ref.view(utype), obs.view(utype))
    return ref, obs


# ---------------------------------------------------------------- Tolerance

def test_tolerance_for_dtype_defaults_and_overrides():
    for name, (atol, rtol, ulp) in DEFAULT_TOLERANCES.items():
        dtype = BF16 if name == "bfloat16" else np.dtype(name)
        assert Tolerance().for_dtype(dtype) == (atol, rtol, ulp)
    assert Tolerance().for_dtype(np.int32) == (0.0, 0.0, 0.0)
    assert Tolerance().for_dtype(np.bool_) == (0.0, 0.0, 0.0)
    assert Tolerance(atol=0.5).for_dtype(np.float32) == (0.5, DEFAULT_TOLERANCES["float32"][1], 0.0)
    assert Tolerance(max_ulp=4).for_dtype(np.int8) == (0.0, 0.0, 4.0)
    assert Tolerance(atol=0, rtol=0, max_ulp=0).for_dtype(np.float16) == (0.0, 0.0, 0.0)


def test_tolerance_merged():
    base = Tolerance(atol=1.0, rtol=2.0, max_ulp=3.0)
    assert base.merged(None) is base
    assert base.merged(Tolerance()) == base
    assert base.merged(Tolerance(rtol=0.0)) == Tolerance(atol=1.0, rtol=0.0, max_ulp=3.0)
    assert Tolerance(atol=1.0).merged(Tolerance(max_ulp=5)) == Tolerance(atol=1.0, rtol=None, max_ulp=5)


# ---------------------------------------------------------------- ULP

@pytest.mark.parametrize("dtype", FLOATS + [BF16], ids=str)
def test_ulp_adjacent_values_known(dtype):
    ref = np.array([1.0, -1.0, 1e-3, 3.0, -0.25], dtype)
    up = np.nextafter(ref, np.full_like(ref, np.inf))
    down = np.nextafter(ref, np.full_like(ref, -np.inf))
    assert ulp_distance(ref, up).tolist() == [1.0] * 5
    assert ulp_distance(ref, down).tolist() == [1.0] * 5
    assert ulp_distance(down, up).tolist() == [2.0] * 5
    # +0 and -0 are adjacent encodings (documented), so nextafter(+0, -inf) = -tiny
    # skips -0 and is 2 encodings away, while +0 -> +tiny is 1.
    zero = np.zeros(1, dtype)
    assert ulp_distance(zero, -zero).tolist() == [1.0]
    assert ulp_distance(zero, np.nextafter(zero, zero + 1)).tolist() == [1.0]
    assert ulp_distance(zero, np.nextafter(zero, zero - 1)).tolist() == [2.0]
    # smallest subnormals straddling zero are 3 apart (-tiny, -0, +0, +tiny)
    tiny = np.nextafter(np.zeros(1, dtype), np.ones(1, dtype))
    assert ulp_distance(tiny, -tiny).tolist() == [3.0]


def test_ulp_nan_and_int():
    nan = np.array([np.nan, np.nan, 1.0], np.float32)
    obs = np.array([np.nan, 1.0, np.nan], np.float32)
    assert ulp_distance(nan, obs).tolist() == [0.0, math.inf, math.inf]
    assert ulp_distance(np.array([3, -5], np.int32), np.array([1, 5], np.int32)).tolist() == [2.0, 10.0]
    assert ulp_distance(np.array([True, False]), np.array([False, False])).tolist() == [1.0, 0.0]


def test_ordered_bits_matches_float_order():
    vals = np.array([-np.inf, -1e30, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 3e38, np.inf], np.float32)
    bits = ordered_bits(vals)
    assert (np.diff(bits.astype(np.float64)) > 0).all()


@SETTINGS
@given(st.sampled_from(FLOATS).flatmap(
    lambda dt: hnp.arrays(dt, st.integers(1, 20), elements=_float_elems(dt, allow_nonfinite=False))))
def test_ulp_nextafter_is_one(a):
    big = np.finfo(a.dtype).max
    # nextafter(max, inf) is inf; nextafter(+-0) skips the other zero (2 encodings, see above)
    a = a[(np.abs(a) < big) & (a != 0)]
    toward = np.full_like(a, np.inf)
    assert (ulp_distance(a, np.nextafter(a, toward)) == 1).all()
    assert (ulp_distance(a, np.nextafter(a, -toward)) == 1).all()


@SETTINGS
@given(float_pairs())
def test_ulp_symmetric_and_zero_iff_same_bits(pair):
    ref, obs = pair
    d = ulp_distance(ref, obs)
    assert np.array_equal(d, ulp_distance(obs, ref))
    assert (d >= 0).all()
    utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[ref.dtype.itemsize]
    same_bits = ref.view(utype) == obs.view(utype)
    either_nan = np.isnan(ref) | np.isnan(obs)
    both_nan = np.isnan(ref) & np.isnan(obs)
    assert ((d == 0) == (same_bits | both_nan))[~either_nan | both_nan].all()
    assert np.isinf(d[either_nan & ~both_nan]).all()


@SETTINGS
@given(st.sampled_from(FLOATS).flatmap(
    lambda dt: hnp.arrays(dt, st.integers(2, 12), elements=_float_elems(dt, allow_nonfinite=False))))
def test_ulp_monotone_and_additive(a):
    a = np.sort(a + a.dtype.type(0))  # -0 -> +0 so the numeric order is the encoding order
    d0 = ulp_distance(np.full_like(a, a[0]), a)
    assert (np.diff(d0) >= 0).all()
    # distances along the sorted line add up
    steps = ulp_distance(a[:-1], a[1:])
    if a.dtype != np.float64:  # float64 distances above 2**53 are not exact in float64
        assert d0[-1] == steps.sum()


# ---------------------------------------------------------------- compare_arrays: units

def test_identical_is_bitwise_with_zero_metrics():
    a = np.array([[1.5, np.nan], [-np.inf, -0.0]], np.float32)
    r = compare_arrays("y", a, a.copy())
    assert r.verdict == "bitwise"
    assert (r.max_abs_diff, r.max_rel_diff, r.max_ulp_diff, r.mismatch_fraction) == (0, 0, 0, 0)
    assert (r.required_atol, r.required_rtol, r.required_ulp) == (0, 0, 0)
    assert r.first_mismatch_index is None and r.reason is None


def test_docstring_example_and_metrics():
    ref = np.float32([1, 2])
    obs = np.float32([1, np.nextafter(2, 3, dtype=np.float32)])
    r = compare_arrays("y", ref, obs)
    assert (r.verdict, r.max_ulp_diff) == ("within_tolerance", 1.0)
    assert r.max_abs_diff == pytest.approx(2.0 ** -22)
    assert r.mismatch_fraction == 0.5
    assert r.dtype_ref == r.dtype_obs == "float32"
    assert (r.atol, r.rtol, r.max_ulp) == DEFAULT_TOLERANCES["float32"]


def test_outside_tolerance_reason_and_first_index():
    ref = np.zeros((2, 3), np.float64)
    obs = ref.copy()
    obs[1, 2] = 1.0
    obs[1, 0] = 2.0
    r = compare_arrays("out", ref, obs)
    assert r.verdict == "mismatch"
    assert r.first_mismatch_index == (1, 0)
    assert "2 of 6 elements" in r.reason and "[1, 0]" in r.reason
    assert r.required_atol == 2.0 and r.required_rtol == math.inf


def test_shape_mismatch():
    r = compare_arrays("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert r.verdict == "mismatch"
    assert r.shape_ref == (2, 3) and r.shape_obs == (3, 2)
    assert "shape" in r.reason
    # even a huge tolerance does not accept a shape mismatch
    r = compare_arrays("y", np.zeros(3), np.zeros(4), Tolerance(atol=1e9, rtol=1e9, max_ulp=1e9))
    assert r.verdict == "mismatch"


def test_dtype_mismatch_even_if_values_agree():
    ref = np.array([1.0, 2.0], np.float32)
    r = compare_arrays("y", ref, ref.astype(np.float64), Tolerance(atol=1.0))
    assert r.verdict == "mismatch"
    assert "float64" in r.reason and "float32" in r.reason
    assert r.mismatch_fraction == 1.0
    r = compare_arrays("y", np.array([1, 2], np.int32), np.array([1, 2], np.int64))
    assert r.verdict == "mismatch"


def test_zero_size_arrays():
    assert compare_arrays("y", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)).verdict == "bitwise"
    r = compare_arrays("y", np.zeros((0,), np.float32), np.zeros((0,), np.float64))
    assert r.verdict == "mismatch" and "dtype" in r.reason


def test_zero_d_arrays():
    assert compare_arrays("y", np.float32(1), np.float32(1)).verdict == "bitwise"
    r = compare_arrays("y", np.float32(0), np.float32(1))
    assert r.verdict == "mismatch" and r.first_mismatch_index == ()


@pytest.mark.parametrize("dtype", FLOATS + [BF16], ids=str)
def test_signed_zero_within_tolerance_not_bitwise(dtype):
    r = compare_arrays("y", np.array([0.0, 1.0], dtype), np.array([-0.0, 1.0], dtype), EXACT)
    assert r.verdict == "within_tolerance"
    assert r.max_abs_diff == 0.0 and r.max_ulp_diff == 1.0 and r.mismatch_fraction == 0.5


@pytest.mark.parametrize("dtype", FLOATS + [BF16], ids=str)
def test_nan_inf_agreement(dtype):
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], dtype)
    r = compare_arrays("y", ref, ref.copy(), EXACT)
    assert r.verdict == "bitwise"
    # a different NaN payload still matches NaN
    if dtype != BF16:
        utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]
        obs = ref.copy()
        obs.view(utype)[0] ^= 1
        assert np.isnan(obs[0])
        r = compare_arrays("y", ref, obs, EXACT)
        assert r.verdict == "within_tolerance" and r.nonfinite_mismatch == 0 and r.mismatch_fraction == 0.25


@pytest.mark.parametrize("ref_val,obs_val", [
    (np.nan, 1.0), (1.0, np.nan), (np.inf, -np.inf), (-np.inf, np.inf), (np.inf, 1.0), (1.0, np.inf),
    (np.nan, np.inf), (np.inf, np.nan),
])
def test_nan_inf_disagreement_outside_every_tolerance(ref_val, obs_val):
    huge = Tolerance(atol=np.inf, rtol=np.inf, max_ulp=np.inf)
    r = compare_arrays("y", np.array([ref_val, 2.0], np.float32), np.array([obs_val, 2.0], np.float32), huge)
    assert r.verdict == "mismatch"
    assert r.nonfinite_mismatch == 1
    assert r.first_mismatch_index == (0,)
    assert "NaN/Inf" in r.reason
    assert r.max_abs_diff == math.inf


def test_infinite_rtol_accepts_signed_zero():
    # rtol * |ref| at ref = 0 must be 0 (not inf * 0 = NaN): a bigger tolerance never rejects more
    r = compare_arrays("y", np.float32([0.0, 1.0]), np.float32([-0.0, 5.0]), Tolerance(atol=0, rtol=np.inf, max_ulp=0))
    assert r.verdict == "within_tolerance"
    assert compare_arrays("y", np.float32([0.0]), np.float32([1.0]), Tolerance(atol=0, rtol=np.inf)).verdict == "mismatch"


def test_inf_vs_largest_finite_is_not_one_ulp_accept():
    big = np.finfo(np.float32).max
    r = compare_arrays("y", np.float32([np.inf]), np.float32([big]), Tolerance(atol=0, rtol=0, max_ulp=10))
    assert r.verdict == "mismatch"


@pytest.mark.parametrize("ref_val,obs_val", [
    (np.inf, np.finfo(np.float32).max), (np.finfo(np.float32).max, np.inf), (np.nan, 1.0), (-np.inf, np.inf),
])
def test_required_tolerances_of_a_nonfinite_disagreement_are_infinite(ref_val, obs_val):
    """No tolerance accepts a NaN/Inf disagreement, so the smallest one that would is inf.

    Inf and the largest finite float are 1 ULP apart; ``required_ulp`` used to say 1
    although ``max_ulp: 1`` still gives ``mismatch``.
    """
    ref, obs = np.float32([ref_val, 2.0]), np.float32([obs_val, 2.0])
    r = compare_arrays("y", ref, obs, EXACT)
    assert (r.required_atol, r.required_rtol, r.required_ulp) == (math.inf, math.inf, math.inf)
    finite_ulp = r.max_ulp_diff if math.isfinite(r.max_ulp_diff) else 1e9
    assert compare_arrays("y", ref, obs, Tolerance(atol=0, rtol=0, max_ulp=finite_ulp)).verdict == "mismatch"


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                   np.uint64, np.bool_])
def test_int_and_bool_exact_only_by_default(dtype):
    ref = np.array([0, 1, 1], dtype)
    obs = np.array([0, 1, 0], dtype)
    assert compare_arrays("y", ref, ref.copy()).verdict == "bitwise"
    r = compare_arrays("y", ref, obs)
    assert r.verdict == "mismatch"
    assert (r.atol, r.rtol, r.max_ulp) == (0.0, 0.0, 0.0)
    assert r.max_ulp_diff == 1.0 and r.mismatch_fraction == pytest.approx(1 / 3)
    # an explicit tolerance can accept integer differences
    assert compare_arrays("y", ref, obs, Tolerance(max_ulp=1)).verdict == "within_tolerance"
    assert compare_arrays("y", ref, obs, Tolerance(atol=1)).verdict == "within_tolerance"


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_large_int64_differences_are_exact(dtype):
    # float64 cannot tell 2**62 from 2**62 + 1; the comparison must still see the difference
    ref = np.array([2 ** 62, 5], dtype)
    obs = np.array([2 ** 62 + 1, 5], dtype)
    r = compare_arrays("y", ref, obs)
    assert r.verdict == "mismatch"
    assert r.max_ulp_diff == 1.0 and r.required_ulp == 1.0 and r.required_atol == 1.0
    assert compare_arrays("y", ref, obs, Tolerance(max_ulp=1)).verdict == "within_tolerance"


def test_bfloat16():
    ref = np.array([1.0, 2.0, -3.5], BF16)
    assert compare_arrays("y", ref, ref.copy()).verdict == "bitwise"
    one_up = np.nextafter(ref, np.full_like(ref, np.inf))
    r = compare_arrays("y", ref, one_up)
    assert r.dtype_ref == "bfloat16"
    assert r.max_ulp_diff == 1.0
    assert (r.atol, r.rtol, r.max_ulp) == DEFAULT_TOLERANCES["bfloat16"]
    assert r.verdict == "within_tolerance"  # 1 ULP of bfloat16 at 2 is 2**-6 < 1e-2 + 1e-2*2
    assert compare_arrays("y", ref, one_up, EXACT).verdict == "mismatch"
    assert compare_arrays("y", ref, one_up, Tolerance(atol=0, rtol=0, max_ulp=1)).verdict == "within_tolerance"
    # float32 observed against a bfloat16 reference is a dtype mismatch
    assert compare_arrays("y", ref, ref.astype(np.float32)).verdict == "mismatch"


def test_ulp_measured_on_reference_dtype():
    ref = np.array([1.0], np.float16)
    obs = np.array([np.nextafter(np.float16(1), np.float16(2))], np.float32)  # cast back: 1 ULP in float16
    r = compare_arrays("y", ref, obs, Tolerance(max_ulp=1))
    assert r.max_ulp_diff == 1.0
    assert r.verdict == "mismatch" and "dtype" in r.reason


def test_float16_defaults():
    ref = np.array([1.0], np.float16)
    obs = np.array([1.0009765625], np.float16)  # 1 ULP above 1.0
    assert compare_arrays("y", ref, obs).verdict == "within_tolerance"
    obs = np.array([1.0078125], np.float16)  # 8 ULP, |d| = 7.8e-3 > 1e-3 + 1e-3
    assert compare_arrays("y", ref, obs).verdict == "mismatch"


def test_rtol_is_relative_to_reference():
    ref, obs = np.array([100.0]), np.array([101.0])
    assert compare_arrays("y", ref, obs, Tolerance(atol=0, rtol=0.01, max_ulp=0)).verdict == "within_tolerance"
    # swapped: |d| = 1 > 0.01 * 101? no: 1 <= 1.01, so still within; use a tighter case
    assert compare_arrays("y", obs, ref, Tolerance(atol=0, rtol=1 / 101, max_ulp=0)).verdict == "within_tolerance"
    assert compare_arrays("y", ref, obs, Tolerance(atol=0, rtol=1 / 101, max_ulp=0)).verdict == "mismatch"


def test_to_dict_maps_nan_to_none():
    r = compare_arrays("y", np.zeros(2), np.zeros(3))
    d = r.to_dict()
    assert d["max_abs_diff"] is None and d["verdict"] == "mismatch" and d["shape_obs"] == (3,)


# ---------------------------------------------------------------- compare_arrays: properties

@SETTINGS
@given(float_pairs())
def test_identical_arrays_bitwise(pair):
    ref, _ = pair
    r = compare_arrays("y", ref, ref.copy(), EXACT)
    assert r.verdict == "bitwise"
    assert (r.max_abs_diff, r.max_ulp_diff, r.mismatch_fraction, r.required_atol) == (0, 0, 0, 0)


@SETTINGS
@given(float_pairs())
def test_mismatch_fraction_is_fraction_of_differing_bytes(pair):
    ref, obs = pair
    r = compare_arrays("y", ref, obs)
    assert 0.0 <= r.mismatch_fraction <= 1.0
    utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[ref.dtype.itemsize]
    expected = float(np.mean(ref.view(utype) != obs.view(utype))) if ref.size else 0.0
    assert r.mismatch_fraction == pytest.approx(expected)
    assert (r.verdict == "bitwise") == (expected == 0.0)


def _check_required(ref, obs, attr, make):
    r = compare_arrays("y", ref, obs, EXACT)
    assume(r.verdict != "bitwise" and r.nonfinite_mismatch == 0)
    req = getattr(r, attr)
    assume(math.isfinite(req))
    at = compare_arrays("y", ref, obs, make(req))
    assert at.verdict == "within_tolerance", (attr, req, at)
    return r, req


def _one_step_up(values):
    ref = np.array(values)
    obs = ref.copy()
    obs[0] = np.nextafter(ref[0], np.inf)
    return ref, obs


# Found by Hypothesis: |d| and rtol*|ref| both subnormal, so float64 products
# could not tell req from req*(1-1e-9); the comparison is now exact.
SUBNORMAL_PRODUCT = _one_step_up([2.67633062e-303, 0.0])
# Found by Hypothesis: obs - ref rounds down in float64 (and err*s underflows).
ROUNDED_DIFFERENCE = (np.array([-1.40939767e-282, -1.40939767e-282]), np.array([1.52649046e-165, 0.0]))


@SETTINGS
@given(float_pairs())
@example(SUBNORMAL_PRODUCT)
@example(ROUNDED_DIFFERENCE)
def test_required_atol_is_tight(pair):
    ref, obs = pair
    r, req = _check_required(ref, obs, "required_atol", lambda t: Tolerance(atol=t, rtol=0, max_ulp=0))
    if req > 0:
        below = float(np.nextafter(req, 0.0))
        assert compare_arrays("y", ref, obs, Tolerance(atol=below, rtol=0, max_ulp=0)).verdict == "mismatch"


@SETTINGS
@given(float_pairs())
@example(SUBNORMAL_PRODUCT)
@example(ROUNDED_DIFFERENCE)
def test_required_rtol_is_tight(pair):
    ref, obs = pair
    r, req = _check_required(ref, obs, "required_rtol", lambda t: Tolerance(atol=0, rtol=t, max_ulp=0))
    if req > 0:
        below = req * (1 - 1e-9)  # far below any float32 step; the comparison is exact
        assert compare_arrays("y", ref, obs, Tolerance(atol=0, rtol=below, max_ulp=0)).verdict == "mismatch"


@SETTINGS
@given(float_pairs())
def test_required_ulp_is_tight(pair):
    ref, obs = pair
    r, req = _check_required(ref, obs, "required_ulp", lambda t: Tolerance(atol=0, rtol=0, max_ulp=t))
    # +0 vs -0 is 1 ULP apart yet numerically equal, so 0 ULP accepts it; a real difference needs req
    if req > 0 and r.required_atol > 0:
        below = min(req - 1, float(np.nextafter(req, 0.0)))  # float64 distances > 2**53 are rounded
        assert compare_arrays("y", ref, obs, Tolerance(atol=0, rtol=0, max_ulp=below)).verdict == "mismatch"


tol_values = st.one_of(st.just(0.0), st.floats(1e-12, 1e3), st.just(math.inf))


@SETTINGS
@given(float_pairs(), tol_values, tol_values, st.integers(0, 10),
       *[st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))] * 3)
def test_verdict_monotone_in_tolerance(pair, atol, rtol, ulp, fa, fr, fu):
    ref, obs = pair
    def shrink(v, f):
        return 0.0 if f == 0 else v * f  # inf * 0 would be NaN

    big = compare_arrays("y", ref, obs, Tolerance(atol=atol, rtol=rtol, max_ulp=ulp))
    small = compare_arrays("y", ref, obs, Tolerance(atol=shrink(atol, fa), rtol=shrink(rtol, fr),
                                                    max_ulp=math.floor(ulp * fu)))
    assert RANK[small.verdict] >= RANK[big.verdict]


# ---------------------------------------------------------------- compare_outputs

def test_compare_outputs_worst_verdict():
    ref = {"a": np.float32([1, 2]), "b": np.float32([3, 4]), "c": np.int32([1])}
    obs = {"a": ref["a"].copy(), "b": np.float32([3, np.nextafter(4, 5, dtype=np.float32)]), "c": np.int32([1])}
    c = compare_outputs(ref, obs)
    assert isinstance(c, Comparison)
    assert c.verdict == "within_tolerance" and c.reason is None
    assert [o.name for o in c.outputs] == ["a", "b", "c"]
    assert [o.verdict for o in c.outputs] == ["bitwise", "within_tolerance", "bitwise"]
    assert c.max_ulp_diff == 1.0
    assert c.mismatch_fraction == pytest.approx(1 / 5)
    obs["c"] = np.int32([2])
    c = compare_outputs(ref, obs)
    assert c.verdict == "mismatch" and c.reason.startswith("c: ")
    assert compare_outputs(ref, ref).verdict == "bitwise"
    assert compare_outputs({}, {}).verdict == "bitwise"


def test_compare_outputs_missing_and_extra_are_named():
    ref = {"a": np.zeros(2), "b": np.zeros(2)}
    c = compare_outputs(ref, {"a": np.zeros(2), "z": np.zeros(2)})
    assert c.verdict == "mismatch"
    assert "'b'" in c.reason and "'z'" in c.reason
    assert [o.name for o in c.outputs] == ["a"]
    c = compare_outputs(ref, {"a": np.zeros(2)})
    assert c.verdict == "mismatch" and "'b'" in c.reason


def test_compare_outputs_per_output_override():
    ref = {"a": np.array([1.0]), "b": np.array([1.0])}
    obs = {"a": np.array([1.1]), "b": np.array([1.1])}
    base = Tolerance(atol=0.0, rtol=0.0)
    c = compare_outputs(ref, obs, base, per_output={"a": Tolerance(atol=0.2)})
    assert [o.verdict for o in c.outputs] == ["within_tolerance", "mismatch"]
    assert c.outputs[0].atol == 0.2 and c.outputs[0].rtol == 0.0
    assert c.verdict == "mismatch" and c.reason.startswith("b: ")
    c = compare_outputs(ref, obs, base, per_output={"a": Tolerance(atol=0.2), "b": Tolerance(rtol=0.2)})
    assert c.verdict == "within_tolerance"
    assert c.required[0] == pytest.approx(0.1) and c.applied[0] == 0.2


def test_worst():
    assert worst([]) == "bitwise"
    assert worst(["bitwise", "within_tolerance"]) == "within_tolerance"
    assert worst(["within_tolerance", "mismatch", "bitwise"]) == "mismatch"


# ---------------------------------------------------------------- compare_digests

def _d(sha="aa" * 32, shape=(2, 3), dtype="float32"):
    return {"sha256": sha, "shape": list(shape), "dtype": dtype}


def test_digests_exact():
    ref = {"dense/kernel": _d(), "dense/bias": _d(shape=(3,))}
    check = compare_digests(ref, dict(ref))
    assert check == WeightCheck(equal=True, problems=[], notes=[], checked=2, ignored_state=[])


def test_digests_suffix_match_both_ways():
    ref = {"dense/kernel": _d(), "dense/bias": _d(shape=(3,))}
    obs = {"sequential/dense/bias": _d(shape=(3,)), "sequential/dense/kernel": _d()}
    assert compare_digests(ref, obs).equal and compare_digests(ref, obs).checked == 2
    assert compare_digests(obs, ref).equal


def test_digests_never_pair_by_position():
    """Unrelated names are not paired, even when shapes and bytes would fit."""
    ref = {"kernel": _d("11" * 32), "bias": _d("22" * 32, shape=(3,))}
    obs = {"variable": _d("11" * 32), "variable_1": _d("22" * 32, shape=(3,))}
    check = compare_digests(ref, obs)
    assert not check.equal
    assert sorted(check.problems) == ["bias: not restored", "kernel: not restored",
                                      "variable: unexpected extra variable", "variable_1: unexpected extra variable"]


def test_digests_differing_bytes_shape_dtype():
    ref = {"k": _d("11" * 32), "b": _d(shape=(3,)), "m": _d()}
    obs = {"k": _d("99" * 32), "b": _d(shape=(4,)), "m": _d(dtype="float16")}
    check = compare_digests(ref, obs)
    problems = check.problems
    assert not check.equal and check.checked == 3
    assert len(problems) == 3
    assert any(p.startswith("k:") and "bytes differ" in p and "999999999999" in p for p in problems)
    assert any(p.startswith("b:") and "[4]" in p and "[3]" in p for p in problems)
    assert any(p.startswith("m:") and "float16" in p and "float32" in p for p in problems)


def test_digests_missing_and_extra():
    ref = {"dense/kernel": _d(), "dense/bias": _d(shape=(3,))}
    check = compare_digests(ref, {"dense/kernel": _d()})
    assert not check.equal and check.problems == ["dense/bias: not restored"]
    check = compare_digests(ref, {**ref, "extra/var": _d()})
    assert not check.equal and check.problems == ["extra/var: unexpected extra variable"]
    check = compare_digests({}, {})
    assert check.equal and check.problems == [] and check.checked == 0


# ---------------------------------------------------------------- prediction impact

from harness.compare import Impact, output_kind, prediction_impact  # noqa: E402


def test_output_kinds_are_guessed_and_can_be_declared():
    assert output_kind(np.zeros((4, 10), np.float32)) == "classes"
    assert output_kind(np.full((4, 1), 0.3, np.float32)) == "binary"
    assert output_kind(np.full((4, 1), 3.0, np.float32)) == "regression"
    assert output_kind(np.zeros(4, np.int64)) == "labels"
    assert output_kind(np.zeros((4, 10), np.float32), "regression") == "regression"
    with pytest.raises(ValueError, match="unknown output kind 'probabilities'"):
        output_kind(np.zeros(3), "probabilities")


def test_hand_built_class_flips_and_rank_changes():
    ref = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]], np.float32)
    obs = ref.copy()
    obs[0] = [0.1, 0.44, 0.46]  # top-1 flips from class 1 to class 2
    obs[1] = [0.7, 0.1, 0.2]  # top-1 kept, classes 1 and 2 swap ranks
    impact = prediction_impact(ref, obs)
    assert impact == Impact("classes", positions=4, flips=1, k=3, max_rank_change=1)
    assert impact.flip_fraction == 0.25
    obs[3] = [0.7, 0.2, 0.1]  # class 2 falls from first to last
    assert prediction_impact(ref, obs).max_rank_change == 2


def test_binary_threshold_and_labels_and_regression():
    ref = np.array([[0.49], [0.51], [0.9]], np.float32)
    obs = np.array([[0.50], [0.51], [0.9]], np.float32)
    assert prediction_impact(ref, obs) == Impact("binary", positions=3, flips=1)
    assert prediction_impact(np.array([1, 2, 3]), np.array([1, 0, 3])) == Impact("labels", positions=3, flips=1)
    assert prediction_impact(np.array([[3.0], [4.0]]), np.array([[3.5], [4.0]])) is None
    assert prediction_impact(np.zeros((2, 3)), np.zeros((3, 3))) is None  # shapes differ: nothing to say


def test_last_bit_differences_flip_nothing():
    ref = np.random.default_rng(0).random((64, 10)).astype(np.float32)
    obs = np.nextafter(ref, np.float32(2))  # every element one ULP up: same order
    assert prediction_impact(ref, obs) == Impact("classes", positions=64, flips=0, k=5, max_rank_change=0)


def test_sequence_outputs_count_positions_and_bfloat16_works():
    import ml_dtypes

    ref = np.random.default_rng(1).random((4, 6, 3)).astype(ml_dtypes.bfloat16)
    impact = prediction_impact(ref, ref.copy())
    assert impact.positions == 24 and impact.flips == 0


def test_impacts_per_output_use_declared_kinds_and_summarize():
    from harness.compare import impact_summary, prediction_impacts

    ref = {"cls": np.array([[0.9, 0.1], [0.4, 0.6]], np.float32), "reg": np.array([[0.2], [0.7]], np.float32)}
    obs = {"cls": np.array([[0.9, 0.1], [0.6, 0.4]], np.float32), "reg": np.array([[0.6], [0.7]], np.float32)}
    guessed = prediction_impacts(ref, obs)
    assert guessed["reg"] == Impact("binary", positions=2, flips=1)  # values in [0, 1]: taken for a score
    declared = prediction_impacts(ref, obs, {"reg": "regression"})
    assert set(declared) == {"cls"} and declared["cls"].flips == 1
    assert impact_summary(guessed) == (2, 0.5, 1)
    assert impact_summary(declared) == (1, 0.5, 1)
    assert impact_summary({}) == (None, None, None)
    assert prediction_impacts(ref, {"cls": obs["cls"][:1]}) == {}  # other shape, or missing: nothing to say


def test_scenario_outputs_must_name_known_kinds():
    from harness.scenario import Scenario, ScenarioError

    def probe(rng):
        return np.zeros((2, 2), np.float32)

    with pytest.raises(ScenarioError, match=r"outputs\['y'\] is 'probabilities'; use one of classes"):
        Scenario(name="s", train=lambda seed: None, probe=probe, outputs={"y": "probabilities"})
    with pytest.raises(ScenarioError, match="outputs= must map output names"):
        Scenario(name="s", train=lambda seed: None, probe=probe, outputs=["classes"])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), classes=st.integers(2, 12), seed=st.integers(0, 2 ** 32 - 1),
       moved=st.floats(0, 1))
def test_prediction_impact_invariants(rows, classes, seed, moved):
    """Flips never exceed the positions; identical outputs flip nothing; a flip moves a top class in rank."""
    rng = np.random.default_rng(seed)
    ref = rng.random((rows, classes)).astype(np.float32)
    assert prediction_impact(ref, ref.copy()) == Impact("classes", rows, 0, min(5, classes), 0)
    obs = ref.copy()
    pick = rng.random(rows) < moved
    obs[pick] = rng.random((int(pick.sum()), classes)).astype(np.float32)  # some rows redrawn
    impact = prediction_impact(ref, obs)
    assert 0 <= impact.flips <= int(pick.sum()) and impact.flips <= impact.positions == rows
    assert 0 <= impact.max_rank_change <= classes - 1
    if impact.flips:
        assert impact.max_rank_change >= 1
    expected_flips = int(np.count_nonzero(np.argmax(ref, -1) != np.argmax(obs, -1)))
    assert impact.flips == expected_flips  # top-1 is the first of equal maxima, as np.argmax takes it


# -- accuracy against a float64 oracle (PyTorch's rule) -----------------------------------------
from harness.compare import (  # noqa: E402
    Accuracy,
    MetricChange,
    accuracy_multiplier,
    binary_auc,
    judge_accuracy,
    largest_change,
    metric_changes,
    output_accuracy,
    task_metric,
)


def test_multiplier_is_pytorchs_two_or_three():
    assert accuracy_multiplier(1000, np.float32) == 2.0 and accuracy_multiplier(999, np.float32) == 3.0
    assert accuracy_multiplier(10 ** 6, np.float32, np.float16) == 3.0
    assert accuracy_multiplier(10 ** 6, BF16, np.float32) == 3.0
    assert accuracy_multiplier(10 ** 6, np.float64, np.float32) == 2.0


def _exact_case(obs_step: float, n: int = 1000):
    """An oracle, a reference exactly 2**-10 off everywhere, an observation exactly ``obs_step`` off."""
    truth = np.arange(n) * 0.25  # exact in float64, and the offsets below add exactly
    sign = np.where(np.arange(n) % 2, 1.0, -1.0)
    return truth, truth + sign * 2.0 ** -10, truth + sign * obs_step


def test_rule_boundary_is_exact_and_tol_over_ten_widens_it():
    truth, ref, _ = _exact_case(0)
    at = output_accuracy("y", truth, ref, _exact_case(2.0 ** -9)[2], tol=0.0)  # rmse = 2 x reference's: passes
    assert (at.tier, at.rmse, at.reference_rmse, at.multiplier) == ("as_accurate", 2.0 ** -9, 2.0 ** -10, 2.0)
    over = output_accuracy("y", truth, ref, _exact_case(2.0 ** -9 + 2.0 ** -30)[2], tol=0.0)
    assert over.tier == "less_accurate" and over.excess > 0
    assert output_accuracy("y", truth, ref, _exact_case(2.0 ** -9 + 2.0 ** -30)[2], tol=1e-6).tier == "as_accurate"
    small = output_accuracy("y", truth[:999], ref[:999], _exact_case(3 * 2.0 ** -10, 999)[2], tol=0.0)
    assert (small.tier, small.multiplier) == ("as_accurate", 3.0)  # under 1,000 elements: m = 3


@st.composite
def oracle_and_reference(draw):
    n = draw(st.integers(1, 300))
    truth = draw(hnp.arrays(np.float64, n, elements=st.floats(-1e6, 1e6, allow_nan=False)))
    ulps = draw(hnp.arrays(np.int32, n, elements=st.integers(-4, 4)))
    ref = (truth.astype(np.float32).view(np.int32) + ulps).view(np.float32)
    assume(np.isfinite(ref).all())
    return truth, ref


@SETTINGS
@given(oracle_and_reference())
def test_identical_bits_and_nearest_rounding_are_always_as_accurate(case):
    truth, ref = case
    assert output_accuracy("y", truth, ref, ref.copy(), tol=0.0).tier == "as_accurate"
    # Rounding the oracle to nearest is the best float32 can do, element by element.
    best = output_accuracy("y", truth, ref, truth.astype(np.float32), tol=0.0)
    assert best.tier == "as_accurate" and best.rmse <= best.reference_rmse


def test_half_precision_serving_of_a_float32_model_is_less_accurate():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(64, 3))
    ref = truth.astype(np.float32)
    for half in (np.float16, BF16):
        out = output_accuracy("y", truth, ref, truth.astype(half), tol=1e-6)
        assert out.tier == "less_accurate" and out.multiplier == 3.0 and out.rmse > 100 * out.reference_rmse


def test_nonfinite_values_must_sit_where_the_oracle_has_them():
    truth = np.array([1.0, np.nan, np.inf, 4.0] * 10)
    ref = truth.astype(np.float32)
    assert output_accuracy("y", truth, ref, ref.copy(), 0.0).tier == "as_accurate"
    obs = ref.copy()
    obs[0] = np.nan  # NaN where the oracle is finite
    bad = output_accuracy("y", truth, ref, obs, 0.0)
    assert bad.tier == "less_accurate" and "NaN/Inf" in bad.reason
    obs = ref.copy()
    obs[2] = -np.inf  # another infinity than the oracle's
    assert output_accuracy("y", truth, ref, obs, 0.0).tier == "less_accurate"
    obs = ref.copy()
    obs[1] = 0.0  # finite where the oracle is NaN
    assert output_accuracy("y", truth, ref, obs, 0.0).tier == "less_accurate"
    # The reference overflowed where float64 did not; an observation that did not is not worse.
    wrong_ref = ref.copy()
    wrong_ref[3::4] = np.inf
    fine = output_accuracy("y", truth, wrong_ref, ref, 0.0)
    assert fine.tier == "as_accurate" and fine.reference_nonfinite == 10
    # Both overflowed alike: left out, the rest judged.
    assert output_accuracy("y", truth, wrong_ref, wrong_ref.copy(), 0.0).tier == "as_accurate"


def test_outputs_without_rounding_error_or_without_an_observation():
    ids = np.array([1, 2, 3])
    assert output_accuracy("c", ids.astype(np.float64), ids, ids, 0.0).tier == "n/a"
    text = np.array([b"a", b"b"], dtype=object)
    assert "string output" in output_accuracy("s", np.zeros(2), text, text, 0.0).reason
    truth = np.linspace(0, 1, 8)
    ref = truth.astype(np.float32)
    assert output_accuracy("y", truth, ref, None, 0.0).reason == "output missing"
    assert output_accuracy("y", truth, ref, ref[:4], 0.0).tier == "less_accurate"
    assert output_accuracy("y", truth, ref, (ref * 100).astype(np.int32), 0.0).tier == "less_accurate"


def test_cell_tier_is_the_worst_output_and_names_it():
    truth = {"a": np.linspace(0, 1, 50), "b": np.linspace(1, 2, 50), "ids": np.arange(50.0)}
    ref = {"a": truth["a"].astype(np.float32), "b": truth["b"].astype(np.float32), "ids": np.arange(50)}
    obs = {**ref, "b": truth["b"].astype(np.float16)}
    oracle = {k: v for k, v in truth.items() if k != "ids"}
    acc = judge_accuracy(oracle, ref, obs, {"a": 1e-6, "b": 1e-6}, unavailable={"ids": "integer output"})
    assert acc.tier == "less_accurate" and acc.decisive.name == "b"
    assert acc.rmse == acc.decisive.rmse and acc.note.startswith("b: rmse vs float64 ") and " > 3 x " in acc.note
    assert [o.tier for o in acc.outputs] == ["as_accurate", "less_accurate", "n/a"]
    same = judge_accuracy(oracle, ref, ref, {})
    assert same.tier == "as_accurate" and " <= " in same.note
    none = judge_accuracy(None, ref, obs, reason="the scenario produced a plain TwoLayerMLP")
    assert (none.tier, none.note, none.rmse) == ("n/a", "the scenario produced a plain TwoLayerMLP", None)
    only_ids = judge_accuracy({}, {"ids": ref["ids"]}, {"ids": ref["ids"]}, unavailable={"ids": "integer output"})
    assert only_ids.tier == "n/a" and only_ids.note == "ids: integer output"
    assert Accuracy("n/a").decisive is None


# -- task metrics ---------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.booleans()), min_size=2, max_size=40))
def test_auc_is_the_share_of_correctly_ordered_pairs(pairs):
    scores = np.array([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs])
    assume(0 < labels.sum() < len(labels))
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert binary_auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_task_metrics_by_output_kind():
    scores = np.array([[0.1], [0.7], [0.4], [0.9]])
    assert task_metric("accuracy", scores, np.array([0, 1, 1, 1]), "binary") == 0.75
    assert task_metric("auc", scores, np.array([0, 1, 0, 1]), "binary") == 1.0
    classes = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert task_metric("accuracy", classes, np.array([1, 0, 0]), "classes") == pytest.approx(2 / 3)
    assert task_metric("accuracy", classes, np.eye(2)[[1, 0, 0]], "classes") == pytest.approx(2 / 3)  # one-hot
    assert task_metric("auc", classes, np.array([1, 0, 1]), "classes") == 1.0
    assert task_metric("accuracy", np.array([2, 1, 0]), np.array([2, 1, 1]), "labels") == pytest.approx(2 / 3)
    y = np.array([[1.0], [2.0]], np.float32)
    assert task_metric("mse", y, np.array([1.5, 2.0]), "regression") == 0.125
    assert task_metric("mae", y, np.array([1.5, 2.0]), "regression") == 0.25
    with pytest.raises(ValueError, match="regression"):
        task_metric("accuracy", y, np.array([1, 2]), "regression")
    with pytest.raises(ValueError, match="both positive and negative"):
        task_metric("auc", scores, np.ones(4), "binary")
    with pytest.raises(ValueError, match="one target per output element"):
        task_metric("mse", y, np.ones(3), "regression")
    with pytest.raises(ValueError, match="unknown metric"):
        task_metric("f1", y, np.ones(2), "regression")


def test_metric_changes_pick_the_output_that_moved_most():
    labels = {"p": np.array([0, 1, 1, 0]), "q": np.array([1.0, 2.0, 3.0, 4.0])}
    ref = {"p": np.array([[0.2], [0.6], [0.7], [0.4]]), "q": np.array([1.0, 2.0, 3.0, 4.0])}
    obs = {"p": np.array([[0.2], [0.4], [0.7], [0.4]]), "q": np.array([1.0, 2.0, 3.0, 4.0])}
    changes = metric_changes("mae", labels, ref, obs, {"p": "binary"})
    assert [c.output for c in changes] == ["p", "q"]
    top = largest_change(changes)
    assert top.output == "p" and top.delta == pytest.approx(0.05)
    acc = metric_changes("accuracy", {"p": labels["p"]}, ref, obs)
    assert (acc[0].reference, acc[0].observed, acc[0].delta) == (1.0, 0.75, -0.25)
    gone = metric_changes("mae", {"p": labels["p"]}, ref, {})
    assert gone[0].reason == "output missing" and math.isnan(gone[0].delta)
    assert largest_change([MetricChange("mse", "a", 1.0, 5.0), gone[0]]) is gone[0]  # undefined counts as largest
    assert largest_change([]) is None
