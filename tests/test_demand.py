"""The gateway's demands for evicted models, against a stand-in router stub: one
DemandModel call however many requests arrive together, refusals with the reason,
and a retry-after when the deadline is shorter than the load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.demand import Demands
from meshserve.errors import Unavailable
from meshserve.models.repository import RepositoryError, load_model
from model_workers.memory import describe_device
from protos import meshserve_pb2 as mpb


class Router:
    """DemandModel only: counts the calls, answers once ``release`` is set."""

    def __init__(self, reply: mpb.ModelDemandReply) -> None:
        self.reply = reply
        self.calls: list[mpb.ModelDemand] = []
        self.release = asyncio.Event()

    async def DemandModel(self, request: mpb.ModelDemand, **options: float) -> mpb.ModelDemandReply:  # noqa: N802
        self.calls.append(request)
        async with asyncio.timeout(5):
            await self.release.wait()
        return self.reply


def _in_ms(delta_ms: float) -> float:
    return time.time() * 1000 + delta_ms


async def test_concurrent_requests_for_one_evicted_model_ask_the_router_once() -> None:
    router = Router(mpb.ModelDemandReply(placed=True, expected_ms=100))
    demands = Demands(router, "g1")  # type: ignore[arg-type]
    waiting = [asyncio.create_task(demands.admit(("m", 1), _in_ms(5_000))) for _ in range(20)]
    await asyncio.sleep(0)  # every request is waiting on the one demand
    router.release.set()
    await asyncio.gather(*waiting)
    assert len(router.calls) == 1
    assert (router.calls[0].model, router.calls[0].version, router.calls[0].gateway_id) == ("m", 1, "g1")
    await demands.admit(("m", 1), _in_ms(5_000))  # within the refresh: the same answer
    assert len(router.calls) == 1
    assert demands.cold_requests == 21
    await demands.close()


async def test_a_deadline_shorter_than_the_load_is_refused_with_a_retry_after() -> None:
    router = Router(mpb.ModelDemandReply(placed=True, expected_ms=3_000))
    router.release.set()
    demands = Demands(router, "g1")  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as caught:
        await demands.admit(("m", 2), _in_ms(500))
    assert caught.value.message.startswith("model 'm' version 2 is loading, retry after ")
    assert 2_000 < caught.value.retry_after_ms <= 3_000
    await demands.admit(("m", 2), _in_ms(10_000))  # a longer deadline waits for it
    await demands.close()


async def test_a_model_no_device_can_hold_is_refused_with_the_routers_reason() -> None:
    router = Router(mpb.ModelDemandReply(placed=False, reason="no device has room: model m needs 9 GiB"))
    router.release.set()
    demands = Demands(router, "g1")  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="cannot be loaded: no device has room: model m needs 9 GiB"):
        await demands.admit(("m", 1), _in_ms(5_000))
    waiting = Router(mpb.ModelDemandReply(placed=False, expected_ms=0, reason="evicted: every resident model is busy"))
    waiting.release.set()
    await Demands(waiting, "g1").admit(("m", 1), _in_ms(5_000))  # type: ignore[arg-type]  # queued: it waits


def test_a_worker_reports_its_memory_budget_instead_of_the_measured_memory() -> None:
    assert describe_device("cpu", budget_bytes=115 * 2**20).memory_bytes == 115 * 2**20
    assert describe_device("cpu").memory_bytes > 0  # the host's RAM


def test_pinned_must_be_a_boolean(model_repository: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "mlp"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes((model_repository / "mlp" / "1" / "model.onnx").read_bytes())
    (model_dir / "config.yaml").write_text("pinned: true\n")
    assert load_model(model_dir, 1).pinned
    (model_dir / "config.yaml").write_text("pinned: yes please\n")
    with pytest.raises(RepositoryError, match="'pinned' must be true or false"):
        load_model(model_dir, 1)
