"""Requests for a model version that is not resident: ask the router to load it, once.

The routing table flags a model version *evicted* while no device holds it (more
models than memory, docs/lifecycle.md): it loads on demand. A request for one
calls :meth:`Demands.admit` before it is queued. That asks the router
(``DemandModel``) to place it, one call per model version at a time however many
requests arrive together, and again at most every ``DEMAND_REFRESH_S`` (each ask
also marks the model used, for the router's LRU). The request is then queued as
any other, and waits there, within its deadline, for the worker that loads the
model to claim it. When the deadline is shorter than what is left of the measured
load time, it is refused at once: UNAVAILABLE "model X is loading, retry after N
ms", with the retry-after trailer.

Off the hot path: only requests for a model that is not ready come here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from meshserve.errors import Unavailable
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

ModelKey = tuple[str, int]

DEMAND_TIMEOUT_S = 2.0
"""How long a demand waits for the router's answer."""

DEMAND_REFRESH_S = 1.0
"""An answer is reused this long by the requests that follow (one ask per model
version per second at most, whatever the request rate)."""

WAITING_REASONS = ("evicted", "waiting for a device")
"""How the router's reason starts when the model will be placed once room frees
(router/residency.py): the request may wait in the queue. Any other reason (no
device could ever hold it, an unreadable model) refuses it."""


@dataclass(frozen=True, slots=True)
class DemandAnswer:
    """The router's answer to a demand, and when it came (epoch ms)."""

    placed: bool
    expected_ms: int  # measured load time; 0: unknown
    reason: str
    asked_ms: float
    loading_since_ms: float  # the first of the answers in a row that said placed: the load began then


class Demands:
    """Owns the demands in flight (one task per model version) and the latest answers.

    ``on_wait(model, seconds)`` is told how long each request that found its model
    not resident waited for its answer (the cold-start wait): the gateway's metrics.
    """

    def __init__(self, router: mpb_grpc.RouterStub, gateway_id: str) -> None:
        self._router = router
        self._gateway_id = gateway_id
        self._asking: dict[ModelKey, asyncio.Task[DemandAnswer]] = {}
        self._answers: dict[ModelKey, DemandAnswer] = {}
        self.on_wait: Callable[[str, float], None] = lambda model, seconds: None
        self.cold_requests = 0  # requests that found their model not resident

    async def admit(self, key: ModelKey, deadline_ms: float) -> None:
        """Return once a request for ``key`` (evicted) may be queued; raise Unavailable
        when it cannot be served within ``deadline_ms`` (epoch ms) or at all."""
        self.cold_requests += 1
        answer = await self._answer(key, deadline_ms)
        name, version = key
        if not answer.placed and not answer.reason.startswith(WAITING_REASONS):
            raise Unavailable(f"model '{name}' version {version} cannot be loaded: {answer.reason}")
        now_ms = time.time() * 1000
        left_ms = answer.expected_ms - (now_ms - answer.loading_since_ms if answer.placed else 0)
        if left_ms > deadline_ms - now_ms:
            retry_ms = max(1, round(left_ms))
            raise Unavailable(
                f"model '{name}' version {version} is loading, retry after {retry_ms} ms",
                retry_after_ms=retry_ms,
            )

    async def _answer(self, key: ModelKey, deadline_ms: float) -> DemandAnswer:
        """The latest answer if recent, else the router's (one ask in flight per key)."""
        answer = self._answers.get(key)
        if answer is not None and time.time() * 1000 - answer.asked_ms < DEMAND_REFRESH_S * 1000:
            return answer
        task = self._asking.get(key)
        if task is None:
            task = self._asking[key] = asyncio.create_task(self._ask(key), name=f"demand {key[0]}/{key[1]}")
            task.add_done_callback(self._asked)
        timeout_s = max(0.0, min(DEMAND_TIMEOUT_S, (deadline_ms - time.time() * 1000) / 1000))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            raise Unavailable(f"model '{key[0]}' version {key[1]} is not loaded; the router did not answer") from None

    def _asked(self, task: asyncio.Task[DemandAnswer]) -> None:
        """A demand ended: the next request after the refresh asks again. Its error is
        read here, as the requests that awaited it may all have given up."""
        key = next((key for key, asking in self._asking.items() if asking is task), None)
        if key is not None:
            del self._asking[key]
        if not task.cancelled():
            task.exception()

    async def _ask(self, key: ModelKey) -> DemandAnswer:
        name, version = key
        asked_ms = time.time() * 1000
        try:
            reply = await self._router.DemandModel(
                mpb.ModelDemand(model=name, version=version, gateway_id=self._gateway_id), timeout=DEMAND_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"model '{name}' version {version} is not loaded and the router is unreachable ({exc.code().name})"
            ) from None
        before = self._answers.get(key)
        since_ms = asked_ms
        same_load = (  # placed before and now, and not long past the time a load takes
            before is not None
            and before.placed
            and reply.placed
            and asked_ms - before.loading_since_ms < before.expected_ms + DEMAND_REFRESH_S * 1000
        )
        if same_load and before is not None:
            since_ms = before.loading_since_ms
        answer = DemandAnswer(reply.placed, reply.expected_ms, reply.reason, asked_ms, since_ms)
        self._answers[key] = answer
        if not reply.placed:
            log.info("model %s version %d demanded, not placed: %s", name, version, reply.reason)
        return answer

    async def close(self) -> None:
        """Cancel the demands in flight."""
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
