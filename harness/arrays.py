"""Named numpy arrays <-> Arrow IPC (uncompressed, ``pa.fixed_shape_tensor``).

When every array shares the same leading (batch) dimension, one Arrow row is
one probe example and each array is a fixed-shape-tensor column of its
per-example shape (or a plain column for 1-D arrays): the file is readable as
an ordinary table. Otherwise each array is stored whole in a one-row layout.
Dtypes Arrow has no tensor type for (bool, bfloat16, ...) are stored as the
unsigned integer of the same width and restored from the recorded dtype, so
round trips are bit exact.

String arrays (what TensorFlow returns for ``tf.string``: object arrays of
``bytes``; probes may also use ``str`` objects or numpy ``U``/``S`` arrays)
are stored as Arrow ``binary`` / ``string`` values, one fixed-size list per
row, and restored with the same element type and numpy dtype.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import numpy as np
import pyarrow as pa

_NATIVE = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64"}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends, shipped with TensorFlow

        return np.dtype(getattr(ml_dtypes, name))


def _string_kind(a: np.ndarray) -> str | None:
    """``bytes`` / ``str`` for string arrays (object, ``S``, ``U``), else ``None``.

    Raises:
        TypeError: an object array holds something other than only bytes or only str.
    """
    if a.dtype.kind == "S":
        return "bytes"
    if a.dtype.kind == "U":
        return "str"
    if a.dtype.kind != "O":
        return None
    types = {type(x) for x in a.reshape(-1)}
    if types <= {bytes, np.bytes_}:
        return "bytes"
    if types <= {str, np.str_}:
        return "str"
    raise TypeError(f"cannot store an object array holding {sorted(t.__name__ for t in types)} in Arrow: "
                    "only arrays of bytes or of str are supported")


def _string_column(a: np.ndarray, kind: str, rows: bool) -> pa.Array:
    typ = pa.binary() if kind == "bytes" else pa.string()
    per_row = a.reshape(a.shape[0], int(np.prod(a.shape[1:]))) if rows and a.ndim else a.reshape(1, a.size)
    values = pa.array([bytes(x) if kind == "bytes" else str(x) for x in per_row.reshape(-1)], typ)
    if rows and a.ndim == 1:
        return values
    return pa.FixedSizeListArray.from_arrays(values, per_row.shape[1]) if per_row.shape[1] else \
        pa.array([[]] * per_row.shape[0], pa.list_(typ, 0))


def _strings_from_column(col: pa.Array, info: dict) -> np.ndarray:
    if isinstance(col.type, pa.FixedSizeListType):
        col = col.flatten()
    values = col.to_pylist()
    if info["dtype"] == "object":
        out = np.empty(len(values), object)
        out[:] = values
    else:
        out = np.array(values, dtype=np.dtype(info["dtype"]))
    return out.reshape(info["shape"])


def _storage_view(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.name in _NATIVE:
        return a
    if a.dtype.itemsize not in _UINT:
        raise TypeError(f"cannot store dtype {a.dtype} in Arrow")
    return a.view(_UINT[a.dtype.itemsize])


def _column(a: np.ndarray, rows: bool) -> pa.Array:
    kind = _string_kind(a)
    if kind is not None:
        return _string_column(a, kind, rows)
    stored = _storage_view(a)
    if rows and stored.ndim == 1:
        return pa.array(stored)
    if not rows:
        stored = stored.reshape((1,) + stored.shape)
    if stored.ndim == 1:  # a 0-d array in the one-row layout
        stored = stored.reshape(1, 1)
    if stored.size == 0:  # from_numpy_ndarray rejects empty arrays; build the (empty) rows by hand
        typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(stored.dtype), stored.shape[1:])
        lists = pa.array([[]] * stored.shape[0], pa.list_(typ.value_type, int(np.prod(stored.shape[1:]))))
        return pa.ExtensionArray.from_storage(typ, lists)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(stored)


def _array_info(a: np.ndarray) -> dict:
    kind = a.dtype.kind
    # U/S dtypes carry their width (``<U7``); ``dtype.name`` ("str224") would not parse back
    return {"dtype": a.dtype.str if kind in "SU" else a.dtype.name, "shape": list(a.shape)}


def to_table(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, object] | None = None) -> pa.Table:
    """Arrays -> Arrow table (column order = mapping order).

    ``metadata`` (JSON-serialisable) is stored in the schema under ``harness``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    leading = {v.shape[0] if v.ndim else None for v in arrays.values()}
    rows = bool(arrays) and len(leading) == 1 and None not in leading
    cols = {k: _column(v, rows) for k, v in arrays.items()}
    meta = {
        "layout": "rows" if rows else "single",
        "arrays": {k: _array_info(v) for k, v in arrays.items()},
        "user": dict(metadata or {}),
    }
    table = pa.table(cols) if cols else pa.table({})
    return table.replace_schema_metadata({"harness": json.dumps(meta, default=str)})


def from_table(table: pa.Table) -> tuple[dict[str, np.ndarray], dict]:
    """Arrow table written by ``to_table`` -> ``(arrays, user metadata)``.

    Numeric columns are zero-copy views of the Arrow buffers where Arrow allows it.
    """
    meta = json.loads(table.schema.metadata[b"harness"])
    out = {}
    for name, info in meta["arrays"].items():
        chunked = table.column(name)
        # combine_chunks() copies even a single chunk; take it as is to keep memory-mapped reads zero-copy
        col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        if pa.types.is_binary(col.type) or pa.types.is_string(col.type) or (
                isinstance(col.type, (pa.FixedSizeListType, pa.ListType))
                and (pa.types.is_binary(col.type.value_type) or pa.types.is_string(col.type.value_type))):
            out[name] = _strings_from_column(col, info)
            continue
        dtype = _dtype(info["dtype"])
        if 0 in info["shape"]:
            out[name] = np.empty(info["shape"], dtype)
            continue
        if isinstance(col.type, pa.FixedShapeTensorType):
            stored = col.to_numpy_ndarray()
        else:
            stored = col.to_numpy(zero_copy_only=False)
        arr = stored.view(dtype) if stored.dtype != dtype else stored
        out[name] = arr.reshape(info["shape"])
    return out, meta["user"]


def to_ipc_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, object] | None = None) -> bytes:
    """Serialize arrays as an uncompressed Arrow IPC file."""
    table = to_table(arrays, metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(source: str | bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Read an IPC file written by ``to_ipc_bytes`` (a local path is memory-mapped)."""
    if isinstance(source, (bytes, bytearray)):
        reader = pa.ipc.open_file(pa.BufferReader(source))
    else:
        reader = pa.ipc.open_file(pa.memory_map(str(source), "r"))
    return from_table(reader.read_all())


def digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and contents: two arrays have the same digest iff their bits are the same.

    Numeric arrays are hashed by their bytes (``-0.0`` and ``+0.0`` differ, as
    do NaNs with different payloads); string arrays by their values, each
    length-prefixed, with the kind of string (bytes or str) in the header.
    """
    a = np.asarray(a)
    kind = _string_kind(a)
    h = hashlib.sha256(json.dumps({**_array_info(a), "strings": kind}, sort_keys=True).encode())
    if kind is None:
        h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    for x in a.reshape(-1):
        data = bytes(x) if kind == "bytes" else str(x).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
