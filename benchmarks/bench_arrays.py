"""arrays.read_ipc from a memory-mapped file: zero-copy reads of a 100 MiB tensor column.

Baselines (same process, same data, files hot in the page cache):

* ``np.load`` of the same array saved as ``.npy`` (reads into fresh memory);
* the whole IPC file read into memory, then ``pa.ipc.open_file`` on the bytes
  (what ``read_ipc(bytes)`` does).

Memory is what tracemalloc sees (Python objects and numpy buffers) plus what
the pyarrow memory pool allocates. Pages of a memory-mapped file belong to the
page cache, not to the process's allocations, which is the point of mapping.
"""

from __future__ import annotations

import os

import numpy as np

from _util import Row, fmt_bytes, peak_extra_bytes, timed_row
from harness.arrays import read_ipc, to_ipc_bytes

LIMIT_MMAP_VS_NPLOAD = 1.0   # strict: the mapped read must be faster than np.load
LIMIT_MMAP_MEMORY = 0.05     # strict: mapped read allocates < 5% of the data size

SHAPE = (102_400, 256)  # float32 -> 100 MiB, one fixed_shape_tensor column of (256,)


def _read_bytes_then_ipc(path: str):
    with open(path, "rb") as f:
        return read_ipc(f.read())


def _sum(arrays) -> float:
    return float(np.add.reduce(arrays["x"], axis=None, dtype=np.float64))


def run(repeat: int, workdir: str) -> list[Row]:
    data = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    ipc_path = os.path.join(workdir, "probe.arrow")
    npy_path = os.path.join(workdir, "probe.npy")
    with open(ipc_path, "wb") as f:
        f.write(to_ipc_bytes({"x": data}))
    np.save(npy_path, data)
    nbytes = data.nbytes

    # Sanity: all three read the same values, and the mapped read is a view, not a copy.
    mapped = read_ipc(ipc_path)[0]["x"]
    assert mapped.shape == SHAPE and mapped.dtype == np.float32 and not mapped.flags.owndata
    assert np.array_equal(mapped, data) and np.array_equal(np.load(npy_path), data)
    assert np.array_equal(_read_bytes_then_ipc(ipc_path)[0]["x"], data)
    del mapped, data

    size = f"{nbytes / 2**20:.0f} MiB"
    rows = [
        timed_row(f"read_ipc mmap {size} tensor col: time vs np.load",
                  lambda: read_ipc(ipc_path), lambda: np.load(npy_path),
                  repeat=repeat, min_time=0.5, limit=LIMIT_MMAP_VS_NPLOAD, strict=True),
        timed_row(f"read_ipc mmap {size}: time vs bytes+ipc.open_file",
                  lambda: read_ipc(ipc_path), lambda: _read_bytes_then_ipc(ipc_path),
                  repeat=repeat, min_time=0.5),
    ]

    mem = {k: peak_extra_bytes(fn)[0] for k, fn in {
        "mmap": lambda: read_ipc(ipc_path),
        "npload": lambda: np.load(npy_path),
        "inmem": lambda: _read_bytes_then_ipc(ipc_path),
    }.items()}
    rows.append(Row(f"read_ipc mmap {size}: peak extra mem / data",
                    fmt_bytes(mem["mmap"]),
                    f"np.load {mem['npload'] / nbytes:.2f}x; bytes {mem['inmem'] / nbytes:.2f}x",
                    mem["mmap"] / nbytes, LIMIT_MMAP_MEMORY, strict=True))

    # End to end: reading is lazy with a map, so also time one full pass over the values.
    rows.append(timed_row(f"read_ipc mmap {size} + sum vs np.load + sum",
                          lambda: _sum(read_ipc(ipc_path)[0]), lambda: _sum({"x": np.load(npy_path)}),
                          repeat=repeat, min_time=0.5))
    return rows
