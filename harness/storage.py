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
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {"files": files}
    if extra:
        manifest.update(extra)
    return manifest


def verify_dir(local_dir: str | os.PathLike, manifest: dict[str, Any], shown_as: str | None = None) -> None:
    """Check every file of ``manifest`` exists below ``local_dir`` with its digest.

    ``shown_as`` replaces ``local_dir`` in messages (e.g. the storage URI of a
    download being verified in a temporary directory).

    Raises:
        CorruptArtifact: naming the first file that is missing or differs.
    """
    root = Path(local_dir)
    for rel, meta in manifest["files"].items():
        p = root / rel
        name = f"{shown_as.split('?', 1)[0].rstrip('/')}/{rel}" if shown_as else str(p)
        if not p.is_file():
            raise CorruptArtifact(f"{name}: file listed in the manifest is missing")
        if p.stat().st_size != meta["size"]:
            raise CorruptArtifact(f"{name}: size {p.stat().st_size} != manifest size {meta['size']}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise CorruptArtifact(f"{name}: sha256 {digest[:12]}... != manifest {meta['sha256'][:12]}...")


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

    def put_dir(self, local_dir: str | os.PathLike, rel: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload ``local_dir`` to ``rel`` and write its manifest last.

        If ``rel`` is already complete it is left untouched (content-addressed
        writes are idempotent) and its manifest is returned.
        """
        if self.is_complete(rel):
            return self.read_json(f"{rel}/{MANIFEST}")
        manifest = build_manifest(local_dir, extra)
        if is_local(self.fs):
            # Stage next to the target, then rename: the directory appears whole.
            staging = f"{rel}.staging-{uuid.uuid4().hex[:8]}"
            dest = self.path(staging)
            shutil.copytree(local_dir, dest)
            with open(os.path.join(dest, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            try:
                os.rename(dest, self.path(rel))
            except OSError:
                # Someone else finished the same content-addressed directory first.
                shutil.rmtree(dest, ignore_errors=True)
                if not self.is_complete(rel):
                    raise
            return self.read_json(f"{rel}/{MANIFEST}")
        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(os.path.abspath(local_dir), self.path(rel),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.write_json(f"{rel}/{MANIFEST}", manifest)
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
            raise CorruptArtifact(f"{self.uri_of(rel)}: no {MANIFEST}; the artifact was never fully written")
        raw = self.read_bytes(f"{rel}/{MANIFEST}")
        digest = hashlib.sha256(raw).hexdigest()
        if expected_manifest_sha256 and digest != expected_manifest_sha256:
            raise CorruptArtifact(f"{self.uri_of(rel)}/{MANIFEST}: sha256 {digest[:12]}... is not the manifest the "
                                  f"training step of this run wrote or checked ({expected_manifest_sha256[:12]}...); "
                                  "the artifact was changed since")
        manifest = json.loads(raw)
        if is_local(self.fs):
            verify_dir(self.path(rel), manifest)
            return self.path(rel), manifest
        cache_root = Path(cache_root or default_cache_dir())
        local = cache_root / hashlib.sha256(raw).hexdigest()[:24]
        if local.exists():
            try:
                verify_dir(local, manifest)
                return str(local), manifest
            except CorruptArtifact:
                # A damaged cached copy is this node's problem, not the
                # artifact's: drop it and fetch again from storage.
                shutil.rmtree(local, ignore_errors=True)
        self._download(rel, manifest, local)  # verified before it is renamed into place
        return str(local), manifest

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
                    raise CorruptArtifact(f"{self.uri_of(f'{rel}/{relfile}')}: file listed in the manifest "
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

def default_cache_dir() -> str:
    """Where workers cache downloaded artifacts (``HARNESS_CACHE`` overrides)."""
    return os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tf-repro-harness", "artifacts")
