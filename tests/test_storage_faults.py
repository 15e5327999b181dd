"""Storage that fails, fills up, goes away for a while, or is written by two runs at once.

S3 runs in its own process (a moto server) behind a fault-injecting HTTP proxy
(``tests/s3_faults.py``): chosen requests get 403 / 500 / 503 SlowDown / 507 /
EntityTooLarge, or are held while another writer publishes; an outage is the
server process stopped with SIGSTOP. Full, read-only and permission-denied
local disks are real: a small tmpfs mounted in a private mount namespace
(``unshare -m``, the code under test in a subprocess inside it), and a
directory the test writes as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from harness import storage as storage_mod
from harness.storage import (
    MANIFEST,
    POINTER,
    CorruptArtifact,
    RunLease,
    Storage,
    StorageFailure,
    is_debris,
    leases,
)
from s3_faults import S3Process
from s3_helpers import DUMMY_AWS_ENV, environ

TESTS = Path(__file__).parent
REPO = TESTS.parent
BUCKET = "harness-faults"
FILES = {"model/model.keras": b"K" * 3000, "model/sub/weights.h5": b"\x00\x01" * 900, "reference.json": b"{}"}
@pytest.fixture(scope="module")
def s3():
    """A moto server process behind a fault proxy, with dummy AWS credentials in ``os.environ``."""
    with environ(DUMMY_AWS_ENV):
        server = S3Process.start()
        server.make_bucket(BUCKET)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_store(s3):
    """An empty prefix on the S3 server, through the proxy; the proxy's rules are cleared after the test."""
    yield Storage.open(s3.uri(BUCKET, f"t-{uuid.uuid4().hex[:8]}"))
    s3.proxy.clear()


