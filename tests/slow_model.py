"""A model whose run time the caller picks: "slow" loops a 256x256 matmul as many
times as the largest ``iterations`` value in the batch.

For the tests of what happens while a batch computes (leases, deadlines, a worker
killed or stopped mid-batch). The warm-up's and canary's generated inputs hold
integers below 8, so loading stays quick; :func:`iterations_for` measures this
host, now, so a test asks for seconds rather than for a count that only suits one
machine's load.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

NAME = "slow"
SIDE = 256


def build_slow() -> onnx.ModelProto:
    """iterations INT64 [batch, 1] -> done FP32 [batch, 1] (the iterations, as floats).

    The loop's state feeds the output (times zero) so ONNX Runtime cannot drop it;
    Tanh keeps the state finite, so the sanity check's NaN/Inf test holds.
    """
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((SIDE, SIDE)) / np.sqrt(SIDE)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        inputs=[
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [SIDE, SIDE]),
        ],
        outputs=[
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [SIDE, SIDE]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMax", ["iterations"], ["most"], keepdims=0),
        helper.make_node("Loop", ["most", "keep_going", "start"], ["final"], body=body),
        helper.make_node("ReduceSum", ["final"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Cast", ["iterations"], ["counted"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["counted", "nothing"], ["done"]),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        inputs=[helper.make_tensor_value_info("iterations", TensorProto.INT64, ["batch", 1])],
        outputs=[helper.make_tensor_value_info("done", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.eye(SIDE, dtype=np.float32), "start"),
            numpy_helper.from_array(np.array(True), "keep_going"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def write_slow(repository: Path, config: str = "max_batch_size: 4\n") -> Path:
    """``<repository>/slow/1/model.onnx`` and its config.yaml; returns the repository."""
    version_dir = repository / NAME / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(build_slow().SerializeToString())
    (repository / NAME / "config.yaml").write_text(config)
    return repository


def iterations_for(seconds: float, repository: Path) -> int:
    """How many iterations take about ``seconds`` on this host now (one thread, as
    the tests' workers run), measured on the model written in ``repository``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(repository / NAME / "1" / "model.onnx"), options)
    probe = 20
    started = time.perf_counter()
    session.run(None, {"iterations": np.array([[probe]], dtype=np.int64)})
    per_iteration_s = (time.perf_counter() - started) / probe
    return max(probe, int(seconds / per_iteration_s))


def slow_request_inputs(iterations: int) -> dict[str, np.ndarray]:
    return {"iterations": np.array([[iterations]], dtype=np.int64)}
