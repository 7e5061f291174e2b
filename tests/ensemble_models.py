"""The models of the ensemble tests, built with the onnx helper: "prep" and an
ensemble's directory. Free of the mesh's generated code, so that tests/compat
(tritonclient's protos in the same process) can use them too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from meshserve.devkit.examples import IR_VERSION, OPSET

CHAIN = {
    "steps": [
        {"model": "prep", "input_map": {"raw": "RAW"}, "output_map": {"features": "FEATURES"}},
        {"model": "mlp", "input_map": {"features": "FEATURES"}, "output_map": {"probabilities": "PROBS"}},
    ],
    "outputs": ["PROBS"],
}


def write_prep(repository: Path) -> None:
    """ "prep": raw FP32 [batch, 64] -> features = raw * 0.5, batches of up to 64."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["raw", "half"], ["features"])],
        "prep",
        inputs=[helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 64])],
        outputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        initializer=[numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    (repository / "prep" / "1").mkdir(parents=True)
    onnx.save(model, repository / "prep" / "1" / "model.onnx")
    (repository / "prep" / "config.yaml").write_text("max_batch_size: 64\n")


def write_ensemble(repository: Path, name: str, section: dict[str, object]) -> None:
    """An ensemble's directory: config.yaml only (version 1, no version directory)."""
    (repository / name).mkdir()
    (repository / name / "config.yaml").write_text(yaml.safe_dump({"platform": "ensemble", "ensemble": section}))
