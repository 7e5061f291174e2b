"""An ensemble as tritonclient meets it: `meshserve up` on a preprocessing model, a
classifier and the ensemble chaining them; one infer call, its metadata, and a
failure in step 2 naming the step."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import write_example_repository
from tests.compat.test_tritonclient import RunningMesh, meshserve_up
from tests.ensemble_models import CHAIN, write_ensemble, write_prep


@pytest.fixture(scope="module")
def ensemble_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    repository = write_example_repository(tmp_path_factory.mktemp("ensemble") / "models", ["mlp"])
    write_prep(repository)
    write_ensemble(repository, "pipe", CHAIN)
    with meshserve_up(repository, 3) as running:  # mlp, prep, pipe
        yield running


def test_one_infer_call_runs_the_ensemble(ensemble_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(ensemble_mesh.address)
    assert client.is_model_ready("pipe")
    meta = client.get_model_metadata("pipe", as_json=True)
    assert meta["platform"] == "ensemble"
    assert meta["inputs"] == [{"name": "RAW", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "PROBS", "datatype": "FP32", "shape": ["-1", "10"]}]
    raw = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    inp = tc.InferInput("RAW", list(raw.shape), "FP32")
    inp.set_data_from_numpy(raw)
    result = client.infer("pipe", [inp], request_id="e-7")
    assert result.get_response().id == "e-7"
    assert [out.name for out in result.get_response().outputs] == ["PROBS"]
    cpu = ["CPUExecutionProvider"]
    models = ensemble_mesh.repository
    (features,) = ort.InferenceSession(str(models / "prep" / "1" / "model.onnx"), providers=cpu).run(None, {"raw": raw})
    mlp = ort.InferenceSession(str(models / "mlp" / "1" / "model.onnx"), providers=cpu)
    want = mlp.run(["probabilities"], {"features": features})[0]
    np.testing.assert_allclose(result.as_numpy("PROBS"), want, rtol=1e-5, atol=1e-6)


def test_a_failure_in_step_2_reaches_the_client_naming_it(ensemble_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(ensemble_mesh.address)
    inp = tc.InferInput("RAW", [40, 64], "FP32")  # prep takes 64 rows, mlp 32
    inp.set_data_from_numpy(np.ones((40, 64), np.float32))
    with pytest.raises(InferenceServerException) as failed:
        client.infer("pipe", [inp])
    assert failed.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ensemble 'pipe' step 2 (model 'mlp')" in (failed.value.message() or "")
