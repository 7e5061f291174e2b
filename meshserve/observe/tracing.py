"""Tracing set-up, sampling across the queue hop, and W3C trace-context propagation.

Tracer providers are built once in each service's ``main()`` and passed down.
With no ``OTEL_EXPORTER_OTLP_ENDPOINT`` the services get a no-op tracer and
the request path skips its span sites (``records``): tracing off costs one
attribute test per site, and a gateway without tracing passes no trace context on. Otherwise spans go over
OTLP/gRPC to that endpoint, under ``OTEL_SERVICE_NAME`` (default: the service's
own name). The trace context of every request rides inside its queued envelope
(``QueuedRequest.trace_context``): the gateway injects it, the worker extracts it.
A request's trace holds the gateway's ``ModelInfer`` and ``enqueue`` spans, the
worker's ``queue_wait`` and ``compute`` (the batch's run, linked to the batch
span), and the gateway's ``reply``, which starts at the time the worker stamped
on the reply (``InferReply.replied_unix_ns``, set for sampled requests only).
Spans that cross the hop carry explicit start and end times.

Sampling is decided once, at the gateway, by the SDK's standard
``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` (unset: the SDK default,
``parentbased_always_on``; with ``parentbased_traceidratio`` a client's sampled
``traceparent`` is kept and the ratio applies to calls that bring none). The
decision travels in the ``traceparent`` flags. Workers never roll the dice again
and ignore ``OTEL_TRACES_SAMPLER``: a per-request span follows its request's
flag, and a batch span (a root of its own that links the requests it served) is
sampled if and only if at least one of those requests was. A worker therefore
starts no trace of its own: behind a gateway without tracing it exports nothing.

Tenants on spans (``meshserve.tenant``, and ``meshserve.tenancy.tenants`` on a batch)
follow the ``trace_tenant`` setting: ``clear`` (the name), ``off`` (no
attribute), or ``hash``: the first 16 hex digits of HMAC-SHA256 of the name
keyed with ``MESHSERVE_TRACE_TENANT_SECRET``. Tenant names are few and
guessable, so without a secret (plain SHA-256 of the name) anyone with a list of
candidate names can reverse the hash: set the secret, the same on every gateway
and worker, wherever traces leave the deployment's trust.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import default_getter, default_setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from meshserve.settings import TRACE_TENANT_MODES

_PROPAGATOR = TraceContextTextMapPropagator()

UNTRACED = contextlib.nullcontext(trace.INVALID_SPAN)
"""What a skipped span site enters instead of a span: no context switch, and a span
whose every method does nothing."""


def records(tracer: trace.Tracer) -> bool:
    """Whether ``tracer``'s spans go anywhere. Span sites on the request path skip
    themselves when not: even a no-op span attaches and detaches a context, and the
    gateway and the worker pass several span sites per request."""
    return not isinstance(tracer, trace.NoOpTracer)


TENANT_HASH_HEX_DIGITS = 16


class AnyLinkSampled(Sampler):
    """Samples a root span iff one of its links is sampled: a batch span is kept
    exactly when it served at least one request the gateway chose to trace."""

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        sampled = any(link.context.trace_flags.sampled for link in links or ())
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP, attributes if sampled else None, trace_state
        )

    def get_description(self) -> str:
        return "AnyLinkSampled"


def downstream_sampler() -> Sampler:
    """A worker's sampler: children follow their parent's flag, roots their links'."""
    return ParentBased(root=AnyLinkSampled())


def tracer_provider(service_name: str, *, downstream: bool = False) -> TracerProvider | None:
    """The provider ``make_tracer`` uses, from the standard ``OTEL_*`` variables;
    None when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is unset. ``downstream`` (workers)
    replaces the configured sampler with ``downstream_sampler()``. The caller owns
    the provider: ``force_flush`` and ``shutdown`` are its to call."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(
        sampler=downstream_sampler() if downstream else None,  # None: OTEL_TRACES_SAMPLER, or the SDK default
        resource=Resource.create({"service.name": name}),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def make_tracer(service_name: str, *, downstream: bool = False) -> trace.Tracer:
    """A tracer for ``service_name``, also installed as the global provider: OTLP
    export if configured by ``OTEL_EXPORTER_OTLP_ENDPOINT``, else a no-op tracer."""
    provider = tracer_provider(service_name, downstream=downstream)
    if provider is None:
        return trace.NoOpTracer()
    trace.set_tracer_provider(provider)
    return provider.get_tracer("meshserve")


def tenant_attribute(mode: str, secret: str = "") -> Callable[[str], str | None]:
    """How spans name a tenant under ``trace_tenant`` = ``mode`` (see the module
    docstring); None means no attribute. Hashes are computed once per name."""
    if mode == "clear":
        return _same
    if mode == "off":
        return _nothing
    if mode != "hash":
        raise ValueError(f"trace_tenant: expected one of {', '.join(TRACE_TENANT_MODES)}, got {mode!r}")
    key = secret.encode()

    @functools.lru_cache(maxsize=4096)  # tenant names come from the tenants file: a bounded set
    def hashed(tenant: str) -> str:
        if key:
            digest = hmac.new(key, tenant.encode(), hashlib.sha256).hexdigest()
        else:
            digest = hashlib.sha256(tenant.encode()).hexdigest()
        return digest[:TENANT_HASH_HEX_DIGITS]

    return hashed


def _same(tenant: str) -> str:
    return tenant


def _nothing(tenant: str) -> None:
    return None


def inject(carrier: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> None:
    """Write the current (or given) span context into ``carrier`` as W3C headers."""
    _PROPAGATOR.inject(carrier, context=ctx, setter=default_setter)


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a carrier (gRPC metadata, a queued envelope) brought along."""
    return _PROPAGATOR.extract(carrier, getter=default_getter)
