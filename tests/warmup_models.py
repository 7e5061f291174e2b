"""Models whose height and width are symbolic, built with the onnx helper, for warm-up tests.

``write_stride32_model``: a detector's neck in miniature. The image is pooled at
stride 32, upsampled back by 32 and concatenated with itself on the channels: the
concat needs H and W to be multiples of 32 (a size of 8, the old guess, fails).

``write_fixed_area_model``: a Reshape to [N, 3, 1000] needs H * W == 1000, which no
single guessed size gives (say H 25 and W 40 in the config).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = [helper.make_opsetid("", 17)]
IMAGE = ["N", 3, "H", "W"]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_stride32_model(repository: Path, name: str = "detector") -> Path:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 32.0, 32.0])
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["image"], ["coarse"], kernel_shape=[32, 32], strides=[32, 32]),
            helper.make_node("Resize", ["coarse", "", "scales"], ["up"], mode="nearest"),
            helper.make_node("Concat", ["image", "up"], ["features"], axis=1),
        ],
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, IMAGE)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 6, "H", "W"])],
        initializer=[scales],
    )
    return _save(graph, repository / name / "1" / "model.onnx")


def write_fixed_area_model(repository: Path, name: str = "area") -> Path:
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 3, 1000])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"])],
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, IMAGE)],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 3, 1000])],
        initializer=[shape],
    )
    return _save(graph, repository / name / "1" / "model.onnx")
