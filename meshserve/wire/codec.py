"""The tensor codec: KServe v2 request tensors <-> queue envelopes <-> numpy.

Gateway side, :func:`pack_inputs` validates a ``ModelInferRequest`` against the
model's metadata and packs its tensors into envelope ``Tensor`` messages without
going through per-element Python objects (raw bytes are passed through; typed
``contents`` are converted once with numpy).

Worker side, :func:`to_array` views envelope bytes as numpy arrays (no copy) and
:func:`from_array` turns outputs back into envelope tensors. Tensor bytes travel
beside the envelope, never inside it (:func:`meshserve.wire.envelope.frame`), so
neither side copies them into a protobuf message: a request costs its gateway and
its worker about twice its payload, not ten times.

BYTES is ONNX's ``tensor(string)``, which holds UTF-8 text: the gateway refuses an
element that is not valid UTF-8 (naming the input and the element), the worker
hands ONNX Runtime an object array of ``str`` (it would ``str()`` a ``bytes``
object into ``"b'...'"``), and string outputs go back as their UTF-8 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from meshserve.errors import InvalidArgument
from meshserve.models.classification import check_classifiable, class_count
from meshserve.models.repository import ModelInfo, TensorInfo
from meshserve.wire.dtypes import NUMPY_BY_KSERVE, itemsize
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb

# Typed InferTensorContents field per datatype (FP16 and BF16 must come raw).
_CONTENTS_FIELD: dict[str, str] = {
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

# The length prefix of each BYTES element (tritonclient's serialize_byte_tensor).
_LENGTH = struct.Struct("<I")

# Typed in a wider proto field (int32 or uint32): range-checked before the cast.
_NARROW_INTS = frozenset({"INT8", "INT16", "UINT8", "UINT16"})


@dataclass(frozen=True, slots=True)
class PackedInputs:
    """Validated inputs of one request, ready for the queue."""

    tensors: list[mpb.Tensor]  # ``data`` empty, ``data_bytes`` set: the bytes are in ``data``
    batch_size: int  # 1 for a model that does not batch
    signature: str  # non-batch dims of every input: only equal signatures share a batch
    data: list[bytes | memoryview]  # each input's bytes, in the order of ``tensors``

    @property
    def data_bytes(self) -> int:
        return sum(len(d) for d in self.data)


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def pack_inputs(
    request: pb.ModelInferRequest, model: ModelInfo, raw_contents: Sequence[bytes | memoryview] | None = None
) -> PackedInputs:
    """Validate a request's inputs against ``model`` and pack them for the queue.

    ``raw_contents``: the raw contents read in place from the received bytes
    (:mod:`meshserve.wire.rawfields`), passed through without a copy; None: the
    message's own ``raw_input_contents``.

    Raises InvalidArgument naming the input at fault for: unknown, duplicate or
    missing inputs, wrong datatype, rank or fixed dim, byte length that does not
    match the shape, mixed raw/typed contents, or a batch over the model's max.
    """
    raw = request.raw_input_contents if raw_contents is None else raw_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "there must be one per input, in the same order"
        )
    expected = {spec.name: spec for spec in model.inputs}
    seen: dict[str, tuple[mpb.Tensor, bytes | memoryview]] = {}
    for index, tensor in enumerate(request.inputs):
        spec = expected.get(tensor.name)
        if spec is None:
            names = ", ".join(sorted(expected))
            raise InvalidArgument(f"input '{tensor.name}' is not an input of model '{model.name}' (inputs: {names})")
        if tensor.name in seen:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        shape = _check_shape(tensor, spec, model)
        data = _tensor_bytes(tensor, raw[index] if raw else None, shape)
        header = mpb.Tensor(name=tensor.name, datatype=tensor.datatype, shape=shape, data_bytes=len(data))
        seen[tensor.name] = (header, data)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise InvalidArgument(f"input '{missing[0]}' of model '{model.name}' is missing")
    tensors = [seen[spec.name][0] for spec in model.inputs]
    buffers = [seen[spec.name][1] for spec in model.inputs]
    return PackedInputs(tensors, batch_items(tensors, model), shape_signature(tensors, model), buffers)


def declared_bytes(request: pb.ModelInferRequest) -> int:
    """The bytes a request's input shapes call for (BYTES: 4 per element, their
    least), read off the shapes alone: no tensor is touched, so it is cheap enough
    to decide, before decoding, whether a request is large enough to decode off the
    event loop. A claim, not a measure: the codec checks the bytes against it."""
    total = 0
    for tensor in request.inputs:
        known = tensor.datatype in NUMPY_BY_KSERVE or tensor.datatype == "BF16"
        size = (itemsize(tensor.datatype) or 4) if known else 1  # BYTES: its prefixes; unknown: refused later
        total += prod(max(0, d) for d in tensor.shape) * size
    return total


def check_requested_outputs(request: pb.ModelInferRequest, model: ModelInfo) -> list[str]:
    """Names of the requested outputs (empty: all), each checked to exist, and each
    one's classification (Triton's extension, ``class_count``) checked to be one the
    worker can answer (:func:`requested_classes`)."""
    known = {spec.name for spec in model.outputs}
    names = []
    for out in request.outputs:
        if out.name not in known:
            raise InvalidArgument(f"requested output '{out.name}' is not an output of model '{model.name}'")
        names.append(out.name)
    requested_classes(request, model)
    return names


def requested_classes(request: pb.ModelInferRequest, model: ModelInfo) -> dict[str, int]:
    """Requested output -> k, for each output asked for as its top k classes
    (meshserve/models/classification.py); refuses a bad k, an output that has no
    classes to rank, and a decoupled model (its responses are the model's own)."""
    specs = {spec.name: spec for spec in model.outputs}
    counts: dict[str, int] = {}
    for out in request.outputs:
        k = class_count(out.name, out.parameters)
        if not k:
            continue
        if model.decoupled:
            raise InvalidArgument(
                f"requested output '{out.name}': classification (class_count) is not available for "
                f"decoupled model '{model.name}'"
            )
        spec = specs.get(out.name)
        if spec is not None:
            check_classifiable(out.name, spec.datatype, spec.shape, model.max_batch_size > 0)
        counts[out.name] = k
    return counts


def _check_shape(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorInfo, model: ModelInfo) -> list[int]:
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{tensor.name}': expected {spec.datatype}, got {tensor.datatype or 'no datatype'}"
        )
    shape = list(tensor.shape)
    if len(shape) != len(spec.shape):
        raise InvalidArgument(
            f"input '{tensor.name}': expected rank {len(spec.shape)} shape {shape_str(spec.shape)}, "
            f"got {shape_str(shape)}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got < 0:
            raise InvalidArgument(f"input '{tensor.name}': dim {axis} is negative ({got})")
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input '{tensor.name}': dim {axis} must be {want}, got {got} (shape {shape_str(spec.shape)})"
            )
    if model.max_batch_size > 0:
        if shape[0] < 1:
            raise InvalidArgument(f"input '{tensor.name}': batch size must be at least 1")
        if shape[0] > model.max_batch_size:
            raise InvalidArgument(
                f"input '{tensor.name}': batch size {shape[0]} exceeds max_batch_size "
                f"{model.max_batch_size} of model '{model.name}'"
            )
    return shape


