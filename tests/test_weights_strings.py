"""Weight-check rules (compare_digests), string and low-precision arrays through
Arrow and the comparison: pure numpy, no TensorFlow."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from harness.arrays import read_ipc, to_ipc_bytes
from harness.compare import Tolerance, WeightCheck, compare_arrays, compare_digests, compare_outputs, state_kind

BF16 = np.dtype(ml_dtypes.bfloat16)


def _d(sha="aa", shape=(2, 3), dtype="float32", **extra):
    return {"sha256": sha * 32, "shape": list(shape), "dtype": dtype, **extra}


# Parameters of a small Dense-Dropout-BatchNorm-Dense model, as the training worker records them.
REF = {
    "sequential/dense/kernel": _d("01", (6, 16)),
    "sequential/dense/bias": _d("02", (16,)),
    "sequential/batch_normalization/gamma": _d("03", (16,)),
    "sequential/batch_normalization/beta": _d("04", (16,)),
    "sequential/batch_normalization/moving_mean": _d("05", (16,)),
    "sequential/batch_normalization/moving_variance": _d("06", (16,)),
    "sequential/dense_1/kernel": _d("07", (16, 2)),
    "sequential/dense_1/bias": _d("08", (2,)),
}


# ---------------------------------------------------------------- weight rules

def test_extra_rng_state_is_ignored_but_reported():
    obs = {**REF, "seed_generator/seed_generator_state": _d("99", (2,), "uint32"),
           "seed_generator_3/seed_generator_state": _d("98", (2,), "uint32")}
    check = compare_digests(REF, obs)
    assert check.equal and check.problems == [] and check.checked == len(REF)
    assert check.ignored_state == ["seed_generator/seed_generator_state", "seed_generator_3/seed_generator_state"]
    assert len(check.notes) == 2 and all(n.startswith("rng state ") and "only in the reloaded" in n for n in check.notes)


def test_optimizer_and_metric_state_are_ignored_on_either_side():
    ref = {**REF, "adam/iteration": _d("10", (), "int64"),
           "loss_scale_optimizer/adam_1/sequential_dense_kernel_momentum": _d("11", (6, 16)),
           "mean_absolute_error/total": _d("12", (), kind="metric")}
    obs = {**REF, "iterations": _d("13", (), "int64"), "auc/true_positives": _d("14", (200,), kind="metric")}
    check = compare_digests(ref, obs)
    assert check.equal, check.problems
    assert sorted(check.ignored_state) == sorted(["adam/iteration", "iterations", "mean_absolute_error/total",
                                                  "loss_scale_optimizer/adam_1/sequential_dense_kernel_momentum",
                                                  "auc/true_positives"])
    assert {n.split()[0] for n in check.notes} == {"optimizer", "metric"}
    # state with other bytes on both sides is a note too, never a failure
    check = compare_digests({**REF, "adam/iteration": _d("10", (), "int64")},
                            {**REF, "adam/iteration": _d("20", (), "int64")})
    assert check.equal and check.ignored_state == ["adam/iteration"] and "bytes differ" in check.notes[0]


def test_a_parameter_named_like_a_metric_is_still_a_parameter():
    """Normalization's `count` and a layer named `total` are parameters unless the saver said otherwise."""
    assert state_kind("normalize/count") is None and state_kind("mean/total") is None
    assert state_kind("mean/total", {"kind": "metric"}) == "metric"
    check = compare_digests({**REF, "normalize/count": _d("30", (), "int64")}, REF)
    assert not check.equal and check.problems == ["normalize/count: not restored"]


def test_missing_parameter_fails():
    obs = dict(REF)
    del obs["sequential/batch_normalization/moving_variance"]  # BatchNorm statistics are parameters
    check = compare_digests(REF, obs)
    assert not check.equal and check.problems == ["sequential/batch_normalization/moving_variance: not restored"]
    assert check.checked == len(REF)


def test_extra_parameter_fails():
    check = compare_digests(REF, {**REF, "sequential/dense_2/kernel": _d("40", (2, 2))})
    assert not check.equal and check.problems == ["sequential/dense_2/kernel: unexpected extra variable"]


@pytest.mark.parametrize("change, needle", [({"shape": [16, 3]}, "float32[16, 3] != original float32[16, 2]"),
                                            ({"dtype": "float16"}, "float16[16, 2] != original float32[16, 2]")])
def test_shape_or_dtype_change_fails(change, needle):
    obs = {**REF, "sequential/dense_1/kernel": {**REF["sequential/dense_1/kernel"], **change}}
    check = compare_digests(REF, obs)
    assert not check.equal and check.problems == [f"sequential/dense_1/kernel: {needle}"]


def test_bytes_change_fails():
    obs = {**REF, "sequential/batch_normalization/moving_mean": _d("55", (16,))}
    check = compare_digests(REF, obs)
    assert not check.equal
    assert check.problems == ["sequential/batch_normalization/moving_mean: restored bytes differ from the "
                              "original (sha256 555555555555 != 050505050505)"]


def test_renamed_auto_named_layers_are_matched_by_structure():
    """The model rebuilt in a process that built models before: sequential_1, dense_2, dense_3 ..."""
    renames = {"sequential": "sequential_1", "dense": "dense_2", "dense_1": "dense_3",
               "batch_normalization": "batch_normalization_4"}
    obs = {}
    for name, d in reversed(list(REF.items())):  # order must not matter
        parts = name.split("/")
        obs["/".join(renames.get(p, p) for p in parts[:-1]) + "/" + parts[-1]] = d
    check = compare_digests(REF, obs)
    assert check.equal, check.problems
    assert check.checked == len(REF) and "matched by structural path" in check.notes[0]
    assert "sequential_1/dense_3/kernel -> sequential/dense_1/kernel" in check.notes[0]
    # a real difference under renaming is still caught, on the right variable
    obs["sequential_1/dense_3/kernel"] = _d("77", (16, 2))
    check = compare_digests(REF, obs)
    assert check.problems == ["sequential/dense_1/kernel: restored bytes differ from the original "
                              "(sha256 777777777777 != 070707070707)"]


