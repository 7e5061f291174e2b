"""The codec alone over every KServe datatype: it accepts consistently or raises
InvalidArgument, nothing else."""

from __future__ import annotations

import struct
from math import prod

import numpy as np
from hypothesis import example, given, settings

from meshserve.errors import InvalidArgument
from meshserve.models.repository import ModelInfo
from meshserve.wire.codec import pack_inputs
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from tests.fuzz.oracle import CONTENTS_FIELD, ITEMSIZE, Request
from tests.fuzz.strategies import codec_cases, synthetic_model


def check_packed(model: ModelInfo, request: Request) -> None:
    """``pack_inputs`` accepts (consistently) or raises InvalidArgument; nothing else."""
    try:
        packed = pack_inputs(request, model)
    except InvalidArgument:
        return
    (tensor,) = packed.tensors
    (data,) = packed.data
    assert tensor.data_bytes == len(data)
    count = prod(tensor.shape)
    if tensor.datatype == "BYTES":
        offset, found = 0, 0
        while offset < len(data):
            offset += 4 + struct.unpack_from("<I", data, offset)[0]
            found += 1
        assert (offset, found) == (len(data), count)
        return
    assert len(data) == count * ITEMSIZE[tensor.datatype]
    field = CONTENTS_FIELD.get(tensor.datatype)
    values = getattr(request.inputs[0].contents, field) if field else []
    if not request.raw_input_contents and tensor.datatype not in ("BOOL", "FP32", "FP64"):
        decoded = np.frombuffer(data, dtype=NUMPY_BY_KSERVE[tensor.datatype])
        assert decoded.tolist() == list(values), "typed integer contents changed on the way to the queue"


def int8_out_of_range() -> tuple[ModelInfo, Request]:
    """Regression: numpy refused to cast 128 to INT8 (OverflowError, answered INTERNAL)."""
    request = Request(model_name="synthetic")
    request.inputs.add(name="x", datatype="INT8", shape=[2, 2]).contents.int_contents.extend([0, 0, 0, 128])
    return synthetic_model("INT8", 0, (2, 2)), request


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(case=codec_cases())
@example(case=int8_out_of_range())
def test_codec_answers_invalid_argument_for_any_datatype(case: tuple[ModelInfo, Request]) -> None:
    check_packed(*case)
