"""A repository in an object store (meshserve/models/remote.py, router --repository-uri),
with fsspec's memory:// store: mirrored locally, cached by content hash, followed by
a polling router."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import EXAMPLE_MODELS
from meshserve.models.remote import sync_repository
from protos import grpc_service_pb2 as pb
from tests.support import infer_request, infer_stub, start_mesh, stop_mesh

MLP = EXAMPLE_MODELS["mlp"]().SerializeToString(deterministic=True)


@pytest.fixture
def store() -> Iterator[str]:
    """An empty memory:// store of this test's own; removed after."""
    root = f"/repo-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _put(store: str, path: str, data: bytes) -> None:
    fs, root = fsspec.core.url_to_fs(store)
    fs.pipe(f"{root}/{path}", data)


def _rm(store: str, path: str) -> None:
    fs, root = fsspec.core.url_to_fs(store)
    fs.rm(f"{root}/{path}", recursive=True)


def test_sync_mirrors_by_content_hash_and_fetches_only_what_changed(store: str, tmp_path: Path) -> None:
    _put(store, "mlp/1/model.onnx", MLP)
    _put(store, "mlp/2/model.onnx", MLP)
    _put(store, "mlp/config.yaml", b"max_batch_size: 4\n")
    _put(store, "mlp/.hidden/x", b"never mirrored")
    local = tmp_path / "mirror"
    first = sync_repository(store, local)
    assert (first.fetched, first.kept, first.removed) == (3, 0, 0)
    assert (local / "mlp" / "1" / "model.onnx").read_bytes() == MLP
    assert (local / "mlp" / "config.yaml").read_text() == "max_batch_size: 4\n"
    assert not (local / "mlp" / ".hidden").exists()
    blobs = sorted((local / ".cache" / "blobs").iterdir())
    assert len(blobs) == 2  # two versions with the same bytes share one blob
    assert (local / "mlp" / "1" / "model.onnx").samefile(local / "mlp" / "2" / "model.onnx")

    again = sync_repository(store, local)
    assert (again.fetched, again.kept, again.removed) == (0, 3, 0)

    _put(store, "mlp/config.yaml", b"max_batch_size: 8\n")
    _rm(store, "mlp/2")
    changed = sync_repository(store, local)
    assert (changed.fetched, changed.kept, changed.removed) == (1, 1, 1)
    assert (local / "mlp" / "config.yaml").read_text() == "max_batch_size: 8\n"
    assert not (local / "mlp" / "2").exists()


def test_sync_of_one_model_leaves_the_others(store: str, tmp_path: Path) -> None:
    _put(store, "a/1/model.onnx", MLP)
    _put(store, "b/1/model.onnx", MLP)
    local = tmp_path / "mirror"
    sync_repository(store, local)
    _rm(store, "b")
    _put(store, "a/2/model.onnx", MLP)
    result = sync_repository(store, local, prefix="a")
    assert (result.fetched, result.removed) == (1, 0)
    assert (local / "b" / "1" / "model.onnx").exists()  # outside the prefix: untouched
    assert (local / "a" / "2" / "model.onnx").exists()


@pytest.mark.timeout(60)
async def test_a_polling_router_serves_from_the_store(redis: Redis, redis_url: str, store: str, tmp_path: Path) -> None:
    _put(store, "mlp/1/model.onnx", MLP)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    overrides = {"repository_uri": store, "model_control_mode": "poll", "repository_poll_s": 0.1}
    mesh = await start_mesh(redis_url, mirror, router_overrides=overrides)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
            assert (await stub.ModelInfer(request)).model_name == "mlp"
            _put(store, "mlp/2/model.onnx", MLP)
            async with asyncio.timeout(20):
                await mesh.gateway.routing.wait_for(lambda view: ("mlp", 2) in view.ready)
            request.model_version = "2"
            assert (await stub.ModelInfer(request)).model_version == "2"
            _rm(store, "mlp/1")
            async with asyncio.timeout(20):
                await mesh.gateway.routing.wait_for(lambda view: ("mlp", 1) not in view.models)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            assert {(m.name, m.version, m.state) for m in index.models} == {
                ("mlp", "1", "UNAVAILABLE"),
                ("mlp", "2", "READY"),
            }
    finally:
        await stop_mesh(mesh)
