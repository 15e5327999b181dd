"""``harness gc``: what a storage root may lose: old runs, artifacts no kept run uses, crash debris.

Plain functions over :mod:`harness.storage` (no Ray, no TensorFlow)::

    report = collect("s3://bucket/harness", keep_runs=30, keep_days=14)
    print(report.text())

The rules, in the order they are applied:

* **Runs** (``runs/<run_id>/``): with ``keep_runs`` and/or ``keep_days``, a run
  is removed when it is beyond every limit given (not among the ``keep_runs``
  newest, and older than ``keep_days``); without either, every run is kept. A
  run in progress (a live lease, ``leases/<run_id>.json``) is always kept. A
  run's time is the one in its id (``YYYYMMDDTHHMMSSZ-...``), else its newest file.
* **Artifact versions** (``artifacts/<scenario>/<digest>/<version>/``, and
  directories written before versions existed) are removed when no kept run's
  results name them (``artifact_uri``), unless younger than ``grace_s``, or a
  run in progress may read them: the version the pointer names while any run
  is in progress, a version the pointer moved away from after a running run
  started, a version being uploaded by a run that started before it. When a
  removed version is the one the pointer names, the pointer goes first; if a
  run starts while gc works, no artifact is removed this time.
* **Debris**: staging directories, trash and temporary files older than an
  hour (``harness.storage.debris_in``), leases of crashed runs, and versions an
  interrupted upload left without a manifest (after the grace period).
"""

from __future__ import annotations

import calendar
import io
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

from . import layout
from .storage import (
    MANIFEST,
    POINTER,
    CorruptArtifact,
    Entry,
    Lease,
    Storage,
    StorageError,
    debris_in,
    is_debris,
    leases,
    version_time,
)

DEFAULT_GRACE_S = 6 * 3600.0  # an artifact younger than this is never removed
CLOCK_SKEW_S = 300.0  # leeway between the clocks of the hosts that wrote leases and pointers
_RUN_TIME = re.compile(r"^(\d{8}T\d{6})Z")


@dataclass(frozen=True)
class Removal:
    """One thing ``gc`` removes (or, in a dry run, would remove)."""

    path: str  # relative to the storage root
    kind: str  # run | artifact | pointer | debris
    size: int  # bytes
    files: int
    why: str


@dataclass
class GcReport:
    """What a ``gc`` pass removed (or would, with ``dry_run``), what it kept, and what it held back and why."""

    storage: str
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    kept_runs: int = 0
    kept_artifacts: int = 0
    held: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Removal]:
        return [r for r in self.removed if r.kind == kind]

    @property
    def freed(self) -> int:
        """Bytes removed (or that would be)."""
        return sum(r.size for r in self.removed)

    def text(self, items: bool = False) -> str:
        """A summary line (counts and bytes per kind), the held-back notes, and with ``items`` every path."""
        verb = "would remove" if self.dry_run else "removed"
        parts = [f"{len(self.of(kind))} {label} ({_bytes(sum(r.size for r in self.of(kind)))})"
                 for kind, label in (("run", "runs"), ("artifact", "artifact versions"), ("debris", "debris entries"))]
        lines = [f"harness gc {self.storage}: {verb} {', '.join(parts)}: {_bytes(self.freed)} "
                 f"{'to free' if self.dry_run else 'freed'}; kept {self.kept_runs} runs, "
                 f"{self.kept_artifacts} artifact versions" + (" (dry run: nothing was removed)" if self.dry_run else "")]
        lines += [f"  held: {note}" for note in self.held]
        if items:
            lines += [f"  {r.kind:8} {r.path}  ({_bytes(r.size)}; {r.why})" for r in self.removed]
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class _Run:
    run_id: str
    size: int = 0
    files: int = 0
    newest: float = 0.0
    has_results: bool = False

    def time(self) -> float:
        match = _RUN_TIME.match(self.run_id)
        if match:
            return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S")))
        return self.newest


@dataclass
class _Version:
    path: str  # artifacts/<scenario>/<digest>/<version>, or the digest directory (written before versions)
    born: float
    legacy: bool = False  # a directory written before versions existed: its files right in the digest directory
    size: int = 0
    files: int = 0
    complete: bool = False


@dataclass
class _Digest:
    path: str
    pointer: dict | None = None
    pointer_mtime: float | None = None
    versions: dict[str, _Version] = field(default_factory=dict)