def _tensor_bytes(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None, shape: list[int]
) -> bytes | memoryview:
    count = prod(shape)
    if isinstance(raw, memoryview) and tensor.datatype == "BYTES":
        raw = bytes(raw)  # walked element by element: text, not a bulk of numbers
    has_contents = tensor.HasField("contents")
    if raw is not None:
        if has_contents and _contents_len(tensor) > 0:
            raise InvalidArgument(f"input '{tensor.name}': set either contents or raw_input_contents, not both")
        _check_raw_length(tensor.name, tensor.datatype, raw, count, shape)
        return raw
    if tensor.datatype in ("FP16", "BF16"):
        raise InvalidArgument(f"input '{tensor.name}': {tensor.datatype} must be sent in raw_input_contents")
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"input '{tensor.name}': unsupported datatype {tensor.datatype}")
    values: Any = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{tensor.name}': shape {shape_str(shape)} has {count} elements, contents has {len(values)}"
        )
    if _contents_len(tensor) != count:
        raise InvalidArgument(f"input '{tensor.name}': {tensor.datatype} contents go in {field} only")
    return _typed_bytes(tensor.name, tensor.datatype, values)


def _typed_bytes(name: str, datatype: str, values: Any) -> bytes:
    """Typed contents as the queue's bytes, one numpy conversion (BYTES: length-prefixed)."""
    if datatype == "BYTES":
        _check_utf8(name, values)
        return b"".join(_LENGTH.pack(len(v)) + v for v in values)
    dtype = NUMPY_BY_KSERVE[datatype]
    if datatype not in _NARROW_INTS:
        return np.asarray(values, dtype=dtype).tobytes()
    wide = np.asarray(values, dtype=np.int64)
    limits = np.iinfo(dtype.str)
    if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
        raise InvalidArgument(f"input '{name}': a value is outside the {datatype} range [{limits.min}, {limits.max}]")
    return wide.astype(dtype).tobytes()


