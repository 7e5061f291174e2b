"""The gateway's gRPC adapter: KServe v2 / Open Inference Protocol over :class:`Gateway`.

Thin on purpose: it reads deadlines, metadata and trace context off the call and
the request's parameters off its message (:mod:`gateway.request`), hands plain
values to the core, and maps the one error tree onto gRPC statuses
(here, and nowhere else).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc
from opentelemetry import trace

from gateway.cache import Probe, ResponseCache, with_id
from gateway.core import Gateway
from gateway.decoupled import Responses, decoupled_response, wants_empty_final
from gateway.ensemble import infer_ensemble, is_ensemble
from gateway.model_config import model_config
from gateway.repository import RepositoryForwarder
from gateway.request import InferCall, infer_call
from gateway.shm import SharedMemoryCall, SharedMemoryRegistry, region_status
from gateway.statistics import model_statistics
from gateway.stream import InferStream
from meshserve import __version__
from meshserve.errors import Internal, MeshError, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from meshserve.models.ensemble import ENSEMBLE_PLATFORM
from meshserve.models.repository import ModelInfo
from meshserve.observe.metrics import CacheMetrics, GatewayMetrics, LabelMemo
from meshserve.observe.tracing import UNTRACED, extract, records, tenant_attribute
from meshserve.tenancy.tenants import Tenant, bearer_key
from meshserve.wire.codec import encode_infer_response, encode_stream_response, response_head, stream_response
from meshserve.wire.envelope import OFF_LOOP_BYTES, ReplyAs, Unframed
from meshserve.wire.rawfields import ReceivedRequest, parse_infer_request
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)


EXTENSIONS = [
    "classification",
    "model_configuration",
    "model_repository",
    "parameters",
    "statistics",
    "system_shared_memory",
]

UNAUTHENTICATED_LABEL = "<unauthenticated>"
"""The rejections metric's tenant label for a call with no valid credential."""

UNKNOWN_KEY = "missing or unknown API key"
"""How an UNAUTHENTICATED answer starts, whatever the credential that failed."""

RETRY_AFTER_TRAILER = "retry-after-ms"
"""Trailing metadata on a rate-limited call, or one for a model still loading:
milliseconds until a retry can pass."""

UNKNOWN_MODEL_LABEL = "<unknown>"
"""The metrics' model label for a name the gateway does not serve: clients choose
names, and a label per name would grow the registry without bound."""


UNREAD_MODEL_LABEL = "<unread>"
"""The metrics' model label for a call refused before its message was read (unknown
key, or a tenant over its rate): the model's name is in that message."""


DEADLINE_MARGIN_S = 0.005
"""The gateway gives up this long before the client's gRPC deadline, so that its
DEADLINE_EXCEEDED reaches a call that is still open."""


MAX_DETAILS_CHARS = 512
"""Status details are cut to this length. They quote names the client chose, and a
grpc-message trailer over 8 KiB (percent-encoded: up to 12 bytes a character) makes
clients with grpc's default limits fail the call with RESOURCE_EXHAUSTED instead."""


async def _abort(context: Context, error: MeshError) -> NoReturn:
    _set_retry_after(context, error)
    await context.abort(error.code, _details(error.message))
    raise AssertionError("unreachable")  # context.abort always raises


def set_status(context: Context, error: MeshError) -> None:
    """The call's answer for ``error``, as ``_abort`` gives it: status, details and the
    retry-after trailer. A handler that returns after this answers without the cost of
    ``abort``'s exception."""
    _set_retry_after(context, error)
    context.set_code(error.code)
    context.set_details(_details(error.message))


def _set_retry_after(context: Context, error: MeshError) -> None:
    if isinstance(error, ResourceExhausted | Unavailable) and error.retry_after_ms > 0:
        context.set_trailing_metadata(((RETRY_AFTER_TRAILER, str(error.retry_after_ms)),))


def _log_request(model: str, tenant: str, code: grpc.StatusCode, started_s: float) -> None:
    """The per-request DEBUG line; its fields ride as ``extra`` for the JSON log format."""
    duration_ms = (time.perf_counter() - started_s) * 1000
    log.debug(
        "ModelInfer %s for %s: %s in %.1f ms",
        model,
        tenant,
        code.name,
        duration_ms,
        extra={"model": model, "tenant": tenant, "code": code.name, "duration_ms": round(duration_ms, 3)},
    )


