"""Triton's classification extension (``class_count``) on the real in-process mesh:
a requested output's top k per batch row, as BYTES "value:index[:label]", equals
numpy's ranking of the outputs in-process ONNX Runtime computes for the same inputs;
labels come from the output's ``label_filename``; k over the class count is capped;
bad counts, BYTES outputs, ensembles and decoupled models are refused naming the
output. The ranking alone (meshserve/models/classification.py) is checked against a
full numpy sort on large and odd outputs."""

from __future__ import annotations

import shutil
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gateway.core import check_reply
from meshserve.devkit.examples import write_example_repository
from meshserve.errors import InvalidArgument, Unavailable
from meshserve.models.classification import top_classes
from meshserve.models.repository import load_model
from meshserve.wire.codec import requested_classes
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

RPC_TIMEOUT_S = 10
LABELS = [f"class {i} label" for i in range(10)]  # with spaces, as ImageNet's
CNN_CONFIG = "max_batch_size: 8\noutput: [{name: logits, label_filename: labels.txt}]\n"


def expected(values: np.ndarray[Any, Any], k: int, labels: Sequence[str] = ()) -> list[list[bytes]]:
    """Each row's top k by a full numpy sort (descending value, then index), formatted
    as Triton's std::to_string (``%f``) and joined with the index and label."""
    rows = values.reshape(values.shape[0], -1)
    answer = []
    for row in rows:
        order = sorted(range(row.size), key=lambda i: (-float(row[i]), i))[:k]
        texts = []
        for i in order:
            value = f"{float(row[i]):f}" if row.dtype.kind == "f" else str(int(row[i]))
            texts.append(f"{value}:{i}:{labels[i]}".encode() if labels else f"{value}:{i}".encode())
        answer.append(texts)
    return answer


def strings(response: pb.ModelInferResponse, name: str) -> tuple[list[int], list[bytes]]:
    """An output's shape and its BYTES elements (length-prefixed in raw_output_contents)."""
    index = [out.name for out in response.outputs].index(name)
    out = response.outputs[index]
    assert out.datatype == "BYTES"
    raw, items, at = response.raw_output_contents[index], [], 0
    while at < len(raw):
        (size,) = struct.unpack_from("<I", raw, at)
        items.append(bytes(raw[at + 4 : at + 4 + size]))
        at += 4 + size
    return list(out.shape), items


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_example_repository(tmp_path_factory.mktemp("classes"), ["mlp", "cnn", "scale_any"])
    (root / "cnn" / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    (root / "cnn" / "config.yaml").write_text(CNN_CONFIG)
    shutil.copytree(root / "mlp", root / "mlp_cached")
    (root / "mlp_cached" / "config.yaml").write_text("response_cache: true\n")
    return root


@pytest.fixture
async def mesh(redis_url: str, repository: Path) -> AsyncIterator[Mesh]:
    running = await start_mesh(redis_url, repository)
    try:
        yield running
    finally:
        await stop_mesh(running)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield infer_stub(channel)


def reference(repository: Path, model: str, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (np.asarray(out) for out in session.run(None, feed)), strict=True))


def classified(request: pb.ModelInferRequest, name: str, k: int, key: str = "classification") -> None:
    request.outputs.add(name=name).parameters[key].int64_param = k


