"""The response cache as tritonclient meets it: `meshserve up` on a model with
`response_cache: true`; the same request twice, sync and asyncio, answers the same
bytes, the second marked cached; another input is computed afresh."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from meshserve.devkit.examples import write_example_repository
from tests.compat.test_tritonclient import RunningMesh, meshserve_up


@pytest.fixture(scope="module")
def cache_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = write_example_repository(tmp_path_factory.mktemp("cache") / "models", ["mlp"])
    (repository / "mlp" / "config.yaml").write_text("response_cache: true\n")
    with meshserve_up(repository, 1) as running:
        yield running


def _features(seed: int) -> tc.InferInput:
    features = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float32)
    inp = tc.InferInput("features", list(features.shape), "FP32")
    inp.set_data_from_numpy(features)
    return inp


def _cached(result: tc.InferResult) -> bool:
    parameters = result.get_response().parameters
    return "cached" in parameters and parameters["cached"].bool_param


def test_the_same_request_twice_is_answered_from_the_cache(cache_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(cache_mesh.address)
    first = client.infer("mlp", [_features(5)], request_id="a")
    # the store runs beside the answer: ask until it is in (bounded; each miss is a real answer too)
    for _ in range(50):
        second = client.infer("mlp", [_features(5)], request_id="b")
        if _cached(second):
            break
    assert not _cached(first)
    assert _cached(second)
    assert second.get_response().id == "b"
    np.testing.assert_array_equal(second.as_numpy("probabilities"), first.as_numpy("probabilities"))
    assert not _cached(client.infer("mlp", [_features(6)]))  # other bytes: computed


async def test_the_asyncio_client_gets_cached_answers_too(cache_mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(cache_mesh.address)
    try:
        first = await client.infer("mlp", [_features(7)])
        for _ in range(50):
            again = await client.infer("mlp", [_features(7)])
            if _cached(again):
                break
        assert _cached(again)
        np.testing.assert_array_equal(again.as_numpy("probabilities"), first.as_numpy("probabilities"))
    finally:
        await client.close()
