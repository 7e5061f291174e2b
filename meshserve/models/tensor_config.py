"""Per-tensor settings of config.yaml that clients read in ModelConfig.

::

    inputs:
      images: {format: NCHW}           # NCHW | NHWC (Triton's FORMAT_*); default: none
    outputs:
      probabilities: {label_filename: labels.txt}   # a file in the model directory

``format`` tells an image client the layout of an input of three dims (batch dim
excluded); ``label_filename`` names the classes of an output, one per line, as
Triton's ``label_filename``. Both only describe the model: the mesh does not
transpose tensors nor classify outputs. Unknown keys are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_FORMATS = ("NCHW", "NHWC")
IMAGE_DIMS = 3
"""Triton's rule: an input with a format has three dims, the batch dim excluded."""

_INPUT_KEYS = frozenset({"format"})
_OUTPUT_KEYS = frozenset({"label_filename"})
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class TensorConfig:
    """``formats``: (input, "NCHW" | "NHWC") pairs; ``labels``: (output, file name)
    pairs, the file in the model directory. Both sorted by tensor name."""

    formats: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def format_of(self, name: str) -> str:
        """The input's layout, or "" when config.yaml names none."""
        return dict(self.formats).get(name, "")

    def labels_of(self, name: str) -> str:
        """The output's labels file name, or "" when config.yaml names none."""
        return dict(self.labels).get(name, "")


NO_TENSOR_CONFIG = TensorConfig()


def parse_tensor_config(inputs: object, outputs: object, model_dir: Path) -> TensorConfig:
    """The ``inputs`` and ``outputs`` sections, checked on their own (the graph's
    names and dims are checked by :func:`check_tensor_config`). Raises ValueError
    naming the key at fault."""
    formats = [
        (name, _format(name, entry)) for name, entry in _entries(inputs, "inputs", _INPUT_KEYS) if "format" in entry
    ]
    labels = [
        (name, _labels_file(name, entry, model_dir))
        for name, entry in _entries(outputs, "outputs", _OUTPUT_KEYS)
        if "label_filename" in entry
    ]
    return TensorConfig(tuple(sorted(formats)), tuple(sorted(labels)))


def check_tensor_config(config: TensorConfig, inputs: dict[str, int], outputs: frozenset[str], batch_dims: int) -> None:
    """Every name is a graph tensor; an input with a format has three dims beside the
    batch dim. ``inputs`` maps each graph input to its rank. Raises ValueError."""
    for name, layout in config.formats:
        if name not in inputs:
            raise ValueError(f"'inputs.{name}': the graph has no input {name!r} (inputs: {sorted(inputs)})")
        if inputs[name] - batch_dims != IMAGE_DIMS:
            raise ValueError(
                f"'inputs.{name}.format' {layout} needs {IMAGE_DIMS} dims beside the batch dim, "
                f"the graph's input has {inputs[name] - batch_dims}"
            )
    for name, _ in config.labels:
        if name not in outputs:
            raise ValueError(f"'outputs.{name}': the graph has no output {name!r} (outputs: {sorted(outputs)})")


def _entries(value: object, section: str, allowed: frozenset[str]) -> list[tuple[str, dict[str, object]]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ValueError(f"'{section}' must be a mapping of tensor name to settings")
    entries = []
    for name, entry in value.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ValueError(f"'{section}.{name}' must be a mapping")
        unknown = sorted(str(key) for key in entry if key not in allowed)
        if unknown:
            raise ValueError(f"unknown key '{section}.{name}.{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
        entries.append((name, entry))
    return entries


def _format(name: str, entry: dict[str, object]) -> str:
    layout = entry["format"]
    if layout not in IMAGE_FORMATS:
        raise ValueError(f"'inputs.{name}.format' must be one of {', '.join(IMAGE_FORMATS)}, got {layout!r}")
    return str(layout)


def _labels_file(name: str, entry: dict[str, object], model_dir: Path) -> str:
    """A plain file name (no directory part, nothing hidden) of a file in the model directory."""
    filename = entry["label_filename"]
    where = f"'outputs.{name}.label_filename'"
    if not isinstance(filename, str) or not _PLAIN_FILENAME.fullmatch(filename):
        raise ValueError(f"{where} must be a plain file name in the model directory, got {filename!r}")
    if not (model_dir / filename).is_file():
        raise ValueError(f"{where}: no file {filename!r} in {model_dir}")
    return filename
