"""KEDA's external scaler on the router: worker pools scale on their queues.

KEDA's operator dials the router (a ``ScaledObject`` trigger of type
``external-push``, ``scalerAddress: <router>:8003``) and speaks
``externalscaler.ExternalScaler`` (protos/externalscaler.proto). The trigger's
metadata names the pool whose queues count:

    models: "mlp,resnet"       these models, every version the router knows, or
    device: cpu | gpu | mig    every model whose config.yaml placement allows that
                               device (``any`` counts in every pool; a MIG slice is a
                               GPU to placement, so ``mig`` is ``gpu``)
    targetQueueDepth: "16"     waiting requests per replica (default 16)
    targetBacklogSeconds: "2"  optional: also scale on the pool's longest backlog,
                               seconds a request queued now would wait (the
                               ``meshserve_autoscale_backlog_seconds`` of /metrics)

Metrics: ``queue_depth`` (requests waiting in the pool's ready queues, every tier
summed) and, when targeted, ``backlog_seconds``. ``IsActive`` is depth > 0, so
KEDA takes a pool at zero replicas to one on the first queued request and back
to zero when its queues stay empty for the cooldown.

``StreamIsActive`` reads the depth every ``STREAM_POLL_S`` while KEDA holds the
stream open (one per ScaledObject), and sends the state at once, then on each
change: the first request queued for an idle pool reaches KEDA within that
interval, not KEDA's polling interval. It polls rather than watch the queue's wake
list because that list holds a single token workers take with BLPOP: a watcher
would steal a worker's wake-up. Keyspace notifications would avoid the poll, but
they are off by default and cost every write on the request path.

Depths are read with the router's synchronous Redis client (router/depths.py) on
a thread, never on the router's event loop. A read that fails answers UNAVAILABLE
(KEDA then keeps its replicas, or applies the ScaledObject's fallback) rather than
a depth of 0, which would scale the pool in during a Redis outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc
from redis.exceptions import RedisError

from meshserve.errors import InvalidArgument, MeshError, Unavailable
from meshserve.models.repository import ModelInfo
from meshserve.observe.metrics import backlog_seconds
from protos import externalscaler_pb2 as kpb
from protos import externalscaler_pb2_grpc as kpb_grpc
from router.core import LoadRate
from router.depths import QueueDepths
from router.placement import ModelKey

log = logging.getLogger(__name__)

SCALER_SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name
"""Its grpc.health.v1 entry: SERVING on every router replica, leader or not (the
scaler reads Redis only), so it is what Kubernetes probes for readiness."""

STREAM_POLL_S = 0.2
"""How often an open StreamIsActive reads its pool's depth (one pipelined round trip)."""

DEFAULT_TARGET_QUEUE_DEPTH = 16
QUEUE_DEPTH = "queue_depth"
BACKLOG_SECONDS = "backlog_seconds"
POOL_DEVICES = {"cpu": "cpu", "gpu": "gpu", "mig": "gpu"}
"""A pool's ``device`` to the placement device its models name (or ``any``)."""


@dataclass(frozen=True, slots=True)
class Pool:
    """Which queues one ScaledObject scales on, and its targets per replica."""

    models: frozenset[str] = frozenset()  # by name; empty: by device
    device: str = ""  # a placement device ("cpu" or "gpu"); "": by models
    target_queue_depth: int = DEFAULT_TARGET_QUEUE_DEPTH
    target_backlog_s: float = 0.0  # 0: not a metric of this pool


def parse_pool(metadata: Mapping[str, str]) -> Pool:
    """The trigger's metadata as a pool; ``InvalidArgument`` naming the key."""
    names = frozenset(n.strip() for n in metadata.get("models", "").split(",") if n.strip())
    device = metadata.get("device", "").strip()
    if bool(names) == bool(device):
        raise InvalidArgument("scalerMetadata: give exactly one of 'models' (comma-separated names) or 'device'")
    if device and device not in POOL_DEVICES:
        raise InvalidArgument(f"scalerMetadata 'device': expected one of {', '.join(POOL_DEVICES)}, got {device!r}")
    depth = _positive(metadata, "targetQueueDepth", str(DEFAULT_TARGET_QUEUE_DEPTH))
    if depth != int(depth):
        raise InvalidArgument(f"scalerMetadata 'targetQueueDepth': expected a whole number, got {depth!r}")
    backlog_s = _positive(metadata, "targetBacklogSeconds", "") if "targetBacklogSeconds" in metadata else 0.0
    return Pool(names, POOL_DEVICES.get(device, ""), int(depth), backlog_s)


