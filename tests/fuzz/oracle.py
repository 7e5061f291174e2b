"""The fuzz oracle: which status a correct gateway gives each request.

Written from the example models' declared inputs (and a string model,
``lowercase``), independent of the codec: OK only for a valid request, else
RESOURCE_EXHAUSTED, NOT_FOUND or INVALID_ARGUMENT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb

Request = pb.ModelInferRequest
InferTensor = pb.ModelInferRequest.InferInputTensor

MAX_MESSAGE_BYTES = 1 << 20
"""The fuzzed gateway's receive limit: small, so that oversized messages are cheap."""

RPC_TIMEOUT_S = 5.0
"""Client deadline of every call; a call that reaches it (without a tiny timeout) hung."""

TINY_TIMEOUT_US = 2_000_000
"""A ``timeout`` parameter below this may legitimately end in DEADLINE_EXCEEDED."""


@dataclass(frozen=True, slots=True)
class Model:
    """What an example model declares (written out here, not read from the mesh)."""

    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, shape; -1 is free)
    outputs: tuple[str, ...]
    max_batch_size: int  # 0: dim 0 is not a batch dim


MODELS: dict[str, Model] = {
    "mlp": Model({"features": ("FP32", (-1, 64))}, ("logits", "probabilities"), 32),
    "cnn": Model({"image": ("FP32", (-1, 3, 32, 32))}, ("logits",), 8),
    "adder_fixed": Model({"a": ("INT64", (1, 4)), "b": ("INT64", (1, 4))}, ("sum", "diff"), 0),
    "scale_any": Model({"image": ("FP32", (-1, 1, -1, -1))}, ("scaled",), 32),
    "mobilenet": Model({"image": ("FP32", (-1, 3, 96, 96))}, ("logits",), 8),
    "lowercase": Model({"text": ("BYTES", (-1,))}, ("lower",), 32),  # tests/dtype_models.py
}

KSERVE_DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2}
ITEMSIZE |= {"UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
NUMPY_DTYPE = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}  # what the example models take

# Typed field per datatype, as the KServe v2 protocol defines it (FP16, BF16: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))


def contents_counts(tensor: InferTensor) -> dict[str, int]:
    return {field: len(getattr(tensor.contents, field)) for field in CONTENTS_FIELDS}


def timeout_us_of(request: Request) -> int:
    """The ``timeout`` parameter as the gateway reads it (int64 or uint64 microseconds)."""
    if "timeout" not in request.parameters:
        return 0
    param = request.parameters["timeout"]
    return int(param.int64_param or param.uint64_param)


def asks_tiny_timeout(request: Request) -> bool:
    return 0 < timeout_us_of(request) < TINY_TIMEOUT_US


def version_is_one(version: str) -> bool:
    """The only version of every example model is 1; "" means the latest.

    Accepts what Python's ``int`` (like Triton's ``stoll``) accepts: " 1", "+1", "01".
    """
    if not version:
        return True
    try:
        return int(version) == 1
    except ValueError:
        return False


def strings_of(raw: bytes) -> list[bytes] | None:
    """The elements of a raw BYTES tensor (4-byte little-endian length, then the
    bytes); None when a prefix is cut or an element runs past the end."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            return None
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            return None
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def is_utf8(item: bytes) -> bool:
    try:
        item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def strings_are_valid(items: list[bytes] | None, count: int) -> bool:
    """ONNX string tensors hold UTF-8 text: the right count, every element UTF-8."""
    return items is not None and len(items) == count and all(is_utf8(item) for item in items)


def raw_is_valid(datatype: str, raw: bytes, count: int) -> bool:
    if datatype == "BYTES":
        return strings_are_valid(strings_of(raw), count)
    return len(raw) == count * ITEMSIZE[datatype]


CLASS_COUNT_KEYS = ("classification", "class_count")


def class_counts(request: Request) -> dict[str, int]:
    """Triton's classification extension: output -> k, for each output whose
    parameters ask for it with a valid k (an int64 over 0)."""
    counts = {}
    for out in request.outputs:
        for key in CLASS_COUNT_KEYS:
            param = out.parameters.get(key)
            if param is not None and param.WhichOneof("parameter_choice") == "int64_param" and param.int64_param > 0:
                counts[out.name] = param.int64_param
    return counts


def asks_bad_class_count(request: Request) -> bool:
    """A classification the gateway refuses: a k that is not an int64 over 0 (unset
    included), two keys that disagree, or an output with no classes to rank (text;
    scale_any's image with more than one of its non-batch dims over 1)."""
    for out in request.outputs:
        asked = [out.parameters[key] for key in CLASS_COUNT_KEYS if key in out.parameters]
        if not asked:
            continue
        if any(p.WhichOneof("parameter_choice") != "int64_param" or p.int64_param <= 0 for p in asked):
            return True
        if len({p.int64_param for p in asked}) > 1:
            return True
        if request.model_name == "lowercase":
            return True
        if request.model_name == "scale_any" and sum(1 for d in request.inputs[0].shape[1:] if d > 1) > 1:
            return True
    return False


def inputs_are_valid(request: Request, model: Model) -> bool:
    """The KServe v2 rules for the inputs of one of the example models."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        return False
    if sorted(t.name for t in request.inputs) != sorted(model.inputs):
        return False  # unknown, duplicate or missing inputs
    for index, tensor in enumerate(request.inputs):
        datatype, spec = model.inputs[tensor.name]
        shape = list(tensor.shape)
        if tensor.datatype != datatype or len(shape) != len(spec):
            return False
        if any(got < 0 or (want >= 0 and got != want) for got, want in zip(shape, spec, strict=True)):
            return False
        if model.max_batch_size and not 1 <= shape[0] <= model.max_batch_size:
            return False
        count, counts = prod(shape), contents_counts(tensor)
        if raw:
            if any(counts.values()) or not raw_is_valid(datatype, raw[index], count):
                return False
        else:
            field = CONTENTS_FIELD[datatype]
            if counts[field] != count or any(n for f, n in counts.items() if f != field):
                return False
            if datatype == "BYTES" and not strings_are_valid(list(tensor.contents.bytes_contents), count):
                return False
    return True


def expected_code(request: Request) -> grpc.StatusCode:
    """The status a correct gateway answers, in the order it must check."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    model = MODELS.get(request.model_name)
    if model is None or not version_is_one(request.model_version):
        return grpc.StatusCode.NOT_FOUND
    if not inputs_are_valid(request, model) or any(out.name not in model.outputs for out in request.outputs):
        return grpc.StatusCode.INVALID_ARGUMENT
    if asks_bad_class_count(request):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.OK