def _contents_len(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    return sum(len(getattr(tensor.contents, field)) for field in set(_CONTENTS_FIELD.values()))


def _check_raw_length(name: str, datatype: str, raw: bytes | memoryview, count: int, shape: list[int]) -> None:
    if datatype == "BYTES":
        if count > len(raw) // 4:  # each element needs its 4-byte prefix: refuse before walking
            raise InvalidArgument(
                f"input '{name}': shape {shape_str(shape)} has {count} elements, "
                f"raw BYTES holds at most {len(raw) // 4}"
            )
        found = _count_bytes_elements(name, bytes(raw))  # the same object: BYTES come as bytes
        if found != count:
            raise InvalidArgument(
                f"input '{name}': shape {shape_str(shape)} has {count} elements, raw BYTES has {found}"
            )
        return
    size = itemsize(datatype)
    if len(raw) != count * size:
        raise InvalidArgument(
            f"input '{name}': shape {shape_str(shape)} {datatype} needs {count * size} bytes, got {len(raw)}"
        )
    if datatype == "BOOL" and raw and np.frombuffer(raw, np.uint8).max() > 1:
        # one byte per element, 0 or 1: any other byte is a bool no reader agrees on
        # (ONNX Runtime's kernels and numpy's comparisons disagree on byte 2)
        index = int(np.argmax(np.frombuffer(raw, np.uint8) > 1))
        raise InvalidArgument(f"input '{name}': BOOL element {index} is byte {raw[index]}; raw BOOL bytes are 0 or 1")


def _count_bytes_elements(name: str, raw: bytes) -> int:
    """Walk the 4-byte little-endian length prefixes of a raw BYTES tensor, checking
    that each element is UTF-8."""
    unpack = _LENGTH.unpack_from
    offset, count, end = 0, 0, len(raw)
    view = memoryview(raw)
    # All-ASCII bytes (short elements of ASCII text) are valid UTF-8 wherever the cuts fall.
    elements: list[memoryview] | None = None if raw.isascii() else []
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgument(f"input '{name}': raw BYTES is truncated inside a length prefix")
        start = offset + 4
        offset = start + unpack(raw, offset)[0]
        if offset > end:
            raise InvalidArgument(f"input '{name}': raw BYTES element {count} runs past the end")
        if elements is not None:
            elements.append(view[start:offset])
        count += 1
    if elements:
        _check_utf8(name, elements)
    return count


def _check_utf8(name: str, elements: Sequence[bytes | memoryview]) -> None:
    """ONNX string tensors hold UTF-8 text: anything else is refused, never mangled.

    One decode of the elements joined by NUL: an element cut inside a multi-byte
    character cannot be completed by a NUL, so the join is valid exactly when every
    element is. Only a refusal walks the elements, to name the first bad one.
    """
    try:
        str(b"\x00".join(elements), "utf-8")
    except UnicodeDecodeError:
        for index, element in enumerate(elements):
            try:
                str(element, "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"input '{name}': BYTES element {index} is not valid UTF-8 (byte {exc.start}); ONNX string "
                    "tensors hold UTF-8 text, so binary data must be encoded (e.g. base64) or sent as UINT8"
                ) from None


def batch_items(tensors: Sequence[mpb.Tensor], model: ModelInfo) -> int:
    """The request's batch items: dim 0, which every input must agree on; 1 for a
    model that does not batch (its dim 0 is part of the shape, not a count)."""
    if model.max_batch_size == 0:
        return 1
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) > 1:
        detail = ", ".join(f"'{t.name}' has {t.shape[0]}" for t in tensors)
        raise InvalidArgument(f"inputs disagree on the batch size (dim 0): {detail}")
    return sizes.pop()


