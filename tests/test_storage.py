"""Tests for harness/storage.py on a local directory and on S3 (moto, see conftest.s3_server)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
from hypothesis import given
from hypothesis import strategies as st_

from harness import storage as storage_mod
from harness.storage import (
    MANIFEST,
    POINTER,
    CorruptArtifact,
    Storage,
    StorageError,
    StorageFailure,
    build_manifest,
    is_debris,
    resolve,
    sha256_file,
    verify_dir,
    version_time,
)

BUCKET = "harness-test"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """An empty storage root, once on local disk and once on S3."""
    if request.param == "local":
        return Storage.open(tmp_path / "store")
    s3 = request.getfixturevalue("s3_server")
    s3.make_bucket(BUCKET)
    return Storage.open(s3.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}"))


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


FILES = {"model.keras": b"K" * 1000, "sub/weights.h5": b"\x00\x01" * 300, "sub/deeper/v.txt": b"v"}


def flip_byte(store: Storage, rel: str) -> None:
    data = bytearray(store.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    if storage_mod.is_local(store.fs):
        Path(store.path(rel)).write_bytes(bytes(data))
    else:
        store.write_bytes(rel, bytes(data))


# ---------------------------------------------------------------- single files

def test_write_read_bytes_and_overwrite(store):
    store.write_bytes("runs/r1/hello.txt", b"hi")
    assert store.read_bytes("runs/r1/hello.txt") == b"hi"
    store.write_bytes("runs/r1/hello.txt", b"bye" * 1000)
    assert store.read_bytes("runs/r1/hello.txt") == b"bye" * 1000
    store.write_json("runs/r1/meta.json", {"b": [1, 2], "a": None})
    assert store.read_json("runs/r1/meta.json") == {"a": None, "b": [1, 2]}
    assert store.walk_files("runs") == ["runs/r1/hello.txt", "runs/r1/meta.json"]


def test_local_write_leaves_no_temp_files(tmp_path):
    st = Storage.open(tmp_path)
    for i in range(5):
        st.write_bytes("d/f.bin", bytes([i]) * 100)
        st.write_bytes(f"d/g{i}.bin", b"x")
    assert sorted(os.listdir(tmp_path / "d")) == ["f.bin"] + [f"g{i}.bin" for i in range(5)]
    assert (tmp_path / "d" / "f.bin").read_bytes() == bytes([4]) * 100


def test_read_missing_file_raises(store):
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope/none.bin")


def test_exists_listdir_walk_files(store):
    assert not store.exists("a")
    assert store.listdir("a") == []
    assert store.walk_files("a") == []
    store.write_bytes("a/x.txt", b"1")
    store.write_bytes("a/b/y.txt", b"2")
    store.write_bytes("a/b/c/z.txt", b"3")
    store.write_bytes("other/w.txt", b"4")
    assert store.exists("a") and store.exists("a/b") and store.exists("a/x.txt")
    assert not store.exists("a/x")
    assert store.listdir("a") == ["b", "x.txt"]
    assert store.listdir("a/b") == ["c", "y.txt"]
    assert store.walk_files("a") == ["a/b/c/z.txt", "a/b/y.txt", "a/x.txt"]
    assert store.walk_files("") == ["a/b/c/z.txt", "a/b/y.txt", "a/x.txt", "other/w.txt"]
    store.delete("a/b")
    store.delete("a/x.txt")
    assert store.walk_files("a") == []
    store.delete("missing")  # no error


# ---------------------------------------------------------------- directories with manifests

def test_publish_dir_get_dir_roundtrip(store, tmp_path):
    src = make_dir(tmp_path / "src", FILES)
    pub = store.publish_dir(src, "artifacts/mlp/abc", extra={"format": "keras"})
    manifest = pub.manifest
    assert pub.ours and pub.path.startswith("artifacts/mlp/abc/v") and version_time(pub.path.rsplit("/", 1)[1])
    assert manifest["format"] == "keras"
    assert set(manifest["files"]) == set(FILES)
    assert manifest["files"]["model.keras"]["size"] == 1000
    assert store.is_complete(pub.path) and not store.is_complete("artifacts/mlp/abc")
    assert store.current("artifacts/mlp/abc") == pub.path and store.current(pub.path) == pub.path
    assert store.read_json(f"{pub.path}/{MANIFEST}") == manifest
    assert store.manifest_sha256("artifacts/mlp/abc") == store.manifest_sha256(pub.path) == pub.manifest_sha256
    assert store.pointer("artifacts/mlp/abc")["manifest_sha256"] == pub.manifest_sha256
    assert sorted(store.walk_files("artifacts")) == sorted(
        [f"{pub.path}/{k}" for k in FILES] + [f"{pub.path}/{MANIFEST}", f"artifacts/mlp/abc/{POINTER}"])
    local, got = store.get_dir("artifacts/mlp/abc", cache_root=tmp_path / "cache")  # through the pointer
    assert got == manifest
    for rel, data in FILES.items():
        assert (Path(local) / rel).read_bytes() == data
    if storage_mod.is_local(store.fs):
        assert local == store.path(pub.path)  # verified in place, no copy
        assert not (tmp_path / "cache").exists()
    else:
        assert Path(local).parent == tmp_path / "cache"
        assert [p for p in os.listdir(tmp_path / "cache") if p != ".locks"] == [Path(local).name]  # no temp dirs
        # second call reuses the cache (same path, still verified)
        assert store.get_dir(pub.path, cache_root=tmp_path / "cache")[0] == local


def test_publish_dir_first_writer_wins(store, tmp_path):
    first = store.publish_dir(make_dir(tmp_path / "one", {"a.bin": b"first"}), "art/x")
    second = store.publish_dir(make_dir(tmp_path / "two", {"a.bin": b"second", "b.bin": b"new"}), "art/x")
    assert first.ours and not second.ours
    assert (second.path, second.manifest, second.manifest_sha256) == (first.path, first.manifest, first.manifest_sha256)
    assert store.read_bytes(f"{first.path}/a.bin") == b"first"
    assert store.listdir("art/x") == sorted([POINTER, first.path.rsplit("/", 1)[1]])  # nothing staged left


def test_replace_publishes_a_new_version_and_keeps_the_old_for_its_readers(store, tmp_path):
    old = store.publish_dir(make_dir(tmp_path / "one", {"a.bin": b"first"}), "art/v")
    new = store.publish_dir(make_dir(tmp_path / "two", {"a.bin": b"retrained"}), "art/v", replace=True)
    assert new.ours and new.path != old.path and new.manifest_sha256 != old.manifest_sha256
    assert store.current("art/v") == new.path
    # A run that was given the old version still reads exactly it, whole.
    local, _ = store.get_dir(old.path, cache_root=tmp_path / "c1", expected_manifest_sha256=old.manifest_sha256)
    assert Path(local, "a.bin").read_bytes() == b"first"
    local, _ = store.get_dir("art/v", cache_root=tmp_path / "c2", expected_manifest_sha256=new.manifest_sha256)
    assert Path(local, "a.bin").read_bytes() == b"retrained"


def test_local_publish_manifest_last_and_version_appears_whole(tmp_path, monkeypatch):
    st = Storage.open(tmp_path / "store")
    src = make_dir(tmp_path / "src", FILES)
    real_rename = os.rename
    seen = []

    def spy_rename(a, b):
        # the version is invisible until the rename, the staged copy is complete, manifest included,
        # and the pointer comes after
        assert not os.path.exists(b) and not st.exists(f"art/y/{POINTER}")
        staged = {p.relative_to(a).as_posix() for p in Path(a).rglob("*") if p.is_file()}
        seen.append(staged)
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", spy_rename)
    st.publish_dir(src, "art/y")
    assert seen == [set(FILES) | {MANIFEST}]


def test_s3_publish_writes_manifest_then_pointer_last(s3_server, tmp_path, monkeypatch):
    s3_server.make_bucket(BUCKET)
    st = Storage.open(s3_server.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}"))
    real = Storage.write_bytes
    order = []

    def spy(self, rel, data):
        if rel.endswith((MANIFEST, POINTER)):
            order.append(rel.rsplit("/", 1)[1])
            version = self.walk_files("art/z")
            for f in FILES:
                assert any(p.endswith(f"/{f}") for p in version), f"{f} not uploaded before {rel}"
        if rel.endswith(POINTER):
            assert any(p.endswith(f"/{MANIFEST}") for p in self.walk_files("art/z")), "pointer before manifest"
        return real(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", spy)
    st.publish_dir(make_dir(tmp_path / "src", FILES), "art/z")
    assert order == [MANIFEST, POINTER]


def test_failed_upload_leaves_nothing_and_is_not_published(store, tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the second file: the first one is staged or uploaded already
            raise OSError("network down")
        return real(*args, **kwargs)

    if storage_mod.is_local(store.fs):
        real = storage_mod.shutil.copyfile
        monkeypatch.setattr(storage_mod.shutil, "copyfile", boom)
    else:
        real = Storage._upload
        monkeypatch.setattr(Storage, "_upload", lambda self, *a: boom(self, *a))
    with pytest.raises(StorageFailure, match=r"^storage error: network down writing art/i/v\S+ on ") as info:
        store.publish_dir(make_dir(tmp_path / "src", FILES), "art/i")
    assert store.where in str(info.value)
    assert store.walk_files("art") == [] and store.current("art/i") is None
    assert [e.path for e in store.entries("art") if is_debris(e.path)] == []
    with pytest.raises(CorruptArtifact, match="never fully written"):
        store.get_dir("art/i", cache_root=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_storage_is_corrupt_artifact(store, tmp_path, damage):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/d")
    target = f"{pub.path}/sub/weights.h5"
    if damage == "flip":
        flip_byte(store, target)
    else:
        store.fs.delete_file(store.path(target))
    with pytest.raises(CorruptArtifact) as info:
        store.get_dir("art/d", cache_root=tmp_path / "cache")
    assert "sub/weights.h5" in str(info.value)
    assert ("missing" if damage == "delete" else "sha256") in str(info.value)
    if (tmp_path / "cache").exists():
        assert [p for p in os.listdir(tmp_path / "cache") if p != ".locks"] == []  # the failed download was cleaned up


def test_missing_manifest_is_corrupt_artifact(store, tmp_path):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/m")
    store.fs.delete_file(store.path(f"{pub.path}/{MANIFEST}"))
    with pytest.raises(CorruptArtifact, match=MANIFEST) as info:
        store.get_dir("art/m", cache_root=tmp_path / "cache")
    assert pub.path in str(info.value)
    with pytest.raises(CorruptArtifact):
        store.get_dir("never/written", cache_root=tmp_path / "cache")


@pytest.mark.parametrize("pointer, fragment", [(b'{"version": ', "not a pointer to a version"),
                                               (b'{"version": "../../etc"}', "which is not a version")])
def test_damaged_pointer_is_corrupt_naming_it(store, tmp_path, pointer, fragment):
    store.publish_dir(make_dir(tmp_path / "src", FILES), "art/p")
    store.write_bytes(f"art/p/{POINTER}", pointer)
    with pytest.raises(CorruptArtifact, match=fragment) as info:
        store.get_dir("art/p", cache_root=tmp_path / "cache")
    assert f"art/p/{POINTER}" in str(info.value)


def test_s3_damaged_cache_is_refetched_and_harness_cache_env(s3_server, tmp_path, monkeypatch):
    s3_server.make_bucket(BUCKET)
    st = Storage.open(s3_server.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}"))
    pub = st.publish_dir(make_dir(tmp_path / "src", FILES), "art/c")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "envcache"))
    local, _ = st.get_dir("art/c")  # no cache_root: HARNESS_CACHE decides
    assert Path(local).parent == tmp_path / "envcache"
    cached = Path(local) / "model.keras"
    good = cached.read_bytes()
    cached.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    # A damaged cached copy is repaired from storage, not reported as corrupt.
    assert st.get_dir("art/c")[0] == local and cached.read_bytes() == good
    os.remove(cached)
    assert st.get_dir("art/c")[0] == local and cached.read_bytes() == good
    # Damage in storage itself is corrupt, named by its storage URI.
    flip_byte(st, f"{pub.path}/model.keras")
    cached.write_bytes(b"x")  # force a new download
    with pytest.raises(CorruptArtifact, match=r"s3://.*/art/c/v\S+/model.keras: sha256"):
        st.get_dir("art/c")


# ---------------------------------------------------------------- tampering and repair (issue: nothing passes vacuously)

def _rewrite_manifest(store: Storage, rel: str, data: bytes) -> None:
    store.write_bytes(f"{rel}/{MANIFEST}", data)


@pytest.mark.parametrize("damage, fragment", [
    ("truncated", "not valid JSON"),
    ("no-files", "no 'files' mapping"),
    ("escape", "not a relative path inside the artifact"),
])
def test_damaged_manifest_is_corrupt_naming_it(store, tmp_path, damage, fragment):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/bad")
    raw = store.read_bytes(f"{pub.path}/{MANIFEST}")
    doc = json.loads(raw)
    data = {"truncated": raw[: len(raw) // 2],
            "no-files": json.dumps({"file": doc["files"]}).encode(),
            "escape": json.dumps({"files": {"../../outside": {"sha256": "0" * 64, "size": 1}}}).encode()}[damage]
    _rewrite_manifest(store, pub.path, data)
    with pytest.raises(CorruptArtifact, match=fragment) as info:
        store.get_dir("art/bad", cache_root=tmp_path / "cache")
    assert f"{pub.path}/{MANIFEST}" in str(info.value)
    assert not (tmp_path / "outside").exists()


def test_file_not_in_the_manifest_is_corrupt(store, tmp_path):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/x")
    store.write_bytes(f"{pub.path}/sub/planted.py", b"import os")
    with pytest.raises(CorruptArtifact, match="sub/planted.py: file is not in the manifest"):
        store.get_dir("art/x", cache_root=tmp_path / "cache")


def test_manifest_rewritten_since_training_is_corrupt(store, tmp_path):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/t")
    bound = store.manifest_sha256("art/t")
    store.get_dir("art/t", cache_root=tmp_path / "cache", expected_manifest_sha256=bound)
    # A changed file with a matching, rewritten manifest: verification alone would pass it.
    store.write_bytes(f"{pub.path}/model.keras", b"evil" * 250)
    _rewrite_manifest(store, pub.path, json.dumps(build_manifest(make_dir(tmp_path / "evil", {
        **FILES, "model.keras": b"evil" * 250}))).encode())
    store.get_dir("art/t", cache_root=tmp_path / "cache2")  # consistent in itself
    with pytest.raises(CorruptArtifact, match="not the manifest the training step of this run wrote"):
        store.get_dir("art/t", cache_root=tmp_path / "cache3", expected_manifest_sha256=bound)


@pytest.mark.parametrize("how", ["flip", "delete-manifest"])
def test_replace_repairs_a_damaged_artifact(store, tmp_path, how):
    damaged = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/r")
    if how == "flip":
        flip_byte(store, f"{damaged.path}/model.keras")
    else:
        store.fs.delete_file(store.path(f"{damaged.path}/{MANIFEST}"))
    with pytest.raises(CorruptArtifact):
        store.get_dir("art/r", cache_root=tmp_path / "cache")
    fresh = {**FILES, "model.keras": b"N" * 1000}
    pub = store.publish_dir(make_dir(tmp_path / "fresh", fresh), "art/r", replace=True)
    local, manifest = store.get_dir("art/r", cache_root=tmp_path / "cache")
    assert set(manifest["files"]) == set(fresh) and Path(local, "model.keras").read_bytes() == b"N" * 1000
    # the pointer and two versions (the damaged one goes with gc); nothing staged
    assert store.listdir("art/r") == sorted([POINTER, damaged.path.rsplit("/", 1)[1], pub.path.rsplit("/", 1)[1]])


def test_s3_cache_entry_replaced_by_a_file_is_fetched_again(s3_server, tmp_path):
    s3_server.make_bucket(BUCKET)
    st = Storage.open(s3_server.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}"))
    st.publish_dir(make_dir(tmp_path / "src", FILES), "art/f")
    local, _ = st.get_dir("art/f", cache_root=tmp_path / "cache")
    shutil.rmtree(local)
    Path(local).write_bytes(b"not a directory")
    again, _ = st.get_dir("art/f", cache_root=tmp_path / "cache")
    assert again == local and Path(again, "model.keras").read_bytes() == FILES["model.keras"]


def test_signed_manifests(store, tmp_path, monkeypatch):
    store.publish_dir(make_dir(tmp_path / "unsigned", FILES), "art/u")
    monkeypatch.setenv("HARNESS_SIGNING_KEY", "k1")
    with pytest.raises(CorruptArtifact, match="not signed"):
        store.get_dir("art/u", cache_root=tmp_path / "cache")
    store.publish_dir(make_dir(tmp_path / "signed", FILES), "art/s")
    store.get_dir("art/s", cache_root=tmp_path / "cache")
    monkeypatch.setenv("HARNESS_SIGNING_KEY", "k2")
    with pytest.raises(CorruptArtifact, match="does not match"):
        store.get_dir("art/s", cache_root=tmp_path / "cache")


# ---------------------------------------------------------------- manifest helpers

def test_build_and_verify_manifest(tmp_path):
    d = make_dir(tmp_path / "d", {**FILES, MANIFEST: b"ignored"})
    m = build_manifest(d, extra={"k": 1})
    assert set(m["files"]) == set(FILES) and m["k"] == 1
    assert m["files"]["sub/deeper/v.txt"] == {"sha256": sha256_file(d / "sub/deeper/v.txt"), "size": 1}
    verify_dir(d, m)
    (d / "model.keras").write_bytes(b"K" * 999 + b"X")  # same size, different bytes
    with pytest.raises(CorruptArtifact, match="model.keras.*sha256"):
        verify_dir(d, m)
    (d / "model.keras").write_bytes(b"K")
    with pytest.raises(CorruptArtifact, match="model.keras.*size"):
        verify_dir(d, m)


# ---------------------------------------------------------------- resolve

def test_resolve_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("rel/store")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "store")
    fs, path = resolve(tmp_path / "p")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "p")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/s")[1] == str(tmp_path / "s")
    fs, path = resolve(f"file://{tmp_path}/f")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/f"
    st = Storage.open(f"file://{tmp_path}/f")
    st.write_bytes("x.txt", b"via file uri")
    assert (tmp_path / "f" / "x.txt").read_bytes() == b"via file uri"
    assert st.uri_of("x.txt") == f"file://{tmp_path}/f/x.txt"
    assert Storage.open("rel/store").uri_of("a/b") == f"{tmp_path}/rel/store/a/b"


def test_resolve_s3_with_query(s3_server):
    s3_server.make_bucket(BUCKET)
    uri = s3_server.uri(BUCKET, "q/prefix")
    fs, path = resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{BUCKET}/q/prefix"
    assert fs.region == "us-east-1"
    st = Storage.open(uri)
    st.write_bytes("obj.bin", b"through the query endpoint")
    body = boto3.client("s3", endpoint_url=f"http://{s3_server.endpoint}").get_object(
        Bucket=BUCKET, Key="q/prefix/obj.bin")["Body"].read()
    assert body == b"through the query endpoint"
    assert st.uri_of("obj.bin") == (f"s3://{BUCKET}/q/prefix/obj.bin?endpoint_override={s3_server.endpoint}"
                                    "&scheme=http&region=us-east-1")
    assert Storage.open(st.uri_of("obj.bin")).read_bytes("") == b"through the query endpoint"


@pytest.mark.parametrize("var", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_resolve_s3_endpoint_from_env(s3_server, monkeypatch, var):
    s3_server.make_bucket(BUCKET)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(var, f"http://{s3_server.endpoint}")
    st = Storage.open(f"s3://{BUCKET}/env/{var}")
    assert isinstance(st.fs, pafs.S3FileSystem) and st.root == f"{BUCKET}/env/{var}"
    st.write_bytes("e.txt", var.encode())
    body = boto3.client("s3", endpoint_url=f"http://{s3_server.endpoint}").get_object(
        Bucket=BUCKET, Key=f"env/{var}/e.txt")["Body"].read()
    assert body == var.encode()


@pytest.mark.parametrize("uri", ["foo://bucket/x", "nosuchscheme://a", "s3://bkt/p?no_such_option=1"])
def test_bad_uri_is_storage_error(uri):
    with pytest.raises(StorageError, match="cannot open storage"):
        resolve(uri)
    with pytest.raises(StorageError):
        Storage.open(uri)


# ---------------------------------------------------------------- one object-store filesystem per process

_OPTS = "?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"


@given(st_.lists(st_.sampled_from(["a", "b b", "%20", "x.y", "", "ü"]), max_size=4), st_.booleans())
def test_resolve_gives_pyarrows_own_path_with_a_shared_filesystem(segments, trailing):
    from urllib.parse import quote

    uri = f"s3://bkt/{'/'.join(quote(s) for s in segments)}{'/' if trailing else ''}{_OPTS}"
    fs, path = resolve(uri)
    assert path == pafs.FileSystem.from_uri(uri)[1]
    assert fs is resolve(f"s3://bkt/elsewhere{_OPTS}")[0]  # one per bucket and options, whatever the path


def test_filesystems_differ_by_bucket_options_and_credentials(monkeypatch):
    fs = resolve(f"s3://bkt/p{_OPTS}")[0]
    assert resolve(f"s3://other/p{_OPTS}")[0] is not fs
    assert resolve(f"s3://bkt/p{_OPTS.replace(':1', ':2')}")[0] is not fs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    assert resolve(f"s3://bkt/p{_OPTS}")[0] is not fs
    monkeypatch.undo()
    assert resolve(f"s3://bkt/p{_OPTS}")[0] is fs
    storage_mod.forget_filesystems()
    assert resolve(f"s3://bkt/p{_OPTS}")[0] is not fs


def test_threads_opening_the_same_storage_share_one_filesystem():
    from concurrent.futures import ThreadPoolExecutor

    storage_mod.forget_filesystems()
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda i: Storage.open(f"s3://threads/p{i}{_OPTS}").fs, range(32)))
    assert len({id(fs) for fs in found}) == 1


def test_storage_calls_reuse_connections(s3_server, tmp_path):
    """Each Storage.open used to build its own S3 client and connection pool: a new connection per call."""
    import subprocess
    import sys
    import time
    import urllib.request

    from s3_helpers import free_port

    s3_server.make_bucket(BUCKET)
    listen, stats = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).parent / "multihost" / "s3proxy.py"), listen,
                              s3_server.endpoint, stats])
    try:
        def counts() -> dict:
            with urllib.request.urlopen(f"http://{stats}/", timeout=5) as resp:
                return json.loads(resp.read())

        deadline = time.time() + 30
        while True:
            try:
                counts()
                break
            except OSError:
                assert proxy.poll() is None and time.time() < deadline, "the counting proxy did not start"
                time.sleep(0.1)
        uri = f"s3://{BUCKET}/conn-{uuid.uuid4().hex[:8]}?endpoint_override={listen}&scheme=http&region=us-east-1"
        storage_mod.forget_filesystems()
        for i in range(20):
            st = Storage.open(uri)  # as each replay, training step and publication does
            st.write_bytes(f"f{i}", b"x")
            assert st.read_bytes(f"f{i}") == b"x" and st.exists(f"f{i}")
        seen = counts()
        # The proxy keeps client connections alive as S3 does: one pool, reused (a new one per open made 20).
        assert seen["requests"] >= 60 and seen["connections"] <= 2, seen
    finally:
        proxy.kill()
        proxy.wait(timeout=10)


def test_manifest_is_json_with_sorted_files(store, tmp_path):
    pub = store.publish_dir(make_dir(tmp_path / "src", FILES), "art/j")
    raw = store.read_bytes(f"{pub.path}/{MANIFEST}")
    assert list(json.loads(raw)["files"]) == sorted(FILES)


# ---------------------------------------------------------------- what a storage exception means (pure)

@pytest.mark.parametrize("exc, kind, text, transient", [
    (OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
     "storage full", "No space left on device", False),
    (OSError(30, "Failed to open local file '/x'. Detail: [errno 30] Read-only file system"),
     "storage read-only", "Read-only file system", False),
    (PermissionError(13, "Permission denied"), "permission denied", "Permission denied", False),
    (OSError("When getting information for key 'p/a' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
             "operation: No response body."), "access denied", "AccessDenied (HTTP 403)", False),
    (OSError("When initiating multiple part upload for key 'p/big' in bucket 'b': AWS Error UNKNOWN (HTTP status "
             "400) during CreateMultipartUpload operation: Unable to parse ExceptionName: EntityTooLarge Message: "
             "too large"), "storage full", "EntityTooLarge (HTTP 400)", False),
    (OSError("When getting information for key 'p/a' in bucket 'b': AWS Error UNKNOWN (HTTP status 507) during "
             "HeadObject operation: No response body."), "storage full", "HTTP 507 Insufficient Storage", False),
    (OSError("When initiating multiple part upload for key 'p/a' in bucket 'b': AWS Error SLOW_DOWN during "
             "CreateMultipartUpload operation: m"), "storage unavailable", "SlowDown (HTTP 503)", True),
    (OSError("When getting information for key 'p/a' in bucket 'b': AWS Error UNKNOWN (HTTP status 502) during "
             "HeadObject operation: No response body."), "storage unavailable", "HTTP 502", True),
    (OSError("When getting information for key 'p/a' in bucket 'b': AWS Error NETWORK_CONNECTION during "
             "HeadObject operation: curlCode: 28, Timeout was reached; Details: Operation too slow."),
     "storage unreachable", "Timeout was reached", True),
    (OSError("AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Could not connect "
             "to server; Details: Failed to connect"), "storage unreachable", "Could not connect to server", True),
    (OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified bucket does not "
             "exist"), "bucket missing", "NoSuchBucket (HTTP 404)", False),
    (ConnectionResetError(104, "Connection reset by peer"), "storage unreachable", "Connection reset by peer", True),
    (OSError("something else\nsecond line"), "storage error", "something else", False),
])
def test_classify_storage_exceptions(exc, kind, text, transient):
    cause = storage_mod.classify(exc)
    assert (cause.kind, cause.text, cause.transient) == (kind, text, transient)


@given(status=st_.integers(400, 599), code=st_.sampled_from(["", "Whatever", "AccessDenied", "SlowDown"]))
def test_classify_http_statuses(status, code):
    """A status alone decides what an unknown code means; a known code decides for itself."""
    detail = f"Unable to parse ExceptionName: {code} Message: m" if code else "No response body."
    cause = storage_mod.classify(OSError(f"AWS Error UNKNOWN (HTTP status {status}) during PutObject operation: "
                                         f"{detail}"))
    assert "\n" not in cause.text and cause.text
    if code == "AccessDenied":
        assert cause.kind == "access denied" and not cause.transient
    elif code == "SlowDown":
        assert cause.transient
    else:
        assert cause.transient == (status >= 500 and status != 507 or status == 429)
        assert cause.kind == ("storage full" if status == 507 else "access denied" if status == 403
                              else "storage unavailable" if cause.transient else "storage error")
        assert f"HTTP {status}" in cause.text
