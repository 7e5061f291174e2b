"""The managed directory: models loaded with a config override, or with files sent in
the request (``RepositoryModelLoad``'s ``config`` and ``file:`` parameters).

Such a model is written whole under ``<managed>/<name>``: first into a staging
directory, validated there as any model directory (meshserve/models/repository.py,
and the override's tensors against the graph), then moved into place, so a refused
load leaves what was served untouched. A copy of a repository directory is made of
hard links, and its config is replaced, never written through, so the repository's
own files are never changed. Blocking: call it in a thread.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import yaml

from meshserve.errors import InvalidArgument, NotFound, ResourceExhausted
from meshserve.models.repository import CONFIG_FILENAME, scan_model_dir
from router.model_config import TritonConfig, check_tensors, parse_triton_config

_FILE = re.compile(r"([1-9][0-9]*)/([A-Za-z0-9_][A-Za-z0-9._-]*)")


class ManagedRepository:
    """Writes the models the repository API is given; owns ``managed``'s contents."""

    def __init__(self, repository: Path, managed: Path, *, max_upload_bytes: int) -> None:
        self.repository = repository
        self.managed = managed
        self._max_upload_bytes = max_upload_bytes

    def materialize(self, name: str, config: str | None, files: dict[str, bytes]) -> Path:
        """The directory to load ``name`` from: the repository's, or a managed copy with
        the override and files, validated before it replaces the managed one.

        Raises NotFound for a model the repository lacks, InvalidArgument for a bad
        config or file, ResourceExhausted for files over ``max_upload_bytes``."""
        source = self.repository / name
        if not files and not source.is_dir():
            raise NotFound(f"unknown model '{name}': no directory '{name}' in the model repository")
        if not files and config is None:
            return source
        override = parse_triton_config(config, name) if config is not None else None
        size_bytes = sum(len(data) for data in files.values())
        if size_bytes > self._max_upload_bytes:
            raise ResourceExhausted(
                f"model files: {size_bytes} bytes, over the router's --max-upload-bytes {self._max_upload_bytes}"
            )
        staging_root = self.managed / f".staging-{uuid.uuid4().hex}"
        staging = staging_root / name
        try:
            staging.mkdir(parents=True)
            if files:
                _write_files(staging, files)
            else:
                shutil.copytree(source, staging, dirs_exist_ok=True, copy_function=_link_or_copy, symlinks=False)
            if override is not None:
                _write_config(staging, override)
            scan = scan_model_dir(staging)
            problems = scan.problems or list(scan.unservable.values())
            if problems or not scan.models:
                raise InvalidArgument(f"model '{name}': " + ("; ".join(problems) or "no version to serve"))
            if override is not None:
                check_tensors(override, scan.models)
            final = self.managed / name
            if final.exists():
                retired = staging_root / f"{name}.retired"
                final.rename(retired)  # workers hold what they loaded in memory
            staging.rename(final)
            return final
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)


def _write_files(model_dir: Path, files: Mapping[str, bytes]) -> None:
    """``file:<version>/<name>`` parameters into ``model_dir``; names checked, no paths."""
    for path, data in files.items():
        match = _FILE.fullmatch(path)
        if match is None:
            raise InvalidArgument(
                f"parameter 'file:{path}': expected file:<version>/<file name> (a positive version, a plain file name)"
            )
        version_dir = model_dir / match[1]
        version_dir.mkdir(exist_ok=True)
        (version_dir / match[2]).write_bytes(data)


def _write_config(model_dir: Path, override: TritonConfig) -> None:
    """The override as config.yaml, ``version_policy.latest`` made a version list."""
    config = dict(override.yaml)
    path = model_dir / CONFIG_FILENAME
    path.unlink(missing_ok=True)  # maybe a hard link to the repository's own: never written through
    if override.latest_versions is not None:
        versions = sorted(int(child.name) for child in model_dir.iterdir() if child.name.isdigit())
        config["versions"] = versions[-override.latest_versions :]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
