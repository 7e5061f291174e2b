"""Python models as tritonclient calls them (sync and asyncio): `meshserve up
--allow-python-models` in a subprocess (see test_tritonclient.py for why), serving the
normalize example and a model that raises on request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import write_example_repository, write_python_examples
from tests.compat.test_tritonclient import RunningMesh, meshserve_up
from tests.python_models import write_doubler


@pytest.fixture(scope="module")
def python_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = write_example_repository(tmp_path_factory.mktemp("python"), ["cnn"])  # "classify"'s second step
    write_python_examples(repository, allowed=True)
    write_doubler(repository)
    with meshserve_up(repository, 4, ("--allow-python-models",)) as running:  # cnn, classify, doubler, normalize
        yield running


def _image_input(module: object) -> object:
    image = np.full((1, 2, 3, 3), 51, np.uint8)
    inp = module.InferInput("image", list(image.shape), "UINT8")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(image)
    return inp


def test_sync_infer_and_an_exception_named_by_type(python_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(python_mesh.address)
    assert client.is_model_ready("normalize")
    metadata = client.get_model_metadata("normalize", as_json=True)
    assert metadata["inputs"][0]["datatype"] == "UINT8"
    result = client.infer("normalize", [_image_input(tc)])
    pixels = result.as_numpy("pixels")
    assert pixels.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(pixels, 0.2, rtol=1e-6)
    bad = tc.InferInput("x", [1, 4], "INT32")
    bad.set_data_from_numpy(np.array([[-1, 0, 0, 0]], np.int32))
    with pytest.raises(InferenceServerException) as failed:
        client.infer("doubler", [bad])
    assert failed.value.status() == "StatusCode.INTERNAL"
    assert "ValueError" in (failed.value.message() or "")


def test_asyncio_infer(python_mesh: RunningMesh) -> None:
    async def call() -> np.ndarray:
        async with tc_aio.InferenceServerClient(python_mesh.address) as client:
            result = await client.infer("normalize", [_image_input(tc_aio)])
            return result.as_numpy("pixels")

    pixels = asyncio.run(call())
    np.testing.assert_allclose(pixels, 0.2, rtol=1e-6)


def test_the_example_pipeline_runs_a_python_step_then_an_onnx_model(python_mesh: RunningMesh) -> None:
    """ "classify": the Python "normalize" on the CPU, then the ONNX "cnn", in one call."""
    client = tc.InferenceServerClient(python_mesh.address)
    images = np.random.default_rng(8).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    inp = tc.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    result = client.infer("classify", [inp])
    cnn = ort.InferenceSession(
        str(python_mesh.repository / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (want,) = cnn.run(["logits"], {"image": images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)})
    np.testing.assert_allclose(result.as_numpy("LOGITS"), want, rtol=1e-5, atol=1e-5)
