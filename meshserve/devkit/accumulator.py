"""An accumulator, the smallest stateful model: each step adds its input to the
sequence's running sum (docs/models.md#sequences). For tests and the bench.

Graph (built with ``onnx.helper``, batch dim symbolic): inputs ``x`` INT64 [batch, 1]
and the hidden ``state_in`` INT64 [batch, 1], ``START`` INT32 [batch, 1], ``CORRID``
INT64 [batch, 1]; outputs ``sum`` = ``state_in + x``, ``state_out`` (the same, fed
back as the next step's ``state_in``), ``started`` (START echoed) and ``corrid``
(CORRID echoed), so a test sees what the worker fed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from meshserve.devkit.examples import BATCH, IR_VERSION, OPSET, PRODUCER

NAME = "accumulator"


def build_accumulator() -> onnx.ModelProto:
    def tensor(name: str, kind: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, [BATCH, 1])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["state_in", "x"], ["sum"]),
            helper.make_node("Identity", ["sum"], ["state_out"]),
            helper.make_node("Identity", ["START"], ["started"]),
            helper.make_node("Identity", ["CORRID"], ["corrid"]),
        ],
        "accumulator",
        [
            tensor("x", TensorProto.INT64),
            tensor("state_in", TensorProto.INT64),
            tensor("START", TensorProto.INT32),
            tensor("CORRID", TensorProto.INT64),
        ],
        [
            tensor("sum", TensorProto.INT64),
            tensor("state_out", TensorProto.INT64),
            tensor("started", TensorProto.INT32),
            tensor("corrid", TensorProto.INT64),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name=PRODUCER
    )
    onnx.checker.check_model(model)
    return model


def write_accumulator(
    root: Path,
    name: str = NAME,
    *,
    idle_timeout_s: float = 60,
    max_sequences: int = 0,
    max_sequences_per_tenant: int = 0,
    max_batch_size: int = 8,
) -> Path:
    """Write the model and its config.yaml (with ``sequence:``) under ``root/name``."""
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(build_accumulator(), str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.yaml").write_text(
        f"max_batch_size: {max_batch_size}\n"
        "dynamic_batching: {max_queue_delay_ms: 0}\n"
        "sequence:\n"
        f"  idle_timeout_s: {idle_timeout_s}\n"
        f"  max_sequences: {max_sequences}\n"
        f"  max_sequences_per_tenant: {max_sequences_per_tenant}\n"
        "  controls:\n"
        "    - {kind: start, input: START, values: [0, 1]}\n"
        "    - {kind: correlation_id, input: CORRID}\n"
        "  states:\n"
        "    - {input: state_in, output: state_out, initial: 0}\n",
        encoding="utf-8",
    )
    return model_dir
