"""The repository API as tritonclient calls it (sync and asyncio): index, load with a
config override and files sent in the request, unload; `meshserve up` in explicit
control mode, in a subprocess (see test_tritonclient.py for why)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import write_example_repository
from tests.compat.test_tritonclient import RunningMesh, meshserve_up


@pytest.fixture(scope="module")
def explicit_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """mlp loaded at start; "extra" (a copy of it) in the repository, not loaded."""
    repository = write_example_repository(tmp_path_factory.mktemp("explicit"), ["mlp"])
    shutil.copytree(repository / "mlp", repository / "extra")
    with meshserve_up(repository, 1, ("--model-control-mode", "explicit", "--load-model", "mlp")) as running:
        yield running


def _infer(client: tc.InferenceServerClient, model: str) -> np.ndarray:
    inp = tc.InferInput("features", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    result = client.infer(model, [inp])
    return result.as_numpy("logits")


def _states(index: dict[str, object]) -> dict[tuple[str, str], str]:
    models = index.get("models", [])
    assert isinstance(models, list)
    return {(m["name"], m.get("version", "")): m.get("state", "") for m in models}


def test_sync_index_load_and_unload(explicit_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(explicit_mesh.address)
    states = _states(client.get_model_repository_index(as_json=True))
    assert states == {("mlp", "1"): "READY", ("extra", ""): "UNAVAILABLE"}
    client.load_model("extra")  # returns once READY, as Triton's
    assert client.is_model_ready("extra")
    assert _infer(client, "extra").shape == (1, 10)
    config = json.dumps({"max_batch_size": 4, "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}]})
    client.load_model("extra", config=config)  # a reload with Triton's JSON config
    assert client.get_model_config("extra", as_json=True)["config"]["max_batch_size"] == 4
    model = (explicit_mesh.repository / "mlp" / "1" / "model.onnx").read_bytes()
    client.load_model("sent", config=json.dumps({"max_batch_size": 2}), files={"file:1/model.onnx": model})
    assert _infer(client, "sent").shape == (1, 10)
    client.unload_model("sent")
    client.unload_model("extra")
    states = _states(client.get_model_repository_index(as_json=True))
    assert states[("extra", "1")] == "UNAVAILABLE"
    assert states[("sent", "1")] == "UNAVAILABLE"
    assert client.is_model_ready("mlp")  # the other model served throughout
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("extra", config=json.dumps({"optimization": {}}))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "optimization" in (refused.value.message() or "")
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("nosuch")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


async def test_asyncio_index_load_and_unload(explicit_mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(explicit_mesh.address)
    try:
        await client.load_model("extra")
        assert await client.is_model_ready("extra")
        index = await client.get_model_repository_index(as_json=True)
        assert _states(index)[("extra", "1")] == "READY"
        await client.unload_model("extra")
        index = await client.get_model_repository_index(as_json=True)
        entry = next(m for m in index["models"] if m["name"] == "extra")
        assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
        with pytest.raises(InferenceServerException) as gone:
            await client.is_model_ready("extra")
        assert gone.value.status() == "StatusCode.NOT_FOUND"
    finally:
        await client.close()
