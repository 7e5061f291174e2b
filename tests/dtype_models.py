"""Test models for datatypes: one Identity model per KServe datatype, a string model
that lower-cases (ONNX StringNormalizer), and a BF16 model the repository refuses.

Built with the ``onnx`` helper, deterministic, batchable ([batch, 3] or [batch]).
Tests compare what the mesh answers with what in-process ONNX Runtime answers on
the same file.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from meshserve.devkit.examples import IR_VERSION, OPSET

# Every datatype the gateway accepts that ONNX Runtime's Python API can feed.
IDENTITY_DATATYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

LOWERCASE = "lowercase"
"""A string model: ``text`` BYTES [batch] -> ``lower`` BYTES [batch], lower-cased."""


def identity_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_identity(elem_type: int) -> bytes:
    """``x`` [batch, 3] -> Identity -> ``y``, of one element type."""
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem_type, ["batch", 3])],
        [helper.make_tensor_value_info("y", elem_type, ["batch", 3])],
    )


def build_lowercase() -> bytes:
    """``text`` [batch] -> StringNormalizer(LOWER) -> ``lower``; C.UTF-8 locale, so
    non-ASCII letters are lower-cased too (the default en_US.UTF-8 is often absent)."""
    node = helper.make_node("StringNormalizer", ["text"], ["lower"], case_change_action="LOWER", locale="C.UTF-8")
    return _model(
        [node],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("lower", TensorProto.STRING, ["batch"])],
    )


def write_model(root: Path, name: str, model: bytes) -> Path:
    """Write ``model`` as ``<root>/<name>/1/model.onnx``; returns its path."""
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    return path


def write_dtype_repository(root: Path) -> Path:
    """Every identity model and the lowercase model under ``root``."""
    for datatype, elem_type in IDENTITY_DATATYPES.items():
        write_model(root, identity_name(datatype), build_identity(elem_type))
    write_model(root, LOWERCASE, build_lowercase())
    return root