def _positive(metadata: Mapping[str, str], key: str, default: str) -> float:
    raw = metadata.get(key, default)
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"scalerMetadata {key!r}: expected a number, got {raw!r}") from None
    if not value > 0 or math.isinf(value):
        raise InvalidArgument(f"scalerMetadata {key!r}: expected a number > 0, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class PoolState:
    """One reading of a pool's queues."""

    depth: int
    backlog_s: float


class PoolReader:
    """Reads a pool's queues: the scaler's plain core, without gRPC."""

    def __init__(
        self,
        depths: QueueDepths,
        models: Callable[[], Mapping[ModelKey, ModelInfo]],
        loads: Callable[[], Mapping[ModelKey, LoadRate]],
    ) -> None:
        self._depths = depths
        self._models = models
        self._loads = loads

    def members(self, pool: Pool) -> list[ModelKey]:
        """The pool's model versions now (the repository may change while KEDA watches)."""
        models = self._models()
        if pool.device:
            return sorted(key for key, info in models.items() if info.placement.device in (pool.device, "any"))
        unknown = pool.models - {name for name, _ in models}
        if unknown:
            raise InvalidArgument(f"scalerMetadata 'models': unknown model {', '.join(map(repr, sorted(unknown)))}")
        return sorted(key for key in models if key[0] in pool.models)

    async def read(self, pool: Pool) -> PoolState:
        """Depth summed over the pool, and its longest backlog. Unavailable when Redis
        cannot be read, or when the router has no Redis URL."""
        members = self.members(pool)
        if not self._depths.configured:
            raise Unavailable("the router has no --redis-url (MESHSERVE_REDIS_URL): no queue depths to scale on")
        try:
            depths = await asyncio.to_thread(self._depths.read_or_raise, members)
        except RedisError as exc:
            raise Unavailable(f"queue depths unavailable: {exc}") from exc
        loads = self._loads()
        by_model = {key: sum(depths.get(key, {}).values()) for key in members}
        backlog_s = max((backlog_seconds(depth, loads.get(key)) for key, depth in by_model.items()), default=0.0)
        return PoolState(sum(by_model.values()), backlog_s)

    async def watch_active(self, pool: Pool, interval_s: float = STREAM_POLL_S) -> AsyncIterator[bool]:
        """Whether the pool has work: now, then on every change (read every ``interval_s``)."""
        last: bool | None = None
        while True:
            active = (await self.read(pool)).depth > 0
            if active != last:
                last = active
                yield active
            await asyncio.sleep(interval_s)


Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)


class ExternalScalerServicer(kpb_grpc.ExternalScalerServicer):
    """The gRPC adapter: KEDA's messages to and from :class:`PoolReader`."""

    def __init__(self, reader: PoolReader) -> None:
        self.reader = reader

    async def IsActive(self, request: kpb.ScaledObjectRef, context: Context) -> kpb.IsActiveResponse:  # noqa: N802
        try:
            state = await self.reader.read(parse_pool(request.scalerMetadata))
        except MeshError as error:
            await _abort(context, request, error)
        return kpb.IsActiveResponse(result=state.depth > 0)

    async def StreamIsActive(  # noqa: N802
        self, request: kpb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[kpb.IsActiveResponse]:
        try:
            async for active in self.reader.watch_active(parse_pool(request.scalerMetadata)):
                yield kpb.IsActiveResponse(result=active)
        except MeshError as error:  # KEDA opens the stream again
            await _abort(context, request, error)

    async def GetMetricSpec(self, request: kpb.ScaledObjectRef, context: Context) -> kpb.GetMetricSpecResponse:  # noqa: N802
        try:
            pool = parse_pool(request.scalerMetadata)
            self.reader.members(pool)  # an unknown model is refused when the ScaledObject is made
        except MeshError as error:
            await _abort(context, request, error)
        specs = [kpb.MetricSpec(metricName=QUEUE_DEPTH, targetSize=pool.target_queue_depth)]
        specs[0].targetSizeFloat = pool.target_queue_depth
        if pool.target_backlog_s:
            specs.append(
                kpb.MetricSpec(
                    metricName=BACKLOG_SECONDS,
                    targetSize=max(1, round(pool.target_backlog_s)),
                    targetSizeFloat=pool.target_backlog_s,
                )
            )
        return kpb.GetMetricSpecResponse(metricSpecs=specs)

    async def GetMetrics(self, request: kpb.GetMetricsRequest, context: Context) -> kpb.GetMetricsResponse:  # noqa: N802
        ref = request.scaledObjectRef
        try:
            state = await self.reader.read(parse_pool(ref.scalerMetadata))
        except MeshError as error:
            await _abort(context, ref, error)
        # KEDA names the metric it asks for (its HPA may add a prefix such as "s0-").
        if request.metricName.endswith(BACKLOG_SECONDS):
            value = kpb.MetricValue(
                metricName=BACKLOG_SECONDS, metricValue=math.ceil(state.backlog_s), metricValueFloat=state.backlog_s
            )
        else:
            value = kpb.MetricValue(metricName=QUEUE_DEPTH, metricValue=state.depth, metricValueFloat=state.depth)
        return kpb.GetMetricsResponse(metricValues=[value])


async def _abort(context: Context, ref: kpb.ScaledObjectRef, error: MeshError) -> NoReturn:
    log.warning("KEDA scaler, ScaledObject %s/%s: %s", ref.namespace, ref.name, error.message)
    await context.abort(error.code, error.message)
    raise AssertionError("unreachable")  # context.abort always raises


def add_scaler_to_server(server: grpc.aio.Server, reader: PoolReader) -> None:
    """Serve ``externalscaler.ExternalScaler`` on the router's gRPC server."""
    kpb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerServicer(reader), server)