def make_dir(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def debris(st: Storage) -> list[str]:
    return [e.path for e in st.entries("") if is_debris(e.path.rsplit("/", 1)[-1])]


# ---------------------------------------------------------------- S3 errors: one true sentence, no retry of permanent ones

@pytest.mark.parametrize("status, code, kind, cause", [
    (403, "AccessDenied", "access denied", "AccessDenied (HTTP 403)"),
    (400, "EntityTooLarge", "storage full", "EntityTooLarge (HTTP 400)"),
    (507, "XMinioStorageFull", "storage full", "XMinioStorageFull (HTTP 507)"),
])
def test_s3_permanent_failure_is_one_sentence_and_not_retried(s3, s3_store, tmp_path, status, code, kind, cause):
    rule = s3.proxy.fail("PUT", r"/model/sub/weights\.h5$", status, code, "refused by the fault proxy")
    with pytest.raises(StorageFailure) as info:
        s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    message = str(info.value)
    assert message.startswith(f"{kind}: {cause} writing artifacts/s/d/v"), message
    assert message.endswith(f"/model/sub/weights.h5 on {s3_store.where}") and "?" not in message
    assert info.value.kind == kind and not info.value.transient
    assert rule.hits == 1  # permanent: asked once
    assert s3_store.walk_files("artifacts") == []  # what was uploaded before the failure is removed
    assert s3_store.current("artifacts/s/d") is None


def test_s3_access_denied_on_read_names_the_file(s3, s3_store, tmp_path):
    pub = s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    s3.proxy.fail("GET", r"/model/model\.keras$", 403, "AccessDenied", "Access Denied")
    with pytest.raises(StorageFailure, match=rf"^access denied: AccessDenied \(HTTP 403\) reading "
                                             rf"{pub.path}/model/model.keras on s3://{BUCKET}/"):
        s3_store.get_dir("artifacts/s/d", cache_root=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]  # no partial copy


def test_s3_5xx_is_retried_past_pyarrows_own_retries_then_succeeds(s3, s3_store, tmp_path):
    # pyarrow retries a 503 for ~6 s (about 30 requests) and gives up; the harness tries again.
    rule = s3.proxy.fail("PUT", r"/model/model\.keras$", 503, "SlowDown", "Please reduce your request rate.",
                         times=45)
    pub = s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    assert rule.hits == 45 and pub.ours
    local, _ = s3_store.get_dir("artifacts/s/d", cache_root=tmp_path / "cache")
    assert Path(local, "model/model.keras").read_bytes() == FILES["model/model.keras"]


def test_s3_5xx_that_persists_fails_after_the_retry_budget(s3, s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STORAGE_RETRY_S", "1")
    s3.proxy.fail("PUT", r"/reference\.json$", 500, "InternalError", "We encountered an internal error.")
    with pytest.raises(StorageFailure) as info:
        s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    message = str(info.value)
    assert message.startswith("storage unavailable: InternalError (HTTP 500) writing artifacts/s/d/v"), message
    assert "/reference.json on s3://" in message and "of retries)" in message and info.value.transient
    assert s3_store.walk_files("artifacts") == []


# ---------------------------------------------------------------- an outage: the server stopped mid-operation

def _outage_during(s3: S3Process, method: str, path: str, action, seconds: float = 10.0):
    """Run ``action()`` in a thread; when its first ``method path`` request arrives, stop the server for ``seconds``."""
    hold = s3.proxy.hold(method, path)
    out: dict = {}

    def run():
        try:
            out["value"] = action()
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            out["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    assert hold.reached.wait(60), f"no {method} {path} request"
    s3.pause()
    resumed = threading.Timer(seconds, s3.resume)
    resumed.start()
    stopped = time.monotonic()
    hold.release()  # into a server that does not answer
    worker.join(180)
    resumed.join()
    assert not worker.is_alive()
    return out, time.monotonic() - stopped


def test_s3_outage_during_publish_is_retried_and_publishes_once(s3, s3_store, tmp_path):
    out, took = _outage_during(s3, "PUT", r"/model/sub/weights\.h5$",
                               lambda: s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d"))
    assert "error" not in out, out.get("error")
    assert took >= 10  # it waited the outage out
    pub = out["value"]
    assert pub.ours and s3_store.current("artifacts/s/d") == pub.path
    local, manifest = s3_store.get_dir("artifacts/s/d", cache_root=tmp_path / "cache",
                                       expected_manifest_sha256=pub.manifest_sha256)
    assert set(manifest["files"]) == set(FILES)
    assert s3_store.listdir("artifacts/s/d") == sorted([POINTER, pub.path.rsplit("/", 1)[1]])


def test_s3_outage_during_download_is_retried_and_the_cache_holds_a_verified_copy(s3, s3_store, tmp_path):
    pub = s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    out, took = _outage_during(s3, "GET", r"/model/model\.keras$", lambda: s3_store.get_dir(
        pub.path, cache_root=tmp_path / "cache", expected_manifest_sha256=pub.manifest_sha256))
    assert "error" not in out, out.get("error")
    local, manifest = out["value"]
    storage_mod.verify_dir(local, manifest)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([".locks", Path(local).name])


def test_a_run_rides_out_an_s3_outage_without_a_corrupt_or_failed_cell(s3, scenarios, tmp_path):
    from harness.spec import parse_sweep
    from harness.sweep import run_sweep

    uri = s3.uri(BUCKET, f"run-{uuid.uuid4().hex[:8]}")
    sweep = parse_sweep({"name": "outage", "scenarios": ["test-slow-build"], "formats": ["keras", "h5"],
                         "storage": uri, "expect": "bitwise", "environments": {"cpu-default": {}}},
                        source=str(tmp_path / "outage.yaml"))
    out, took = _outage_during(s3, "PUT", r"/observations/", lambda: run_sweep(
        sweep, scenarios, out_dir=tmp_path / "run", inline=True))
    assert "error" not in out, out.get("error")
    res = out["value"]
    assert res.harness_failures == [] and res.results_uri is not None and took >= 10
    assert [(r["verdict"], r["error"]) for r in res.table.to_pylist()] == [("bitwise", None)] * 2


# ---------------------------------------------------------------- two workers on one node share one download

def test_a_worker_waits_for_another_ones_download_instead_of_downloading_again(s3, s3_store, tmp_path):
    from filelock import FileLock

    pub = s3_store.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    theirs, _ = s3_store.get_dir(pub.path, cache_root=tmp_path / "elsewhere")  # what the other worker fetches
    cache = tmp_path / "cache"
    name = pub.manifest_sha256[:24]
    (cache / ".locks").mkdir(parents=True)
    other = FileLock(str(cache / ".locks" / f"{name}.lock"))  # the other worker, downloading
    other.acquire()
    data = s3.proxy.hold("GET", r"/model/model\.keras$")  # a download of our own would show here
    out = {}
    worker = threading.Thread(target=lambda: out.update(got=s3_store.get_dir(pub.path, cache_root=cache)))
    try:
        worker.start()
        assert not data.reached.wait(3), "downloaded while another worker held the lock"
        shutil.copytree(theirs, cache / name)  # the other worker's verified copy appears, and it lets go
    finally:
        other.release()
        worker.join(60)
        data.release()
    assert not data.reached.is_set()  # never fetched a file itself
    assert out["got"][0] == str(cache / name)  # used the other worker's copy, verified


# ---------------------------------------------------------------- two writers at once: first writer wins, nothing mixed

def _pause_local_writer(monkeypatch, writer: str):
    """Pause thread ``writer`` in its next ``os.rename`` (a staged version about to appear) until released."""
    reached, gate = threading.Event(), threading.Event()
    real = os.rename

    def rename(a, b):
        if threading.current_thread().name == writer and not gate.is_set():
            reached.set()
            assert gate.wait(60)
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    return reached, gate


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("replace", [False, True], ids=["first-run", "retrain"])
def test_concurrent_publication_never_mixes_saves(s3, where, replace, tmp_path, monkeypatch):
    st = Storage.open(tmp_path / "store") if where == "local" else Storage.open(s3.uri(BUCKET, uuid.uuid4().hex))
    a_src = make_dir(tmp_path / "a", {**FILES, "model/model.keras": b"A" * 3000})
    b_src = make_dir(tmp_path / "b", {**FILES, "model/model.keras": b"B" * 2000})
    if where == "local":
        reached, gate = _pause_local_writer(monkeypatch, "writer-a")
    else:
        hold = s3.proxy.hold("PUT", rf"/{MANIFEST}$")  # writer a's manifest: its files are all up
        reached, gate = hold.reached, hold.gate
    out = {}
    a = threading.Thread(target=lambda: out.update(a=st.publish_dir(a_src, "artifacts/s/d", replace=replace)),
                         name="writer-a")
    a.start()
    try:
        assert reached.wait(60)
        b = st.publish_dir(b_src, "artifacts/s/d", replace=replace)  # publishes while a is paused
    finally:
        gate.set()
        a.join(60)
        s3.proxy.clear()
    a_pub = out["a"]
    assert b.ours
    for pub, data in ((a_pub, b"A" * 3000 if replace else b"B" * 2000), (b, b"B" * 2000)):
        local, manifest = st.get_dir(pub.path, cache_root=tmp_path / "cache",
                                     expected_manifest_sha256=pub.manifest_sha256)
        assert Path(local, "model/model.keras").read_bytes() == data  # files and manifest of one save
    versions = sorted(n for n in st.listdir("artifacts/s/d") if n != POINTER)
    if replace:  # both retrains published; each run reads its own; the later pointer wins for later runs
        assert a_pub.ours and a_pub.path != b.path and len(versions) == 2
        assert st.current("artifacts/s/d") == a_pub.path
    else:  # a found b's version published first: a uses it, and its own copy is gone
        assert not a_pub.ours and (a_pub.path, a_pub.manifest_sha256) == (b.path, b.manifest_sha256)
        assert versions == [b.path.rsplit("/", 1)[1]] and st.current("artifacts/s/d") == b.path
    assert debris(st) == []


def test_two_runs_training_the_same_scenario_at_once_on_s3(s3, scenarios, tmp_path):
    """Run a (another process) is paused publishing its manifest while run b trains and publishes the same
    artifact; a then uses b's version: both replay it bitwise, neither sees a corrupt artifact."""
    from harness.replay import replay
    from harness.spec import Environment
    from harness.train import train

    uri = s3.uri(BUCKET, f"train-{uuid.uuid4().hex[:8]}")
    hold = s3.proxy.hold("PUT", rf"/{MANIFEST}$")
    code = ("import json, sys; from dataclasses import asdict; from harness.scenario import discover; "
            "from harness.spec import Environment; from harness.train import train; "
            f"s = discover([{str(TESTS / 'scenarios')!r}])['test-slow-build']; "
            "r = train(s, ['keras'], sys.argv[1], Environment(name='training')); "
            "print(json.dumps(asdict(r.artifacts['keras'])))")
    run_a = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HARNESS_CACHE": str(tmp_path / "cache-a"),
                                  "HARNESS_STORAGE_RETRY_S": "600"}, cwd=REPO)  # held: it retries
    try:
        assert hold.reached.wait(180), "run a never published"
        b = train(scenarios["test-slow-build"], ["keras"], uri, Environment(name="training")).artifacts["keras"]
    finally:
        hold.release()
        stdout, _ = run_a.communicate(timeout=180)
        s3.proxy.clear()
    a = json.loads(stdout.splitlines()[-1])
    assert run_a.returncode == 0
    assert b.error is None and not b.reused
    assert a["reused"] and (a["path"], a["manifest_sha256"]) == (b.path, b.manifest_sha256)
    for record in (a, b.__dict__):
        cell = replay(scenarios["test-slow-build"], "keras", record["path"], uri, Environment(name="cpu-default"),
                      batch_size=8, manifest_sha256=record["manifest_sha256"])
        assert cell.verdict == "bitwise", cell.error
    st = Storage.open(uri)
    parent = b.path.rsplit("/", 1)[0]
    assert st.listdir(parent) == sorted([POINTER, b.path.rsplit("/", 1)[1]])  # a's own upload was removed


# ---------------------------------------------------------------- local disks: full, read-only, permission denied

def _mount_problem() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = tempfile.mkdtemp(prefix="harness-mount-probe-")
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               'mount -t tmpfs -o size=16k tmpfs "$0"', probe], capture_output=True, text=True)
    finally:
        os.rmdir(probe)
    return None if done.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace here: " \
                                              f"{done.stderr.strip() or done.returncode}"


