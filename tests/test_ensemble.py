"""Ensembles: the section's validation against the models, and a preprocessing model
followed by a classifier run through the mesh's queues as one call, equal to running
both in process; a failure in step 2 names the step."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from gateway.ensemble import ensemble_inputs, run_ensemble
from gateway.routing import RoutingView
from meshserve.devkit.examples import write_example_repository
from meshserve.errors import InvalidArgument, NotFound, Unavailable
from meshserve.models.ensemble import EnsembleError, parse_ensemble, read_ensemble_dir, validate_ensemble
from meshserve.models.repository import ModelInfo, RepositoryError, RepositoryScan, TensorInfo, scan_model_dir
from meshserve.tenancy.tenants import hash_key
from meshserve.wire.codec import to_infer_response
from protos import grpc_service_pb2 as pb
from router.core import RouterCore
from router.lifecycle import EXPLICIT, RepositoryManager
from tests.ensemble_models import CHAIN, write_ensemble, write_prep
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh


def info(name: str, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> ModelInfo:
    return ModelInfo(name, 1, Path(name), tuple(inputs), tuple(outputs), 32, 0, (), 0)


MODELS = {
    "prep": info("prep", [TensorInfo("raw", "FP32", (-1, 64))], [TensorInfo("features", "FP32", (-1, 64))]),
    "mlp": info("mlp", [TensorInfo("features", "FP32", (-1, 64))], [TensorInfo("probabilities", "FP32", (-1, 10))]),
    "ints": info("ints", [TensorInfo("features", "INT64", (-1, 64))], [TensorInfo("y", "INT64", (-1, 64))]),
    "wide": info("wide", [TensorInfo("features", "FP32", (-1, 128))], [TensorInfo("y", "FP32", (-1, 128))]),
}


def lookup(name: str, version: int) -> ModelInfo | None:
    model = MODELS.get(name)
    return model if model is not None and version in (0, model.version) else None


def with_step2(model: str, **changes: object) -> dict[str, object]:
    step = {**CHAIN["steps"][1], "model": model, **changes}  # type: ignore[dict-item]
    return {"steps": [CHAIN["steps"][0], step], "outputs": CHAIN["outputs"]}


def test_a_valid_chain_shows_its_outer_inputs_and_outputs() -> None:
    ensemble = validate_ensemble("pipe", 1, parse_ensemble(CHAIN, Path("config.yaml")), lookup)
    assert ensemble.inputs == (TensorInfo("RAW", "FP32", (-1, 64)),)
    assert ensemble.outputs == (TensorInfo("PROBS", "FP32", (-1, 10)),)
    assert [(s.model, s.version) for s in ensemble.steps] == [("prep", 1), ("mlp", 1)]


@pytest.mark.parametrize(
    ("section", "reason"),
    [
        (with_step2("nope"), "step 2 (model 'nope'): unknown model 'nope'"),
        (with_step2("mlp", version=3), "unknown version 3 of model 'mlp'"),
        (with_step2("ints"), "tensor 'FEATURES' is FP32, the model's input wants INT64"),
        (with_step2("wide"), "tensor 'FEATURES' has shape [-1, 64], the model's input wants [-1, 128]"),
        (with_step2("mlp", input_map={"other": "FEATURES"}), "input 'features' is not in its input_map"),
        (with_step2("mlp", output_map={"logits": "PROBS"}), "'logits' is not an output of the model"),
        (with_step2("mlp", output_map={"probabilities": "FEATURES"}), "tensor 'FEATURES' is written twice"),
        ({**CHAIN, "outputs": ["GONE"]}, "output 'GONE' is written by no step"),
    ],
)
def test_an_invalid_chain_says_why(section: dict[str, object], reason: str) -> None:
    with pytest.raises(EnsembleError) as invalid:
        validate_ensemble("pipe", 1, parse_ensemble(section, Path("config.yaml")), lookup)
    assert reason in str(invalid.value)


@pytest.mark.parametrize(
    "section",
    [[], {"steps": []}, {"steps": [{"model": "m"}], "outputs": ["x"]}, {**CHAIN, "outputs": []}, {**CHAIN, "x": 1}],
)
def test_a_malformed_section_names_the_file(section: object) -> None:
    with pytest.raises(RepositoryError, match=r"config\.yaml"):
        parse_ensemble(section, Path("config.yaml"))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
async def pipe_mesh(
    redis: Redis, redis_url: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[Mesh]:
    """mlp and prep, the ensemble "pipe" (prep then mlp), and "broken" (its step 2
    names a model there is not)."""
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    write_prep(repository)
    write_ensemble(repository, "pipe", CHAIN)
    write_ensemble(repository, "broken", with_step2("nope"))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = await start_mesh(
        redis_url, repository, tracer=provider.get_tracer("ensemble-tests"), until=pipe_ready_and_settled
    )
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_the_chain_runs_through_the_queues_as_one_call(pipe_mesh: Mesh) -> None:
    gateway = pipe_mesh.gateway.gateway

    def served(name: str, version: int) -> ModelInfo | None:
        try:
            return gateway.resolve(name, str(version or ""))
        except NotFound:
            return None

    ensemble = validate_ensemble("pipe", 1, parse_ensemble(CHAIN, Path("config.yaml")), served)
    raw = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    request = infer_request("pipe", {"RAW": raw}, request_id="p-1")
    tenant = gateway.tenants.authenticate(None)
    assert tenant is not None
    deadline_ms = time.time() * 1000 + 20_000
    reply, data = await run_ensemble(
        gateway, ensemble, ensemble_inputs(ensemble, request), deadline_ms=deadline_ms, tenant=tenant, request_id="p-1"
    )
    got = output_arrays(to_infer_response(reply, "pipe", "p-1", data))
    assert list(got) == ["PROBS"]
    repository = pipe_mesh.router.settings.model_repository
    prep = ort.InferenceSession(str(repository / "prep" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    mlp = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (features,) = prep.run(None, {"raw": raw})
    want = mlp.run(["probabilities"], {"features": features})[0]
    np.testing.assert_allclose(got["PROBS"], want, rtol=1e-5, atol=1e-6)
    # step 2 refuses a batch of 40 (mlp takes 32 at most; prep 64): the error names it
    too_many = infer_request("pipe", {"RAW": np.ones((40, 64), np.float32)})
    with pytest.raises(InvalidArgument) as failed:
        await run_ensemble(
            gateway, ensemble, ensemble_inputs(ensemble, too_many), deadline_ms=deadline_ms, tenant=tenant
        )
    assert "ensemble 'pipe' step 2 (model 'mlp')" in failed.value.message


def pipe_ready_and_settled(view: RoutingView) -> bool:
    return ("pipe", 1) in view.ready and view.settled()


def in_process(repository: Path, raw: np.ndarray) -> np.ndarray:
    """prep then mlp, run here with ONNX Runtime."""
    cpu = ["CPUExecutionProvider"]
    prep = ort.InferenceSession(str(repository / "prep" / "1" / "model.onnx"), providers=cpu)
    mlp = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"), providers=cpu)
    (features,) = prep.run(None, {"raw": raw})
    return np.asarray(mlp.run(["probabilities"], {"features": features})[0])


async def test_one_model_infer_runs_the_ensemble(pipe_mesh: Mesh, exporter: InMemorySpanExporter) -> None:
    raw = np.random.default_rng(11).standard_normal((2, 64)).astype(np.float32)
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        response = await infer_stub(channel).ModelInfer(infer_request("pipe", {"RAW": raw}, request_id="e-1"))
    got = output_arrays(response)
    assert list(got) == ["PROBS"]  # FEATURES, the tensor between the steps, stays in the mesh
    assert (response.model_name, response.model_version, response.id) == ("pipe", "1", "e-1")
    want = in_process(pipe_mesh.router.settings.model_repository, raw)
    np.testing.assert_allclose(got["PROBS"], want, rtol=1e-5, atol=1e-6)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"ensemble step 1", "ensemble step 2", "ModelInfer"} <= set(spans)
    call = spans["ModelInfer"].context
    assert spans["ensemble step 2"].attributes is not None
    assert spans["ensemble step 2"].attributes["meshserve.model"] == "mlp"
    assert spans["ensemble step 1"].parent is not None
    assert spans["ensemble step 1"].parent.span_id == call.span_id


async def test_a_failure_in_step_2_names_the_step(pipe_mesh: Mesh) -> None:
    # mlp takes batches of 32 at most, prep of 64: step 1 runs, step 2 refuses
    too_many = infer_request("pipe", {"RAW": np.ones((40, 64), np.float32)})
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await infer_stub(channel).ModelInfer(too_many)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ensemble 'pipe' step 2 (model 'mlp')" in (failed.value.details() or "")


async def test_an_ensemble_naming_an_unknown_model_is_unavailable_with_the_reason(pipe_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        stub = infer_stub(channel)
        ready = await stub.ModelReady(pb.ModelReadyRequest(name="broken"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ModelInfer(infer_request("broken", {"RAW": np.ones((1, 64), np.float32)}))
        index = await pipe_mesh.router.repository.index()
        served = await stub.ModelInfer(infer_request("mlp", {"features": np.ones((1, 64), np.float32)}))
    assert not ready.ready
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "step 2 (model 'nope'): unknown model 'nope'" in (failed.value.details() or "")
    states = {(entry.name, entry.version): (entry.state, entry.reason) for entry in index}
    assert states["broken", 1][0] == "UNAVAILABLE"
    assert "unknown model 'nope'" in states["broken", 1][1]
    assert states["pipe", 1] == ("READY", "")
    assert output_arrays(served)["probabilities"].shape == (1, 10)


async def test_metadata_and_config_show_the_outer_tensors(pipe_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        stub = infer_stub(channel)
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="pipe"))
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="pipe"))).config
    assert metadata.platform == "ensemble"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("RAW", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("PROBS", "FP32", [-1, 10])]
    assert (config.platform, config.backend) == ("ensemble", "")
    assert [i.name for i in config.input] == ["RAW"]
    assert [o.name for o in config.output] == ["PROBS"]


def test_the_scan_leaves_an_ensemble_directory_to_the_ensemble_reader(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    write_ensemble(repository, "pipe", CHAIN)
    (repository / "pipe" / "2").mkdir()  # Triton's layout: an empty version directory
    write_ensemble(repository, "odd", {"steps": []})
    assert scan_model_dir(repository / "pipe") == RepositoryScan([], [], {})
    found = read_ensemble_dir(repository / "pipe")
    assert found is not None
    assert found.versions == (2,)
    assert found.problem == ""
    odd = read_ensemble_dir(repository / "odd")
    assert odd is not None
    assert odd.config is None
    assert "'ensemble.steps' must be a non-empty list" in odd.problem
    assert read_ensemble_dir(tmp_path) is None  # no config.yaml: not an ensemble


async def test_explicit_load_checks_an_ensemble_and_unload_dependents_unloads_it(tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    write_prep(repository)
    write_ensemble(repository, "pipe", CHAIN)
    write_ensemble(repository, "broken", with_step2("nope"))
    manager = RepositoryManager(repository, mode=EXPLICIT, load=("prep", "mlp", "pipe"))
    core = RouterCore(manager.table_models(), unservable=manager.unservable(), ensembles=manager.ensembles())
    manager.bind(core)

    async def pipe() -> tuple[str, str]:
        (entry,) = [(e.state, e.reason) for e in await manager.index() if e.name == "pipe"]
        return entry

    assert (await pipe())[0] == "LOADING"  # valid, its steps' models not on a worker yet
    with pytest.raises(Unavailable, match=r"load failed for model 'broken': version 1: .*unknown model 'nope'"):
        await manager.load("broken")
    await manager.unload("mlp")  # the ensemble stays, and cannot run without its step
    state, reason = await pipe()
    assert state == "UNAVAILABLE"
    assert "step 2 (model 'mlp'): unknown model 'mlp'" in reason
    await manager.unload("prep", dependents=True)
    assert await pipe() == ("UNAVAILABLE", "unloaded")
    assert ("pipe", 1) not in {(m.name, m.version) for m in core.snapshot().models}


TENANTS = f"""
tenants:
  - name: everything
    api_keys: ["{hash_key("all-key")}"]
    models: ["*"]
  - name: no_prep
    api_keys: ["{hash_key("no-prep-key")}"]
    models: ["pipe", "mlp"]
  - name: steps_only
    api_keys: ["{hash_key("steps-key")}"]
    models: ["prep", "mlp"]
