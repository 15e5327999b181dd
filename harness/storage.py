"""Shared storage through ``pyarrow.fs``: the only module that touches files.

A storage URI is a local path, ``file://``, ``s3://``, ``gs://`` or ``hdfs://``.
S3 options come from the URI query (``?endpoint_override=127.0.0.1:9000&scheme=http
&region=us-east-1``) or from the usual AWS environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``, credentials).

Writes are atomic: single files are written to a temporary name and renamed on
local disks (an object store PUT is atomic already), and a failed write removes
its temporary file. A directory is published as a **version** that one writer
writes once and nobody changes, with its ``manifest.json`` (sha256 of every
file) written last, and then a small pointer names it::

    artifacts/<scenario>/<digest>/        (any rel passed to publish_dir)
        current.json                      {"version", "manifest_sha256", "published_at"}: written last
        v20261203T021500Z-1a2b3c4d/       one save: its files, then manifest.json
        v20261204T021500Z-5e6f7a8b/       a --retrain: a new version, and the pointer moved

Publication is first-writer-wins: a writer that finds the pointer already
there uses that version and removes its own (on local disks a hard link makes
the check and the write one atomic step; on an object store the check is made
just before the PUT, and if two writers still both write it, each run uses the
complete version it wrote: files and manifest never mix). Nothing but
``harness gc`` deletes a version, after a grace period and never while a run
that may read it holds a lease (``leases/<run_id>.json``, see :class:`RunLease`).
Every read of an artifact verifies it against its manifest.

Failures are one sentence that starts with the cause and the place
(:class:`StorageFailure`: ``storage full: No space left on device writing
artifacts/... on /mnt/store``). Against remote storage, transient failures
(connection refused or reset, timeouts, HTTP 5xx, SlowDown) are retried with
backoff for ``HARNESS_STORAGE_RETRY_S`` seconds (default 60); permanent ones
(403, 404, a full disk or quota, EntityTooLarge, a read-only mount) are not.
pyarrow's own S3 retries (a few seconds) happen inside each attempt.
"""

from __future__ import annotations

import atexit
import calendar
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # HMAC-SHA256 of manifest.json with HARNESS_SIGNING_KEY, when set
POINTER = "current.json"  # names the published version of a directory (see publish_dir)
LEASES = "leases"  # leases/<run_id>.json: runs in progress (see RunLease)
#: The artifact layout (versions + pointer); part of an artifact's content address,
#: so artifacts stored before versions existed are made again rather than mixed in.
ARTIFACT_LAYOUT = 2
#: Crash debris (staging directories, trash, temporary files) older than this is removed.
DEBRIS_AGE_S = 3600.0
DEFAULT_RETRY_S = 60.0  # HARNESS_STORAGE_RETRY_S: long enough for a 10-30 s outage of an object store
DEFAULT_LEASE_TTL_S = 600.0  # HARNESS_LEASE_TTL_S: a lease not renewed for this long is a crashed run's
CACHE_LOCK_TIMEOUT_S = 600.0  # a worker waits this long for another one's download of the same artifact
_CHUNK = 1 << 20
_VERSION = re.compile(r"^v(\d{8}T\d{6})Z-[0-9a-f]{8}$")
_DEBRIS = re.compile(r"\.staging-|\.trash-|^\..+\.tmp$")
T = TypeVar("T")


class StorageError(Exception):
    """Storage could not be reached or used, or a URI is invalid (exit code 3)."""


class StorageFailure(StorageError):
    """A storage operation failed: the message starts with the cause and the place.

    Attributes:
        kind: ``storage full``, ``storage read-only``, ``permission denied``,
            ``access denied``, ``bucket missing``, ``storage unavailable``,
            ``storage unreachable``, ``worker cache full`` ... (the message's first words).
        transient: the failure was of a kind that is retried (and the retries ran out).
    """

    def __init__(self, message: str, kind: str, transient: bool = False):
        super().__init__(message)
        self.kind, self.transient = kind, transient


class CorruptArtifact(Exception):
    """An artifact's files do not match its manifest."""


# -- failures ------------------------------------------------------------------------
@dataclass(frozen=True)
class Cause:
    """What a storage exception means: ``kind`` (first words of the message), ``text``, ``transient``."""

    kind: str
    text: str
    transient: bool = False