MOUNT_PROBLEM = _mount_problem()
needs_mount = pytest.mark.skipif(MOUNT_PROBLEM is not None, reason=MOUNT_PROBLEM or "")


def in_tmpfs(mountpoint: Path, size: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where a ``size`` tmpfs is mounted on ``mountpoint``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o size="$1" tmpfs "$0" && shift && exec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(mountpoint), size,
                           *argv], capture_output=True, text=True, timeout=kwargs.pop("timeout", 600), **kwargs)


_LOCAL_FAULTS = r"""
import json, os, subprocess, sys
from pathlib import Path
from harness.storage import Storage, StorageFailure, is_debris
root, src, mode = sys.argv[1], sys.argv[2], sys.argv[3]
st = Storage.open(root)
st.write_bytes("runs/r0/small.txt", b"fits")
if mode == "read-only":
    subprocess.run(["mount", "-o", "remount,ro", root], check=True)
out = {}
for what, call in (("publish", lambda: st.publish_dir(src, "artifacts/s/d")),
                   ("results", lambda: st.write_bytes("runs/r1/results.parquet", b"r" * 300_000))):
    try:
        call()
        out[what] = "ok"
    except StorageFailure as exc:
        out[what] = str(exc)
out["left"] = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
out["debris"] = [p for p in out["left"] if is_debris(p.rsplit("/", 1)[-1])]
print(json.dumps(out))
"""


