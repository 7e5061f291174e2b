"""Prometheus metrics: one registry and one /metrics endpoint per service.

Names follow Prometheus conventions (base units, ``_total``, ``_seconds``). Each
service owns its registry, so several services can share a process in tests.
Worker counters are read from the worker's own stats at scrape time, so the batch
loop pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class MetricsServer:
    """``registry`` on http://host:port/metrics, in a daemon thread, until ``stop``."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    inflight: Gauge
    rejections: Counter

    @classmethod
    def create(cls, late_replies: Callable[[], int] = lambda: 0) -> GatewayMetrics:
        """``late_replies`` reads the gateway's count of replies nobody waited for."""
        registry = CollectorRegistry()
        registry.register(
            _CounterFromFunction(
                "meshserve_late_replies",
                "Replies that found no waiting call (expired, cancelled or duplicate).",
                late_replies,
            )
        )
        return cls(
            registry=registry,
            requests=Counter(
                "meshserve_requests",
                "ModelInfer calls by model and final gRPC status.",
                ["model", "code"],
                registry=registry,
            ),
            latency=Histogram(
                "meshserve_request_duration_seconds",
                "ModelInfer time in the gateway, end to end.",
                ["model"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            inflight=Gauge("meshserve_inflight_requests", "Calls waiting for a reply.", registry=registry),
            rejections=Counter(
                "meshserve_rejections",
                "Calls refused before enqueue, by tenant and reason (unauthenticated, permission_denied, "
                "rate, inflight, tenant_queue_full, model_queue_full).",
                ["tenant", "reason"],
                registry=registry,
            ),
        )


class _CounterFromFunction(Collector):
    """A counter whose value a plain int in the core keeps (nothing on the hot path)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], self.read())
        yield family


@dataclass(frozen=True)
class ModelCounters:
    """What the worker's stats collector reads for one model version."""

    model: str
    version: int
    batches: int
    items: int
    requests: int
    expired: int
    failed: int


class WorkerStatsCollector(Collector):
    """Turns the worker's plain counters into Prometheus counters at scrape time."""

    def __init__(self, read: Callable[[], Iterable[ModelCounters]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        families = {
            "batches": CounterMetricFamily(
                "meshserve_worker_batches", "ONNX Runtime runs.", labels=["model", "version"]
            ),
            "items": CounterMetricFamily(
                "meshserve_worker_items", "Batch items computed.", labels=["model", "version"]
            ),
            "requests": CounterMetricFamily(
                "meshserve_worker_requests", "Requests computed.", labels=["model", "version"]
            ),
            "expired": CounterMetricFamily(
                "meshserve_worker_expired",
                "Requests dropped past their deadline, never computed.",
                labels=["model", "version"],
            ),
            "failed": CounterMetricFamily(
                "meshserve_worker_failed", "Requests whose batch failed in the model.", labels=["model", "version"]
            ),
        }
        for counters in self.read():
            labels = [counters.model, str(counters.version)]
            for field, family in families.items():
                family.add_metric(labels, getattr(counters, field))
        yield from families.values()


@dataclass(frozen=True)
class WorkerMetrics:
    registry: CollectorRegistry
    batch_size: Histogram
    compute: Histogram
    queue_wait: Histogram

    @classmethod
    def create(cls, read: Callable[[], Iterable[ModelCounters]]) -> WorkerMetrics:
        registry = CollectorRegistry()
        registry.register(WorkerStatsCollector(read))
        return cls(
            registry=registry,
            batch_size=Histogram(
                "meshserve_worker_batch_size",
                "Items per ONNX Runtime run.",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            compute=Histogram(
                "meshserve_worker_compute_seconds",
                "ONNX Runtime time per batch.",
                ["model"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            queue_wait=Histogram(
                "meshserve_worker_queue_wait_seconds",
                "Time from enqueue to claim, per request.",
                ["model"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
        )
