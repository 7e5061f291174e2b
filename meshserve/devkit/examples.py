"""Deterministic example models, for ``meshserve up`` without a repository and tests.

Every builder uses ``onnx.helper`` with weights from a seeded
``numpy.random.default_rng``, so two runs produce byte-identical ``model.onnx``
files. Models use opset 17 and IR version 9, which every supported ONNX Runtime
loads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
PRODUCER = "meshserve.devkit.examples"
BATCH = "batch"

# Output channels of the CNN's three conv blocks; tuned for the latency in build_cnn.
_CNN_CHANNELS = (64, 192, 384)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """Wrap ``graph`` in a ModelProto with the fixed opset, IR version and producer."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
    )
    onnx.checker.check_model(model)
    return model


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int) -> TensorProto:
    """Draw a He-initialised FP32 weight, so activations keep a sane scale."""
    scale = np.sqrt(2.0 / fan_in)
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _bias(rng: np.random.Generator, name: str, size: int) -> TensorProto:
    """Draw a small FP32 bias vector."""
    values = (rng.standard_normal(size) * 0.1).astype(np.float32)
    return numpy_helper.from_array(values, name)


def build_mlp() -> onnx.ModelProto:
    """Build "mlp": features FP32 [batch, 64] -> Gemm/Relu/Gemm -> logits, softmax.

    Outputs "logits" and "probabilities" (softmax of the logits) are both FP32
    [batch, 10].
    """
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
        helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, [BATCH, 64])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH, 10]),
        ],
        initializer=[
            _weight(rng, "w1", (64, 128), fan_in=64),
            _bias(rng, "b1", 128),
            _weight(rng, "w2", (128, 10), fan_in=128),
            _bias(rng, "b2", 10),
        ],
    )
    return _model(graph)


def build_cnn() -> onnx.ModelProto:
    """Build "cnn": image FP32 [batch, 3, 32, 32] -> 3 conv blocks -> GAP -> Gemm.

    Each block is Conv 3x3 / Relu / MaxPool 2x2, with 64, 192 and 384 channels.

    "logits" is FP32 [batch, 10]. Sized to cost about a millisecond per item at
    batch 1 on a small CPU (about 73 M multiply-adds, 3.1 MB of weights), so that
    the model's compute, not the mesh, dominates a request.
    """
    rng = np.random.default_rng(2)
    channels = (3, *_CNN_CHANNELS)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    current = "image"
    for index, (c_in, c_out) in enumerate(pairwise(channels)):
        weight, bias = f"conv{index}_w", f"conv{index}_b"
        initializers += [
            _weight(rng, weight, (c_out, c_in, 3, 3), fan_in=c_in * 9),
            _bias(rng, bias, c_out),
        ]
        nodes += [
            helper.make_node("Conv", [current, weight, bias], [f"conv{index}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
            helper.make_node(
                "MaxPool",
                [f"relu{index}"],
                [f"pool{index}"],
                kernel_shape=[2, 2],
                strides=[2, 2],
            ),
        ]
        current = f"pool{index}"
    initializers += [_weight(rng, "fc_w", (channels[-1], 10), fan_in=channels[-1]), _bias(rng, "fc_b", 10)]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 3, 32, 32])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 10])],
        initializer=initializers,
    )
    return _model(graph)


