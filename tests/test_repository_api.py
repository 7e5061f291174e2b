"""The repository API and control modes (router/lifecycle.py) through a real mesh:
RepositoryIndex states and reasons, explicit load and draining unload, poll mode,
tenant rights, Triton's config override and model files sent in the request."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.routing import RoutingView
from meshserve.devkit.examples import write_example_repository
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

BROKEN_CONFIG = "model_warmup: []\n"  # Triton's key, not ours: the config is refused


def mlp_request(model: str = "mlp", version: str = "") -> pb.ModelInferRequest:
    return infer_request(model, {"features": np.ones((1, 64), np.float32)}, version=version)


def _repository(tmp_path: Path, *, extra: tuple[str, ...] = (), broken: bool = False) -> Path:
    """mlp, copies of it under the ``extra`` names, and maybe a model with a bad config."""
    root = write_example_repository(tmp_path / "models", ["mlp"])
    for name in extra:
        shutil.copytree(root / "mlp", root / name)
    if broken:
        shutil.copytree(root / "mlp", root / "broken")
        (root / "broken" / "config.yaml").write_text(BROKEN_CONFIG)
    return root


async def _mesh(redis_url: str, repository: Path, until: Callable[[RoutingView], bool], **router: Any) -> Mesh:
    tenants = router.pop("tenants_path", None)
    extra = {"tenants_path": tenants} if tenants else {}
    return await start_mesh(redis_url, repository, router_overrides=router, until=until, **extra)


def _settled_or_empty(view: RoutingView) -> bool:
    return view.generation >= 0 and (not view.models or view.settled())


async def _wait(mesh: Mesh, predicate: Callable[[RoutingView], bool]) -> None:
    async with asyncio.timeout(20):
        await mesh.gateway.routing.wait_for(predicate)


def _index(response: pb.RepositoryIndexResponse) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in response.models}


def _load(name: str, config: dict[str, Any] | None = None, **files: bytes) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        request.parameters["config"].string_param = json.dumps(config)
    for path, data in files.items():
        request.parameters[f"file:{path.replace('_', '/', 1)}"].bytes_param = data
    return request


@pytest.fixture
async def channel_for() -> AsyncIterator[Callable[[Mesh], pb_grpc.GRPCInferenceServiceStub]]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(mesh: Mesh) -> pb_grpc.GRPCInferenceServiceStub:
        channels.append(grpc.aio.insecure_channel(mesh.address))
        return infer_stub(channels[-1])

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.mark.timeout(60)
async def test_index_lists_states_and_reasons_and_mode_none_refuses_changes(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    mesh = await _mesh(redis_url, _repository(tmp_path, broken=True), RoutingView.settled)
    try:
        stub = channel_for(mesh)
        index = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index[("mlp", "1")] == ("READY", "")
        state, reason = index[("broken", "1")]
        assert state == "UNAVAILABLE"
        assert "model_warmup" in reason
        ready = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)))
        assert set(ready) == {("mlp", "1")}
        table = await mesh.router.core.watch().__anext__()
        assert table.state(("mlp", 1)) == "READY"
        assert table.state(("broken", 1)) == "UNAVAILABLE"
        for call in (
            stub.RepositoryModelLoad(_load("mlp")),
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "--model-control-mode is none" in (refused.value.details() or "")
        metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert "model_repository" in metadata.extensions
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_explicit_load_serves_and_unload_drains_what_is_queued(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    repository = _repository(tmp_path, extra=("extra",), broken=True)
    mesh = await _mesh(redis_url, repository, RoutingView.all_ready, model_control_mode="explicit", load_model=("mlp",))
    try:
        stub = channel_for(mesh)
        index = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index == {
            ("mlp", "1"): ("READY", ""),
            ("extra", ""): ("UNAVAILABLE", "not loaded"),
            ("broken", ""): ("UNAVAILABLE", "not loaded"),
        }
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.RepositoryModelLoad(_load("broken"))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "load failed for model 'broken': version 1:" in (failed.value.details() or "")
        assert "model_warmup" in (failed.value.details() or "")
        state, reason = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[("broken", "1")]
        assert state == "UNAVAILABLE"
        assert "model_warmup" in reason
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.RepositoryModelLoad(_load("nosuch"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nosuch" in (unknown.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as bad_name:
            await stub.RepositoryModelLoad(_load("../mlp"))
        assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        await stub.RepositoryModelLoad(_load("extra"))  # as Triton's: answers once the model is READY
        assert ("extra", 1) in mesh.gateway.routing.view.ready
        assert (await stub.ModelInfer(mlp_request("extra"))).model_name == "extra"

        # unload while three requests wait in the queue: they complete, new ones are refused
        worker = mesh.workers[0]
        await hold_serving(worker)
        queued = [asyncio.ensure_future(stub.ModelInfer(mlp_request("extra"))) for _ in range(3)]
        await wait_queued(redis, "extra", 3)
        unloading = asyncio.ensure_future(
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="extra"))
        )
        await _wait(mesh, lambda view: ("extra", 1) in view.unloading)
        state = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[("extra", "1")]
        assert state == ("UNLOADING", "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(mlp_request("extra"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "UNLOADING" in (refused.value.details() or "")
        assert not unloading.done()
        release_serving(worker)
        answers = await asyncio.gather(*queued)
        assert [a.model_name for a in answers] == ["extra"] * 3
        await unloading
        assert ("extra", 1) not in mesh.gateway.routing.view.models
        assert _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[("extra", "1")] == (
            "UNAVAILABLE",
            "unloaded",
        )
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.ModelInfer(mlp_request("extra"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.ModelInfer(mlp_request())).model_name == "mlp"  # the other model never paused
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_explicit_mode_with_no_model_named_loads_nothing(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    mesh = await _mesh(redis_url, _repository(tmp_path), _settled_or_empty, model_control_mode="explicit")
    try:
        assert mesh.router.core.models == {}
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_poll_mode_picks_up_a_new_version_and_deletions(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    repository = _repository(tmp_path, extra=("extra",))
    mesh = await _mesh(redis_url, repository, RoutingView.all_ready, model_control_mode="poll", repository_poll_s=0.1)
    try:
        stub = channel_for(mesh)
        shutil.copytree(repository / "mlp" / "1", repository / "mlp" / "2")
        await _wait(mesh, lambda view: ("mlp", 2) in view.ready)
        assert (await stub.ModelInfer(mlp_request(version="2"))).model_version == "2"
        shutil.rmtree(repository / "mlp" / "1")
        await _wait(mesh, lambda view: ("mlp", 1) not in view.models)
        shutil.rmtree(repository / "extra")
        await _wait(mesh, lambda view: "extra" not in view.latest)
        index = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index[("mlp", "1")] == ("UNAVAILABLE", "unloaded")
        assert index[("extra", "1")] == ("UNAVAILABLE", "unloaded")
        assert index[("mlp", "2")] == ("READY", "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelLoad(_load("mlp"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "polling is enabled" in (refused.value.details() or "")
        # a changed config.yaml is a reload: the new batch size reaches the gateway
        (repository / "mlp" / "config.yaml").write_text("max_batch_size: 4\n")
        await _wait(mesh, lambda view: ("mlp", 2) in view.ready and view.models[("mlp", 2)].max_batch_size == 4)
        # a config that no longer reads leaves the version serving, as Triton's failed reload
        (repository / "mlp" / "config.yaml").write_text("max_batch_size: [\n")
        await mesh.router.repository.rescan()
        assert _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[("mlp", "2")] == ("READY", "")
        assert (await stub.ModelInfer(mlp_request(version="2"))).model_version == "2"
    finally:
        await stop_mesh(mesh)


TENANTS = f"""
tenants:
  - name: ops
    api_keys: ["{hash_key("ops-key")}"]
    models: ["*"]
    admin: true
  - name: narrow
    api_keys: ["{hash_key("narrow-key")}"]
    models: ["mlp"]
