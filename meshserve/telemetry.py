"""Tracing set-up and W3C trace-context propagation across the queue hop.

Tracer providers are built once in each service's ``main()`` and passed down.
With no ``OTEL_EXPORTER_OTLP_ENDPOINT`` the services get a no-op tracer, so
tracing off costs one attribute lookup per span site. The trace context of every
request rides inside its queued envelope (``QueuedRequest.trace_context``): the
gateway injects it, the worker extracts it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import default_getter, default_setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def make_tracer(service_name: str) -> trace.Tracer:
    """A tracer for ``service_name``: OTLP export if configured by the standard
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` variable, else a no-op tracer."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return trace.NoOpTracer()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider.get_tracer("meshserve")


def inject(carrier: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> None:
    """Write the current (or given) span context into ``carrier`` as W3C headers."""
    _PROPAGATOR.inject(carrier, context=ctx, setter=default_setter)


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a carrier (gRPC metadata, a queued envelope) brought along."""
    return _PROPAGATOR.extract(carrier, getter=default_getter)
