"""``harness gc``: retention of runs, artifact versions no kept run uses, and crash debris.

Real storage (a local directory, and S3 on the session's moto server), real
results tables and real published versions; ``now`` is moved forward instead
of waiting for artifacts to age.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from harness import results
from harness.cli import main
from harness.records import CellResult
from harness.retention import DEFAULT_GRACE_S, collect
from harness.storage import LEASES, MANIFEST, POINTER, RunLease, Storage, new_version

from test_storage import store  # noqa: F401 -- the same empty storage root, on local disk and on S3

HOUR, DAY = 3600.0, 86400.0


def run_id(at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at)) + "-" + uuid.uuid4().hex[:6]


def publish(st: Storage, tmp_path: Path, rel: str, data: bytes, replace: bool = False) -> str:
    src = tmp_path / uuid.uuid4().hex
    (src / "model").mkdir(parents=True)
    (src / "model" / "model.keras").write_bytes(data)
    return st.publish_dir(src, rel, replace=replace).path


def write_run(st: Storage, rid: str, artifacts: list[str]) -> None:
    """A finished run: its results (one cell per artifact, naming it as a run does) and an observation each."""
    cells = [CellResult(run_id=rid, sweep="s", scenario=f"s{i}", format="keras", environment="e", verdict="bitwise",
                        artifact_uri=st.uri_of(path), artifact_digest=path.split("/")[2])
             for i, path in enumerate(artifacts)]
    st.write_bytes(f"runs/{rid}/results.parquet", results.to_parquet_bytes(results.to_table(cells)))
    for i, _ in enumerate(artifacts):
        st.write_bytes(f"runs/{rid}/observations/s{i}/keras/e.arrow", b"o" * 100)


def sizes(st: Storage, prefix: str) -> int:
    return sum(e.size for e in st.entries(prefix) if not e.is_dir)


def test_keep_runs_removes_old_runs_and_the_artifacts_only_they_used(store, tmp_path):
    now = time.time()
    a1 = publish(store, tmp_path, "artifacts/a/d1", b"A1" * 500)
    a2 = publish(store, tmp_path, "artifacts/a/d1", b"A2" * 500, replace=True)  # a retrain: a1 is not current
    b = publish(store, tmp_path, "artifacts/b/d2", b"B" * 700)
    c = publish(store, tmp_path, "artifacts/c/d3", b"C" * 900)  # nobody's
    old1, old2, new = run_id(now - 10 * DAY), run_id(now - 9 * DAY), run_id(now - DAY)
    write_run(store, old1, [a1])
    write_run(store, old2, [a1, b])
    write_run(store, new, [b])
    later = now + DEFAULT_GRACE_S + HOUR
    expected_runs = sizes(store, f"runs/{old1}") + sizes(store, f"runs/{old2}")
    expected_artifacts = sum(sizes(store, p) for p in (a1, a2, c))

    dry = collect(store.uri, keep_runs=1, dry_run=True, now=later)
    assert sorted(r.path for r in dry.of("run")) == sorted([f"runs/{old1}", f"runs/{old2}"])
    assert sorted(r.path for r in dry.of("artifact")) == sorted([a1, a2, c])
    assert store.exists(f"runs/{old1}") and store.exists(a1)  # a dry run removes nothing

    report = collect(store.uri, keep_runs=1, now=later)
    assert [(r.kind, r.path) for r in report.removed] == [(r.kind, r.path) for r in dry.removed]
    assert sum(r.size for r in report.of("run")) == expected_runs
    assert sum(r.size for r in report.of("artifact")) == expected_artifacts
    assert report.freed == expected_runs + expected_artifacts and (report.kept_runs, report.kept_artifacts) == (1, 1)
    assert store.listdir("runs") == [new]
    assert sorted(store.walk_files("artifacts")) == sorted(
        [f"{b}/model/model.keras", f"{b}/{MANIFEST}", f"artifacts/b/d2/{POINTER}"])
    # the removed current versions went with their pointers: the next run trains them again
    assert store.current("artifacts/a/d1") is None and store.current("artifacts/c/d3") is None
    text = report.text()
    assert text.startswith(f"harness gc {store.where}: removed 2 runs (") and "3 artifact versions" in text


def test_keep_days_and_keep_runs_keep_what_either_keeps(tmp_path):
    st = Storage.open(tmp_path / "store")
    now = time.time()
    ids = [run_id(now - d * DAY) for d in (1, 3, 5, 20, 40)]
    for rid in ids:
        write_run(st, rid, [])
    assert collect(st.uri, keep_days=4, dry_run=True, now=now).kept_runs == 2
    assert collect(st.uri, keep_runs=3, dry_run=True, now=now).kept_runs == 3
    report = collect(st.uri, keep_runs=1, keep_days=4, now=now)
    assert sorted(st.listdir("runs")) == sorted(ids[:2])
    assert {r.why for r in report.of("run")} == {"not among the 1 newest and older than 4 days"}
    assert collect(st.uri, now=now).kept_runs == 2  # no limit given: every run is kept


def test_young_artifacts_are_never_removed(store, tmp_path):
    v = publish(store, tmp_path, "artifacts/a/d", b"young")
    report = collect(store.uri, keep_runs=0, now=time.time() + DEFAULT_GRACE_S / 2)
    assert report.removed == [] and store.current("artifacts/a/d") == v
    assert collect(store.uri, keep_runs=0, grace_s=0, dry_run=True).of("artifact")[0].path == v


def test_a_run_in_progress_keeps_what_it_may_read(tmp_path):
    st = Storage.open(tmp_path / "store")
    old = publish(st, tmp_path, "artifacts/a/d", b"old")  # current when the run starts
    later = time.time() + DEFAULT_GRACE_S + HOUR
    with RunLease(st.uri, "running", ttl_s=DAY):
        newer = publish(st, tmp_path, "artifacts/a/d", b"retrained", replace=True)  # moved while it runs
        spare = publish(st, tmp_path, "artifacts/b/d", b"current elsewhere")
        report = collect(st.uri, keep_runs=0, now=later)
        assert report.removed == [] and report.kept_artifacts == 3
        assert report.held == ["3 artifact version(s) a run in progress may read (running)"]
    # the run is over: the same pass removes them all
    report = collect(st.uri, keep_runs=0, now=later)
    assert sorted(r.path for r in report.of("artifact")) == sorted([old, newer, spare])


def test_a_version_replaced_before_a_run_started_is_not_held_by_it(tmp_path):
    st = Storage.open(tmp_path / "store")
    old = publish(st, tmp_path, "artifacts/a/d", b"old")
    current = publish(st, tmp_path, "artifacts/a/d", b"new", replace=True)
    later = time.time() + DEFAULT_GRACE_S + HOUR
    lease = {"run_id": "late", "started_at": later - 60, "renewed_at": later - 30, "ttl_s": 600}
    st.write_json(f"{LEASES}/late.json", lease)
    report = collect(st.uri, keep_runs=0, now=later)
    assert [r.path for r in report.of("artifact")] == [old]  # nobody running can read it
    assert st.current("artifacts/a/d") == current  # the current one is held for the running run


def test_interrupted_upload_is_debris_after_the_grace_period(store, tmp_path):
    version = new_version(time.time() - 2 * DEFAULT_GRACE_S)
    store.write_bytes(f"artifacts/a/d/{version}/model/model.keras", b"half")  # no manifest: never published
    report = collect(store.uri, now=time.time())
    assert [(r.kind, r.path, r.why) for r in report.removed] == [
        ("debris", f"artifacts/a/d/{version}", "an interrupted upload (no manifest)")]
    assert store.walk_files("artifacts") == []


def test_crash_debris_and_stale_leases_are_removed(tmp_path):
    st = Storage.open(tmp_path / "store")
    rid = run_id(time.time())
    write_run(st, rid, [])
    st.write_bytes(f"runs/{rid}/.results.parquet.0badf00d.tmp", b"t" * 50)
    st.write_json(f"{LEASES}/crashed.json", {"run_id": "crashed", "started_at": 1, "renewed_at": 2, "ttl_s": 600})
    later = time.time() + 2 * HOUR  # older than an hour, and past the lease's time to live
    report = collect(st.uri, now=later)
    assert sorted((r.kind, r.path) for r in report.removed) == [
        ("debris", f"{LEASES}/crashed.json"), ("debris", f"runs/{rid}/.results.parquet.0badf00d.tmp")]
    assert st.listdir(f"runs/{rid}") == ["results.parquet"] and st.listdir(LEASES) == []


def test_artifacts_written_before_versions_are_judged_like_versions(tmp_path):
    st = Storage.open(tmp_path / "store")
    for digest in ("used", "unused"):  # the old layout: files and manifest right in the digest directory
        st.write_bytes(f"artifacts/a/{digest}/model/model.keras", b"legacy")
        st.write_bytes(f"artifacts/a/{digest}/{MANIFEST}", json.dumps({"files": {}}).encode())
    write_run(st, run_id(time.time()), ["artifacts/a/used"])
    report = collect(st.uri, now=time.time() + DEFAULT_GRACE_S + HOUR)
    assert [r.path for r in report.of("artifact")] == ["artifacts/a/unused"]
    assert st.exists(f"artifacts/a/used/{MANIFEST}") and not st.exists("artifacts/a/unused")


def test_a_run_that_starts_during_gc_keeps_the_artifacts(tmp_path, monkeypatch):
    st = Storage.open(tmp_path / "store")
    v = publish(st, tmp_path, "artifacts/a/d", b"current")
    later = time.time() + DEFAULT_GRACE_S + HOUR
    real = Storage.delete

    def delete(self, rel):  # a run starts the moment gc takes the pointer away
        real(self, rel)
        if rel.endswith(POINTER):
            self.write_json(f"{LEASES}/newcomer.json", {"run_id": "newcomer", "started_at": later,
                                                        "renewed_at": later, "ttl_s": 600})

    monkeypatch.setattr(Storage, "delete", delete)
    report = collect(st.uri, now=later)
    assert report.of("artifact") == [] and "newcomer started during gc" in report.held[0]
    assert st.is_complete(v) and st.current("artifacts/a/d") is None  # it retrains; the version waits for gc


def test_cli_gc(tmp_path, capsys):
    st = Storage.open(tmp_path / "store")
    now = time.time()
    for days in (30, 20, 1):
        write_run(st, run_id(now - days * DAY), [])
    assert main(["gc", str(tmp_path / "store"), "--keep-runs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 runs" in out and "(dry run: nothing was removed)" in out and out.count("  run ") == 2
    assert len(st.listdir("runs")) == 3
    assert main(["gc", str(tmp_path / "store"), "--keep-days", "7"]) == 0
    assert "removed 2 runs" in capsys.readouterr().out and len(st.listdir("runs")) == 1
    assert main(["gc", str(tmp_path / "store"), "--keep-runs", "-1"]) == 2
    assert "--keep-runs -1: must be >= 0" in capsys.readouterr().err
    assert main(["gc", str(tmp_path / "nowhere")]) == 2
    assert "nothing the harness wrote is there" in capsys.readouterr().err
    st.write_bytes(f"runs/{run_id(now)}/results.parquet", b"not parquet")
    assert main(["gc", str(tmp_path / "store")]) == 3
    err = capsys.readouterr().err
    assert "results.parquet: not a results table" in err and "remove the file, or the run" in err