_ERRNO_KINDS = {errno.ENOSPC: "storage full", errno.EDQUOT: "storage full", errno.EFBIG: "storage full",
                errno.EROFS: "storage read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN}
# S3 error codes (the XML <Code>, or the SDK's name for it) -> kind, transient.
_S3_CODES = {
    "ACCESS_DENIED": ("access denied", "AccessDenied", False), "AccessDenied": ("access denied", "AccessDenied", False),
    "InvalidAccessKeyId": ("access denied", "InvalidAccessKeyId", False),
    "SignatureDoesNotMatch": ("access denied", "SignatureDoesNotMatch", False),
    "NO_SUCH_BUCKET": ("bucket missing", "NoSuchBucket", False), "NoSuchBucket": ("bucket missing", "NoSuchBucket", False),
    "EntityTooLarge": ("storage full", "EntityTooLarge", False), "QuotaExceeded": ("storage full", "QuotaExceeded", False),
    "XMinioStorageFull": ("storage full", "XMinioStorageFull", False),
    "XMinioAdminBucketQuotaExceeded": ("storage full", "XMinioAdminBucketQuotaExceeded", False),
    "InsufficientStorage": ("storage full", "InsufficientStorage", False),
    "SLOW_DOWN": ("storage unavailable", "SlowDown", True), "SlowDown": ("storage unavailable", "SlowDown", True),
    "THROTTLING": ("storage unavailable", "Throttling", True),
    "INTERNAL_FAILURE": ("storage unavailable", "InternalError", True),
    "InternalError": ("storage unavailable", "InternalError", True),
    "SERVICE_UNAVAILABLE": ("storage unavailable", "ServiceUnavailable", True),
    "ServiceUnavailable": ("storage unavailable", "ServiceUnavailable", True),
    "REQUEST_TIMEOUT": ("storage unreachable", "RequestTimeout", True),
    "RequestTimeout": ("storage unreachable", "RequestTimeout", True),
    "NETWORK_CONNECTION": ("storage unreachable", "network error", True),
}

# The HTTP status of errors the SDK names without printing it.
_S3_STATUS = {"AccessDenied": 403, "NoSuchBucket": 404, "SlowDown": 503, "InternalError": 500,
              "ServiceUnavailable": 503, "RequestTimeout": 400}


def classify(exc: BaseException) -> Cause:
    """What a filesystem exception (local ``OSError`` or pyarrow's S3/remote errors) means, in one line.

    Local errors carry an errno (``ENOSPC``, ``EROFS``, ``EACCES`` ...). pyarrow's
    S3 errors are ``OSError`` whose text names the SDK error (``AWS Error
    ACCESS_DENIED``), the HTTP status, and for errors the SDK does not know the
    S3 code (``ExceptionName: EntityTooLarge``).
    """
    code = getattr(exc, "errno", None)
    if code in _ERRNO_KINDS:
        return Cause(_ERRNO_KINDS[code], os.strerror(code))
    if code in _TRANSIENT_ERRNOS:
        return Cause("storage unreachable", os.strerror(code), True)
    if isinstance(code, int) and code > 0:
        return Cause("storage missing" if code == errno.ENOENT else "storage error", os.strerror(code))
    text = str(exc).strip()
    status_match = re.search(r"HTTP status (\d{3})", text)
    status = int(status_match.group(1)) if status_match else None
    name = re.search(r"ExceptionName: (\w+)", text)
    sdk = re.search(r"AWS Error (\w+)", text)
    for key in (name.group(1) if name else None, sdk.group(1) if sdk else None):
        if key in _S3_CODES:
            kind, label, transient = _S3_CODES[key]
            if key == "NETWORK_CONNECTION":
                detail = re.search(r"curlCode: \d+, ([^;]+)", text)
                label = detail.group(1).strip() if detail else label
            status = status or _S3_STATUS.get(label)
            return Cause(kind, f"{label}" + (f" (HTTP {status})" if status else ""), transient)
    if status is not None:
        if status == 507:
            return Cause("storage full", "HTTP 507 Insufficient Storage")
        if status >= 500 or status == 429:
            return Cause("storage unavailable", f"HTTP {status}", True)
        if status == 403:
            return Cause("access denied", "HTTP 403")
        return Cause("storage error", f"HTTP {status}" + (f" {name.group(1)}" if name else ""))
    if re.search(r"timed? ?out|Timeout was reached|Connection (refused|reset)|Could not connect|"
                 r"Couldn't connect", text, re.IGNORECASE):
        return Cause("storage unreachable", text.splitlines()[0][:200], True)
    first = text.splitlines()[0] if text else type(exc).__name__
    return Cause("storage error", first[:300])


def retry_budget_s() -> float:
    """Seconds transient failures of remote storage are retried for (``HARNESS_STORAGE_RETRY_S``, default 60)."""
    try:
        return max(0.0, float(os.environ.get("HARNESS_STORAGE_RETRY_S", DEFAULT_RETRY_S)))
    except ValueError:
        return DEFAULT_RETRY_S


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _s3_uri(uri: str) -> str:
    """``uri`` with the endpoint from the AWS environment variables, and small files sent in one PUT.

    ``allow_delayed_open`` lets pyarrow upload a small file with one PutObject
    at close instead of a multipart upload (three requests, and parts left
    behind in the bucket when the upload fails).
    """
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "endpoint_override" not in query and endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        query.setdefault("endpoint_override", ep.netloc)
        query.setdefault("scheme", ep.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            query.setdefault("region", region)
    query.setdefault("allow_delayed_open", "true")
    return urlunsplit(parts._replace(query=urlencode(query)))


def normalize_uri(uri: str | os.PathLike) -> str:
    """The URI every process resolves the same way: a local path made absolute, ``~`` expanded.

    The driver calls this once; workers get the result, so a relative
    ``storage:`` never depends on a worker's working directory.
    """
    text = os.fspath(uri)
    return os.path.abspath(os.path.expanduser(text)) if "://" not in text else text


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Turn a storage URI or local path into ``(filesystem, path)``.

    Args:
        uri: ``/data/store``, ``relative/dir``, ``file:///data/store``,
            ``s3://bucket/prefix[?endpoint_override=host:port&scheme=http]``,
            ``gs://bucket/prefix`` or ``hdfs://namenode:8020/path``.

    Raises:
        StorageError: the URI's scheme is unknown or the filesystem cannot be created.
    """
    text = os.fspath(uri)
    if "://" not in text:
        path = os.path.abspath(os.path.expanduser(text))
        return pafs.LocalFileSystem(), path
    full = _s3_uri(text) if text.startswith("s3://") else text
    try:
        parts = urlsplit(full)
        if parts.scheme not in _SHARED_SCHEMES:
            return pafs.FileSystem.from_uri(full)
        return _shared_filesystem(parts), _object_path(parts)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError
        raise StorageError(f"cannot open storage {text!r}: {exc}") from exc


# Object-store filesystems are shared within a process, per (scheme, bucket, options,
# credentials in the environment): each one owns an HTTP connection pool, and a worker
# that opened a new one per call made ~25 TCP connections per cell.
_SHARED_SCHEMES = ("s3", "gs", "gcs")
_CREDENTIAL_VARS = re.compile(r"^(AWS_|GOOGLE_|GCE_|CLOUDSDK_)")
_filesystems: dict[tuple, pafs.FileSystem] = {}
_filesystems_lock = threading.Lock()


def _object_path(parts) -> str:
    """The path ``FileSystem.from_uri`` gives an object-store URI: bucket and key, unescaped, no trailing slash."""
    return (parts.netloc + unquote(parts.path)).rstrip("/")


def _shared_filesystem(parts) -> pafs.FileSystem:
    """This process's filesystem for the bucket and options of ``parts`` (created once, thread-safe)."""
    credentials = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items()
                                             if _CREDENTIAL_VARS.match(k))).encode()).hexdigest()
    key = (parts.scheme, parts.netloc, tuple(sorted(parse_qsl(parts.query))), credentials)
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            # The bucket alone: the key's path plays no part in the filesystem.
            fs, _ = pafs.FileSystem.from_uri(urlunsplit(parts._replace(path="")))
            _filesystems[key] = fs
        return fs