@needs_mount
@pytest.mark.parametrize("mode, sentence", [("full", "storage full: No space left on device"),
                                            ("read-only", "storage read-only: Read-only file system")])
def test_full_or_read_only_local_disk_is_one_sentence_and_leaves_no_debris(tmp_path, mode, sentence):
    src = make_dir(tmp_path / "src", {**FILES, "model/big.bin": os.urandom(300_000)})
    mnt = tmp_path / "mnt"
    done = in_tmpfs(mnt, "200k", [sys.executable, "-c", _LOCAL_FAULTS, str(mnt), str(src), mode])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["publish"].startswith(f"{sentence} writing artifacts/s/d/v"), out["publish"]
    assert out["publish"].endswith(f" on {mnt}")
    assert out["results"] == f"{sentence} writing runs/r1/results.parquet on {mnt}"
    assert out["debris"] == []
    assert "runs/r0/small.txt" in out["left"] and not any(p.startswith("runs/r1/") for p in out["left"])
    assert not any(p.startswith("artifacts/s/d/v") for p in out["left"])


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                    reason="running as root without setpriv: cannot give up the right to write anywhere")
def test_permission_denied_directory_is_one_sentence(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)  # readable, not writable
    code = ("import sys; from harness.storage import Storage, StorageFailure\n"
            "try:\n    Storage.open(sys.argv[1]).publish_dir(sys.argv[2], 'artifacts/s/d'); print('ok')\n"
            "except StorageFailure as exc:\n    print(exc)\n")
    # root writes anywhere: the child gives up that capability (it stays root, and owns the directory)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run([*drop, sys.executable, "-c", code, str(store), str(make_dir(tmp_path / "src"))],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("permission denied: Permission denied writing artifacts/s/d/v")
        assert done.stdout.strip().endswith(f" on {store}")
        assert list(store.iterdir()) == []
    finally:
        store.chmod(0o755)


