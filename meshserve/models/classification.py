"""Triton's classification extension: a requested output's top k classes, per batch
row, instead of its tensor.

A client asks with the output parameter ``classification`` (tritonclient's
``InferRequestedOutput(name, class_count=k)``; ``class_count`` is accepted too), an
int64 k > 0. The answer is a BYTES tensor of shape ``[batch, min(k, classes)]`` (no
batch dim for a model that does not batch), each element ``"value:index"`` or
``"value:index:label"``, by value, highest first. As Triton's: the value is C++
``std::to_string`` of the element (``%f``: 6 decimals for a float, the integer for
an integer type), the index is the class's position among the row's elements, and
the label is line ``index`` of the output's ``label_filename`` (config.yaml; absent or
empty: no label). Triton flattens the non-batch dims; the mesh requires at most one
of them to exceed 1, so that an index names a class rather than a position in a grid.

The gateway validates the request (:func:`requested_classes`) and passes k to the
worker (``QueuedRequest.class_counts``), which has the model directory and the
outputs, and computes the answer (:func:`top_classes`) before its reply is laid out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.errors import InvalidArgument

PARAMETERS = ("classification", "class_count")
"""The output parameters that ask for Triton's classification extension."""

CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
"""Output datatypes that can be ranked: Triton's, plus FP16 (its value formatted as a float)."""


def class_count(output_name: str, parameters: Mapping[str, Any]) -> int:
    """The k an output's request parameters ask for, 0 when they ask for none.

    ``parameters`` is a requested output's ``InferParameter`` map. Refuses a k that
    is not an int64 greater than 0, and two names that ask for different k."""
    asked = 0
    for key in PARAMETERS:
        if key not in parameters:
            continue
        param = parameters[key]
        kind = param.WhichOneof("parameter_choice")
        if kind != "int64_param":
            raise InvalidArgument(
                f"requested output '{output_name}': parameter '{key}' (class_count, Triton's classification "
                f"extension) must be an int64, got {kind or 'no value'}"
            )
        k = int(param.int64_param)
        if k <= 0:
            raise InvalidArgument(
                f"requested output '{output_name}': parameter '{key}' (class_count) must be greater than 0, got {k}"
            )
        if asked and k != asked:
            raise InvalidArgument(
                f"requested output '{output_name}': 'classification' and 'class_count' ask for different counts"
            )
        asked = k
    return asked


def check_classifiable(output_name: str, datatype: str, shape: Sequence[int], batching: bool) -> None:
    """Refuse classification of an output that has no classes to rank: text, a type
    Triton does not rank, or more than one non-batch dim over 1 (-1: unknown, may be)."""
    where = f"requested output '{output_name}': classification (class_count)"
    if datatype == "BYTES":
        raise InvalidArgument(f"{where} of a BYTES output is not possible: its elements are not scores")
    if datatype not in CLASSIFIABLE:
        raise InvalidArgument(f"{where} is not available for datatype {datatype}")
    dims = list(shape[1:] if batching else shape)
    if sum(1 for d in dims if d > 1) > 1:
        raise InvalidArgument(
            f"{where} needs at most one non-batch dim greater than 1 (the classes), got shape {list(shape)}"
        )


def _formatter(dtype: np.dtype[Any]) -> Any:
    if dtype.kind == "f":
        return lambda v: f"{float(v):f}"  # C's %f, as std::to_string
    return lambda v: str(int(v))


def top_classes(
    output_name: str, array: np.ndarray[Any, Any], k: int, batching: bool, labels: Sequence[str] = ()
) -> np.ndarray[Any, Any]:
    """``array``'s top ``k`` per batch row as an object array of ``bytes``
    ``"value:index[:label]"``, shape ``[rows, min(k, classes)]`` (``[min(k, classes)]``
    when the model does not batch). An argpartition, then a sort of the k kept
    only; ties are ranked by index (Triton leaves their order unspecified)."""
    shape = array.shape
    check_classifiable(output_name, _kserve(array.dtype), shape, batching)
    rows = array.reshape(shape[0] if batching and shape else 1, -1)
    classes = rows.shape[1]
    kept = min(k, classes)
    if kept < classes:  # the k highest, unordered, in place of a sort of every class
        index = np.argpartition(rows, classes - kept, axis=1)[:, classes - kept :]
    else:
        index = np.broadcast_to(np.arange(classes), rows.shape)
    picked = -np.take_along_axis(rows, index, axis=1).astype(np.float64)  # ascending: highest first, any type
    order = np.lexsort((index, picked), axis=-1)
    index = np.take_along_axis(index, order, axis=1)
    values = np.take_along_axis(rows, index, axis=1)
    fmt = _formatter(rows.dtype)
    out = np.empty(index.shape, dtype=object)
    for r in range(index.shape[0]):
        for c in range(kept):
            i = int(index[r, c])
            text = f"{fmt(values[r, c])}:{i}"
            if i < len(labels) and labels[i]:
                text += f":{labels[i]}"
            out[r, c] = text.encode()
    return out if batching else out.reshape(kept)


_KSERVE_BY_KIND = {
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}


def _kserve(dtype: np.dtype[Any]) -> str:
    return _KSERVE_BY_KIND.get((dtype.kind, dtype.itemsize), "BYTES" if dtype.kind in "OSU" else str(dtype))


def read_labels(path: Path) -> tuple[str, ...]:
    """The labels in ``path``, one a line (Triton's ``label_filename``), read once per
    version of the file (its size and mtime)."""
    stat = os.stat(path)
    return _read_labels(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _read_labels(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    del mtime_ns, size  # the cache's key only
    with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip("\r\n") for line in f)
