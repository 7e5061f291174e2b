"""tritonclient's stream calls on a decoupled model (the example generator): sync
start_stream / async_stream_infer and asyncio stream_infer, each request answered
with its tokens one response at a time, the last flagged ``triton_final_response``;
`meshserve up` in a subprocess (see test_tritonclient.py for why)."""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import GENERATOR_HIDDEN, write_example_repository
from tests.compat.test_tritonclient import RunningMesh, meshserve_up

FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = write_example_repository(tmp_path_factory.mktemp("generator"), ["generator"])
    with meshserve_up(repository, 1) as running:
        yield running


def greedy(repository: Path, prompt: list[int], count: int) -> list[int]:
    session = ort.InferenceSession(
        str(repository / "generator" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    state = np.zeros((1, GENERATOR_HIDDEN), np.float32)
    for token in prompt:
        logits, state = session.run(None, {"token_id": np.array([[token]], np.int64), "state": state})
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(logits[0])))
        logits, state = session.run(None, {"token_id": np.array([[tokens[-1]]], np.int64), "state": state})
    return tokens


def prompt_input(prompt: list[int]) -> tc.InferInput:
    tensor = tc.InferInput("token_id", [len(prompt)], "INT64")
    tensor.set_data_from_numpy(np.array(prompt, dtype=np.int64))
    return tensor


def test_sync_stream_gets_every_token_and_the_final_flag(mesh: RunningMesh) -> None:
    prompts = {"p1": ([3, 7, 1], 9), "p2": ([5], 4), "p3": ([2, 2], 13)}
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = tc.InferenceServerClient(mesh.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=30)
    try:
        for request_id, (prompt, count) in prompts.items():
            client.async_stream_infer(
                "generator", [prompt_input(prompt)], request_id=request_id, parameters={"max_tokens": count}
            )
        got = [answers.get(timeout=20) for _ in range(sum(count for _, count in prompts.values()))]
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in got)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    flags: dict[str, list[bool]] = {request_id: [] for request_id in prompts}
    for result, _ in got:
        response = result.get_response()  # type: ignore[attr-defined]
        tokens[response.id].append(int(result.as_numpy("token")[0]))  # type: ignore[attr-defined]
        flags[response.id].append(response.parameters[FINAL].bool_param)
    for request_id, (prompt, count) in prompts.items():
        assert tokens[request_id] == greedy(mesh.repository, prompt, count)
        assert flags[request_id] == [False] * (count - 1) + [True]


def test_sync_model_infer_on_the_generator_is_refused(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("generator", [prompt_input([1])])
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in caught.value.message()


async def test_asyncio_stream_infer_gets_every_token_and_the_final_flag(mesh: RunningMesh) -> None:
    async def requests() -> AsyncIterator[dict[str, object]]:
        yield {
            "model_name": "generator",
            "inputs": [prompt_input([4, 4, 4])],
            "request_id": "a",
            "parameters": {"max_tokens": 11},
        }

    client = tc_aio.InferenceServerClient(mesh.address)
    tokens: list[int] = []
    flags: list[bool] = []
    try:
        async for result, error in client.stream_infer(requests(), stream_timeout=30):
            assert error is None
            tokens.append(int(result.as_numpy("token")[0]))
            flags.append(result.get_response().parameters[FINAL].bool_param)
    finally:
        await client.close()
    assert tokens == greedy(mesh.repository, [4, 4, 4], 11)
    assert flags == [False] * 10 + [True]