def collect(storage_uri: str, keep_runs: int | None = None, keep_days: float | None = None,
            grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, now: float | None = None) -> GcReport:
    """Apply the retention policy to ``storage_uri`` (see the module docstring) and report what it freed.

    Args:
        storage_uri: a storage root (path, ``s3://`` ...).
        keep_runs: keep at least the newest N runs.
        keep_days: keep runs younger than D days.
        grace_s: never remove an artifact version younger than this.
        dry_run: decide and report, remove nothing.
        now: the time to judge ages by (epoch seconds; tests and benchmarks).

    Raises:
        StorageError: the storage cannot be listed, read or written (the
            message starts with the cause and the place).
        ValueError: a negative limit.
    """
    if (keep_runs is not None and keep_runs < 0) or (keep_days is not None and keep_days < 0) or grace_s < 0:
        raise ValueError("--keep-runs, --keep-days and --grace-hours must be >= 0")
    st = Storage.open(storage_uri)
    now = time.time() if now is None else now
    every_lease = leases(st)
    live = [lease for lease in every_lease if lease.live(now)]
    report = GcReport(st.where, dry_run)
    run_entries, art_entries = st.entries("runs"), st.entries("artifacts")

    runs = _runs(run_entries)
    kept_runs = _kept_runs(runs, keep_runs, keep_days, {lease.run_id for lease in live}, now)
    for run in runs.values():
        if run.run_id not in kept_runs:
            report.removed.append(Removal(f"runs/{run.run_id}", "run", run.size, run.files, _run_why(keep_runs,
                                                                                                    keep_days)))
    report.kept_runs = len(kept_runs)
    referenced = _referenced(st, [runs[r] for r in kept_runs if runs[r].has_results])

    doomed_pointers: list[str] = []
    digests = _digests(st, art_entries)
    earliest_live = min((lease.started_at for lease in live), default=None)
    held_by_lease = 0
    for digest in digests.values():
        current = f"{digest.path}/{digest.pointer['version']}" if digest.pointer else None
        retired_at = max(float(digest.pointer.get("published_at", 0) or 0), digest.pointer_mtime or 0) \
            if digest.pointer else None
        for version in digest.versions.values():
            fate, why = _judge(version, current, retired_at, referenced, live, earliest_live, grace_s, now)
            if fate != "remove":
                report.kept_artifacts += 1
                held_by_lease += fate == "held"
                continue
            kind = "artifact" if version.complete else "debris"
            report.removed.append(Removal(version.path, kind, version.size, version.files, why))
            if version.path == current:
                doomed_pointers.append(f"{digest.path}/{POINTER}")
    if held_by_lease:
        report.held.append(f"{held_by_lease} artifact version(s) a run in progress may read "
                           f"({', '.join(sorted(lease.run_id for lease in live))})")

    removed_runs = {r.path for r in report.of("run")}
    for entry in debris_in(run_entries + art_entries, now):
        if not any(entry.path.startswith(f"{p}/") for p in removed_runs):  # counted with its run
            size, files = _size_of(entry, run_entries + art_entries)
            report.removed.append(Removal(entry.path, "debris", size, files, "left by an interrupted write"))
    for lease in every_lease:
        if lease.stale(now):
            report.removed.append(Removal(lease.path, "debris", 0, 1, f"lease of run {lease.run_id}, which crashed"))

    if not dry_run:
        _execute(st, report, doomed_pointers, {lease.run_id for lease in live}, now)
    return report


def _execute(st: Storage, report: GcReport, pointers: list[str], live_before: set[str], now: float) -> None:
    for removal in report.of("run"):
        st.delete(removal.path)
    for pointer in pointers:  # first: a run that starts now retrains instead of reading what goes next
        st.delete(pointer)
    started = {lease.run_id for lease in leases(st) if lease.live(now)} - live_before
    if started:  # it may have read a pointer before it went: leave the artifacts for the next gc
        report.held.append(f"run(s) {', '.join(sorted(started))} started during gc: artifacts are left for the "
                           "next gc")
        report.removed = [r for r in report.removed if r.kind != "artifact"]
    for removal in report.removed:
        if removal.kind != "run":
            st.delete(removal.path)


def _runs(entries: Iterable[Entry]) -> dict[str, _Run]:
    runs: dict[str, _Run] = {}
    for entry in entries:
        parts = entry.path.split("/")
        if len(parts) < 2 or is_debris(parts[1]):
            continue
        run = runs.setdefault(parts[1], _Run(parts[1]))
        if len(parts) == 2:
            run.newest = max(run.newest, entry.mtime or 0.0)
            continue
        if not entry.is_dir:
            run.size += entry.size
            run.files += 1
            run.newest = max(run.newest, entry.mtime or 0.0)
            run.has_results |= len(parts) == 3 and parts[2] == "results.parquet"
    return runs