def test_never_paired_by_position_even_when_shapes_line_up():
    """The bug of issue 11: leftovers paired by position gave 'dense_1/kernel float32[6,16] != [16,2]'."""
    ref = {"model/dense/kernel": _d("01", (6, 16)), "model/dense_1/kernel": _d("07", (16, 2))}
    obs = {"other/encoder/kernel": _d("01", (6, 16)), "other/head/kernel": _d("07", (16, 2))}
    check = compare_digests(ref, obs)
    assert not check.equal
    assert sorted(check.problems) == ["model/dense/kernel: not restored", "model/dense_1/kernel: not restored",
                                      "other/encoder/kernel: unexpected extra variable",
                                      "other/head/kernel: unexpected extra variable"]


def test_ambiguous_structure_is_not_guessed():
    ref = {"a/dense/kernel": _d("01"), "b/dense/kernel": _d("02")}
    obs = {"c_1/dense/kernel": _d("01"), "d_1/dense/kernel": _d("02")}
    check = compare_digests(ref, obs)
    assert not check.equal and len(check.problems) == 4


def test_weight_check_is_a_frozen_dataclass():
    check = compare_digests(REF, REF)
    assert check == WeightCheck(equal=True, problems=[], notes=[], checked=len(REF), ignored_state=[])
    with pytest.raises(Exception):
        check.equal = False


# ---------------------------------------------------------------- strings and low precision

def _obj(values, shape):
    a = np.empty(len(values), object)
    a[:] = values
    return a.reshape(shape)


def test_string_probe_and_output_round_trip_exactly_through_arrow():
    arrays = {"input/words": _obj([b"red", b"", b"\xff\x00", "é".encode(), b"blue", b"x"], (2, 3)),
              "input/text": _obj(["a bright red sun", "ünïcode"], (2, 1)),
              "input/fixed": np.array([["ab", "c"], ["", "d"]], "U2"),
              "output/label": _obj([b"warm", b"cool"], (2,)),
              "output/probs": np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)}
    out, meta = read_ipc(to_ipc_bytes(arrays, {"k": 1}))
    assert meta == {"k": 1} and list(out) == list(arrays)
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert [type(x) for x in out[k].reshape(-1)] == [type(x) for x in v.reshape(-1)], k
        assert out[k].tolist() == v.tolist(), k
        assert compare_arrays(k, v, out[k]).verdict == "bitwise"


def test_mixed_object_arrays_are_refused():
    with pytest.raises(TypeError, match="only arrays of bytes or of str"):
        to_ipc_bytes({"x": _obj([b"a", "b"], (2,))})


def test_strings_equal_bitwise_differ_mismatch_with_a_reason():
    ref = _obj([b"warm", b"cool", b"neutral", b"warm"], (2, 2))
    same = compare_outputs({"label": ref}, {"label": ref.copy()})
    assert same.verdict == "bitwise" and same.max_ulp_diff == 0
    obs = ref.copy()
    obs[1, 0] = b"cool"
    r = compare_arrays("label", ref, obs)
    assert r.verdict == "mismatch" and r.mismatch_fraction == 0.25 and r.first_mismatch_index == (1, 0)
    assert "1 of 4 strings differ" in r.reason and "no tolerance applies" in r.reason
    assert "b'cool' != reference b'neutral'" in r.reason
    assert math.isinf(r.required_ulp) and math.isinf(r.required_atol)
    # a huge tolerance changes nothing: strings are exact-only
    assert compare_arrays("label", ref, obs, Tolerance(atol=1e9, rtol=1e9, max_ulp=1e9)).verdict == "mismatch"
    # bytes vs str of the same text is a difference too
    assert compare_arrays("t", _obj([b"a"], (1,)), _obj(["a"], (1,))).verdict == "mismatch"
    cmp = compare_outputs({"label": ref, "p": np.float32([1])}, {"label": obs, "p": np.float32([1])})
    assert cmp.verdict == "mismatch" and cmp.reason.startswith("label: 1 of 4 strings differ")


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=str)
def test_low_precision_one_ulp_through_arrow_and_compare(dtype):
    ref = np.array([[0.5, -1.25, 3.0], [100.0, -0.0, 7.5]], np.float32).astype(dtype)
    obs = ref.copy()
    bits = obs.view(np.uint16)
    bits[1, 0] += 1  # the next representable value above 100
    stored_ref, _ = read_ipc(to_ipc_bytes({"logits": ref}))
    stored_obs, _ = read_ipc(to_ipc_bytes({"logits": obs}))
    assert stored_ref["logits"].dtype == dtype and stored_ref["logits"].tobytes() == ref.tobytes()
    assert stored_obs["logits"].tobytes() == obs.tobytes()
    r = compare_arrays("logits", stored_ref["logits"], stored_obs["logits"])
    assert r.verdict == "within_tolerance" and r.max_ulp_diff == 1.0 and r.required_ulp == 1.0
    assert r.first_mismatch_index is None and r.mismatch_fraction == pytest.approx(1 / 6)
    step = float(obs[1, 0].astype(np.float32)) - 100.0  # bfloat16: 0.5, float16: 0.0625
    assert r.max_abs_diff == step
    exact = compare_outputs({"logits": stored_ref["logits"]}, {"logits": stored_obs["logits"]},
                            tolerance=Tolerance(0, 0, 0))
    assert exact.verdict == "mismatch" and exact.max_ulp_diff == 1.0