"""


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.mark.timeout(60)
async def test_only_an_admin_tenant_loads_and_the_index_is_filtered(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    repository = _repository(tmp_path, extra=("extra",))
    mesh = await _mesh(
        redis_url,
        repository,
        RoutingView.all_ready,
        model_control_mode="explicit",
        load_model=("mlp",),
        tenants_path=tenants,
    )
    try:
        stub = channel_for(mesh)
        for call in (
            stub.RepositoryModelLoad(_load("extra"), metadata=auth("narrow-key")),
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"), metadata=auth("narrow-key")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "admin: true" in (denied.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.RepositoryModelLoad(_load("extra"), metadata=auth("ops-key"))
        await _wait(mesh, lambda view: ("extra", 1) in view.ready)
        seen_by_ops = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=auth("ops-key")))
        assert set(seen_by_ops) == {("mlp", "1"), ("extra", "1")}
        seen_by_narrow = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=auth("narrow-key")))
        assert set(seen_by_narrow) == {("mlp", "1")}
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_a_config_override_reloads_and_a_bad_one_is_refused(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    repository = _repository(tmp_path)
    before = (repository / "mlp" / "1" / "model.onnx").read_bytes()
    mesh = await _mesh(redis_url, repository, RoutingView.all_ready, model_control_mode="explicit", load_model=("mlp",))
    try:
        stub = channel_for(mesh)
        override = {
            "name": "mlp",
            "backend": "onnxruntime",
            "max_batch_size": 4,
            "dynamic_batching": {"max_queue_delay_microseconds": "500", "preferred_batch_size": [2, 4]},
            "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}],
        }
        await stub.RepositoryModelLoad(_load("mlp", override))
        await _wait(mesh, lambda view: ("mlp", 1) in view.ready and view.models[("mlp", 1)].max_batch_size == 4)
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
        assert config.max_batch_size == 4
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
        assert (await stub.ModelInfer(mlp_request())).model_name == "mlp"
        assert not (repository / "mlp" / "config.yaml").exists()  # the repository's own files untouched
        assert (repository / "mlp" / "1" / "model.onnx").read_bytes() == before
        refusals = {
            "'optimization'": {"optimization": {}},
            "input 'nosuch'": {"input": [{"name": "nosuch", "data_type": "TYPE_FP32", "dims": [64]}]},
            "data_type FP16": {"input": [{"name": "features", "data_type": "TYPE_FP16"}]},
            "'max_batch_size'": {"max_batch_size": "many"},
            "not valid JSON": None,
        }
        for expected, bad in refusals.items():
            request = _load("mlp", bad)
            if bad is None:
                request.parameters["config"].string_param = "{not json"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RepositoryModelLoad(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
            assert expected in (refused.value.details() or ""), refused.value.details()
        assert mesh.gateway.routing.view.models[("mlp", 1)].max_batch_size == 4  # the refusals changed nothing
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_model_files_sent_in_the_request_are_validated_and_served(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    repository = _repository(tmp_path)
    model = (repository / "mlp" / "1" / "model.onnx").read_bytes()
    mesh = await _mesh(
        redis_url,
        repository,
        RoutingView.all_ready,
        model_control_mode="explicit",
        load_model=("mlp",),
        max_upload_bytes=len(model) + 100,
    )
    try:
        stub = channel_for(mesh)
        refusals = [
            (grpc.StatusCode.INVALID_ARGUMENT, "not a readable ONNX model", {"1_model.onnx": b"not onnx"}),
            (grpc.StatusCode.INVALID_ARGUMENT, "file:<version>/<file name>", {"1_../model.onnx": model}),
            (grpc.StatusCode.INVALID_ARGUMENT, "file:<version>/<file name>", {"0_model.onnx": model}),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-upload-bytes", {"1_model.onnx": model, "2_model.onnx": model}),
        ]
        for code, expected, files in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RepositoryModelLoad(_load("uploaded", {"max_batch_size": 8}, **files))
            assert refused.value.code() == code, refused.value.details()
            assert expected in (refused.value.details() or "")
        assert ("uploaded", 1) not in mesh.gateway.routing.view.models
        await stub.RepositoryModelLoad(_load("uploaded", {"max_batch_size": 8}, **{"1_model.onnx": model}))
        await _wait(mesh, lambda view: ("uploaded", 1) in view.ready)
        assert mesh.gateway.routing.view.models[("uploaded", 1)].max_batch_size == 8
        assert (await stub.ModelInfer(mlp_request("uploaded"))).model_name == "uploaded"
        assert not (repository / "uploaded").exists()  # written to the managed directory, hidden from scans
        assert (repository / ".managed" / "uploaded" / "1" / "model.onnx").read_bytes() == model
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_the_models_command_lists_loads_and_unloads(
    redis: Redis, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshserve.cli.main import main

    repository = _repository(tmp_path, extra=("extra",))
    mesh = await _mesh(redis_url, repository, RoutingView.all_ready, model_control_mode="explicit", load_model=("mlp",))
    try:
        base = ["models", "--address", mesh.address]
        assert await asyncio.to_thread(main, [*base, "list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
        assert lines[1].split() == ["extra", "-", "UNAVAILABLE", "not", "loaded"]
        assert lines[2].split() == ["mlp", "1", "READY"]
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"max_batch_size": 2}))
        model = repository / "mlp" / "1" / "model.onnx"
        assert (
            await asyncio.to_thread(
                main, [*base, "load", "sent", "--config", str(config), "--file", f"1/model.onnx={model}"]
            )
            == 0
        )
        assert capsys.readouterr().out == "loaded sent\n"
        await _wait(mesh, lambda view: ("sent", 1) in view.ready)
        assert mesh.gateway.routing.view.models[("sent", 1)].max_batch_size == 2
        assert await asyncio.to_thread(main, [*base, "list", "--ready"]) == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
        assert listed == ["mlp", "sent"]
        assert await asyncio.to_thread(main, [*base, "unload", "sent"]) == 0
        assert await asyncio.to_thread(main, [*base, "unload", "nosuch"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert await asyncio.to_thread(main, [*base, "load", "x", "--file", "1/model.onnx"]) == 2
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_model_files_larger_than_grpc_s_default_message_reach_the_router(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    from onnx import numpy_helper

    from meshserve.devkit.examples import EXAMPLE_MODELS

    model = EXAMPLE_MODELS["mlp"]()
    padding = np.zeros(6 * 1024 * 1024 // 4, np.float32)  # 6 MiB: over gRPC's 4 MiB default
    model.graph.initializer.append(numpy_helper.from_array(padding, "padding"))
    data = model.SerializeToString()
    mesh = await _mesh(
        redis_url, _repository(tmp_path), RoutingView.all_ready, model_control_mode="explicit", load_model=("mlp",)
    )
    try:
        stub = channel_for(mesh)
        await stub.RepositoryModelLoad(_load("big", **{"1_model.onnx": data}))
        assert (await stub.ModelInfer(mlp_request("big"))).model_name == "big"
    finally:
        await stop_mesh(mesh)


@pytest.mark.timeout(60)
async def test_a_version_no_device_holds_yet_is_loading_waiting_for_a_device(
    redis: Redis, redis_url: str, tmp_path: Path, channel_for: Any
) -> None:
    mesh = await start_mesh(redis_url, _repository(tmp_path), workers=0, until=lambda view: view.generation >= 0)
    try:
        stub = channel_for(mesh)
        index = _index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index == {("mlp", "1"): ("LOADING", "waiting for a device")}
        assert not (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models
    finally:
        await stop_mesh(mesh)