def _kept_runs(runs: dict[str, _Run], keep_runs: int | None, keep_days: float | None, live: set[str],
               now: float) -> set[str]:
    if keep_runs is None and keep_days is None:
        return set(runs)
    newest_first = sorted(runs.values(), key=lambda r: (r.time(), r.run_id), reverse=True)
    kept = set()
    for i, run in enumerate(newest_first):
        if (run.run_id in live or (keep_runs is not None and i < keep_runs)
                or (keep_days is not None and now - run.time() < keep_days * 86400)):
            kept.add(run.run_id)
    return kept


def _run_why(keep_runs: int | None, keep_days: float | None) -> str:
    limits = [f"not among the {keep_runs} newest"] if keep_runs is not None else []
    limits += [f"older than {keep_days:g} days"] if keep_days is not None else []
    return " and ".join(limits)


def _referenced(st: Storage, runs: list[_Run]) -> set[str]:
    """The artifact directories (relative to the root) the kept runs' results name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: set[str] = set()
    for run in runs:
        rel = layout.results_file(run.run_id)
        try:
            table = pq.read_table(io.BytesIO(st.read_bytes(rel)), columns=["artifact_uri"])
        except FileNotFoundError:
            continue
        except (pa.ArrowException, ValueError, KeyError) as exc:  # not a results table: stop, remove nothing
            raise StorageError(f"{st.name_of(rel)}: not a results table ({type(exc).__name__}); gc cannot tell "
                               "which artifacts this run uses: remove the file, or the run") from None
        out.update(rel for uri in set(table.column("artifact_uri").to_pylist()) if (rel := layout.artifact_of_uri(uri)))
    return out


def _digests(st: Storage, entries: list[Entry]) -> dict[str, _Digest]:
    digests: dict[str, _Digest] = {}
    for entry in entries:
        parts = entry.path.split("/")
        if len(parts) < 4 or any(is_debris(p) for p in parts[1:4]):
            continue  # scenario/digest directories themselves, and debris (judged by debris_in)
        digest = digests.setdefault("/".join(parts[:3]), _Digest("/".join(parts[:3])))
        name = parts[3]
        if name == POINTER and len(parts) == 4:
            digest.pointer_mtime = entry.mtime
            try:
                digest.pointer = st.pointer(digest.path)
            except CorruptArtifact:
                digest.pointer = None  # names nothing: a retrain replaces it
            continue
        born = version_time(name)
        if born is not None:
            version = digest.versions.setdefault(name, _Version(f"{digest.path}/{name}", born))
        else:  # files of a directory written before versions existed: one artifact, the digest directory
            version = digest.versions.setdefault("", _Version(digest.path, entry.mtime or 0.0, legacy=True))
        if not entry.is_dir:
            version.size += entry.size
            version.files += 1
            inner = parts[4:] if born is not None else parts[3:]
            version.complete |= inner == [MANIFEST]
            if version.legacy and entry.mtime:
                version.born = max(version.born, entry.mtime)
    return digests


def _judge(version: _Version, current: str | None, retired_at: float | None, referenced: set[str],
           live: list[Lease], earliest_live: float | None, grace_s: float, now: float) -> tuple[str, str]:
    """``(fate, why)``: ``keep``, ``held`` (kept for a run in progress) or ``remove``."""
    if version.path in referenced:
        return "keep", "a kept run uses it"
    if now - version.born < grace_s:
        return "keep", "younger than the grace period"
    if not version.complete:  # an upload that never finished, unless a running run is still at it
        if earliest_live is not None and earliest_live < version.born + CLOCK_SKEW_S:
            return "held", "a running run may still be uploading it"
        return "remove", "an interrupted upload (no manifest)"
    if version.path == current or version.legacy:
        if live:  # any run in progress may have read the pointer (or, before versions, the directory)
            return "held", "the current version, and a run is in progress"
        return "remove", "no kept run uses it"
    retired = retired_at if retired_at is not None else version.born
    if earliest_live is not None and earliest_live < retired + CLOCK_SKEW_S:
        return "held", "replaced after a running run started"
    return "remove", "replaced, and no kept run uses it"


def _size_of(entry: Entry, entries: list[Entry]) -> tuple[int, int]:
    if not entry.is_dir:
        return entry.size, 1
    inside = [e for e in entries if not e.is_dir and e.path.startswith(f"{entry.path}/")]
    return sum(e.size for e in inside), len(inside)
