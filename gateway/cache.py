"""The response cache: a request a caching model (``response_cache: true`` in its
config.yaml) has answered before is answered again from Redis, without the queue.

The key is a BLAKE2b digest of the model's name and the version the request
resolves to, every input (name, datatype, shape, parameters and bytes, in name
order) and the requested outputs with their parameters; it lives in the tenant's
namespace unless the model says ``cache_shared: true``. A new version never meets
the old one's entries (the version is in the key, and each version's cache is
its own keys). Only successful answers are stored: the response as the gateway
serialized it, without the request's id, so a hit answers the same bytes with
the caller's id and the response parameter ``cached: true`` added after them.

Stores run in the background, never delay or fail the request, and are skipped
while Redis is within the gateway's headroom of its maxmemory; a store Redis
refuses is counted in the log of refusals (:mod:`meshserve.store.refusals`). A
lookup Redis cannot answer is a miss. The Redis side and its cap:
:mod:`meshserve.store.cache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.core import Gateway
from gateway.request import InferCall
from meshserve.errors import MeshError
from meshserve.models.repository import ModelInfo
from meshserve.observe.metrics import CacheMetrics
from meshserve.store.cache import CacheKeys, lookup, store
from meshserve.store.link import RedisLink
from meshserve.store.refusals import RefusalLog
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.codec import declared_bytes
from meshserve.wire.envelope import OFF_LOOP_BYTES
from protos import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

CACHED_PARAMETER = "cached"
"""The response parameter (bool, true) of an answer that came from the cache."""

SHARED_NAMESPACE = "*"
"""The namespace of a model with ``cache_shared: true``; otherwise the tenant's name."""

_CACHED_FIELD = pb.ModelInferResponse(
    parameters={CACHED_PARAMETER: pb.InferParameter(bool_param=True)}
).SerializeToString()


@dataclass(frozen=True, slots=True)
class Probe:
    """Where one request's answer is, or would be, cached."""

    model: ModelInfo
    keys: CacheKeys
    entry: str
    tenant: str


def entry_of(model: ModelInfo, call: InferCall, namespace: str) -> str | None:
    """The request's cache entry, ``<namespace>:<digest>``; None for a request whose
    raw contents do not match its inputs (the core refuses it)."""
    message = call.message
    raw = call.raw if call.raw is not None else message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        return None
    digest = hashlib.blake2b(digest_size=20)

    def part(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "little"))  # lengths first: no two parts run together
        digest.update(data)

    part(model.name.encode())
    part(str(model.version).encode())
    for index in sorted(range(len(message.inputs)), key=lambda i: message.inputs[i].name):
        part(message.inputs[index].SerializeToString(deterministic=True))  # name, datatype, shape, params, contents
        part(raw[index] if raw else b"")
    for output in sorted(message.outputs, key=lambda o: o.name):
        part(output.SerializeToString(deterministic=True))
    return f"{namespace}:{digest.hexdigest()}"


def with_id(body: bytes, request_id: str) -> bytes:
    """A stored response with the caller's id (fields of concatenated encodings merge)."""
    if not request_id:
        return body
    return pb.ModelInferResponse(id=request_id).SerializeToString() + body


def cached_response(body: bytes | memoryview, request_id: str) -> bytes:
    """A stored response as answered from the cache: the caller's id, the body and the
    ``cached`` parameter, in one copy of the body (it may be the buffer Redis's reply
    was read into, :mod:`meshserve.store.resp`)."""
    head = pb.ModelInferResponse(id=request_id).SerializeToString() if request_id else b""
    return b"".join((head, body, _CACHED_FIELD))


class ResponseCache:
    """Looks answers up and stores them; owns its background stores."""

    def __init__(
        self,
        redis: RedisLink,
        *,
        ttl_ms: int,
        cap_bytes: int,
        metrics: CacheMetrics,
        store_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self.redis = redis
        self.ttl_ms = ttl_ms
        self.cap_bytes = cap_bytes
        self.metrics = metrics
        self.store_full = store_full
        self.refusals = RefusalLog(log, "cache stores")
        self._stores: set[asyncio.Task[None]] = set()

    def caching_model(self, gateway: Gateway, call: InferCall, tenant: Tenant) -> ModelInfo | None:
        """The model the request resolves to when it caches; None when it does not (or
        is unknown: the core answers that, authorization first). A caching model the
        tenant may not use raises PermissionDenied, as the core would."""
        if call.model_name not in gateway.routing.view.caching_names:
            return None  # the common case: one set lookup, not a second resolve
        try:
            model = gateway.resolve(call.model_name, call.model_version, call)
        except MeshError:
            return None
        if not model.response_cache:
            return None
        gateway.authorize(tenant, call.model_name)
        return model

    async def probe(self, model: ModelInfo, call: InferCall, tenant: Tenant) -> Probe | None:
        """The request's place in ``model``'s cache (hashed on a thread when large);
        None for a request the core will refuse."""
        namespace = SHARED_NAMESPACE if model.cache_shared else tenant.name
        if declared_bytes(call.message) > OFF_LOOP_BYTES:
            entry = await asyncio.to_thread(entry_of, model, call, namespace)
        else:
            entry = entry_of(model, call, namespace)
        if entry is None:
            return None
        return Probe(model, CacheKeys.for_model(model.name, model.version), entry, tenant.name)

    async def answer(self, probe: Probe, request_id: str) -> bytes | None:
        """The cached response with ``request_id`` and the ``cached`` parameter; None: a miss."""
        started_s = time.perf_counter()
        try:
            body = await lookup(self.redis, probe.keys, probe.entry)
        except RedisError as exc:  # a miss: the request goes the usual way, which says what is wrong
            log.debug("cache lookup failed for model %r: %s", probe.model.name, exc)
            body = None
        if body is None:
            self.metrics.misses.labels(probe.model.name, probe.tenant).inc()
            return None
        if len(body) > OFF_LOOP_BYTES:
            response = await asyncio.to_thread(cached_response, body, request_id)
        else:
            response = cached_response(body, request_id)
        self.metrics.hits.labels(probe.model.name, probe.tenant).inc()
        self.metrics.hit_latency.labels(probe.model.name).observe(time.perf_counter() - started_s)
        return response

    def remember(self, probe: Probe, body: bytes) -> None:
        """Store ``body`` (a successful response without its id) in the background."""
        if self.store_full():
            return
        task = asyncio.create_task(self._store(probe, body))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def settle(self) -> None:
        """Until the stores begun so far are done."""
        await asyncio.gather(*self._stores, return_exceptions=True)

    async def _store(self, probe: Probe, body: bytes) -> None:
        try:
            stored = await store(
                self.redis, probe.keys, probe.entry, body, ttl_ms=self.ttl_ms, cap_bytes=self.cap_bytes
            )
        except RedisError as exc:
            if not self.refusals.note(exc):
                log.debug("cache store failed for model %r: %s", probe.model.name, exc)
            return
        model = probe.model
        self.metrics.held_bytes.labels(model.name, str(model.version)).set(stored.held_bytes)
        if stored.evicted:
            self.metrics.evictions.labels(model.name).inc(stored.evicted)