async def test_top_k_with_labels_equals_numpy_on_onnxruntime(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    image = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    request = infer_request("cnn", {"image": image})
    classified(request, "logits", 4)
    response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    shape, items = strings(response, "logits")
    want = expected(reference(repository, "cnn", {"image": image})["logits"], 4, LABELS)
    assert shape == [3, 4]
    assert [items[r * 4 : (r + 1) * 4] for r in range(3)] == want
    assert items[0].decode().split(":")[2] in LABELS


@pytest.mark.parametrize("key", ["classification", "class_count"])  # tritonclient's name, and the hand-written one
async def test_top_k_without_labels_and_other_outputs_untouched(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path, key: str
) -> None:
    features = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    request = infer_request("mlp", {"features": features}, outputs=["probabilities"])
    classified(request, "logits", 3, key)
    response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    want = reference(repository, "mlp", {"features": features})
    shape, items = strings(response, "logits")
    assert shape == [2, 3]
    assert [items[:3], items[3:]] == expected(want["logits"], 3)
    assert all(item.decode().count(":") == 1 for item in items)  # no label file: "value:index"
    probabilities = response.outputs[[o.name for o in response.outputs].index("probabilities")]
    assert probabilities.datatype == "FP32"  # not asked to classify: the scores, as before
    index = [o.name for o in response.outputs].index("probabilities")
    got = np.frombuffer(response.raw_output_contents[index], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, want["probabilities"], rtol=1e-5, atol=1e-6)


async def test_k_over_the_class_count_gives_every_class(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    image = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    request = infer_request("cnn", {"image": image})
    classified(request, "logits", 1000)
    shape, items = strings(await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S), "logits")
    assert shape == [1, 10]  # min(k, classes), as Triton
    assert [items] == expected(reference(repository, "cnn", {"image": image})["logits"], 10, LABELS)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (pb.InferParameter(int64_param=0), "greater than 0, got 0"),
        (pb.InferParameter(int64_param=-3), "greater than 0, got -3"),
        (pb.InferParameter(double_param=2.0), "must be an int64, got double_param"),
        (pb.InferParameter(string_param="2"), "must be an int64, got string_param"),
    ],
)
async def test_bad_counts_are_refused_naming_the_output(
    stub: pb_grpc.GRPCInferenceServiceStub, value: pb.InferParameter, needle: str
) -> None:
    request = infer_request("mlp", {"features": np.zeros((1, 64), np.float32)})
    request.outputs.add(name="logits").parameters["classification"].CopyFrom(value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "requested output 'logits'" in details, details
    assert needle in details, details


async def test_server_metadata_lists_classification(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
    assert "classification" in metadata.extensions


async def test_plain_request_still_answers_the_scores(stub: pb_grpc.GRPCInferenceServiceStub, repository: Path) -> None:
    features = np.random.default_rng(4).standard_normal((1, 64)).astype(np.float32)
    response = await stub.ModelInfer(infer_request("mlp", {"features": features}), timeout=RPC_TIMEOUT_S)
    got = output_arrays(response)
    np.testing.assert_allclose(got["logits"], reference(repository, "mlp", {"features": features})["logits"], rtol=1e-5)


async def test_the_response_cache_keeps_classes_and_scores_apart(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    """The cache key holds the requested outputs' parameters: a cached top-2 answers
    only a top-2 request, never a request for the scores or for a top-3."""
    features = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    want = reference(repository, "mlp_cached", {"features": features})["logits"]

    async def ask(k: int) -> pb.ModelInferResponse:
        request = infer_request("mlp_cached", {"features": features}, outputs=[] if k else ["logits"])
        if k:
            classified(request, "logits", k)
        response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        await mesh.gateway.cache.settle()
        return response

    def was_cached(response: pb.ModelInferResponse) -> bool:
        return "cached" in response.parameters and response.parameters["cached"].bool_param

    first, again = await ask(2), await ask(2)
    assert not was_cached(first)
    assert was_cached(again)
    assert strings(again, "logits") == ([1, 2], expected(want, 2)[0])
    scores = await ask(0)
    assert not was_cached(scores)
    np.testing.assert_allclose(output_arrays(scores)["logits"], want, rtol=1e-5, atol=1e-6)
    three = await ask(3)
    assert not was_cached(three)
    assert strings(three, "logits") == ([1, 3], expected(want, 3)[0])


async def test_a_grid_known_only_at_run_time_is_refused_by_the_worker(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    """scale_any's output has free dims: [batch, 1, 1, 5] is a row of 5 classes, while
    [batch, 1, 2, 3] has two dims over 1 and is refused by the worker, naming it."""
    row = np.random.default_rng(7).standard_normal((2, 1, 1, 5)).astype(np.float32)
    request = infer_request("scale_any", {"image": row})
    classified(request, "scaled", 2)
    shape, items = strings(await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S), "scaled")
    assert shape == [2, 2]
    assert [items[:2], items[2:]] == expected(reference(repository, "scale_any", {"image": row})["scaled"], 2)
    grid = infer_request("scale_any", {"image": np.zeros((1, 1, 2, 3), np.float32)})
    classified(grid, "scaled", 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(grid, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested output 'scaled'" in (caught.value.details() or "")
    assert "got shape [1, 1, 2, 3]" in (caught.value.details() or "")


# ------------------------------------------------------------ refusals decided by the codec


def test_decoupled_and_bytes_outputs_are_refused(repository: Path) -> None:
    info = load_model(repository / "mlp", 1)
    request = pb.ModelInferRequest(model_name="mlp")
    classified(request, "logits", 2)
    assert requested_classes(request, info) == {"logits": 2}
    with pytest.raises(InvalidArgument, match="decoupled model 'mlp'"):
        requested_classes(request, replace(info, decoupled=True))
    text = replace(info, outputs=tuple(replace(t, datatype="BYTES") for t in info.outputs))
    with pytest.raises(InvalidArgument, match=r"requested output 'logits'.*BYTES output"):
        requested_classes(request, text)
    grid = replace(info, outputs=tuple(replace(t, shape=(-1, 4, 5)) for t in info.outputs))
    with pytest.raises(InvalidArgument, match="at most one non-batch dim greater than 1"):
        requested_classes(request, grid)


# ------------------------------------------------------------ the ranking alone


def test_large_output_ranks_as_a_full_sort() -> None:
    scores = np.random.default_rng(5).standard_normal((4, 50_000)).astype(np.float32)
    got = top_classes("probs", scores, 5, batching=True)
    assert got.shape == (4, 5)
    assert got.tolist() == expected(scores, 5)


def test_integer_values_ties_and_a_model_that_does_not_batch() -> None:
    scores = np.array([[3, 9, 9, -1, 0]], dtype=np.int32)  # no batch dim: [1, 5] is one row of 5
    got = top_classes("counts", scores, 3, batching=False, labels=("a", "b", "", "d", "e"))
    assert got.shape == (3,)
    assert got.tolist() == [b"9:1:b", b"9:2", b"3:0:a"]  # an empty label line: no label


def test_a_column_output_and_a_grid_output() -> None:
    column = np.arange(6, dtype=np.float64).reshape(2, 3, 1)  # [batch, classes, 1]: one dim over 1
    assert top_classes("c", column, 2, batching=True).tolist() == [
        [b"2.000000:2", b"1.000000:1"],
        [b"5.000000:2", b"4.000000:1"],
    ]
    with pytest.raises(InvalidArgument, match="requested output 'g'"):
        top_classes("g", np.zeros((1, 2, 2), np.float32), 1, batching=True)


def test_scores_from_a_worker_that_does_not_rank_are_refused_not_answered() -> None:
    """A worker older than ``class_counts`` answers the logits: the gateway says so
    instead of passing scores where classes were asked for."""
    scores = mpb.InferReply(outputs=[mpb.Tensor(name="logits", datatype="FP32", shape=[1, 10])])
    with pytest.raises(Unavailable, match=r"'logits'.*does not rank classes"):
        check_reply(scores, {"logits": 3})
    check_reply(scores, {})  # no classes asked for: the scores are the answer
    ranked = mpb.InferReply(outputs=[mpb.Tensor(name="logits", datatype="BYTES", shape=[1, 3])])
    check_reply(ranked, {"logits": 3})
    laid_out = mpb.InferReply(layout=mpb.REPLY_INFER_RESPONSE)  # only a newer worker lays out
    check_reply(laid_out, {"logits": 3})
