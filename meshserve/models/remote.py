"""A model repository in an object store (s3://, gs://, memory://...), mirrored locally.

fsspec opens the URI (``s3fs`` or ``gcsfs`` must be installed for ``s3://`` and
``gs://``; ``memory://`` and ``file://`` need nothing). :func:`sync_repository`
makes a local directory hold what the store holds under the URI, so that the
repository code (``meshserve/models/repository.py``) and the workers read plain
files, checked as any model file:

- each file's content is kept once, named by its SHA-256, in ``<local>/.cache/blobs``
  (hidden, so scans skip it), and hard-linked into place; two versions with the same
  bytes share one blob;
- a file whose store checksum (fsspec's ``checksum``: ETag, size and modification
  time where the store has them) has not changed since the last sync is not fetched
  again (``<local>/.cache/index.json`` remembers them);
- files and directories no longer in the store are removed; every file is replaced
  atomically (a new name, then ``os.replace``), so a reader never sees half a file;
- names with a hidden part (``.x``) or that climb out (``..``) are skipped, logged.

Files are streamed, never read whole into memory. Blocking: call it in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did: files fetched from the store, kept as they were, removed."""

    fetched: int
    kept: int
    removed: int


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an fsspec store (``scheme://...``) rather than a local path."""
    return "://" in uri


def sync_repository(uri: str, local: Path, *, prefix: str = "") -> SyncResult:
    """Mirror the store's files under ``uri`` (only those under ``prefix``, a model
    name, when given) into ``local``. Raises OSError (and fsspec's errors) when the
    store cannot be read; what was mirrored before stays."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    base = f"{root}/{prefix}" if prefix else root
    found: dict[str, Any] = fs.find(base, detail=True) if fs.exists(base) else {}
    cache = local / CACHE_DIR
    (cache / "blobs").mkdir(parents=True, exist_ok=True)
    index = _read_index(cache / "index.json")
    wanted: set[str] = set()
    fetched = kept = 0
    for path, info in sorted(found.items()):
        if info.get("type") != "file":
            continue
        relative = _relative(path, root)
        if relative is None:
            log.warning("object store: %s skipped: a hidden or climbing name", path)
            continue
        wanted.add(relative)
        checksum = str(fs.checksum(path))
        entry = index.get(relative)
        if entry is not None and entry["checksum"] == checksum and (cache / "blobs" / entry["sha256"]).is_file():
            digest = entry["sha256"]
            kept += 1
        else:
            digest = _fetch(fs, path, cache / "blobs")
            index[relative] = {"checksum": checksum, "sha256": digest}
            fetched += 1
        _place(cache / "blobs" / digest, local / relative)
    removed = _remove_others(local / prefix if prefix else local, local, wanted)
    in_scope = [key for key in index if not prefix or key.startswith(f"{prefix}/")]
    for key in in_scope:
        if key not in wanted:
            del index[key]
    _write_index(cache / "index.json", index)
    return SyncResult(fetched, kept, removed)


def _relative(path: str, root: str) -> str | None:
    """``path`` under ``root``, or None for a name with a hidden or ``..`` part."""
    relative = path.removeprefix(root).lstrip("/") if path.startswith(root) else path.lstrip("/")
    parts = relative.split("/")
    if not relative or any(not part or part.startswith(".") for part in parts):
        return None
    return relative


def _fetch(fs: Any, path: str, blobs: Path) -> str:
    """Stream ``path`` into a blob named by its SHA-256; that digest."""
    digest = hashlib.sha256()
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        name = digest.hexdigest()
        if (blobs / name).is_file():  # the same bytes already: keep that blob (and its links)
            os.unlink(temp)
        else:
            os.replace(temp, blobs / name)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return name


def _place(blob: Path, target: Path) -> None:
    """Make ``target`` the blob's content (a hard link, or a copy), atomically."""
    if target.exists() and os.path.samefile(blob, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{os.getpid()}.sync"
    temp.unlink(missing_ok=True)
    try:
        os.link(blob, temp)
    except OSError:
        shutil.copyfile(blob, temp)
    os.replace(temp, target)


def _remove_others(scope: Path, local: Path, wanted: set[str]) -> int:
    """Files under ``scope`` (hidden ones aside) not in ``wanted``; then empty directories."""
    if not scope.is_dir():
        return 0
    removed = 0
    for path in sorted(scope.rglob("*"), reverse=True):
        relative = path.relative_to(local)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and relative.as_posix() not in wanted:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def _read_index(path: Path) -> dict[str, dict[str, str]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no index yet, or a broken one: every file is fetched again
    return raw if isinstance(raw, dict) else {}


def _write_index(path: Path, index: dict[str, dict[str, str]]) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
    os.replace(temp, path)