def forget_filesystems() -> None:
    """Drop the shared filesystems (their connections close once no ``Storage`` uses them)."""
    with _filesystems_lock:
        _filesystems.clear()


# Before pyarrow's own exit hook (registered when pyarrow.fs was imported, so it runs after
# this one) finalizes S3: an S3 filesystem still alive then can hang or crash the exit.
atexit.register(forget_filesystems)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(local_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sha256 and size of every file below ``local_dir`` (paths relative, '/'-separated)."""
    root = Path(local_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE):
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {"files": files}
    if extra:
        manifest.update(extra)
    return manifest


def parse_manifest(raw: bytes, shown_as: str) -> dict[str, Any]:
    """A manifest's bytes -> dict, or ``CorruptArtifact`` naming the file and what is wrong with it.

    Paths must stay inside the artifact (no ``..``, no absolute paths): a
    manifest is read from shared storage and decides where downloads are written.
    """
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptArtifact(f"{shown_as}: not valid JSON (truncated or overwritten)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
            for v in files.values()):
        raise CorruptArtifact(f"{shown_as}: no 'files' mapping of path -> {{sha256, size}}")
    for rel in files:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or ".." in parts or "" in parts or rel in (MANIFEST, SIGNATURE):
            raise CorruptArtifact(f"{shown_as}: file path {rel!r} is not a relative path inside the artifact")
    return manifest


def _listed(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE)}


def verify_dir(local_dir: str | os.PathLike, manifest: dict[str, Any], shown_as: str | None = None) -> None:
    """Check that ``local_dir`` holds exactly the manifest's files, each with its size and digest.

    ``shown_as`` replaces ``local_dir`` in messages (e.g. the storage URI of a
    download being verified in a temporary directory).

    Raises:
        CorruptArtifact: naming the first file that is missing, differs, or is
            there without being in the manifest.
    """
    root = Path(local_dir)
    base = shown_as.split("?", 1)[0].rstrip("/") if shown_as else str(root)
    if not root.is_dir():
        raise CorruptArtifact(f"{base}: not a directory")
    for rel, meta in manifest["files"].items():
        p = root / rel
        name = f"{base}/{rel}"
        if not p.is_file():
            raise CorruptArtifact(f"{name}: file listed in the manifest is missing")
        if p.stat().st_size != meta["size"]:
            raise CorruptArtifact(f"{name}: size {p.stat().st_size} != manifest size {meta['size']}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise CorruptArtifact(f"{name}: sha256 {digest[:12]}... != manifest {meta['sha256'][:12]}...")
    extra = sorted(_listed(root) - set(manifest["files"]))
    if extra:
        raise CorruptArtifact(f"{base}/{extra[0]}: file is not in the manifest ({len(extra)} such file(s))")


def signing_key() -> bytes | None:
    """The HMAC key from ``HARNESS_SIGNING_KEY`` (None when unset: manifests are not signed)."""
    key = os.environ.get("HARNESS_SIGNING_KEY")
    return key.encode() if key else None


def sign(raw: bytes, key: bytes) -> str:
    """HMAC-SHA256 of a manifest's bytes, hex."""
    return hmac.new(key, raw, hashlib.sha256).hexdigest()


def new_version(now: float | None = None) -> str:
    """A fresh version name: ``v<UTC time>Z-<random>`` (sorts by time; the time tells gc its age)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"v{stamp}Z-{uuid.uuid4().hex[:8]}"


def version_time(name: str) -> float | None:
    """When the version ``name`` was made (epoch seconds), or None if ``name`` is not a version."""
    match = _VERSION.match(name)
    return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S"))) if match else None


def is_debris(name: str) -> bool:
    """Whether a file or directory name is what an interrupted write leaves (staging, trash, temporary)."""
    return bool(_DEBRIS.search(name))


@dataclass(frozen=True)
class Published:
    """A published version of a directory: where it is, its manifest, and whether this writer made it."""

    path: str  # the version directory, relative to the storage root
    manifest: dict[str, Any]
    manifest_sha256: str
    ours: bool  # False: another writer published first, and this is theirs


@dataclass(frozen=True)
class Entry:
    """A file or directory found by :meth:`Storage.entries`."""

    path: str  # relative to the storage root
    is_dir: bool
    size: int
    mtime: float | None  # epoch seconds (None: an object store's directory)


@dataclass(frozen=True)
class Storage:
    """A storage root: a filesystem and a base path under it.

    Example:
        >>> st = Storage.open("/tmp/store")
        >>> st.write_bytes("runs/x/hello.txt", b"hi")
        >>> st.read_bytes("runs/x/hello.txt")
        b'hi'
    """

    uri: str
    fs: pafs.FileSystem
    root: str
    retry_s: float | None = None  # this handle's retry budget; None: HARNESS_STORAGE_RETRY_S

    @classmethod
    def open(cls, uri: str | os.PathLike, retry_s: float | None = None) -> "Storage":
        """The storage at ``uri``; ``retry_s`` bounds the retries of transient failures (default: the env's budget)."""
        fs, root = resolve(uri)
        return cls(uri=os.fspath(uri), fs=fs, root=root.rstrip("/"), retry_s=retry_s)

    # -- paths -------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel.lstrip('/')}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """A URI a user (or ``Storage.open``) can use for ``rel``."""
        base = self.uri.split("?", 1)
        head = base[0].rstrip("/")
        if "://" not in head:
            head = self.root
        return f"{head}/{rel.lstrip('/')}" + (f"?{base[1]}" if len(base) > 1 else "")

    def name_of(self, rel: str) -> str:
        """``rel`` as a user reads it in a message: its URI without the query (endpoint options)."""
        return self.uri_of(rel).split("?", 1)[0]

    @property
    def where(self) -> str:
        """The storage root as messages name it: a local path, or a URI without its query."""
        return self.root if is_local(self.fs) else self.uri.split("?", 1)[0].rstrip("/")

    # -- failures and retries ----------------------------------------------
    def _call(self, verb: str, rel: str, fn: Callable[[], T]) -> T:
        """``fn()``; transient failures of remote storage retried with backoff; any failure a StorageFailure.

        ``FileNotFoundError`` of a read passes through as it is (callers
        decide what a missing file means), and so do our own errors; a write
        that finds no place to go (``storage missing``) is a failure.
        """
        deadline, delay, started = None, 0.5, time.monotonic()
        while True:
            try:
                return fn()
            except (StorageError, CorruptArtifact):
                raise
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) and verb != "writing":
                    raise
                cause = classify(exc)
                now = time.monotonic()
                if cause.transient and not is_local(self.fs):
                    deadline = deadline if deadline is not None else now + (
                        self.retry_s if self.retry_s is not None else retry_budget_s())
                    if now + delay <= deadline:
                        time.sleep(delay)
                        delay = min(delay * 2, 8.0)
                        continue
                raise self._failure(cause, verb, rel, retried_s=now - started if deadline is not None else None) \
                    from exc

    def _failure(self, cause: Cause, verb: str, rel: str, retried_s: float | None = None) -> StorageFailure:
        """The one sentence for ``cause`` while ``verb`` (writing, reading ...) ``rel`` in this storage."""
        retried = f" (still failing after {_seconds(retried_s)} of retries)" if retried_s else ""
        return StorageFailure(f"{cause.kind}: {cause.text} {verb} {rel or '.'} on {self.where}{retried}",
                              cause.kind, cause.transient)

    # -- listing -----------------------------------------------------------
    def _info(self, rel: str) -> pafs.FileInfo:
        return self._call("reading", rel, lambda: self.fs.get_file_info(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def listdir(self, rel: str) -> list[str]:
        """Names directly below ``rel`` (empty if it does not exist)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self._call("listing", rel, lambda: self.fs.get_file_info(sel)))

    def entries(self, rel: str, recursive: bool = True) -> list[Entry]:
        """Files and directories below ``rel`` with their sizes and modification times (empty if none)."""
        sel = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        prefix = self.root + "/"
        out = []
        for i in self._call("listing", rel, lambda: self.fs.get_file_info(sel)):
            mtime = i.mtime.timestamp() if i.mtime is not None else None
            out.append(Entry(i.path[len(prefix):] if i.path.startswith(prefix) else i.path,
                             i.type == pafs.FileType.Directory, i.size or 0, mtime))
        return out

    def walk_files(self, rel: str) -> list[str]:
        """All file paths below ``rel``, relative to the storage root."""
        return sorted(e.path for e in self.entries(rel) if not e.is_dir)

    # -- files -------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self._call("reading", rel, read)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically: readers see the old file or the whole new one; a failure leaves nothing."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        if not is_local(self.fs):
            def put() -> None:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)

            return self._call("writing", rel, put)
        tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"

        def write() -> None:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)

        try:
            self._call("writing", rel, write)
        except BaseException:
            _remove(Path(tmp))
            raise

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def delete(self, rel: str) -> None:
        """Remove the file or directory ``rel`` (nothing if it is not there)."""
        def remove() -> None:
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))
            elif info.type != pafs.FileType.NotFound:
                self.fs.delete_file(self.path(rel))

        try:
            self._call("deleting", rel, remove)
        except FileNotFoundError:
            pass  # gone meanwhile (a retried delete that had worked)

    def _remove_quietly(self, rel: str) -> None:
        """Best-effort removal after a failure (one attempt: the store may be what failed)."""
        try:
            if is_local(self.fs):
                _remove(Path(self.path(rel)))
            elif self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))
        except Exception:  # noqa: BLE001 -- what stays is a version without a manifest: gc removes it
            pass

    # -- directories with manifests --------------------------------------
    def is_complete(self, rel: str) -> bool:
        """Whether the directory ``rel`` was fully written (its manifest exists)."""
        return self.exists(f"{rel}/{MANIFEST}")

    def pointer(self, rel: str) -> dict[str, Any] | None:
        """The pointer of the published directory ``rel`` (``{"version", "manifest_sha256", ...}``), or None.

        Raises:
            CorruptArtifact: the pointer is there but does not name a version.
        """
        try:
            raw = self.read_bytes(f"{rel}/{POINTER}")
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            version = doc["version"]
        except (ValueError, TypeError, KeyError):
            raise CorruptArtifact(f"{self.name_of(f'{rel}/{POINTER}')}: not a pointer to a version "
                                  "(truncated or overwritten)") from None
        if not isinstance(version, str) or not _VERSION.match(version):
            raise CorruptArtifact(f"{self.name_of(f'{rel}/{POINTER}')}: names {version!r}, which is not a version")
        return doc

    def current(self, rel: str) -> str | None:
        """The directory ``rel`` stands for (relative to the root), or None if nothing is published there.

        ``rel`` itself if it holds a manifest (a version, or a directory written
        before versions), else the version its pointer names (complete or not:
        :meth:`get_dir` says which).
        """
        if self.is_complete(rel):
            return rel
        found = self.pointer(rel)
        return f"{rel}/{found['version']}" if found else None

    def publish_dir(self, local_dir: str | os.PathLike, rel: str, extra: dict[str, Any] | None = None,
                    replace: bool = False) -> Published:
        """Publish ``local_dir`` as a new version of ``rel``: files, manifest (and signature), then the pointer.

        First writer wins: if ``rel`` is already published (now, or by a
        concurrent writer that finishes first), that version is returned with
        ``ours=False`` and this writer's copy is removed. ``replace`` (a
        retrain, or a damaged copy) always publishes and moves the pointer; the
        old version stays for readers that have it until ``harness gc``.

        Raises:
            StorageFailure: the upload failed (what it staged is removed).
        """
        for _ in range(3):  # a pointer that vanishes between our check and our read is gc's doing: once more
            if not replace:
                theirs = self._published(rel)
                if theirs is not None:
                    return theirs
            manifest = build_manifest(local_dir, extra)
            raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
            sha = hashlib.sha256(raw).hexdigest()
            version = new_version()
            vrel = f"{rel}/{version}"
            if is_local(self.fs):
                self._put_local(Path(local_dir), vrel, manifest, raw)
            else:
                self._put_remote(Path(local_dir), vrel, manifest, raw)
            # The pointer may land even when its write reports a failure (a timed-out PUT):
            # the version then stays for gc rather than being removed under a reader.
            if self._point(rel, version, sha, replace):
                return Published(vrel, manifest, sha, ours=True)
            self._remove_quietly(vrel)  # nobody ever saw it
            replace = False
        raise StorageFailure(f"storage error: the pointer of {rel} kept changing while publishing on {self.where}",
                             "storage error")

    def _published(self, rel: str) -> Published | None:
        found = self.pointer(rel)
        if found is None:
            return None
        vrel = f"{rel}/{found['version']}"
        try:
            raw = self.read_bytes(f"{vrel}/{MANIFEST}")
        except FileNotFoundError:
            raise CorruptArtifact(f"{self.name_of(f'{vrel}/{MANIFEST}')}: missing; the pointer names a version "
                                  "that was never fully written (or was removed since)") from None
        manifest = parse_manifest(raw, f"{self.name_of(vrel)}/{MANIFEST}")
        return Published(vrel, manifest, hashlib.sha256(raw).hexdigest(), ours=False)

    def _put_local(self, src: Path, vrel: str, manifest: dict[str, Any], raw: bytes) -> None:
        """Copy into a staging directory next to the version, then rename it: the version appears whole."""
        staging = Path(self.path(f"{vrel}.staging-{uuid.uuid4().hex[:8]}"))
        key = signing_key()

        def copy() -> None:
            staging.mkdir(parents=True)
            for relfile in manifest["files"]:
                dest = staging / relfile
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / relfile, dest)  # an OSError with its errno, unlike copytree's shutil.Error
            if key:
                (staging / SIGNATURE).write_text(sign(raw, key))
            (staging / MANIFEST).write_bytes(raw)
            os.rename(staging, self.path(vrel))

        try:
            self._call("writing", vrel, copy)
        except BaseException:
            _remove(staging)
            try:
                staging.parent.rmdir()  # if this write made it and nothing else is there
            except OSError:
                pass
            raise

    def _put_remote(self, src: Path, vrel: str, manifest: dict[str, Any], raw: bytes) -> None:
        """Upload file by file (each retried on its own), the signature, then the manifest last."""
        key = signing_key()
        try:
            for relfile in manifest["files"]:
                self._call("writing", f"{vrel}/{relfile}", lambda relfile=relfile: self._upload(src / relfile,
                                                                                              f"{vrel}/{relfile}"))
            if key:
                self.write_bytes(f"{vrel}/{SIGNATURE}", sign(raw, key).encode())
            self.write_bytes(f"{vrel}/{MANIFEST}", raw)
        except BaseException:
            self._remove_quietly(vrel)
            raise

    def _upload(self, local: Path, rel: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)

    def _point(self, rel: str, version: str, sha: str, replace: bool) -> bool:
        """Make ``rel``'s pointer name ``version``; False if another writer's pointer was there first."""
        body = json.dumps({"version": version, "manifest_sha256": sha, "published_at": time.time()},
                          sort_keys=True).encode()
        target = f"{rel}/{POINTER}"
        if not is_local(self.fs):
            # No conditional PUT through pyarrow: check right before writing (see the module docstring).
            if not replace and self.pointer(rel) is not None:
                return False
            self.write_bytes(target, body)
            return True
        path = self.path(target)
        tmp = self.path(f"{rel}/.{POINTER}.{uuid.uuid4().hex[:8]}.tmp")

        def link() -> bool:
            with open(tmp, "wb") as f:
                f.write(body)
            if replace:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # fails if the pointer exists: check and write in one step
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(path):  # a filesystem without hard links: check, then rename
                    return False
                os.replace(tmp, path)
                return True

        try:
            return self._call("writing", target, link)
        finally:
            _remove(Path(tmp))

    def manifest_sha256(self, rel: str) -> str:
        """sha256 of the manifest file of the complete directory ``rel`` (binds a run to it)."""
        return hashlib.sha256(self.read_bytes(f"{self.current(rel) or rel}/{MANIFEST}")).hexdigest()

    def get_dir(self, rel: str, cache_root: str | os.PathLike | None = None,
                expected_manifest_sha256: str | None = None) -> tuple[str, dict[str, Any]]:
        """A verified local copy of the complete directory ``rel`` (a version, or a published directory).

        Local storage is verified in place (no copy); remote storage is
        downloaded once into ``cache_root/<manifest digest>`` (one worker per
        node downloads it, the others wait on a file lock) and the cached copy
        is verified again on every call.

        Args:
            rel: the directory, relative to the storage root: a version, or a
                published directory (its pointer's version is read).
            cache_root: where remote directories are cached (default: ``default_cache_dir()``).
            expected_manifest_sha256: the manifest digest the caller was given
                (e.g. by the training step of this run); a manifest with another
                digest was rewritten since and is refused.

        Returns:
            ``(local_path, manifest)``.

        Raises:
            CorruptArtifact: the manifest is missing, is not the expected one,
                or a file does not match it.
            StorageFailure: storage (or, for ``worker cache full``, the local cache) failed.
        """
        found = self.current(rel)
        if found is None or (found != rel and not self.is_complete(found)):
            missing = f"{found or rel}/{MANIFEST}"
            raise CorruptArtifact(f"{self.name_of(missing)}: missing; the artifact was never fully written "
                                  "(or was damaged since)")
        rel = found
        raw = self.read_bytes(f"{rel}/{MANIFEST}")
        digest = hashlib.sha256(raw).hexdigest()
        manifest = parse_manifest(raw, f"{self.name_of(rel)}/{MANIFEST}")
        if expected_manifest_sha256 and digest != expected_manifest_sha256:
            raise CorruptArtifact(f"{self.name_of(rel)}/{MANIFEST}: sha256 {digest[:12]}... is not the manifest the "
                                  f"training step of this run wrote or checked ({expected_manifest_sha256[:12]}...); "
                                  "the artifact was changed since")
        self._check_signature(rel, raw)
        if is_local(self.fs):
            verify_dir(self.path(rel), manifest)
            return self.path(rel), manifest
        stored = {p[len(rel) + 1:] for p in self.walk_files(rel)} - {MANIFEST, SIGNATURE}
        extra = sorted(stored - set(manifest["files"]))
        if extra:
            raise CorruptArtifact(f"{self.name_of(f'{rel}/{extra[0]}')}: file is not in the manifest "
                                  f"({len(extra)} such file(s))")
        cache_root = Path(cache_root or default_cache_dir())
        local = cache_root / digest[:24]
        with _cache_lock(cache_root, local.name):
            if os.path.lexists(local):
                try:
                    verify_dir(local, manifest)
                    return str(local), manifest
                except CorruptArtifact:
                    # A damaged cached copy (of any kind: changed files, a file in
                    # place of the directory) is this node's problem, not the
                    # artifact's: drop it and fetch again from storage.
                    _remove(local)
            self._download(rel, manifest, local)  # verified before it is renamed into place
        verify_dir(local, manifest)  # what is in place now, whoever put it there
        return str(local), manifest

    def _check_signature(self, rel: str, raw: bytes) -> None:
        key = signing_key()
        if key is None:
            return
        where = self.name_of(f"{rel}/{SIGNATURE}")
        if not self.exists(f"{rel}/{SIGNATURE}"):
            raise CorruptArtifact(f"{where}: missing; HARNESS_SIGNING_KEY is set and this artifact is not signed "
                                  "with it (retrain it with --retrain to sign it)")
        if not hmac.compare_digest(self.read_bytes(f"{rel}/{SIGNATURE}").decode(errors="replace").strip(),
                                   sign(raw, key)):
            raise CorruptArtifact(f"{where}: does not match manifest.json under HARNESS_SIGNING_KEY")

    def _download(self, rel: str, manifest: dict[str, Any], local: Path) -> None:
        """Fetch every manifest file into ``local`` atomically, verified on the way.

        A failure (storage, or a full local disk) leaves nothing in the cache
        but what was there: the copy is made under a temporary name.
        """
        tmp = None
        try:
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale(local.parent, f".{local.name}.")
                tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
            except OSError as exc:
                raise _cache_failure(exc, local) from exc
            for relfile in manifest["files"]:
                dest = tmp / relfile
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self._call("reading", f"{rel}/{relfile}",
                               lambda relfile=relfile, dest=dest: self._fetch(f"{rel}/{relfile}", dest))
                except FileNotFoundError:
                    raise CorruptArtifact(f"{self.name_of(f'{rel}/{relfile}')}: file listed in the manifest "
                                          "is missing") from None
                except _CacheWriteError as exc:
                    raise _cache_failure(exc.__cause__, local) from exc.__cause__
                except OSError as exc:  # making the directory in the cache
                    raise _cache_failure(exc, local) from exc
            verify_dir(tmp, manifest, shown_as=self.uri_of(rel))
            try:
                os.rename(tmp, local)
            except OSError:  # another worker on this node won the race
                _remove(tmp)
        except BaseException:
            _remove(tmp)
            raise

    def _fetch(self, rel: str, dest: Path) -> None:
        """Copy one stored file into the cache; a local write error is a ``_CacheWriteError`` (never retried)."""
        with self.fs.open_input_stream(self.path(rel)) as src:
            try:
                out = open(dest, "wb")
            except OSError as exc:
                raise _CacheWriteError() from exc
            try:
                while chunk := src.read(_CHUNK):  # a storage error here is the storage's (retried)
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise _CacheWriteError() from exc
            finally:
                try:
                    out.close()  # flushes: a full disk may only show here
                except OSError as exc:
                    raise _CacheWriteError() from exc

    # -- crash debris ----------------------------------------------------
    def remove_debris(self, max_age_s: float = DEBRIS_AGE_S, now: float | None = None) -> list[Entry]:
        """Remove what interrupted writes left here (staging directories, trash, temporary files) and
        leases of crashed runs, when older than ``max_age_s``; returns what was removed.

        On an object store, uploads are never staged under another name: a
        version left without its manifest by a crash is removed by ``harness gc``.
        """
        now = time.time() if now is None else now
        found = [Entry(lease.path, False, 0, lease.renewed_at) for lease in leases(self) if lease.stale(now, max_age_s)]
        if is_local(self.fs):
            found += debris_in(self.entries("artifacts") + self.entries("runs"), now, max_age_s)
        for entry in found:
            self.delete(entry.path)
        return found


def debris_in(entries: list[Entry], now: float, max_age_s: float = DEBRIS_AGE_S) -> list[Entry]:
    """The crash debris among ``entries`` (as :meth:`Storage.entries` lists them), older than ``max_age_s``.

    Debris: staging directories, trash and temporary files of interrupted
    writes (leases of crashed runs: :meth:`Lease.stale`). What is inside a
    debris directory is not listed again.
    """
    out: list[Entry] = []
    dirs: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.path.count("/")):  # parents first
        parts = entry.path.split("/")
        if any("/".join(parts[:i]) in dirs for i in range(1, len(parts))):
            continue
        if is_debris(parts[-1]) and (entry.mtime or now) < now - max_age_s:
            out.append(entry)
            if entry.is_dir:
                dirs.add(entry.path)
    return sorted(out, key=lambda e: e.path)


class _CacheWriteError(Exception):
    """Writing the local cache copy failed (its cause is the OSError): not a storage failure, not retried."""


def _cache_failure(exc: BaseException | None, local: Path) -> StorageFailure:
    """The one sentence for a failure of this node's artifact cache (``HARNESS_CACHE``) while writing ``local``."""
    cause = classify(exc) if exc is not None else Cause("cache error", "unknown error")
    kind = {"storage full": "worker cache full", "storage read-only": "worker cache read-only"}.get(
        cause.kind, f"worker cache {cause.kind}" if cause.kind.startswith("permission") else "worker cache error")
    return StorageFailure(f"{kind}: {cause.text} writing {local} (the node's artifact cache: set HARNESS_CACHE to a "
                          "disk with room)", kind)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _cache_lock(cache_root: Path, name: str) -> Any:
    """A lock that keeps two workers on this node from downloading the same artifact at once.

    Waits at most ``CACHE_LOCK_TIMEOUT_S`` for another worker's download; the
    copy is renamed into place atomically either way, so a lock that cannot
    be had (a read-only or full cache) costs a second download, never a wrong copy.
    """
    from filelock import FileLock, Timeout

    locks = cache_root / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{name}.lock"), timeout=CACHE_LOCK_TIMEOUT_S)
        lock.acquire()
    except (OSError, Timeout):
        return _NoLock()  # the download itself reports a cache that cannot be written
    return _Held(lock)


class _Held:
    def __init__(self, lock: Any):
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _remove(path: Path | None) -> None:
    """Remove a file or directory tree if it is there (best effort)."""
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_stale(directory: Path, prefix: str, max_age_s: float = DEBRIS_AGE_S) -> None:
    """Remove ``prefix*`` entries of ``directory`` older than ``max_age_s`` (copies a crashed worker left)."""
    cutoff = time.time() - max_age_s
    try:
        for p in directory.iterdir():
            if p.name.startswith(prefix) and p.lstat().st_mtime < cutoff:
                _remove(p)
    except OSError:
        pass


def default_cache_dir() -> str:
    """Where workers cache downloaded artifacts (``HARNESS_CACHE`` overrides)."""
    return os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tf-repro-harness", "artifacts")


# -- leases: runs in progress ----------------------------------------------------------
def lease_ttl_s() -> float:
    """How long a lease lives without renewal (``HARNESS_LEASE_TTL_S``, default 600)."""
    try:
        return max(10.0, float(os.environ.get("HARNESS_LEASE_TTL_S", DEFAULT_LEASE_TTL_S)))
    except ValueError:
        return DEFAULT_LEASE_TTL_S


@dataclass(frozen=True)
class Lease:
    """A run in progress, as its lease file says."""

    run_id: str
    started_at: float
    renewed_at: float
    ttl_s: float
    host: str = ""
    pid: int = 0
    path: str = ""  # relative to the storage root

    def live(self, now: float | None = None) -> bool:
        """Renewed within its time to live (a crashed run's lease stops being renewed)."""
        return (time.time() if now is None else now) < self.renewed_at + self.ttl_s

    def stale(self, now: float | None = None, max_age_s: float = DEBRIS_AGE_S) -> bool:
        """Expired more than ``max_age_s`` ago: its run crashed, and the lease is debris."""
        return (time.time() if now is None else now) > self.renewed_at + self.ttl_s + max_age_s


def leases(storage: Storage) -> list[Lease]:
    """Every lease in ``storage`` (live or not); an unreadable lease counts as live, started long ago."""
    out = []
    for entry in storage.entries(LEASES, recursive=False):
        name = entry.path.rsplit("/", 1)[-1]
        if entry.is_dir or not name.endswith(".json") or is_debris(name):
            continue
        try:
            doc = storage.read_json(entry.path)
            out.append(Lease(doc["run_id"], float(doc["started_at"]), float(doc["renewed_at"]),
                             float(doc["ttl_s"]), str(doc.get("host", "")), int(doc.get("pid", 0)), entry.path))
        except FileNotFoundError:
            continue  # released meanwhile
        except (ValueError, KeyError, TypeError):
            # Safe side: honoured as a run in progress that started before anything else.
            out.append(Lease(name[:-5], 0.0, entry.mtime or time.time(), lease_ttl_s(), path=entry.path))
    return out


class RunLease:
    """While a run is in progress, ``leases/<run_id>.json`` in its storage says so (``harness gc`` honours it).

    Entering writes the lease and removes crash debris older than an hour
    (:meth:`Storage.remove_debris`); a daemon thread renews it every quarter of
    its time to live (``HARNESS_LEASE_TTL_S``); leaving deletes it. A run that
    crashes leaves a lease that expires.

    Example:
        >>> with RunLease("/data/store", run_id):
        ...     run_the_cells()
    """

    def __init__(self, storage_uri: str, run_id: str, ttl_s: float | None = None):
        self.storage_uri, self.run_id = storage_uri, run_id
        self.ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
        self.rel = f"{LEASES}/{run_id}.json"
        self.started_at = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.storage: Storage | None = None

    def _write(self) -> None:
        assert self.storage is not None
        self.storage.write_json(self.rel, {"run_id": self.run_id, "started_at": self.started_at,
                                           "renewed_at": time.time(), "ttl_s": self.ttl_s,
                                           "host": socket.gethostname(), "pid": os.getpid()})

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write()
                except Exception:  # noqa: BLE001 -- storage down: the next renewal tries again
                    pass

    def __enter__(self) -> "RunLease":
        self.storage = Storage.open(self.storage_uri)
        self._write()
        try:
            self.storage.remove_debris()
        except (StorageError, OSError):
            pass  # cleaning up after others never stops a run
        self._thread = threading.Thread(target=self._renew, name=f"harness-lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._lock:  # a renewal in flight finishes first, so the lease is not written back after
            try:
                assert self.storage is not None
                self.storage.delete(self.rel)
            except Exception:  # noqa: BLE001 -- it expires on its own
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
