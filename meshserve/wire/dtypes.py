"""Datatype names: KServe v2 (wire), numpy (memory) and ONNX (graph).

The KServe v2 names are what clients send in ``datatype``; numpy dtypes are what
the codec produces; ONNX element types are what the model repository reads from
a graph. BYTES is variable-length and handled by the codec, not by numpy views.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

# KServe v2 datatype -> numpy dtype (little-endian, as the protocol fixes).
NUMPY_BY_KSERVE: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

KSERVE_BY_NUMPY: dict[np.dtype[np.generic], str] = {dt: name for name, dt in NUMPY_BY_KSERVE.items() if name != "BYTES"}

KSERVE_BY_ONNX: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
    TensorProto.BFLOAT16: "BF16",
}


def itemsize(datatype: str) -> int:
    """Bytes per element of a fixed-size KServe datatype (BF16 included); 0 for BYTES."""
    if datatype == "BYTES":
        return 0
    if datatype == "BF16":
        return 2
    return NUMPY_BY_KSERVE[datatype].itemsize
