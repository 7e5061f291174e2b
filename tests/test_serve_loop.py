"""What the serve loop looks at after a wake-up: after a batch of one model ends, that
model's queue only (with hundreds of models a look at every queue after each batch
cost more than the batch, issue 23's scaling sweep); after models are added or the
safety timeout, every queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshserve.devkit.examples import write_example_repository
from model_workers.serve_loop import Target
from tests.support import Mesh, start_mesh, stop_mesh


@pytest.fixture
async def two_models(redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    write_example_repository(tmp_path, ["mlp", "cnn"])
    mesh = await start_mesh(redis_url, tmp_path)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


def self_wake(mesh: Mesh) -> tuple[bytes, bytes]:
    """A BLPOP answer from the worker's own wake list, as ``wake`` leaves it."""
    loop = mesh.workers[0].worker.serve_loop
    return loop._wake_self.encode(), b"1"


def looked(targets: list[Target]) -> list[str]:
    """The ready sets of the models a wake-up sends the loop to (any partition)."""
    assert all(keys is None for _, keys in targets)
    return [served.keys.ready for served, _ in targets]


async def test_a_batch_that_ends_sends_the_loop_back_to_its_own_model_only(two_models: Mesh) -> None:
    worker = two_models.workers[0].worker
    cnn = worker.served[("cnn", 1)]
    loop = worker.serve_loop
    await loop.woken(self_wake(two_models))  # what the start left pending (no await inside: nothing runs between)
    loop.batch_ended(cnn)
    assert looked(await loop.woken(self_wake(two_models))) == ["ms:{m:cnn:1}:ready"]
    assert await loop.woken(self_wake(two_models)) == []  # looked at once, then forgotten


async def test_added_models_and_the_safety_timeout_look_at_every_queue(two_models: Mesh) -> None:
    worker = two_models.workers[0].worker
    loop = worker.serve_loop
    everything = ["ms:{m:mlp:1}:ready", "ms:{m:cnn:1}:ready"]
    loop.batch_ended(worker.served[("cnn", 1)])
    loop.models_added()
    assert sorted(looked(await loop.woken(self_wake(two_models)))) == sorted(everything)
    assert sorted(looked(await loop.woken(None))) == sorted(
        everything
    )  # the wait timed out: a token may have been lost
