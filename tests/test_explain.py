"""harness.explain: layer traces of real Keras models and their layer-by-layer comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import arrays
from harness.explain import (
    LayerDiff,
    arrays_to_trace,
    compare_traces,
    divergence,
    first_divergent,
    most_growth,
    trace_layers,
    trace_to_arrays,
)


def _call(name, inputs, outputs):
    return {"name": name, "inputs": inputs, "outputs": outputs}


def test_compare_traces_finds_the_start_and_the_growth():
    x = np.linspace(1, 2, 12, dtype=np.float32).reshape(3, 4)
    bumped = x.copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(9))
    big = x * np.float32(1.01)
    ref = [_call("a", [x], [x]), _call("b", [x], [x]), _call("c", [x], [x])]
    obs = [_call("a", [x], [x]), _call("b", [x], [bumped]), _call("c", [bumped], [big])]
    diffs = compare_traces(ref, obs)
    assert [d.verdict for d in diffs] == ["bitwise", "mismatch", "mismatch"]
    assert first_divergent(diffs).name == "b"
    assert diffs[1].growth == math.inf and diffs[1].max_ulp_diff == 1  # inputs bitwise: it starts here
    assert diffs[2].growth > 1e3  # 1% from a one-ULP input difference
    assert most_growth(diffs).name == "c"  # the largest finite rate of change
    assert most_growth(diffs[:2]).name == "b"  # with only a start, the start
    assert diffs[0].growth is None and diffs[0].output_divergence == 0


def test_compare_traces_refuses_different_models():
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="different layers"):
        compare_traces([_call("a", [x], [x])], [_call("b", [x], [x])])


def test_divergence_is_relative_and_zero_when_equal():
    r = np.array([1.0, -2.0, 3.0], np.float32)
    assert divergence([r], [r]) == 0.0
    assert divergence([r], [r * 1.5]) == pytest.approx(0.5)


def test_trace_round_trips_through_arrow():
    trace = [_call("dense", [np.ones((2, 3), np.float32)], [np.zeros((2, 4), np.float32)]),
             _call("nested/lookup", [np.array([1, 2])], [np.ones((2,), np.int64), np.ones((2, 2), np.float32)])]
    table_arrays, _ = arrays.read_ipc(arrays.to_ipc_bytes(trace_to_arrays(trace)))
    back = arrays_to_trace(table_arrays)
    assert [c["name"] for c in back] == ["dense", "nested/lookup"]
    assert all(np.array_equal(a, b) for c, d in zip(trace, back) for a, b in zip(c["outputs"], d["outputs"]))


@pytest.fixture(scope="module")
def keras_models():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    functional = keras.Model(inp, keras.layers.Dense(4, name="d2")(h))
    nested = keras.Sequential([keras.Input((8,)), functional, keras.layers.Dense(1, name="head")])
    recurrent = keras.Sequential([keras.Input((6,)), keras.layers.Embedding(20, 4, mask_zero=True, name="emb"),
                                  keras.layers.LSTM(3, name="lstm"), keras.layers.Dense(2, name="out")])
    return functional, nested, recurrent


@pytest.mark.parametrize("jit", [False, True])
def test_trace_layers_of_functional_nested_and_recurrent_models(keras_models, jit):
    functional, nested, recurrent = keras_models
    x = np.random.default_rng(0).random((10, 8)).astype(np.float32)
    trace = trace_layers(nested, x, batch_size=4, jit_compile=jit)
    assert [c["name"] for c in trace] == ["functional/d1", "functional/d2", "head"]
    assert trace[0]["inputs"][0].shape == (10, 8) and trace[-1]["outputs"][0].shape == (10, 1)
    np.testing.assert_allclose(trace[-1]["outputs"][0], nested.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    tokens = np.random.default_rng(1).integers(0, 20, (5, 6))
    names = [c["name"] for c in trace_layers(recurrent, tokens, batch_size=5, jit_compile=jit)]
    assert names == ["emb", "lstm", "out"]  # the LSTM is one step: its cell runs inside a loop
    # The model's own call is untouched afterwards.
    assert "wrapper" not in repr(functional.layers[1].call)
