"""Shared storage through ``pyarrow.fs``: the only module that touches files.

A storage URI is a local path, ``file://``, ``s3://``, ``gs://`` or ``hdfs://``.
S3 options come from the URI query (``?endpoint_override=127.0.0.1:9000&scheme=http
&region=us-east-1``) or from the usual AWS environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``, credentials).

Writes are atomic: single files are written to a temporary name and renamed on
local disks (an object store PUT is atomic already); a directory is complete
only once its ``manifest.json`` (sha256 of every file) exists, and it is
written last. Every read of an artifact verifies it against that manifest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # HMAC-SHA256 of manifest.json with HARNESS_SIGNING_KEY, when set
_CHUNK = 1 << 20


class StorageError(Exception):
    """Storage could not be reached or a URI is invalid."""


class CorruptArtifact(Exception):
    """An artifact's files do not match its manifest."""


def _s3_from_env(uri: str) -> tuple[pafs.FileSystem, str] | None:
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "endpoint_override" in query or not endpoint:
        return None
    ep = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    query.setdefault("endpoint_override", ep.netloc)
    query.setdefault("scheme", ep.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        query.setdefault("region", region)
    return pafs.FileSystem.from_uri(urlunsplit(parts._replace(query=urlencode(query))))


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
    try:
        if text.startswith("s3://"):
            found = _s3_from_env(text)
            if found is not None:
                return found
        return pafs.FileSystem.from_uri(text)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError
        raise StorageError(f"cannot open storage {text!r}: {exc}") from exc


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

    @classmethod
    def open(cls, uri: str | os.PathLike) -> "Storage":
        fs, root = resolve(uri)
        return cls(uri=os.fspath(uri), fs=fs, root=root.rstrip("/"))

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

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str) -> list[str]:
        """Names directly below ``rel`` (empty if it does not exist)."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def walk_files(self, rel: str) -> list[str]:
        """All file paths below ``rel``, relative to the storage root."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        prefix = self.root + "/"
        return sorted(i.path[len(prefix):] if i.path.startswith(prefix) else i.path
                      for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    # -- files -------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically: readers see the old file or the whole new one."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if is_local(self.fs):
            tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    # -- directories with manifests --------------------------------------
    def is_complete(self, rel: str) -> bool:
        """Whether the directory ``rel`` was fully written (its manifest exists)."""
        return self.exists(f"{rel}/{MANIFEST}")

    def put_dir(self, local_dir: str | os.PathLike, rel: str, extra: dict[str, Any] | None = None,
                replace: bool = False) -> dict[str, Any]:
        """Upload ``local_dir`` to ``rel`` and write its manifest last (and its signature, with a key).

        If ``rel`` is already complete it is left untouched (content-addressed
        writes are idempotent) and its manifest is returned, unless ``replace``:
        then the stored copy (damaged, or to be retrained) is swapped for this one.
        A directory left incomplete (no manifest) is always replaced.
        """
        if self.is_complete(rel) and not replace:
            return self.read_json(f"{rel}/{MANIFEST}")
        manifest = build_manifest(local_dir, extra)
        raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
        key = signing_key()
        if is_local(self.fs):
            # Stage next to the target, then rename: the directory appears whole.
            dest = self.path(f"{rel}.staging-{uuid.uuid4().hex[:8]}")
            shutil.copytree(local_dir, dest)
            Path(dest, MANIFEST).write_bytes(raw)
            if key:
                Path(dest, SIGNATURE).write_text(sign(raw, key))
            target = self.path(rel)
            if os.path.lexists(target) and (replace or not self.is_complete(rel)):
                trash = f"{target}.trash-{uuid.uuid4().hex[:8]}"
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True) if os.path.isdir(trash) else os.unlink(trash)
            try:
                os.rename(dest, target)
            except OSError:
                # Someone else finished the same content-addressed directory first.
                shutil.rmtree(dest, ignore_errors=True)
                if not self.is_complete(rel):
                    raise
            return self.read_json(f"{rel}/{MANIFEST}")
        if self.exists(rel):  # incomplete first (no manifest), then emptied
            for name in (MANIFEST, SIGNATURE):
                if self.exists(f"{rel}/{name}"):
                    self.fs.delete_file(self.path(f"{rel}/{name}"))
            self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)
        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(os.path.abspath(local_dir), self.path(rel),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.write_bytes(f"{rel}/{MANIFEST}", raw)
        if key:
            self.write_bytes(f"{rel}/{SIGNATURE}", sign(raw, key).encode())
        return manifest

    def manifest_sha256(self, rel: str) -> str:
        """sha256 of the manifest file of the complete directory ``rel`` (binds a run to it)."""
        return hashlib.sha256(self.read_bytes(f"{rel}/{MANIFEST}")).hexdigest()

    def get_dir(self, rel: str, cache_root: str | os.PathLike | None = None,
                expected_manifest_sha256: str | None = None) -> tuple[str, dict[str, Any]]:
        """A verified local copy of the complete directory ``rel``.

        Local storage is verified in place (no copy); remote storage is
        downloaded once into ``cache_root/<manifest digest>`` and the cached copy
        is verified again on every call.

        Args:
            rel: the directory, relative to the storage root.
            cache_root: where remote directories are cached (default: ``default_cache_dir()``).
            expected_manifest_sha256: the manifest digest the caller was given
                (e.g. by the training step of this run); a manifest with another
                digest was rewritten since and is refused.

        Returns:
            ``(local_path, manifest)``.

        Raises:
            CorruptArtifact: the manifest is missing, is not the expected one,
                or a file does not match it.
        """
        if not self.is_complete(rel):
            raise CorruptArtifact(f"{self.name_of(rel)}/{MANIFEST}: missing; the artifact was never fully written "
                                  "(or was damaged since)")
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
        if os.path.lexists(local):
            try:
                verify_dir(local, manifest)
                return str(local), manifest
            except CorruptArtifact:
                # A damaged cached copy (of any kind: changed files, a file in
                # place of the directory) is this node's problem, not the
                # artifact's: drop it and fetch again from storage.
                _discard(local)
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
        """Fetch every manifest file into ``local`` atomically, verified on the way."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
        try:
            for relfile in manifest["files"]:
                dest = tmp / relfile
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = self.fs.open_input_stream(self.path(f"{rel}/{relfile}"))
                except FileNotFoundError:
                    raise CorruptArtifact(f"{self.name_of(f'{rel}/{relfile}')}: file listed in the manifest "
                                          "is missing") from None
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            verify_dir(tmp, manifest, shown_as=self.uri_of(rel))
            try:
                os.rename(tmp, local)
            except OSError:  # another worker on this node won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _discard(path: Path) -> None:
    """Remove a cache entry, whatever it became (directory, file, link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

def default_cache_dir() -> str:
    """Where workers cache downloaded artifacts (``HARNESS_CACHE`` overrides)."""
    return os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tf-repro-harness", "artifacts")