def _peer_names(context: Context) -> list[str]:
    """The names of the client certificate mutual TLS verified; [] without one."""
    return [name.decode("utf-8", "replace") for name in context.peer_identities() or ()]


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 14] + "...(truncated)"


@dataclass(frozen=True, slots=True)
class Oversized:
    """What ModelInfer receives instead of a request over ``--max-message-bytes``:
    its size, read off the bytes gRPC received; the message is never parsed."""

    message_bytes: int
    limit_bytes: int

    def error(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"request message of {self.message_bytes} bytes is over the gateway's limit of {self.limit_bytes}"
            " bytes (--max-message-bytes, MESHSERVE_MAX_MESSAGE_BYTES)",
            reason="message_size",
        )


def request_parser(limit_bytes: int) -> Callable[[bytes], ReceivedRequest | Oversized]:
    """ModelInfer's request deserializer: the message with its raw contents left in
    the received bytes (:mod:`meshserve.wire.rawfields`), or :class:`Oversized` past
    ``limit_bytes``. gRPC's own limit is set above it (twice), so that a request a
    little over is answered with a message naming the setting, not gRPC's."""

    def parse(data: bytes) -> ReceivedRequest | Oversized:
        if len(data) > limit_bytes:
            return Oversized(len(data), limit_bytes)
        return parse_infer_request(data)

    return parse