def build_fixed_adder() -> onnx.ModelProto:
    """Build "adder_fixed": INT64 "a", "b" [1, 4] -> "sum" = a + b, "diff" = a - b.

    Every dim is fixed, so the model is not batchable.
    """
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
    ]
    graph = helper.make_graph(
        nodes,
        "adder_fixed",
        inputs=[
            helper.make_tensor_value_info("a", TensorProto.INT64, [1, 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [1, 4]),
        ],
        outputs=[
            helper.make_tensor_value_info("sum", TensorProto.INT64, [1, 4]),
            helper.make_tensor_value_info("diff", TensorProto.INT64, [1, 4]),
        ],
    )
    return _model(graph)


def build_any_size() -> onnx.ModelProto:
    """Build "scale_any": "image" FP32 [batch, 1, height, width] -> image * 2 + 1.

    Batchable, and any height and width: "scaled" has the input's shape.
    """
    shape: list[str | int | None] = [BATCH, 1, "height", "width"]
    nodes = [
        helper.make_node("Mul", ["image", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "one"], ["scaled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scale_any",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        outputs=[helper.make_tensor_value_info("scaled", TensorProto.FLOAT, shape)],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return _model(graph)


# MobileNetV3-small-like blocks: (expanded channels, output channels, stride, squeeze-excite).
_MOBILENET_BLOCKS = (
    (16, 16, 2, True),
    (72, 24, 2, False),
    (88, 24, 1, False),
    (96, 40, 2, True),
    (240, 40, 1, True),
    (120, 48, 1, True),
    (144, 48, 1, True),
    (288, 96, 2, True),
    (576, 96, 1, True),
)
_MOBILENET_CLASSES = 100


class _GraphBuilder:
    """Appends nodes and He-initialised weights, naming each tensor once."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}{self._count}"

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def conv(self, current: str, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> str:
        """A Conv with bias (batch norm folded in, as exported networks have it)."""
        weight, bias = self.name("w"), self.name("b")
        fan_in = c_in // groups * kernel * kernel
        self.initializers += [
            _weight(self.rng, weight, (c_out, c_in // groups, kernel, kernel), fan_in=fan_in),
            _bias(self.rng, bias, c_out),
        ]
        pad = kernel // 2
        return self.node("Conv", [current, weight, bias], pads=[pad] * 4, strides=[stride, stride], group=groups)

    def squeeze_excite(self, current: str, channels: int) -> str:
        """Global pool, 1x1 reduce / Relu / 1x1 expand / HardSigmoid, times the input."""
        squeezed = self.node("GlobalAveragePool", [current])
        reduced = self.node("Relu", [self.conv(squeezed, channels, max(8, channels // 4))])
        gate = self.node("HardSigmoid", [self.conv(reduced, max(8, channels // 4), channels)], alpha=1 / 6)
        return self.node("Mul", [current, gate])


def build_mobilenet() -> onnx.ModelProto:
    """Build "mobilenet": image FP32 [batch, 3, 96, 96] -> MobileNetV3-small-like -> logits.

    A stem conv, nine inverted-residual blocks (1x1 expand, 3x3 depthwise,
    squeeze-excite, 1x1 project, residual add where shapes allow) with hard-swish,
    then global pooling and a Gemm: "logits" FP32 [batch, 100]. Many small ops
    (about 100) of little compute each, so that the cost of waking ONNX Runtime's
    threads per op, not arithmetic, decides its batch-1 latency: the kind of model
    the worker's engine-settings trials are for (docs/models.md).
    """
    g = _GraphBuilder(seed=5)
    current = g.node("HardSwish", [g.conv("image", 3, 16, kernel=3, stride=2)])
    c_in = 16
    for expanded, c_out, stride, se in _MOBILENET_BLOCKS:
        block_input = current
        x = g.node("HardSwish", [g.conv(current, c_in, expanded)])
        x = g.node("HardSwish", [g.conv(x, expanded, expanded, kernel=3, stride=stride, groups=expanded)])
        if se:
            x = g.squeeze_excite(x, expanded)
        x = g.conv(x, expanded, c_out)
        if stride == 1 and c_in == c_out:
            x = g.node("Add", [x, block_input])
        current, c_in = x, c_out
    current = g.node("HardSwish", [g.conv(current, c_in, 576)])
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [current])], axis=1)
    g.initializers += [
        _weight(g.rng, "fc_w", (576, _MOBILENET_CLASSES), fan_in=576),
        _bias(g.rng, "fc_b", _MOBILENET_CLASSES),
    ]
    g.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"]))
    graph = helper.make_graph(
        g.nodes,
        "mobilenet",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 3, 96, 96])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, _MOBILENET_CLASSES])],
        initializer=g.initializers,
    )
    return _model(graph)


GENERATOR_VOCAB = 32
GENERATOR_HIDDEN = 16


def build_generator() -> onnx.ModelProto:
    """Build "generator", one decoder step of a tiny recurrent language model:
    "token_id" INT64 [batch, 1] and "state" FP32 [batch, 16] -> "logits" FP32
    [batch, 32] (the next token's) and "next_state" FP32 [batch, 16].

    An embedding (Gather) and a tanh recurrent cell: next_state = tanh(E[token] Wx +
    state Wh + b), logits = next_state Wo + bo. Token ids are taken modulo the
    vocabulary, so any id runs. Served in the ``generate`` mode (GENERATOR_CONFIG).
    """
    rng = np.random.default_rng(19)
    vocab, hidden = GENERATOR_VOCAB, GENERATOR_HIDDEN
    initializers = [
        numpy_helper.from_array(np.array(vocab, dtype=np.int64), "vocab"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array((rng.standard_normal((vocab, hidden)) * 1.0).astype(np.float32), "embedding"),
        _weight(rng, "wx", (hidden, hidden), hidden),
        _weight(rng, "wh", (hidden, hidden), hidden),
        _bias(rng, "b", hidden),
        _weight(rng, "wo", (hidden, vocab), hidden),
        _bias(rng, "bo", vocab),
    ]
    nodes = [
        helper.make_node("Mod", ["token_id", "vocab"], ["ids"]),
        helper.make_node("Gather", ["embedding", "ids"], ["embedded3"]),  # [batch, 1, hidden]
        helper.make_node("Squeeze", ["embedded3", "axis1"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "wx"], ["from_token"]),
        helper.make_node("MatMul", ["state", "wh"], ["from_state"]),
        helper.make_node("Add", ["from_token", "from_state"], ["mixed"]),
        helper.make_node("Add", ["mixed", "b"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["next_state"]),
        helper.make_node("MatMul", ["next_state", "wo"], ["scores"]),
        helper.make_node("Add", ["scores", "bo"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "generator",
        inputs=[
            helper.make_tensor_value_info("token_id", TensorProto.INT64, [BATCH, 1]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [BATCH, hidden]),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, vocab]),
            helper.make_tensor_value_info("next_state", TensorProto.FLOAT, [BATCH, hidden]),
        ],
        initializer=initializers,
    )
    return _model(graph)


GENERATOR_CONFIG = """\
# a decoupled model in the generate mode: the worker runs the decoder loop (docs/streaming.md)
decoupled: true
max_batch_size: 16
generate:
  tokens: token_id
  logits: logits
  state:
    state: next_state
  output: token
  max_tokens: 64
"""


EXAMPLE_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "adder_fixed": build_fixed_adder,
    "scale_any": build_any_size,
    "mobilenet": build_mobilenet,
}


EXAMPLE_CONFIGS: dict[str, str] = {
    # ONNX Runtime's best batch for "cnn" on CPU is about 8: a larger batch adds no
    # throughput, but every request that arrives while one runs waits for all of it,
    # so a batch of 32 is head-of-line blocking for every other tenant (see the
    # noisy-neighbor scenario of `meshserve bench`).
    "cnn": "# the best batch on CPU; larger ones only lengthen the wait behind a running batch\nmax_batch_size: 8\n",
    # Same for "mobilenet": at batch 32 its activations leave the caches, and items/s
    # fall to about half of batch 8's.
    "mobilenet": "# the best batch on CPU; at 32 items/s fall to about half\nmax_batch_size: 8\n",
    "generator": GENERATOR_CONFIG,
}

OPTIONAL_EXAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {"generator": build_generator}
"""Examples written only when named (``write_example_repository(root, ["generator"])``,
``meshserve bench --scenario stream``): not in the set ``meshserve up`` serves, whose
models every client may call with ModelInfer (a decoupled one refuses it)."""


PYTHON_EXAMPLES: dict[str, tuple[str, str]] = {
    # A Python model (docs/models.md "Python models"): written only where Python
    # models are allowed (``meshserve up --allow-python-models``), as model.py is code.
    "normalize": (
        """\
# uint8 HWC images to float32 CHW in [0, 1], on the CPU beside the GPU models
backend: python
max_batch_size: 8
placement: {device: cpu}
input:
  - {name: image, datatype: UINT8, dims: [-1, -1, 3]}
output:
  - {name: pixels, datatype: FP32, dims: [3, -1, -1]}
""",
        '''\
"""uint8 HWC images to float32 CHW in [0, 1] (meshserve's example Python model)."""

import numpy as np


class Model:
    def initialize(self, config):
        self.scale = np.float32(1 / 255)

    def execute(self, inputs):
        image = inputs["image"]  # (batch, height, width, 3), uint8, read in place
        return {"pixels": image.transpose(0, 3, 1, 2) * self.scale}

    def finalize(self):
        pass
''',
    ),
}


PYTHON_PIPELINES: dict[str, str] = {
    # An ensemble with a Python step (docs/streaming.md "Ensembles"): decode and scale
    # the image in Python on the CPU, then classify it with the ONNX "cnn"; one call.
    "classify": """\
# uint8 HWC images in, logits out: the Python "normalize", then the ONNX "cnn"
platform: ensemble
ensemble:
  steps:
    - {model: normalize, input_map: {image: IMAGE}, output_map: {pixels: PIXELS}}
    - {model: cnn, input_map: {image: PIXELS}, output_map: {logits: LOGITS}}
  outputs: [LOGITS]
""",
}


def write_python_examples(root: Path, allowed: bool) -> None:
    """Write the Python examples (and the pipeline that uses one) under ``root`` when
    ``allowed``, else remove any written before (a repository once served with
    ``--allow-python-models`` must not leave a model that can only fail to load)."""
    for name, config in PYTHON_PIPELINES.items():
        if allowed:
            _write_if_changed(root / name / "config.yaml", config.encode())
        else:
            (root / name / "config.yaml").unlink(missing_ok=True)
            if (root / name).is_dir() and not any((root / name).iterdir()):
                (root / name).rmdir()
    for name, (config, code) in PYTHON_EXAMPLES.items():
        if allowed:
            _write_if_changed(root / name / "config.yaml", config.encode())
            _write_if_changed(root / name / "1" / "model.py", code.encode())
        else:
            for path in (root / name / "1" / "model.py", root / name / "config.yaml"):
                path.unlink(missing_ok=True)
            for directory in (root / name / "1", root / name):
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()


def write_example_repository(root: Path, names: Iterable[str] | None = None) -> Path:
    """Write ``<root>/<name>/1/model.onnx`` for each named example (all of
    ``EXAMPLE_MODELS`` by default; ``OPTIONAL_EXAMPLES`` when named),
    and ``<root>/<name>/config.yaml`` for those that have one.

    Each file is replaced atomically (temp file in the same directory, then
    ``os.replace``), and left untouched when it already holds identical bytes, so
    concurrent callers and readers never see a partial model. Returns ``root``.
    Raises ValueError for an unknown name.
    """
    builders = {**EXAMPLE_MODELS, **OPTIONAL_EXAMPLES}
    selected = list(EXAMPLE_MODELS) if names is None else list(names)
    unknown = [name for name in selected if name not in builders]
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; known: {', '.join(builders)}")
    for name in selected:
        data = builders[name]().SerializeToString(deterministic=True)
        _write_if_changed(root / name / "1" / "model.onnx", data)
        if name in EXAMPLE_CONFIGS:
            _write_if_changed(root / name / "config.yaml", EXAMPLE_CONFIGS[name].encode())
    return root


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``; no write when it already does."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def default_repository_dir() -> Path:
    """Where ``meshserve up`` keeps generated examples.

    ``$XDG_CACHE_HOME/meshserve/examples`` when that variable holds an absolute
    path (as the XDG spec requires), else ``~/.cache/meshserve/examples``. Reads
    the environment on each call, never at import.
    """
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "meshserve" / "examples"