# ---------------------------------------------------------------- a full worker cache (HARNESS_CACHE)

_REPLAY_WITH_SMALL_CACHE = r"""
import json, subprocess, sys
from harness.scenario import discover
from harness.spec import Environment
from harness.replay import replay
scenario = discover([sys.argv[4]])["test-slow-build"]
cache, uri, path, sha = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
out = []
for size in ("16k", "8m"):  # full, then with room
    subprocess.run(["mount", "-o", f"remount,size={size}", cache], check=True)
    cell = replay(scenario, "keras", path, uri, Environment(name="cpu-default"), batch_size=8, manifest_sha256=sha)
    out.append({"verdict": cell.verdict, "error": cell.error,
                "cache": sorted(p for p in __import__("os").listdir(cache))})
print(json.dumps(out))
"""


@needs_mount
def test_full_worker_cache_is_an_error_saying_so_and_leaves_no_partial_copy(s3, scenarios, tmp_path):
    from harness.spec import Environment
    from harness.train import train

    uri = s3.uri(BUCKET, f"cache-{uuid.uuid4().hex[:8]}")
    art = train(scenarios["test-slow-build"], ["keras"], uri, Environment(name="training")).artifacts["keras"]
    cache = tmp_path / "cache"
    done = in_tmpfs(cache, "16k", [sys.executable, "-c", _REPLAY_WITH_SMALL_CACHE, str(cache), uri, art.path,
                                   str(TESTS / "scenarios"), art.manifest_sha256],
                    env={**os.environ, "HARNESS_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    full, roomy = json.loads(done.stdout.splitlines()[-1])
    assert full["verdict"] == "error", full
    assert full["error"].startswith(f"worker cache full: No space left on device writing {cache}/"), full["error"]
    assert "HARNESS_CACHE" in full["error"]
    assert full["cache"] == [".locks"]  # nothing a later cell could trust
    assert roomy["verdict"] == "bitwise", roomy["error"]
    assert len(roomy["cache"]) == 2


# ---------------------------------------------------------------- the run: quick start on a 200 KB store

SMALL_SWEEP = """
name: full-disk
storage: {store}
scenarios: [seed-linear-regression, seed-binary-classifier]
formats: [keras, h5, savedmodel]
expect: tolerance
environments:
  cpu-default: {{expect: bitwise}}
  cpu-xla: {{jit_compile: true}}
"""


@needs_mount
def test_a_run_on_a_full_disk_says_so_in_every_cell_and_leaves_no_debris(tmp_path):
    from harness import results

    mnt = tmp_path / "store"
    sweep = tmp_path / "full-disk.yaml"
    sweep.write_text(SMALL_SWEEP.format(store=mnt))
    out = tmp_path / "out"
    code = ("import sys; from harness.cli import main; code = main(sys.argv[2:]); "
            "import os; [print('LEFT', os.path.relpath(os.path.join(d, n), sys.argv[1])) "
            "for d, ds, fs in os.walk(sys.argv[1]) for n in ds + fs]; sys.exit(code)")
    done = in_tmpfs(mnt, "200k", [sys.executable, "-c", code, str(mnt), "run", str(sweep), "--out", str(out),
                                  "--inline"], cwd=REPO)
    left = [line[5:] for line in done.stdout.splitlines() if line.startswith("LEFT ")]
    assert [p for p in left if is_debris(p.rsplit("/", 1)[-1])] == [], left
    assert not any(p.startswith("leases/") and p.endswith(".json") for p in left)  # the lease went with the run
    cells = results.cells(results.read_table(out))
    assert len(cells) == 12
    failed = [c for c in cells if c.verdict == "error"]
    assert failed, "the store was expected to fill up"
    for c in failed:
        assert c.error.startswith("storage full: No space left on device writing "), c.error
        assert f" on {mnt}" in c.error and ("artifacts/" in c.error or "runs/" in c.error)
    for line in done.stderr.splitlines():  # the console lines of those cells start with the cause too
        if ": error" in line and line.startswith("["):
            assert "-- storage full: No space left on device writing " in line, line
    if done.returncode == 3:  # the results did not fit either: said in one line, and kept locally
        assert "harness: error: storage full: No space left on device writing runs/" in done.stderr
        assert f"the results are in {out / 'results.parquet'}" in done.stderr
    else:
        assert done.returncode == 1, done.stderr


# ---------------------------------------------------------------- crash debris and leases

def test_a_run_removes_what_crashed_writes_left_an_hour_ago(tmp_path):
    st = Storage.open(tmp_path / "store")
    old, young = time.time() - 2 * 3600, time.time() - 60
    entries = {"artifacts/s/d/v20260101T000000Z-0000aaaa.staging-1234abcd/model/x.bin": old,
               "artifacts/s/d.trash-5678abcd/manifest.json": old,
               "runs/r1/.results.parquet.1a2b3c4d.tmp": old,
               "runs/r1/observations/s/keras/.e.arrow.9f9f9f9f.tmp": old,
               "artifacts/s/d/v20260101T000000Z-0000bbbb.staging-99999999/model/y.bin": young,  # may be in use
               "runs/r2/.results.parquet.5e5e5e5e.tmp": young,
               "runs/r1/results.parquet": old}
    for rel, mtime in entries.items():
        path = tmp_path / "store" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        for p in (path, *path.parents):
            if p == tmp_path / "store":
                break
            os.utime(p, (mtime, mtime))
    st.write_json("leases/crashed.json", {"run_id": "crashed", "started_at": old, "renewed_at": old, "ttl_s": 600})
    os.utime(tmp_path / "store/leases/crashed.json", (old, old))
    with RunLease(st.uri, "r3"):
        assert [lease.run_id for lease in leases(st)] == ["r3"]
        left = sorted(st.walk_files(""))
    assert left == ["artifacts/s/d/v20260101T000000Z-0000bbbb.staging-99999999/model/y.bin",
                    "leases/r3.json", "runs/r1/results.parquet", "runs/r2/.results.parquet.5e5e5e5e.tmp"]
    assert not st.exists("artifacts/s/d.trash-5678abcd") and not st.exists("leases/r3.json")


def test_lease_is_renewed_while_the_run_lasts_and_a_crashed_one_expires(s3, s3_store):
    with RunLease(s3_store.uri, "r1", ttl_s=0.4) as lease:
        first = leases(s3_store)
        assert [(x.run_id, x.live()) for x in first] == [("r1", True)]
        deadline = time.monotonic() + 30
        while leases(s3_store)[0].renewed_at == first[0].renewed_at:  # renewed every ttl/4
            assert time.monotonic() < deadline, "the lease was not renewed"
        assert lease.started_at == first[0].started_at
    assert leases(s3_store) == []
    s3_store.write_json("leases/gone.json", {"run_id": "gone", "started_at": 1.0, "renewed_at": 2.0, "ttl_s": 600})
    assert [(x.run_id, x.live()) for x in leases(s3_store)] == [("gone", False)]


def test_s3_failed_write_bytes_leaves_nothing(s3, s3_store):
    s3.proxy.fail("PUT", r"/runs/r/results\.parquet$", 400, "EntityTooLarge", "too large")
    with pytest.raises(StorageFailure, match=r"^storage full: EntityTooLarge \(HTTP 400\) writing "
                                             r"runs/r/results.parquet on s3://"):
        s3_store.write_bytes("runs/r/results.parquet", b"p" * 1000)
    assert s3_store.walk_files("") == []


def test_corrupt_pointer_is_reported_not_followed(tmp_path):
    st = Storage.open(tmp_path / "store")
    st.publish_dir(make_dir(tmp_path / "src"), "artifacts/s/d")
    st.write_bytes(f"artifacts/s/d/{POINTER}", json.dumps({"version": "v1/../../x"}).encode())
    with pytest.raises(CorruptArtifact, match="is not a version"):
        st.current("artifacts/s/d")