def serialize_infer_response(response: bytes | pb.ModelInferResponse) -> bytes:
    """ModelInfer's response serializer: the servicer answers with the response
    already encoded (:func:`meshserve.wire.codec.encode_infer_response`: the outputs'
    bytes copied once, not into a message and out again); a message is serialized."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """Register the servicer as the generated code does, ModelInfer with
    :func:`serialize_infer_response`."""
    recorded = _Recorder()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, recorded)
    handlers = dict(recorded.handlers)
    parse = request_parser(servicer.gateway.settings.max_message_bytes)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=parse, response_serializer=serialize_infer_response
    )
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=parse,
        response_serializer=serialize_infer_response,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class _Recorder:
    """Stands in for a server to read the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        gateway: Gateway,
        tracer: trace.Tracer | None = None,
        metrics: GatewayMetrics | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.gateway = gateway
        self.tracer = tracer or trace.NoOpTracer()
        self.tracing = records(self.tracer)
        settings = gateway.settings
        self._tenant_on_span = tenant_attribute(settings.trace_tenant, settings.trace_tenant_secret)
        self.metrics = metrics or GatewayMetrics.create()
        self._labelled = LabelMemo()
        self.repository = RepositoryForwarder(gateway.routing)
        self.cache = cache or ResponseCache(
            gateway.redis,
            ttl_ms=int(settings.response_cache_ttl_s * 1000),
            cap_bytes=settings.response_cache_max_bytes,
            metrics=CacheMetrics.create(self.metrics.registry),
            store_full=lambda: gateway.store.full,
        )
        self.shared_memory = SharedMemoryRegistry()

    # ----------------------------------------------------------------- health

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.gateway.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # noqa: N802
        model = await self._resolve_for_tenant(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.gateway.model_ready(model))

    # --------------------------------------------------------------- metadata

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="meshserve", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        model = await self._resolve_for_tenant(request.name, request.version, context)
        versions = self.gateway.versions(model.name)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in versions],
            platform=model.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:  # noqa: N802
        model = await self._resolve_for_tenant(request.name, request.version, context)
        config = model_config(model)
        if model.platform == ENSEMBLE_PLATFORM:  # no file, no backend: the steps are other models
            config.backend, config.default_model_filename = "", ""
        return pb.ModelConfigResponse(config=config)

    # -------------------------------------------------------------- inference

    async def ModelInfer(self, request: ReceivedRequest | Oversized, context: Context) -> bytes:  # noqa: N802
        return await self.answer(request, context)

    async def answer(
        self, request: ReceivedRequest | Oversized, context: Context, tenant: Tenant | None = None
    ) -> bytes:
        """ModelInfer with its metrics and error mapping; ``tenant`` when the caller
        (:mod:`gateway.refusal`) has authenticated the call already. The response
        comes encoded (see :func:`serialize_infer_response`)."""
        try:
            return await self.answer_or_raise(request, context, tenant)
        except MeshError as error:
            await _abort(context, error)

    async def answer_or_raise(
        self,
        request: ReceivedRequest | Oversized,
        context: Context,
        tenant: Tenant | None = None,
        *,
        streamed: bool = False,
        partial: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """One request, counted in the metrics; a failure raises a MeshError (anything
        unexpected is logged and raised as ``Internal``). ``context`` lends its deadline
        and metadata: a stream's (:mod:`gateway.stream`) serves each of its requests,
        ``streamed``, each answer a ModelStreamInferResponse; a decoupled model's
        responses before the last go to ``partial`` (gateway/decoupled.py)."""
        started_s = time.perf_counter()
        metrics = self.metrics
        name = "" if isinstance(request, Oversized) else request.message.model_name
        label = name if self.gateway.knows_model(name) else UNKNOWN_MODEL_LABEL
        labelled = self._labelled
        inflight = labelled(metrics.inflight, label)
        inflight.inc()
        code = grpc.StatusCode.OK
        try:
            if tenant is None:
                tenant = self.authenticate(context)
            if isinstance(request, Oversized):
                raise request.error()
            return await self._infer(request, context, tenant, streamed, partial)
        except MeshError as error:
            code = error.code
            self._count_rejection(error, tenant)
            raise
        except asyncio.CancelledError:  # the client went away, or gRPC ended the call first
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in ModelInfer for model %r", name)
            raise Internal("internal error in the gateway") from exc
        finally:
            inflight.dec()
            duration_s = time.perf_counter() - started_s
            code_name = code.name
            labelled(metrics.requests, label, code_name).inc()
            labelled(metrics.latency, label).observe(duration_s)
            tenant_label = tenant.name if tenant is not None else UNAUTHENTICATED_LABEL
            labelled(metrics.tenant_requests, tenant_label, code_name).inc()
            if tenant is not None:
                labelled(metrics.tenant_latency, tenant_label).observe(duration_s)

    def count_unread_refusal(self, error: MeshError, tenant: Tenant | None, started_s: float) -> None:
        """The metrics of a call refused before its message was read (:mod:`gateway.refusal`):
        as any refusal, under the model label ``UNREAD_MODEL_LABEL`` (the name is in the
        unread message); no span, and the DEBUG line when enabled."""
        metrics, labelled = self.metrics, self._labelled
        duration_s = time.perf_counter() - started_s
        self._count_rejection(error, tenant)
        labelled(metrics.requests, UNREAD_MODEL_LABEL, error.code.name).inc()
        labelled(metrics.latency, UNREAD_MODEL_LABEL).observe(duration_s)
        tenant_label = tenant.name if tenant is not None else UNAUTHENTICATED_LABEL
        labelled(metrics.tenant_requests, tenant_label, error.code.name).inc()
        if tenant is not None:
            labelled(metrics.tenant_latency, tenant_label).observe(duration_s)
        if log.isEnabledFor(logging.DEBUG):
            _log_request(UNREAD_MODEL_LABEL, tenant_label, error.code, started_s)

    def _count_rejection(self, error: MeshError, tenant: Tenant | None) -> None:
        """Admission refusals by tenant and reason; tenants come only from the file (bounded)."""
        if isinstance(error, Unauthenticated):
            label, reason = UNAUTHENTICATED_LABEL, "unauthenticated"
        elif isinstance(error, PermissionDenied | ResourceExhausted):
            label = tenant.name if tenant else UNAUTHENTICATED_LABEL
            reason = error.reason if isinstance(error, ResourceExhausted) else "permission_denied"
        else:
            return
        self._labelled(self.metrics.rejections, label, reason).inc()

    async def _infer(
        self,
        received: ReceivedRequest,
        context: Context,
        tenant: Tenant,
        streamed: bool,
        partial: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """The call without error mapping: a MeshError propagates to ModelInfer. The
        response comes encoded (see :func:`serialize_infer_response`): laid out by the
        worker when it can be (:func:`_reply_as`), else encoded here, a large one on a
        thread."""
        request = received.message
        started_s = time.perf_counter()
        deadline_ms = self._deadline_ms(context)
        tracing = self.tracing
        with self._server_span(context) as span:
            code = grpc.StatusCode.INTERNAL  # until the call is answered
            try:
                if tracing:  # an untraced call skips the no-op span's calls
                    span.set_attribute("meshserve.model", request.model_name)
                    if (traced := self._tenant_on_span(tenant.name)) is not None:
                        span.set_attribute("meshserve.tenant", traced)
                shared = self.shared_memory.plan(tenant, request, received.raw)
                raw = received.raw if shared is None or shared.raw is None else shared.raw
                call = infer_call(request, raw, context.invocation_metadata() or ())
                probe, hit = await self._cached(call, tenant, shared, request.id, span)
                if hit is not None:
                    code = grpc.StatusCode.OK
                    return stream_response(hit) if streamed else hit
                responses = None if partial is None else Responses(partial, request.model_name, request.id)
                reply_as = _reply_as(request, shared, probe, streamed)
                answer = await self._run(call, deadline_ms, tenant, responses, reply_as)
                code = grpc.StatusCode.OK
                version = answer.message.version
                self._labelled(self.metrics.version_requests, request.model_name, str(version)).inc()
                if tracing:
                    span.set_attribute("meshserve.version", version)
            except MeshError as error:
                code = error.code
                if tracing:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                if log.isEnabledFor(logging.DEBUG):  # inside the span: the line carries its trace id
                    _log_request(request.model_name, tenant.name, code, started_s)
        if responses is not None and self.gateway.decoupled(request.model_name, answer.message.version):
            if not answer.message.outputs and not wants_empty_final(request):
                return b""  # Triton's way: no empty final response unless the client asks for one
            return decoupled_response(answer, request.model_name, request.id, final=True)
        if answer.response is not None and reply_as is not None and answer.message.layout == reply_as.layout:
            return await self._laid_out(answer, request, probe, streamed)
        return await self._encode(answer, request, probe, shared, streamed)

    def _deadline_ms(self, context: Context) -> float:
        """The call's deadline, Unix epoch ms: the client's, capped by the gateway's default.

        DEADLINE_EXCEEDED is answered here a moment before gRPC's own timer ends the
        call: a status sent after it fails in the core and is logged as an error."""
        remaining_s = context.time_remaining()
        default_s = self.gateway.settings.default_timeout_ms / 1000
        budget_s = default_s if remaining_s is None else min(remaining_s - DEADLINE_MARGIN_S, default_s)
        return time.time() * 1000 + budget_s * 1000

    async def _cached(
        self, call: InferCall, tenant: Tenant, shared: SharedMemoryCall | None, request_id: str, span: trace.Span
    ) -> tuple[Probe | None, bytes | None]:
        """The call's place in its model's response cache, and the cached answer (None:
        a miss); (None, None) for a model that does not cache. Outputs written into
        shared memory are never cached: a hit would answer bytes instead."""
        if shared is not None or (caching := self.cache.caching_model(self.gateway, call, tenant)) is None:
            return None, None
        probe = await self.cache.probe(caching, call, tenant)
        if probe is None:
            return None, None
        hit = await self.cache.answer(probe, request_id)
        span.set_attribute("meshserve.cache", "miss" if hit is None else "hit")
        return probe, hit

    async def _run(
        self, call: InferCall, deadline_ms: float, tenant: Tenant, responses: Responses | None, reply_as: ReplyAs | None
    ) -> Unframed:
        """The model's one call, or an ensemble's steps (gateway/ensemble.py), each step
        traced and counted under its own model (their replies framed: the steps read them)."""
        if not is_ensemble(self.gateway, call.model_name):
            return await self._answer_of(call, deadline_ms, tenant, responses, reply_as)
        tracer = self.tracer if self.tracing else None
        return await infer_ensemble(
            self.gateway, call, deadline_ms=deadline_ms, tenant=tenant, tracer=tracer, count=self._count_step
        )

    def _count_step(self, model: str, code: str) -> None:
        self._labelled(self.metrics.requests, model, code).inc()

    async def _answer_of(
        self, call: InferCall, deadline_ms: float, tenant: Tenant, responses: Responses | None, reply_as: ReplyAs | None
    ) -> Unframed:
        """The core's answer; a decoupled request's failure after some responses says
        how many the client got (gateway/decoupled.py)."""
        try:
            return await self.gateway.infer(
                call, deadline_ms=deadline_ms, tenant=tenant, on_partial=responses, reply_as=reply_as
            )
        except MeshError as error:
            if responses is None or not responses.sent:
                raise
            raise responses.failed(error) from error

    async def _laid_out(
        self, answer: Unframed, request: pb.ModelInferRequest, probe: Probe | None, streamed: bool
    ) -> bytes:
        """A response the worker laid out as asked (:func:`_reply_as`), received into the
        ``bytes`` gRPC sends (meshserve/store/resp.py), answered as it is; or, laid out
        for the cache (without the id), stored, and answered with the id (and a
        stream's framing) added in one copy. A response that came as a view (a small
        reply, or a link that reads replies whole) is copied into ``bytes``. Copies of a
        large response run on a thread."""
        response = answer.response
        assert response is not None
        large = len(response) > OFF_LOOP_BYTES
        if probe is None and isinstance(response, bytes):
            return response
        if probe is None:
            return await asyncio.to_thread(bytes, response) if large else bytes(response)
        if not isinstance(response, bytes):
            response = await asyncio.to_thread(bytes, response) if large else bytes(response)
        if answer.message.version == probe.model.version:  # a split may draw another: never stored under it
            self.cache.remember(probe, response)
        head = with_id(b"", request.id)
        if not head and not streamed:
            return response
        if large:
            return await asyncio.to_thread(_with_head, head, response, streamed)
        return _with_head(head, response, streamed)

    async def _encode(
        self,
        answer: Unframed,
        request: pb.ModelInferRequest,
        probe: Probe | None,
        shared: SharedMemoryCall | None,
        streamed: bool,
    ) -> bytes:
        """The answer as the response's bytes (a large one encoded on a thread); with
        ``shared``, the outputs it names written into their regions instead; a
        cacheable one stored, without its id, which each answer adds."""
        if probe is not None and answer.message.version != probe.model.version:
            probe = None  # a split drew another version than the probe's: never store it under the wrong one
        if shared is not None:  # never cached (see _infer)
            encode = shared.encode
        elif streamed and probe is None:
            encode = encode_stream_response
        else:
            encode = encode_infer_response
        parts = (answer.message, answer.data, request.model_name, "" if probe is not None else request.id)
        large = sum(len(d) for d in answer.data) > OFF_LOOP_BYTES
        response = await asyncio.to_thread(encode, *parts) if large else encode(*parts)
        if probe is not None:
            self.cache.remember(probe, response)
            # a copy of the whole response: on a thread when large, as the encoding
            response = (
                await asyncio.to_thread(with_id, response, request.id) if large else with_id(response, request.id)
            )
        elif encode is encode_stream_response:
            return response
        if not streamed:
            return response
        return await asyncio.to_thread(stream_response, response) if large else stream_response(response)

    def _server_span(self, context: Context) -> AbstractContextManager[trace.Span]:
        """The call's span, in the caller's trace if its metadata names one."""
        if not self.tracing:
            return UNTRACED
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return self.tracer.start_as_current_span("ModelInfer", context=extract(metadata), kind=trace.SpanKind.SERVER)

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[ReceivedRequest | Oversized], context: Context
    ) -> AsyncIterator[bytes]:
        """Many requests over one stream (:mod:`gateway.stream`), the tenant authenticated
        once; each answered as ModelInfer is, through :meth:`answer_or_raise`."""
        try:
            tenant = self.authenticate(context)
            stream = InferStream(self, context, tenant, self.gateway.settings.max_stream_inflight)
            async for response in stream.serve(requests):
                yield response
        except Unauthenticated as error:
            self._count_rejection(error, None)
            set_status(context, error)
        except MeshError as error:  # with triton_grpc_error: the first failure ends the stream
            set_status(context, error)
        except Exception:
            log.exception("unexpected error in ModelStreamInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway")

    # ------------------------------------------------------- not implemented yet

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        """The router's statistics (:mod:`gateway.statistics`), only of the models the
        tenant may use."""
        try:
            tenant = self.authenticate(context)
            return await model_statistics(self.gateway, tenant, request, context.time_remaining())
        except MeshError as error:
            await _abort(context, error)

    # ------------------------------------------------- the repository API (gateway/repository.py)

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        try:
            return await self.repository.index(request, self.authenticate(context), context.time_remaining())
        except MeshError as error:
            await _abort(context, error)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.repository.load(request, self.authenticate(context), context.time_remaining())
        except MeshError as error:
            await _abort(context, error)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.repository.unload(request, self.authenticate(context), context.time_remaining())
        except MeshError as error:
            await _abort(context, error)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(  # noqa: N802
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        try:
            return region_status(self.shared_memory.status(self.authenticate(context), request.name))
        except MeshError as error:
            await _abort(context, error)

    async def SystemSharedMemoryRegister(  # noqa: N802
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        try:
            tenant = self.authenticate(context)
            self.shared_memory.register(tenant, request.name, request.key, request.offset, request.byte_size)
        except MeshError as error:
            await _abort(context, error)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(  # noqa: N802
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        try:
            self.shared_memory.unregister(self.authenticate(context), request.name)
        except MeshError as error:
            await _abort(context, error)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:  # noqa: N802
        await _no_cuda_shared_memory(context)

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:  # noqa: N802
        await _no_cuda_shared_memory(context)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:  # noqa: N802
        await _no_cuda_shared_memory(context)

    async def TraceSetting(self, request: Any, context: Context) -> Any:  # noqa: N802
        await _unimplemented(context, "TraceSetting (configure tracing with OTEL_* variables)")

    async def LogSettings(self, request: Any, context: Context) -> Any:  # noqa: N802
        await _unimplemented(context, "LogSettings (use --log-level / MESHSERVE_LOG_LEVEL)")

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _presented_key(context: Context) -> str | None:
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                return bearer_key(value)
        return None

    def authenticate(self, context: Context) -> Tenant:
        """The tenant of a call: from ``authorization: Bearer <key>`` when the call
        sends one (the key decides alone), else from the names of the client
        certificate mutual TLS verified (``mtls_identities`` in the tenants file)."""
        tenants = self.gateway.tenants
        key = self._presented_key(context)
        if key is not None or tenants.open:
            tenant = tenants.authenticate(key)
            if tenant is None:
                raise Unauthenticated(f"{UNKNOWN_KEY} (send 'authorization: Bearer <key>')")
            return tenant
        tenant = tenants.authenticate_peer(_peer_names(context))
        if tenant is None:
            raise Unauthenticated(
                f"{UNKNOWN_KEY} (send 'authorization: Bearer <key>'), and no verified client certificate names a tenant"
            )
        return tenant

    async def _resolve_for_tenant(self, name: str, version: str, context: Context) -> ModelInfo:
        """A model-level RPC: authenticate, authorize the model, then resolve it."""
        try:
            self.gateway.authorize(self.authenticate(context), name)
            return self.gateway.resolve(name, version)
        except MeshError as error:
            await _abort(context, error)


def _reply_as(
    request: pb.ModelInferRequest, shared: SharedMemoryCall | None, probe: Probe | None, streamed: bool
) -> ReplyAs | None:
    """How to ask the worker for its reply: laid out as the response this call answers
    with (a stream's as a ModelStreamInferResponse), or, for a cacheable one, as the
    response the cache stores (without the id); None (framed) when outputs go to
    shared memory, whose answer leaves their bytes out."""
    if shared is not None:
        return None
    if probe is not None:
        return ReplyAs(mpb.REPLY_INFER_RESPONSE, response_head(request.model_name, ""))
    layout = mpb.REPLY_STREAM_RESPONSE if streamed else mpb.REPLY_INFER_RESPONSE
    return ReplyAs(layout, response_head(request.model_name, request.id))


def _with_head(head: bytes, response: bytes, streamed: bool) -> bytes:
    """``head`` (encoded fields) and ``response`` as one response, a stream's when ``streamed``."""
    return stream_response(head, response) if streamed else head + response


async def _unimplemented(context: Context, what: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"meshserve does not implement {what} yet")
    raise AssertionError("unreachable")


async def _no_cuda_shared_memory(context: Context) -> NoReturn:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "meshserve does not support CUDA shared memory: the gateway holds no GPU (the models run in worker "
        "processes, often on other hosts), so it cannot open a client's CUDA IPC handle; use system shared "
        "memory (same host) or send tensors in the request",
    )
    raise AssertionError("unreachable")
