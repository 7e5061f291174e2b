"""tritonclient's stream calls on a decoupled Python model (tests/python_models.py
"streamer", a generator ``execute``): sync start_stream / async_stream_infer and asyncio
stream_infer get N responses in order, the last flagged ``triton_final_response``; an
exception mid-stream answers an error naming the model and the exception type; a
client that cancels its stream closes the model's generator. `meshserve up
--allow-python-models` in a subprocess (see test_tritonclient.py for why)."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from tests.compat.test_tritonclient import RunningMesh, meshserve_up
from tests.python_models import write_streamer

FINAL = "triton_final_response"
LONG = 100_000  # responses 10 ms apart: far longer than any test waits


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = tmp_path_factory.mktemp("python-decoupled")
    write_streamer(repository)
    with meshserve_up(repository, 1, ("--allow-python-models",)) as running:
        yield running


def count_input(module: object, n: int) -> object:
    tensor = module.InferInput("n", [1, 1], "INT32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([[n]], np.int32))
    return tensor


def closes(repository: Path) -> int:
    """How many times the model's generator was closed (model.py appends a line each time)."""
    marker = repository / "streamer" / "1" / "closed"
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_sync_stream_gets_n_responses_in_order_then_an_error_mid_stream(mesh: RunningMesh) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = tc.InferenceServerClient(mesh.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=30)
    try:
        client.async_stream_infer("streamer", [count_input(tc, 4)], request_id="four")
        got = [answers.get(timeout=20) for _ in range(4)]
        client.async_stream_infer("streamer", [count_input(tc, -1)], request_id="raises")
        failed = [answers.get(timeout=20) for _ in range(3)]
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in got)
    values = [int(result.as_numpy("i")[0, 0]) for result, _ in got]  # type: ignore[attr-defined]
    flags = [result.get_response().parameters[FINAL].bool_param for result, _ in got]  # type: ignore[attr-defined]
    assert (values, flags) == ([0, 1, 2, 3], [False, False, False, True])
    assert [int(result.as_numpy("i")[0, 0]) for result, _ in failed[:2]] == [0, 1]  # type: ignore[attr-defined]
    error = failed[2][1]
    assert error is not None
    message = error.message()  # type: ignore[attr-defined]
    assert "model 'streamer'" in message
    assert "ValueError: n is -1" in message
    assert "Traceback" not in message


def test_sync_stop_stream_with_cancel_closes_the_models_generator(mesh: RunningMesh) -> None:
    before = closes(mesh.repository)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = tc.InferenceServerClient(mesh.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=60)
    try:
        client.async_stream_infer("streamer", [count_input(tc, LONG)], request_id="long")
        _, error = answers.get(timeout=20)
        assert error is None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    deadline_s = time.monotonic() + 15
    while closes(mesh.repository) == before:
        assert time.monotonic() < deadline_s, "the model's generator was not closed after the cancel"
        time.sleep(0.05)


def test_model_config_tells_the_client_to_stream(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    config = client.get_model_config("streamer").config
    assert config.model_transaction_policy.decoupled


async def test_asyncio_stream_infer_gets_n_responses_then_a_cancel_closes_the_generator(mesh: RunningMesh) -> None:
    async def requests() -> AsyncIterator[dict[str, object]]:
        yield {"model_name": "streamer", "inputs": [count_input(tc_aio, 6)], "request_id": "six"}

    client = tc_aio.InferenceServerClient(mesh.address)
    values: list[int] = []
    flags: list[bool] = []
    try:
        async for result, error in client.stream_infer(requests(), stream_timeout=30):
            assert error is None
            values.append(int(result.as_numpy("i")[0, 0]))
            flags.append(result.get_response().parameters[FINAL].bool_param)
            if flags[-1]:
                break
    finally:
        await client.close()
    assert values == [0, 1, 2, 3, 4, 5]
    assert flags == [False] * 5 + [True]

    before = closes(mesh.repository)
    stop = asyncio.Event()

    async def long_request() -> AsyncIterator[dict[str, object]]:
        yield {"model_name": "streamer", "inputs": [count_input(tc_aio, LONG)], "request_id": "long"}
        await stop.wait()  # keeps the stream open until the client goes

    client = tc_aio.InferenceServerClient(mesh.address)
    try:
        responses = client.stream_infer(long_request(), stream_timeout=60)
        _, error = await anext(aiter(responses))
        assert error is None
    finally:
        await client.close()  # the channel closes: the stream is cancelled
    async with asyncio.timeout(15):
        while closes(mesh.repository) == before:  # noqa: ASYNC110 (the close runs in the model's process)
            await asyncio.sleep(0.05)
