"""Tests for harness/arrays.py: named numpy arrays <-> uncompressed Arrow IPC, bit exact."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from harness.arrays import from_table, read_ipc, to_ipc_bytes, to_table

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(d) for d in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                "uint8", "uint16", "uint32", "uint64", "bool")] + [BF16]


def assert_same(out: dict, ref: dict) -> None:
    assert list(out) == list(ref)
    for k, v in ref.items():
        v = np.asarray(v)
        assert out[k].dtype == v.dtype, k
        assert out[k].shape == v.shape, k
        assert out[k].tobytes() == v.tobytes(), k  # bit exact (NaN payloads, -0.0)


def roundtrip(arrays: dict, meta=None) -> tuple[dict, dict]:
    return read_ipc(to_ipc_bytes(arrays, meta))


def layout(data: bytes) -> str:
    schema = pa.ipc.open_file(pa.BufferReader(data)).schema
    return json.loads(schema.metadata[b"harness"])["layout"]


def sample(dtype: np.dtype, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if dtype == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array(([int(info.min), int(info.max), 0, 1] * (n // 4 + 1))[:n], dtype).reshape(shape)
    base = np.array([1.5, -0.0, np.inf, -np.inf, np.nan, 3.25, -7.0, 1e-3], np.float64)
    return np.resize(base, n).astype(dtype).reshape(shape)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (5,), (4, 3), (2, 3, 4)], ids=str)
def test_roundtrip_each_dtype_and_rank(dtype, shape):
    arrays = {"x": sample(dtype, shape)}
    out, meta = roundtrip(arrays)
    assert_same(out, arrays)
    assert meta == {}


def test_nan_payloads_and_signed_zero_bit_exact():
    f32 = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000], np.uint32).view(np.float32)
    f16 = np.array([0x7E01, 0xFC01, 0x8000], np.uint16).view(np.float16)
    f64 = np.array([0x7FF8000000000ABC, 0x8000000000000000], np.uint64).view(np.float64)
    bf = np.array([0x7FC1, 0xFF81, 0x8000], np.uint16).view(BF16)
    base = {"f32": f32, "f16": f16, "f64": f64, "bf": bf}
    # lengths differ -> "single" layout; tiled to (2, n) -> "rows" layout with tensor columns;
    # one array alone -> "rows" layout with a plain column
    for arrays in [base, {k: np.tile(v, (2, 1)) for k, v in base.items()}, *({k: v} for k, v in base.items())]:
        assert_same(roundtrip(arrays)[0], arrays)


def test_rows_layout_is_a_plain_table():
    n = 6
    arrays = {
        "logits": np.arange(n * 10, dtype=np.float32).reshape(n, 10),
        "image": np.ones((n, 4, 4, 3), np.float16),
        "label": np.arange(n, dtype=np.int64),
        "mask": np.ones((n, 2), bool),
        "bf": np.ones((n, 3), BF16),
    }
    data = to_ipc_bytes(arrays)
    assert layout(data) == "rows"
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    assert table.num_rows == n
    assert table.column_names == list(arrays)
    t = table.schema.field("logits").type
    assert isinstance(t, pa.FixedShapeTensorType) and t.shape == [10] and t.value_type == pa.float32()
    t = table.schema.field("image").type
    assert isinstance(t, pa.FixedShapeTensorType) and t.shape == [4, 4, 3] and t.value_type == pa.float16()
    assert table.schema.field("label").type == pa.int64()
    mask = table.schema.field("mask").type
    assert isinstance(mask, pa.FixedShapeTensorType) and mask.shape == [2] and mask.value_type == pa.uint8()
    assert table.schema.field("bf").type.value_type == pa.uint16()
    # one row = one example, readable without the harness
    row3 = table.column("logits").chunk(0).to_numpy_ndarray()[3]
    np.testing.assert_array_equal(row3, arrays["logits"][3])
    assert table.column("label").to_pylist() == list(range(n))
    assert table.slice(2, 1).column("image").chunk(0).to_numpy_ndarray().shape == (1, 4, 4, 3)
    assert_same(read_ipc(data)[0], arrays)


def test_single_layout_for_mixed_leading_dims_and_scalars():
    arrays = {"a": np.ones((2, 3), np.float32), "b": np.arange(5, dtype=np.int32), "s": np.float64(2.5),
              "m": np.zeros((3,), bool)}
    data = to_ipc_bytes(arrays)
    assert layout(data) == "single"
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    assert table.num_rows == 1
    assert_same(read_ipc(data)[0], arrays)
    # a lone 0-d array is also "single"
    assert layout(to_ipc_bytes({"s": np.int8(3)})) == "single"


def test_empty_and_zero_size():
    out, meta = roundtrip({}, {"note": "nothing"})
    assert out == {} and meta == {"note": "nothing"}
    for arrays in [{"a": np.zeros((0, 3), np.float32)}, {"a": np.zeros((3, 0), np.float32)},
                   {"a": np.zeros((0,), np.float32), "b": np.float32(1)},
                   {"a": np.zeros((0, 2), bool), "b": np.zeros((0,), np.int8)}]:
        assert_same(roundtrip(arrays)[0], arrays)


def test_non_contiguous_input():
    a = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    b = np.arange(12, dtype=np.int16).reshape(3, 4).T
    assert_same(roundtrip({"a": a, "b": b})[0], {"a": a, "b": b})


def test_user_metadata_roundtrip_and_table_api():
    meta = {"scenario": "mlp", "seed": 7, "nested": {"xs": [1, 2.5, None], "ok": True}}
    arrays = {"y": np.arange(4, dtype=np.float32)}
    out, got = roundtrip(arrays, meta)
    assert got == meta
    table = to_table(arrays, meta)
    out2, got2 = from_table(table)
    assert got2 == meta
    assert_same(out2, arrays)


# ---------------------------------------------------------------- IPC file properties

def test_read_ipc_from_memory_mapped_file_zero_copy(tmp_path):
    arrays = {"a": np.random.default_rng(0).random((2000, 64)).astype(np.float32),
              "b": np.arange(2000, dtype=np.int64)}
    path = tmp_path / "obs.arrow"
    path.write_bytes(to_ipc_bytes(arrays, {"k": 1}))
    before = pa.total_allocated_bytes()
    out, meta = read_ipc(str(path))
    # reading a memory-mapped file allocates (almost) nothing from Arrow's pool
    assert pa.total_allocated_bytes() - before < 64 * 1024
    assert meta == {"k": 1}
    assert_same(out, arrays)
    assert not out["a"].flags.owndata
    out_p, _ = read_ipc(path)  # a pathlib.Path works too
    assert_same(out_p, arrays)


def test_ipc_file_is_uncompressed():
    arrays = {"z": np.zeros((500, 500), np.float32)}  # 1 MB of zeros: any codec would shrink it
    data = to_ipc_bytes(arrays)
    raw = arrays["z"].nbytes
    assert raw <= len(data) < raw + 16 * 1024
    assert data[:6] == b"ARROW1"  # IPC *file* format, not stream
    # sanity: the same table written with a codec is far smaller, so the size check can fail
    table = to_table(arrays)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    assert sink.getvalue().size < raw // 10


def test_read_ipc_accepts_bytearray():
    arrays = {"a": np.arange(3, dtype=np.uint32)}
    assert_same(read_ipc(bytearray(to_ipc_bytes(arrays)))[0], arrays)


# ---------------------------------------------------------------- property

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def array_dicts(draw):
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(alphabet="abcdefghij_/0123", min_size=1, max_size=6),
                          min_size=n, max_size=n, unique=True))
    shared = draw(st.booleans())  # force a common leading dim to exercise the rows layout
    lead = draw(st.integers(0, 4))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(_shapes)
        if shared:
            shape = (lead,) + tuple(shape)
        # random bytes cover every bit pattern: NaN payloads, subnormals, -0.0, infs
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                             max_size=int(np.prod(shape)) * dtype.itemsize))
        arr = np.frombuffer(raw, np.uint8).copy()
        if dtype == np.bool_:
            arr = arr & 1
        out[name] = arr.view(dtype).reshape(shape)
    return out


@settings(max_examples=80, deadline=None)
@given(array_dicts(), st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3))
def test_random_dicts_roundtrip_exactly(arrays, meta):
    out, got = roundtrip(arrays, meta)
    assert_same(out, arrays)
    assert got == meta
