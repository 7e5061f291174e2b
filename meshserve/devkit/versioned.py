"""A model with several versions that answer differently, for rollout tests and the
rollout bench: version N computes ``y = x + N``, so every answer says which
version computed it, whatever ``model_version`` claims."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshserve.devkit.examples import IR_VERSION, OPSET, PRODUCER

OFFSET_WIDTH = 4
"""Items per row: inputs and outputs are FP32 [batch, 4]."""


def build_offset(offset: float) -> onnx.ModelProto:
    """``x`` FP32 [batch, 4] -> ``y`` = x + ``offset``; batchable."""
    constant = numpy_helper.from_array(np.full((OFFSET_WIDTH,), offset, dtype=np.float32), "offset")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["y"])],
        "offset",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", OFFSET_WIDTH])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OFFSET_WIDTH])],
        initializer=[constant],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name=PRODUCER
    )
    onnx.checker.check_model(model)
    return model


def write_version(root: Path, name: str, version: int) -> Path:
    """Write ``<root>/<name>/<version>/model.onnx``, computing x + version; its path."""
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_offset(float(version)).SerializeToString())
    return path


def write_versioned_model(root: Path, name: str, versions: Iterable[int], config: str = "") -> Path:
    """Every version of ``name`` under ``root`` (and its config.yaml when given); the model's directory."""
    for version in versions:
        write_version(root, name, version)
    if config:
        (root / name / "config.yaml").write_text(config, encoding="utf-8")
    return root / name