"""


async def test_a_tenant_needs_the_ensemble_and_every_step_allowed(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    write_prep(repository)
    write_ensemble(repository, "pipe", CHAIN)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    mesh = await start_mesh(redis_url, repository, tenants_path=tenants)
    request = infer_request("pipe", {"RAW": np.ones((1, 64), np.float32)})
    codes = {}
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            served = await stub.ModelInfer(request, metadata=(("authorization", "Bearer all-key"),))
            for key in ("no-prep-key", "steps-key"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelInfer(request, metadata=(("authorization", f"Bearer {key}"),))
                codes[key] = (refused.value.code(), refused.value.details() or "")
    finally:
        await stop_mesh(mesh)
    assert output_arrays(served)["PROBS"].shape == (1, 10)
    assert codes["no-prep-key"][0] == grpc.StatusCode.PERMISSION_DENIED
    assert "ensemble 'pipe' step 1 (model 'prep')" in codes["no-prep-key"][1]
    assert codes["steps-key"][0] == grpc.StatusCode.PERMISSION_DENIED
    assert "model 'pipe' is not available" in codes["steps-key"][1]


async def test_requested_outputs_are_the_ensembles_own(pipe_mesh: Mesh) -> None:
    raw = np.ones((1, 64), np.float32)
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        stub = infer_stub(channel)
        named = await stub.ModelInfer(infer_request("pipe", {"RAW": raw}, outputs=["PROBS"]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(infer_request("pipe", {"RAW": raw}, outputs=["FEATURES"]))
    assert list(output_arrays(named)) == ["PROBS"]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested output 'FEATURES': not an output of ensemble 'pipe'" in (refused.value.details() or "")


async def test_class_count_on_an_ensemble_output_is_refused_not_ignored(pipe_mesh: Mesh) -> None:
    """Triton's classification extension is the step's model's: on an ensemble's output
    it is refused naming the output, never answered with the scores."""
    request = infer_request("pipe", {"RAW": np.ones((1, 64), np.float32)})
    request.outputs.add(name="PROBS").parameters["classification"].int64_param = 3
    async with grpc.aio.insecure_channel(pipe_mesh.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer_stub(channel).ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested output 'PROBS': classification (class_count)" in (refused.value.details() or "")
    assert "ensemble 'pipe'" in (refused.value.details() or "")


def explicit_ready(view: RoutingView) -> bool:
    return ("pipe", 1) in view.ready


async def test_unload_dependents_through_the_gateway(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    write_prep(repository)
    write_ensemble(repository, "pipe", CHAIN)
    router = {"model_control_mode": "explicit", "load_model": ("prep", "mlp", "pipe")}
    mesh = await start_mesh(redis_url, repository, router_overrides=router, until=explicit_ready)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            dependents = {"unload_dependents": pb.ModelRepositoryParameter(bool_param=True)}
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="prep", parameters=dependents))
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.ModelInfer(infer_request("pipe", {"RAW": np.ones((1, 64), np.float32)}))
    finally:
        await stop_mesh(mesh)
    states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    assert states["pipe", "1"] == ("UNAVAILABLE", "unloaded")
    assert states["prep", "1"] == ("UNAVAILABLE", "unloaded")
    assert states["mlp", "1"] == ("READY", "")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
