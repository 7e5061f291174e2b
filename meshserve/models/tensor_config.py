"""Per-tensor settings of config.yaml that clients read in ModelConfig.

The ``input`` and ``output`` lists, as Triton's config has them::

    input:
      - {name: images, format: NCHW}                   # NCHW | NHWC (Triton's FORMAT_*); default: none
    output:
      - {name: probabilities, label_filename: labels.txt}   # a file in the model directory

(A Python model declares ``datatype`` and ``dims`` in the same entries:
meshserve/models/python_backend.py; an ONNX model's come from its graph.)

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

DECLARED_KEYS = frozenset({"name", "datatype", "dims"})
"""What an entry declares of the tensor itself (read by the Python backend)."""
_INPUT_KEYS = DECLARED_KEYS | {"format"}
_OUTPUT_KEYS = DECLARED_KEYS | {"label_filename"}
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
    """The ``input`` and ``output`` lists' client settings, checked on their own (the
    graph's names and dims are checked by :func:`check_tensor_config`). Raises
    ValueError naming the key at fault."""
    formats = [
        (name, _format(where, entry))
        for where, name, entry in _entries(inputs, "input", _INPUT_KEYS)
        if "format" in entry
    ]
    labels = [
        (name, _labels_file(where, entry, model_dir))
        for where, name, entry in _entries(outputs, "output", _OUTPUT_KEYS)
        if "label_filename" in entry
    ]
    return TensorConfig(tuple(sorted(formats)), tuple(sorted(labels)))


def check_tensor_config(config: TensorConfig, inputs: dict[str, int], outputs: frozenset[str], batch_dims: int) -> None:
    """Every name is a graph tensor; an input with a format has three dims beside the
    batch dim. ``inputs`` maps each graph input to its rank. Raises ValueError."""
    for name, layout in config.formats:
        if name not in inputs:
            raise ValueError(f"'input' {name!r}: the graph has no input {name!r} (inputs: {sorted(inputs)})")
        if inputs[name] - batch_dims != IMAGE_DIMS:
            raise ValueError(
                f"'input' {name!r}: format {layout} needs {IMAGE_DIMS} dims beside the batch dim, "
                f"the graph's input has {inputs[name] - batch_dims}"
            )
    for name, _ in config.labels:
        if name not in outputs:
            raise ValueError(f"'output' {name!r}: the graph has no output {name!r} (outputs: {sorted(outputs)})")


def _entries(value: object, section: str, allowed: frozenset[str]) -> list[tuple[str, str, dict[str, object]]]:
    """(where, name, entry) of each entry of the ``section`` list; ``where`` names it in errors."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"'{section}' must be a list of entries with a name, e.g. [{{name: image, format: NCHW}}]")
    entries = []
    for index, entry in enumerate(value):
        where = f"{section}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"'{where}' must be a mapping with a 'name'")
        unknown = sorted(str(key) for key in entry if key not in allowed)
        if unknown:
            raise ValueError(f"unknown key '{where}.{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
        entries.append((where, str(entry["name"]), entry))
    return entries


def _format(where: str, entry: dict[str, object]) -> str:
    layout = entry["format"]
    if layout not in IMAGE_FORMATS:
        raise ValueError(f"'{where}.format' must be one of {', '.join(IMAGE_FORMATS)}, got {layout!r}")
    return str(layout)


def _labels_file(where: str, entry: dict[str, object], model_dir: Path) -> str:
    """A plain file name (no directory part, nothing hidden) of a file in the model directory."""
    filename = entry["label_filename"]
    where = f"'{where}.label_filename'"
    if not isinstance(filename, str) or not _PLAIN_FILENAME.fullmatch(filename):
        raise ValueError(f"{where} must be a plain file name in the model directory, got {filename!r}")
    if not (model_dir / filename).is_file():
        raise ValueError(f"{where}: no file {filename!r} in {model_dir}")
    return filename
