"""config.yaml for Python models (``backend: python``): the tensors model.py takes and answers.

A Python model has no graph to read its tensors from, so config.yaml declares them,
as Triton's Python backend requires::

    backend: python
    max_batch_size: 16              # default 0: not batchable
    input:
      - {name: image, datatype: UINT8, dims: [32, 32, 3]}
    output:
      - {name: normalized, datatype: FP32, dims: [32, 32, 3]}

The same entries may carry the client settings every model may have (``format``,
``label_filename``: meshserve/models/tensor_config.py).

``dims`` leave out the batch dim when ``max_batch_size`` > 0 (Triton's rule); -1
is any size. BYTES tensors are refused: tensors cross to the model's process
through shared memory as fixed-size arrays (model_workers/python_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshserve.wire.dtypes import NUMPY_BY_KSERVE

ONNXRUNTIME = "onnxruntime"
PYTHON = "python"
BACKENDS = (ONNXRUNTIME, PYTHON)
PYTHON_FILENAME = "model.py"
PYTHON_PLATFORM = "python"
ALLOW_FLAG = "--allow-python-models"

_TENSOR_KEYS = frozenset({"name", "datatype", "dims"})
_CLIENT_KEYS = frozenset({"format", "label_filename"})  # checked by meshserve/models/tensor_config.py


@dataclass(frozen=True, slots=True)
class DeclaredTensor:
    """One tensor as config.yaml declares it: ``dims`` without the batch dim."""

    name: str
    datatype: str
    dims: tuple[int, ...]


def parse_backend(raw: dict[Any, Any]) -> tuple[str, tuple[tuple[DeclaredTensor, ...], tuple[DeclaredTensor, ...]]]:
    """``backend`` (onnxruntime, the default, or python) and the declared (inputs, outputs);
    ValueError names the key at fault."""
    backend = raw.get("backend", ONNXRUNTIME)
    if backend not in BACKENDS:
        raise ValueError(f"'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != PYTHON:
        for key in ("input", "output"):
            for index, item in enumerate(raw.get(key) or ()):
                declared_here = sorted(k for k in item if k in ("datatype", "dims")) if isinstance(item, dict) else []
                if declared_here:
                    raise ValueError(
                        f"'{key}[{index}].{declared_here[0]}': an ONNX model's tensors come from its graph; "
                        "datatype and dims are declared for 'backend: python' only"
                    )
        return str(backend), ((), ())
    declared = parse_tensors(raw.get("input"), "input"), parse_tensors(raw.get("output"), "output")
    if not (declared[0] and declared[1]):
        raise ValueError("'backend: python' needs 'input' and 'output' lists (name, datatype, dims)")
    return str(backend), declared


def parse_tensors(value: object, key: str) -> tuple[DeclaredTensor, ...]:
    """``input`` or ``output``: a list of {name, datatype, dims}; ValueError names the entry."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list of {{name, datatype, dims}}")
    tensors: list[DeclaredTensor] = []
    for index, item in enumerate(value):
        where = f"'{key}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}' must be a mapping with name, datatype and dims")
        unknown = sorted(str(k) for k in item if k not in _TENSOR_KEYS | _CLIENT_KEYS)
        if unknown:
            raise ValueError(
                f"{where}' has unknown keys {unknown} (allowed: name, datatype, dims, format, label_filename)"
            )
        name, datatype, dims = item.get("name"), item.get("datatype"), item.get("dims")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name' must be a non-empty string")
        if datatype == "BYTES":
            raise ValueError(f"{where}.datatype' BYTES is not served for Python models (fixed-size tensors only)")
        if datatype not in NUMPY_BY_KSERVE:
            raise ValueError(f"{where}.datatype' must be a KServe datatype such as FP32 or UINT8, got {datatype!r}")
        if not isinstance(dims, list) or not all(isinstance(d, int) and (d > 0 or d == -1) for d in dims):
            raise ValueError(f"{where}.dims' must be a list of positive integers or -1, got {dims!r}")
        if name in {t.name for t in tensors}:
            raise ValueError(f"{where}.name' '{name}' is declared twice")
        tensors.append(DeclaredTensor(name, str(datatype), tuple(dims)))
    return tuple(tensors)
