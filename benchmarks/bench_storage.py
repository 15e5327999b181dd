"""storage.Storage.publish_dir + get_dir on a local store vs plain ``shutil.copytree``.

``publish_dir`` hashes every file (sha256 manifest), copies the directory to a
staging name, writes the manifest, renames it to a new version and writes the
pointer; ``get_dir`` on local storage follows the pointer and verifies every
file against the manifest in place (hashing again). The
baseline copies the same files and checks nothing. The ratio is the price of
integrity checking.
"""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np

from _util import Row, timed_row
from harness.storage import Storage, build_manifest

LIMIT_PUT_GET = 8.0  # (publish_dir + get_dir) / copytree; measured 4.7-5.6x (with put_dir, before versions)

# A SavedModel-like tree, ~50 MiB: one big variables shard plus a few small files.
FILES = {
    "saved_model.pb": 2 << 20,
    "fingerprint.pb": 64,
    "keras_metadata.pb": 100 << 10,
    "variables/variables.data-00000-of-00001": 40 << 20,
    "variables/variables.index": 64 << 10,
    **{f"assets/vocab_{i}.txt": 1 << 20 for i in range(8)},
}


def _make_tree(root: str) -> int:
    rng = np.random.default_rng(2)
    total = 0
    for rel, size in FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.bytes(size))
        total += size
    return total


def run(repeat: int, workdir: str) -> list[Row]:
    src = os.path.join(workdir, "model")
    store_root = os.path.join(workdir, "store")
    copy_root = os.path.join(workdir, "copies")
    total = _make_tree(src)
    store = Storage.open(store_root)
    counter = itertools.count()

    def clear() -> None:
        shutil.rmtree(store_root, ignore_errors=True)
        shutil.rmtree(copy_root, ignore_errors=True)
        os.makedirs(store_root)
        os.makedirs(copy_root)

    def ours():
        rel = f"artifacts/bench/{next(counter)}"
        store.publish_dir(src, rel)
        return store.get_dir(rel)

    def baseline():
        return shutil.copytree(src, os.path.join(copy_root, str(next(counter))))

    # Sanity: the manifest covers every file and a round trip verifies.
    clear()
    local, manifest = ours()
    assert sorted(manifest["files"]) == sorted(FILES), sorted(manifest["files"])
    assert os.path.isfile(os.path.join(local, "manifest.json")), local

    rows = [timed_row(f"publish_dir+get_dir {total / 2**20:.0f} MiB/{len(FILES)} files vs copytree",
                      ours, baseline, repeat=repeat, min_time=0.5, limit=LIMIT_PUT_GET, setup=clear)]
    # Where the time goes: hashing the tree once, against the same copy.
    rows.append(timed_row("build_manifest (sha256 once) vs copytree", lambda: build_manifest(src), baseline,
                          repeat=repeat, min_time=0.5, setup=clear))
    clear()
    return rows
