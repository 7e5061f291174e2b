"""tritonclient's sequence calls, unchanged: ``sequence_id`` (integer and string),
``sequence_start`` and ``sequence_end`` over ModelInfer (sync and asyncio) and
ModelStreamInfer, against ``meshserve up`` in a subprocess (see
test_tritonclient.py for why), with the accumulator stateful model."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from meshserve.devkit.accumulator import write_accumulator
from meshserve.devkit.examples import write_example_repository
from tests.compat.test_tritonclient import RunningMesh, meshserve_up


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = write_example_repository(tmp_path_factory.mktemp("seq") / "models", ["adder_fixed"])
    write_accumulator(repository)
    with meshserve_up(repository, 2) as running:
        yield running


def x(value: int) -> list[Any]:
    inp = tc.InferInput("x", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[value]], np.int64))
    return [inp]


def test_sync_sequences_with_integer_and_string_ids(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    config = client.get_model_config("accumulator").config
    assert config.sequence_batching.state[0].input_name == "state_in"
    sums: dict[Any, list[int]] = {1001: [], "alpha": []}
    for i, value in enumerate([1, 2, 3]):
        for sequence_id in sums:
            result = client.infer(
                "accumulator", x(value), sequence_id=sequence_id, sequence_start=i == 0, sequence_end=i == 2
            )
            sums[sequence_id].append(int(result.as_numpy("sum")[0, 0]))
    assert sums == {1001: [1, 3, 6], "alpha": [1, 3, 6]}
    with pytest.raises(InferenceServerException, match="not live") as ended:
        client.infer("accumulator", x(1), sequence_id=1001)
    assert ended.value.status() == "StatusCode.INVALID_ARGUMENT"
    a = tc.InferInput("a", [1, 4], "INT64")
    a.set_data_from_numpy(np.ones((1, 4), np.int64))
    b = tc.InferInput("b", [1, 4], "INT64")
    b.set_data_from_numpy(np.ones((1, 4), np.int64))
    with pytest.raises(InferenceServerException, match="has no sequence: section") as stateless:
        client.infer("adder_fixed", [a, b], sequence_id=7, sequence_start=True)
    assert stateless.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_asyncio_sequence(mesh: RunningMesh) -> None:
    async def run() -> list[int]:
        async with tc_aio.InferenceServerClient(mesh.address) as client:
            sums = []
            for i, value in enumerate([5, 6]):
                result = await client.infer(
                    "accumulator", x(value), sequence_id=2002, sequence_start=i == 0, sequence_end=i == 1
                )
                sums.append(int(result.as_numpy("sum")[0, 0]))
            return sums

    assert asyncio.run(run()) == [5, 11]


def test_stream_sequence(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    try:
        sums = []
        for i, value in enumerate([7, 8, 9]):
            client.async_stream_infer(
                "accumulator", x(value), sequence_id=3003, sequence_start=i == 0, sequence_end=i == 2
            )
            answer = answers.get(timeout=20)
            assert not isinstance(answer, InferenceServerException), answer
            sums.append(int(answer.as_numpy("sum")[0, 0]))
    finally:
        client.stop_stream()
    assert sums == [7, 15, 24]