def shape_signature(tensors: Sequence[mpb.Tensor], model: ModelInfo) -> str:
    """Every input's non-batch dims: only requests with equal signatures share a
    batch (CLAIM compares them byte for byte). Empty for a model that does not batch."""
    if model.max_batch_size == 0:
        return ""
    return ";".join(",".join(str(d) for d in t.shape[1:]) for t in tensors)


# ---------------------------------------------------------------- worker side


def to_array(tensor: mpb.Tensor, data: bytes | memoryview | None = None) -> np.ndarray[Any, Any]:
    """A read-only numpy view of an envelope tensor's bytes: ``data`` (a framed
    envelope's, :func:`meshserve.wire.envelope.unframe`), else its ``data`` field.
    BYTES: an object array of str, what ONNX Runtime takes for ``tensor(string)``."""
    shape = tuple(tensor.shape)
    raw = tensor.data if data is None else data
    if tensor.datatype == "BYTES":
        return np.array(_split_strings(tensor.name, raw), dtype=np.object_).reshape(shape)
    return np.frombuffer(raw, dtype=NUMPY_BY_KSERVE[tensor.datatype]).reshape(shape)


def _split_strings(name: str, raw: bytes | memoryview) -> list[str]:
    """Decode length-prefixed UTF-8 elements (the gateway has checked them)."""
    items, offset = [], 0
    view = memoryview(raw)
    while offset < len(raw):
        start = offset + 4
        offset = start + _LENGTH.unpack_from(raw, offset)[0]
        try:
            items.append(str(view[start:offset], "utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}': BYTES element {len(items)} is not valid UTF-8") from None
    return items


def from_array(name: str, datatype: str, array: np.ndarray[Any, Any]) -> tuple[mpb.Tensor, Any]:
    """A numpy output as an envelope tensor (``data_bytes`` set) and its bytes: a
    view of ``array`` when it is contiguous and of its dtype (a slice of a batch's
    output along dim 0 is), else one copy.

    BYTES elements go out as their UTF-8 bytes (ONNX Runtime gives ``str``); a
    ``bytes`` element is passed through as it is.
    """
    data: Any
    if datatype == "BYTES":
        encoded = [v if isinstance(v, bytes) else str(v).encode() for v in array.flat]
        data = b"".join(_LENGTH.pack(len(v)) + v for v in encoded)
        nbytes = len(data)
    else:
        flat = np.ascontiguousarray(array, dtype=NUMPY_BY_KSERVE[datatype]).reshape(-1)
        data = flat.view(np.uint8).data  # a memoryview of the array's bytes
        nbytes = flat.nbytes
    return mpb.Tensor(name=name, datatype=datatype, shape=array.shape, data_bytes=nbytes), data


def to_plain_tensor(tensor: mpb.Tensor, data: Any) -> mpb.Tensor:
    """``tensor`` with its bytes inside (``data``), for a peer that reads plain envelopes."""
    return mpb.Tensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, data=bytes(data))


# Field numbers of ModelInferResponse (protos/grpc_service.proto), for the hand-built
# encoding of its raw_output_contents below.
_RAW_OUTPUT_CONTENTS_TAG = b"\x32"  # field 6, length-delimited
_STREAM_INFER_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, length-delimited


def encode_infer_response(
    reply: mpb.InferReply, data: Sequence[bytes | memoryview], model_name: str, request_id: str
) -> bytes:
    """The serialized KServe response for a successful reply (outputs in
    raw_output_contents), built with one copy of the outputs' bytes: ``data`` (a
    framed reply's views, in output order; empty: the bytes are in each output's
    ``data``) is appended as encoded fields after the small message, which protobuf
    reads as one message (repeated fields of concatenated encodings append)."""
    return b"".join(_response_parts(reply, data, model_name, request_id))


