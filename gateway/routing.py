"""The gateway's copy of the router's routing table, and the watch that keeps it.

The router streams a new table whenever the models or their readiness change;
:class:`RoutingWatch` follows that stream and keeps the last table received while
the router is away (a gateway goes on serving what it knew). The core reads
``view`` on every call and never talks to the router itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from meshserve.models.ensemble import ENSEMBLE_PLATFORM, Ensemble
from meshserve.models.repository import ModelInfo
from meshserve.models.traffic import TrafficSplit
from meshserve.wire.routing import ensemble_from_spec, info_from_spec, split_from_pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoutingView:
    """One routing-table generation: every model version, which are ready, which
    failed to load (and why), the latest version of each model name."""

    generation: int
    models: dict[tuple[str, int], ModelInfo]
    ready: frozenset[tuple[str, int]]
    latest: dict[str, int]
    failed: dict[tuple[str, int], str] = field(default_factory=dict)
    unloading: frozenset[tuple[str, int]] = frozenset()  # draining: refused, naming the state
    splits: dict[str, TrafficSplit] = field(default_factory=dict)  # by model (gateway/versions.py)
    evicted: frozenset[tuple[str, int]] = frozenset()  # not resident, not ready: loads on demand
    ensembles: dict[tuple[str, int], Ensemble] = field(default_factory=dict)  # the valid ones (gateway/ensemble.py)
    ensemble_names: frozenset[str] = frozenset()  # every ensemble's name, valid or not
    caching_names: frozenset[str] = frozenset()  # models with a version that caches (gateway/cache.py)
    payload_keys: bool = False  # every live worker reads payload keys (QueueProtocol.enqueue)

    @classmethod
    def from_table(cls, table: mpb.RoutingTable) -> RoutingView:
        models = {(s.name, s.version): info_from_spec(s) for s in table.models}
        latest: dict[str, int] = {}
        for name, version in models:
            latest[name] = max(version, latest.get(name, 0))
        ready = frozenset((s.name, s.version) for s in table.models if s.ready)
        failed = {(s.name, s.version): s.load_error for s in table.models if s.load_error and not s.ready}
        unloading = frozenset((s.name, s.version) for s in table.models if s.state == "UNLOADING")
        splits = {s.model: split_from_pb(s) for s in table.splits}
        evicted = frozenset((s.name, s.version) for s in table.models if s.evicted and not s.ready)
        ensembles = {(s.name, s.version): e for s in table.models if (e := ensemble_from_spec(s)) is not None}
        names = frozenset(s.name for s in table.models if s.platform == ENSEMBLE_PLATFORM)
        caching = frozenset(s.name for s in table.models if s.response_cache)
        return cls(
            table.generation,
            models,
            ready,
            latest,
            failed,
            unloading,
            splits,
            evicted,
            ensembles,
            names,
            caching,
            table.payload_keys,
        )

    def all_ready(self) -> bool:
        """Whether there are models and every one of them is ready (strict readiness)."""
        return bool(self.models) and self.ready == frozenset(self.models)

    def settled(self) -> bool:
        """Whether some model is ready and every other one failed to load or is evicted
        (loads on demand): the mesh serves every model that loaded."""
        return bool(self.ready) and all(
            key in self.ready or key in self.failed or key in self.evicted for key in self.models
        )


EMPTY_VIEW = RoutingView(-1, {}, frozenset(), {})
"""The view before the first table arrives: no models, so nothing resolves."""


class RoutingWatch:
    """Follows the router's routing table; ``view`` is the last one received.

    Owns its one task (``start``/``stop``). ``on_change`` runs in the event loop
    after each new table, with it.
    """

    def __init__(
        self,
        router: mpb_grpc.RouterStub,
        gateway_id: str,
        on_change: Callable[[RoutingView], None] = lambda view: None,
    ) -> None:
        self.router = router
        self.gateway_id = gateway_id
        self.on_change = on_change
        self.view = EMPTY_VIEW
        self.settled_once = False  # some view was settled (every model loaded or failed to): latched
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def server_ready(self, *, strict: bool) -> bool:
        """Server readiness. ``strict``: every model is ready (Triton's meaning). Else:
        every model has loaded or failed to at least once since this gateway started,
        and some model is ready now; a model that goes unready later (a worker
        restarting, a failing canary) shows in its own readiness, not here, so that a
        readiness probe never takes the healthy models out with it."""
        if strict:
            return self.view.all_ready()
        return self.settled_once and bool(self.view.ready)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="routing-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_for(self, predicate: Callable[[RoutingView], bool]) -> RoutingView:
        """Until ``predicate`` holds for the current view (checked now and after each
        new table); that view. Unbounded: the caller sets the deadline."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self.view))
            return self.view

    async def _watch(self) -> None:
        backoff_s = 0.2
        while True:
            try:
                stream = self.router.WatchRoutingTable(mpb.WatchRequest(gateway_id=self.gateway_id))
                async for table in stream:
                    self.view = view = RoutingView.from_table(table)
                    self.settled_once = self.settled_once or view.settled()
                    async with self._changed:
                        self._changed.notify_all()
                    self.on_change(view)
                    backoff_s = 0.2
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "router watch failed (%s); keeping routing table generation %d",
                    exc.code().name,
                    self.view.generation,
                )
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
