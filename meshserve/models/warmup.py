"""A model's ``warmup`` section: the inputs its warm-up runs, as Triton's ``model_warmup``.

In ``<model>/config.yaml``; optional, a list of samples::

    warmup:
      - name: letterbox           # optional, for the log
        batch_size: 1             # optional, default 1; each input's item is repeated to it
        inputs:
          images:
            dims: [3, 640, 640]   # without the batch dim when the model batches
            data: random          # random (the default) | zeros | file
          scale:
            dims: [1]
            data: file
            file: scale.bin       # raw row-major item, in <model>/warmup/

Every graph input needs an entry, with a dim for each non-batch dim of the graph
(a fixed dim must match the graph). A file holds one item, row-major, little-endian
(BYTES: 4-byte length-prefixed elements, as KServe's raw encoding); its size is
checked when the worker reads it. Without the section the worker guesses sizes for
symbolic dims (``model_workers/warmup.py``). Parsing raises ``ValueError`` with the
key at fault; the repository adds the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WARMUP_DIR = "warmup"
WARMUP_DATA = ("random", "zeros", "file")
_SAMPLE_KEYS = frozenset({"name", "batch_size", "inputs"})
_INPUT_KEYS = frozenset({"dims", "data", "file"})


@dataclass(frozen=True, slots=True)
class WarmupInput:
    """One input of a warm-up sample: one item's dims and where its values come from."""

    name: str
    dims: tuple[int, ...]  # the batch dim excluded when the model batches
    data: str  # one of WARMUP_DATA
    file: Path | None = None  # absolute, inside <model>/warmup/; set when data is "file"


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """One warm-up request: every input, run at ``batch_size`` (items repeated)."""

    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]


def parse_warmup(value: object, model_dir: Path) -> tuple[WarmupSample, ...]:
    """The ``warmup`` section as samples; () when absent. Raises ValueError naming the key."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ValueError("'warmup' must be a non-empty list of samples")
    return tuple(_sample(item, index, model_dir) for index, item in enumerate(value))


def _sample(value: object, index: int, model_dir: Path) -> WarmupSample:
    where = f"warmup[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"'{where}' must be a mapping")
    _reject_unknown(value, _SAMPLE_KEYS, where)
    name = value.get("name", f"sample {index}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"'{where}.name' must be a non-empty string")
    batch_size = value.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"'{where}.batch_size' must be a positive integer, got {batch_size!r}")
    inputs = value.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError(f"'{where}.inputs' must be a mapping of input name to dims and data")
    return WarmupSample(
        name=name,
        batch_size=batch_size,
        inputs=tuple(_input(str(key), item, f"{where}.inputs.{key}", model_dir) for key, item in inputs.items()),
    )


def _input(name: str, value: object, where: str, model_dir: Path) -> WarmupInput:
    if not isinstance(value, dict):
        raise ValueError(f"'{where}' must be a mapping with 'dims' and 'data'")
    _reject_unknown(value, _INPUT_KEYS, where)
    dims = value.get("dims")
    if not isinstance(dims, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in dims
    ):
        raise ValueError(f"'{where}.dims' must be a list of integers >= 0, got {dims!r}")
    data = value.get("data", "file" if "file" in value else "random")
    if data not in WARMUP_DATA:
        raise ValueError(f"'{where}.data' must be one of {', '.join(WARMUP_DATA)}, got {data!r}")
    file = value.get("file")
    if (data == "file") != (file is not None):
        raise ValueError(f"'{where}.file' is required with data: file, and only then")
    path = None
    if file is not None:
        if not isinstance(file, str) or not file or os.path.isabs(file) or "\x00" in file:
            raise ValueError(f"'{where}.file' must be a file name relative to {WARMUP_DIR}/, got {file!r}")
        directory = model_dir.absolute() / WARMUP_DIR
        path = directory / file
        real_dir = os.path.realpath(directory)
        if os.path.commonpath([real_dir, os.path.realpath(path)]) != real_dir:
            raise ValueError(f"'{where}.file' {file!r} points outside {directory}")
        if not path.is_file():
            raise ValueError(f"'{where}.file': no file {path}")
    return WarmupInput(name=name, dims=tuple(dims), data=data, file=path)


def _reject_unknown(mapping: dict[object, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise ValueError(f"unknown key '{where}.{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