def encode_stream_response(
    reply: mpb.InferReply, data: Sequence[bytes | memoryview], model_name: str, request_id: str
) -> bytes:
    """A ModelStreamInferResponse carrying :func:`encode_infer_response`'s response as
    its ``infer_response``, with the same one copy of the outputs' bytes."""
    parts = _response_parts(reply, data, model_name, request_id)
    inner_bytes = sum(len(part) for part in parts)
    return b"".join([_STREAM_INFER_RESPONSE_TAG, _varint(inner_bytes), *parts])


def stream_response(*infer_response: bytes | memoryview) -> bytes:
    """A serialized ModelInferResponse (given in one or more parts, joined in order) as
    a ModelStreamInferResponse's ``infer_response``, in one copy."""
    nbytes = sum(len(part) for part in infer_response)
    return b"".join((_STREAM_INFER_RESPONSE_TAG, _varint(nbytes), *infer_response))


def response_head(model_name: str, request_id: str, parameters: Mapping[str, pb.InferParameter] | None = None) -> bytes:
    """The fields of a ModelInferResponse that the gateway chooses (the model's name as
    the client asked for it, the request's id, response parameters), serialized: the
    first bytes of a response laid out by :func:`response_parts`."""
    response = pb.ModelInferResponse(model_name=model_name, id=request_id)
    for name, parameter in (parameters or {}).items():
        response.parameters[name].CopyFrom(parameter)
    return response.SerializeToString()


def response_parts(
    reply: mpb.InferReply, data: Sequence[Any], head: bytes, *, streamed: bool = False
) -> list[bytes | memoryview]:
    """A successful reply's response, serialized, in parts to be written as they are
    (the outputs' buffers are not copied): ``head`` (:func:`response_head`), then the
    version and the outputs' names, datatypes and shapes, then each output's raw
    contents (``data``, in output order: a tag, a length, the buffer). Protobuf reads
    concatenated encodings as one message, so this is the ModelInferResponse that
    :func:`encode_infer_response` builds. ``streamed``: the same, as a
    ModelStreamInferResponse's ``infer_response``. Each output's raw contents end the
    response in order, which :func:`output_views` relies on."""
    small = pb.ModelInferResponse(model_version=str(reply.version))
    for tensor in reply.outputs:
        small.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    parts: list[bytes | memoryview] = [head, small.SerializeToString()]
    for raw in data:
        view = memoryview(raw).cast("B")
        parts.append(_RAW_OUTPUT_CONTENTS_TAG + _varint(len(view)))
        parts.append(view)
    if streamed:
        parts.insert(0, _STREAM_INFER_RESPONSE_TAG + _varint(sum(len(part) for part in parts)))
    return parts


def output_views(response: bytes | memoryview, outputs: Sequence[mpb.Tensor]) -> list[memoryview]:
    """The raw contents of ``outputs`` (their ``data_bytes`` set) as views of a response
    :func:`response_parts` laid out, found from its end. Raises ValueError when the
    response does not end with them."""
    view = memoryview(response)
    views: list[memoryview] = []
    end = len(view)
    for tensor in reversed(outputs):
        start = end - tensor.data_bytes
        field = _RAW_OUTPUT_CONTENTS_TAG + _varint(tensor.data_bytes)
        if start - len(field) < 0 or view[start - len(field) : start] != field:
            raise ValueError(f"laid-out response does not end with the raw contents of output '{tensor.name}'")
        views.append(view[start:end])
        end = start - len(field)
    views.reverse()
    return views


def _response_parts(
    reply: mpb.InferReply, data: Sequence[bytes | memoryview], model_name: str, request_id: str
) -> list[bytes | memoryview]:
    response = pb.ModelInferResponse(model_name=model_name, model_version=str(reply.version), id=request_id)
    for tensor in reply.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    parts: list[bytes | memoryview] = [response.SerializeToString()]
    for index, tensor in enumerate(reply.outputs):
        raw = data[index] if data else tensor.data
        parts.append(_RAW_OUTPUT_CONTENTS_TAG + _varint(len(raw)))
        parts.append(raw)
    return parts


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def to_infer_response(
    reply: mpb.InferReply, model_name: str, request_id: str, data: Sequence[bytes | memoryview] = ()
) -> pb.ModelInferResponse:
    """The KServe response as a message (tests and tools; the gateway sends
    :func:`encode_infer_response`'s bytes, which cost one copy less)."""
    return pb.ModelInferResponse.FromString(encode_infer_response(reply, data, model_name, request_id))
