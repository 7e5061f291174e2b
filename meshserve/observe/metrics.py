"""Prometheus metrics: one registry and one /metrics endpoint per service.

Names follow Prometheus conventions (base units, ``_total``, ``_seconds``). Each
service owns its registry, so several services can share a process in tests.
Worker counters are read from the worker's own stats at scrape time, so the batch
loop pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LabelMemo:
    """``metric.labels(*values)``, each child looked up once.

    ``labels()`` checks the values, builds a key and takes a lock on every call,
    six times per gateway call, which matters most for refusals that do little
    else. The request path's label values
    come from bounded sets (model names, tenant names from the tenants file,
    status codes and reasons), and Prometheus keeps every child anyway, so the
    memo grows no further than the metrics do."""

    def __init__(self) -> None:
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def __call__(self, metric: MetricWrapperBase, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child


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
    tenant_requests: Counter
    tenant_latency: Histogram
    version_requests: Counter
    cold_start: Histogram

    @classmethod
    def create(
        cls,
        late_replies: Callable[[], int] = lambda: 0,
        lost_requests: Callable[[], int] = lambda: 0,
        shadow: ShadowReads | None = None,
        cold_requests: Callable[[], int] = lambda: 0,
    ) -> GatewayMetrics:
        """``late_replies`` reads the gateway's count of replies nobody waited for,
        ``lost_requests`` its count of waiting calls whose job Redis lost, ``shadow``
        its shadow-traffic comparisons (gateway/shadow.py), ``cold_requests`` its count
        of requests whose model was not resident."""
        registry = CollectorRegistry()
        if shadow is not None:
            registry.register(_ShadowCollector(shadow))
        registry.register(
            _CounterFromFunction(
                "meshserve_cold_requests",
                "ModelInfer calls whose model version was evicted (not resident): they waited for its load.",
                cold_requests,
            )
        )
        registry.register(
            _CounterFromFunction(
                "meshserve_late_replies",
                "Replies that found no waiting call (expired, cancelled or duplicate).",
                late_replies,
            )
        )
        registry.register(
            _CounterFromFunction(
                "meshserve_lost_requests",
                "Waiting calls answered UNAVAILABLE because Redis came back without their job.",
                lost_requests,
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
            inflight=Gauge(
                "meshserve_inflight_requests",
                "ModelInfer calls waiting for a reply, by model.",
                ["model"],
                registry=registry,
            ),
            rejections=Counter(
                "meshserve_rejections",
                "Calls refused before enqueue, by tenant and reason (unauthenticated, permission_denied, "
                "rate, inflight, tenant_queue_full, model_queue_full, deadline: the queue ahead would outlast it, "
                "store_full: Redis is nearly at its maxmemory, message_size: over --max-message-bytes).",
                ["tenant", "reason"],
                registry=registry,
            ),
            tenant_requests=Counter(
                "meshserve_tenant_requests",
                "ModelInfer calls by tenant (<unauthenticated> without a valid key) and final gRPC status.",
                ["tenant", "code"],
                registry=registry,
            ),
            tenant_latency=Histogram(
                "meshserve_tenant_request_duration_seconds",
                "ModelInfer time in the gateway, end to end, by authenticated tenant.",
                ["tenant"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            version_requests=Counter(
                "meshserve_version_requests",
                "ModelInfer calls answered, by model and the version that answered (docs/lifecycle.md).",
                ["model", "version"],
                registry=registry,
            ),
            cold_start=Histogram(
                "meshserve_cold_start_wait_seconds",
                "ModelInfer time of the calls that found their model evicted and waited for its load (OK ones).",
                ["model"],
                buckets=COLD_START_BUCKETS_S,
                registry=registry,
            ),
        )


class ShadowReads(Protocol):
    """The gateway's shadow-traffic counts (``gateway.shadow.ShadowCounts``)."""

    @property
    def outcomes(self) -> Mapping[tuple[str, int, str], int]: ...

    @property
    def max_abs_diff(self) -> Mapping[tuple[str, int], float]: ...


class _ShadowCollector(Collector):
    """Shadow comparisons, read off the core's plain counts at scrape time."""

    def __init__(self, reads: ShadowReads) -> None:
        self.reads = reads

    def collect(self) -> Iterator[Metric]:
        compared = CounterMetricFamily(
            "meshserve_shadow_comparisons",
            "Shadow copies compared with the answer the caller got, by model, shadow version and outcome"
            " (agree / disagree: argmax of the first output over its last axis; failed: the shadow erred).",
            labels=["model", "version", "outcome"],
        )
        for (model, version, outcome), count in list(self.reads.outcomes.items()):
            compared.add_metric([model, str(version), outcome], count)
        yield compared
        diff = GaugeMetricFamily(
            "meshserve_shadow_max_abs_diff",
            "Largest absolute difference seen between a shadow's first output and the caller's.",
            labels=["model", "version"],
        )
        for (model, version), value in list(self.reads.max_abs_diff.items()):
            diff.add_metric([model, str(version)], value)
        yield diff


COLD_START_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""A cold start is a model's load and warm-up: tens of ms to a minute."""


@dataclass(frozen=True)
class CacheMetrics:
    """The gateway's response cache (docs/streaming.md#response-cache), in the
    gateway's registry: lookups by model and tenant, hit latency and the store's
    figures by model."""

    hits: Counter
    misses: Counter
    hit_latency: Histogram
    held_bytes: Gauge
    evictions: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CacheMetrics:
        return cls(
            hits=Counter(
                "meshserve_cache_hits",
                "Requests answered from the response cache.",
                ["model", "tenant"],
                registry=registry,
            ),
            misses=Counter(
                "meshserve_cache_misses",
                "Requests to a caching model that the cache could not answer.",
                ["model", "tenant"],
                registry=registry,
            ),
            hit_latency=Histogram(
                "meshserve_cache_hit_duration_seconds",
                "Time in the gateway of a request answered from the cache.",
                ["model"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            held_bytes=Gauge(
                "meshserve_cache_bytes",
                "Response bytes the cache of a model version holds, as of this gateway's last store.",
                ["model", "version"],
                registry=registry,
            ),
            evictions=Counter(
                "meshserve_cache_evictions",
                "Cache entries dropped to keep a model version under its cap (expired ones not counted).",
                ["model"],
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
    device_seconds: float
    weights_bytes: int
    compute_cpu_seconds: float | None = None  # None: computed outside this process


@dataclass(frozen=True)
class EngineFigures:
    """One model version's ONNX Runtime thread setting, how it was chosen, and the
    warm-up trials it was chosen by: (setting label, batch-1 s, max-batch s or None)."""

    model: str
    version: int
    setting: str
    source: str  # measured, config.yaml, flags, gpu, default
    trials: tuple[tuple[str, float, float | None], ...] = ()


class DeviceFigures(Protocol):
    """A device sample (``model_workers.devices.DeviceSample``)."""

    @property
    def device(self) -> str: ...
    @property
    def utilization_ratio(self) -> float: ...
    @property
    def memory_used_bytes(self) -> int: ...
    @property
    def memory_total_bytes(self) -> int: ...


@dataclass(frozen=True)
class WorkerReads:
    """What the worker's collector reads at scrape time (plain values the core keeps)."""

    models: Callable[[], Iterable[ModelCounters]]
    tenant_device_seconds: Callable[[], Mapping[tuple[str, str], float]] = lambda: {}  # (tenant, model) -> s
    devices: Callable[[], Iterable[DeviceFigures]] = lambda: ()
    engines: Callable[[], Iterable[EngineFigures]] = lambda: ()
    device: str = "cpu"
    price_per_device_hour: float = 0.0  # 0: no cost figures


class WorkerStatsCollector(Collector):
    """Turns the worker's plain counters into Prometheus metrics at scrape time."""

    def __init__(self, reads: WorkerReads) -> None:
        self.reads = reads
        self.read = reads.models

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
        device = self.reads.device
        device_seconds = CounterMetricFamily(
            "meshserve_device_seconds",
            "Device time spent running each model's batches.",
            labels=["model", "version", "device"],
        )
        weights = GaugeMetricFamily(
            "meshserve_model_memory_bytes",
            "Size of the model's weights as loaded from the repository.",
            labels=["model", "version", "device"],
        )
        price = self.reads.price_per_device_hour
        cost = GaugeMetricFamily(
            "meshserve_cost_per_1000_requests",
            "Device time per 1000 requests times --price-per-device-hour, since the worker started.",
            labels=["model", "version"],
        )
        compute_cpu = CounterMetricFamily(
            "meshserve_worker_compute_cpu_seconds",
            "CPU time of the threads computing the model in this process: the calling thread inside"
            " ONNX Runtime's run and the session's intra-op pool threads (spinning included).",
            labels=["model", "version"],
        )
        for counters in self.read():
            labels = [counters.model, str(counters.version)]
            for field, family in families.items():
                family.add_metric(labels, getattr(counters, field))
            if counters.compute_cpu_seconds is not None:
                compute_cpu.add_metric(labels, counters.compute_cpu_seconds)
            device_seconds.add_metric([*labels, device], counters.device_seconds)
            weights.add_metric([*labels, device], counters.weights_bytes)
            if price > 0 and counters.requests:
                cost.add_metric(labels, counters.device_seconds / counters.requests * 1000 * price / 3600)
        yield from families.values()
        yield compute_cpu
        yield device_seconds
        yield weights
        if price > 0:
            yield cost
        by_tenant = CounterMetricFamily(
            "meshserve_tenant_device_seconds",
            "Device time per tenant and model: each batch's time shared by its items.",
            labels=["tenant", "model", "device"],
        )
        for (tenant, model), seconds in sorted(self.reads.tenant_device_seconds().items()):
            by_tenant.add_metric([tenant, model, device], seconds)
        yield by_tenant
        utilization = GaugeMetricFamily(
            "meshserve_device_utilization_ratio", "Busy share of the device over the last second.", labels=["device"]
        )
        used = GaugeMetricFamily("meshserve_device_memory_used_bytes", "Device memory in use.", labels=["device"])
        total = GaugeMetricFamily("meshserve_device_memory_total_bytes", "Device memory size.", labels=["device"])
        for sample in self.reads.devices():
            utilization.add_metric([sample.device], sample.utilization_ratio)
            used.add_metric([sample.device], sample.memory_used_bytes)
            total.add_metric([sample.device], sample.memory_total_bytes)
        yield from (utilization, used, total)
        yield from engine_families(self.reads.engines())


def engine_families(figures: Iterable[EngineFigures]) -> tuple[Metric, Metric]:
    """The chosen engine setting per model version, and the warm-up trial times behind it."""
    chosen = GaugeMetricFamily(
        "meshserve_engine_setting",
        "1 for the ONNX Runtime thread setting each model version runs under; source: how it was chosen.",
        labels=["model", "version", "setting", "source"],
    )
    trials = GaugeMetricFamily(
        "meshserve_engine_trial_seconds",
        "Warm-up time of one run per engine setting tried: batch 1 (after an idle gap) and the max batch.",
        labels=["model", "version", "setting", "batch"],
    )
    for engine in figures:
        labels = [engine.model, str(engine.version)]
        chosen.add_metric([*labels, engine.setting, engine.source], 1)
        for setting, batch1_s, max_batch_s in engine.trials:
            trials.add_metric([*labels, setting, "1"], batch1_s)
            if max_batch_s is not None:
                trials.add_metric([*labels, setting, "max"], max_batch_s)
    return chosen, trials


@dataclass(frozen=True)
class WorkerMetrics:
    registry: CollectorRegistry
    batch_size: Histogram
    compute: Histogram
    queue_wait: Histogram

    @classmethod
    def create(cls, reads: WorkerReads) -> WorkerMetrics:
        registry = CollectorRegistry()
        registry.register(WorkerStatsCollector(reads))
        return cls(
            registry=registry,
            batch_size=Histogram(
                "meshserve_worker_batch_size",
                "Items per ONNX Runtime run.",
                ["model", "version"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            compute=Histogram(
                "meshserve_worker_compute_seconds",
                "ONNX Runtime time per batch.",
                ["model", "version"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            queue_wait=Histogram(
                "meshserve_worker_queue_wait_seconds",
                "Time from enqueue to claim, per request.",
                ["model", "version"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
        )


class LoadFigures(Protocol):
    """A model version's served load (``router.core.LoadRate``)."""

    @property
    def requests_per_s(self) -> float: ...
    @property
    def mean_queue_wait_s(self) -> float: ...


ModelKey = tuple[str, int]


@dataclass(frozen=True)
class RouterReads:
    """What the router's collector reads at scrape time."""

    ready: Callable[[], Mapping[ModelKey, bool]]
    depths: Callable[[], Mapping[ModelKey, Mapping[str, int]]]  # tier name -> queued requests
    loads: Callable[[], Mapping[ModelKey, LoadFigures]]
    unplaceable: Callable[[], Mapping[ModelKey, bool]] = lambda: {}  # no device has room for it
    load_failures: Callable[[], Mapping[ModelKey, str]] = lambda: {}  # failed to load (or to fit): why
    residency: Callable[[], Mapping[ModelKey, ResidencyFigures]] = lambda: {}  # more models than memory


class ResidencyFigures(Protocol):
    """A model version's residency (``router.residency.ResidencyFigures``)."""

    @property
    def devices(self) -> tuple[str, ...]: ...
    @property
    def evicted(self) -> bool: ...
    @property
    def loads(self) -> int: ...
    @property
    def unloads(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def load_ms(self) -> int: ...


class ResidencyCollector(Collector):
    """Where each model version is resident, and its loads, unloads, evictions, load time."""

    def __init__(self, reads: RouterReads) -> None:
        self.reads = reads

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        resident = GaugeMetricFamily(
            "meshserve_model_resident", "1 for each device the model version is placed on.", labels=[*labels, "device"]
        )
        evicted = GaugeMetricFamily(
            "meshserve_model_evicted", "1 while it is not resident (evicted for want of memory).", labels=labels
        )
        loads = CounterMetricFamily("meshserve_model_loads", "Times a worker reported it loaded.", labels=labels)
        unloads = CounterMetricFamily("meshserve_model_unloads", "Times a worker stopped serving it.", labels=labels)
        evictions = CounterMetricFamily(
            "meshserve_model_evictions", "Times it was evicted to make room for others.", labels=labels
        )
        load_time = GaugeMetricFamily(
            "meshserve_model_load_seconds", "Its latest measured load and warm-up time (0: not yet).", labels=labels
        )
        for (name, version), figures in sorted(self.reads.residency().items()):
            names = [name, str(version)]
            for device in figures.devices:
                resident.add_metric([*names, device], 1.0)
            evicted.add_metric(names, 1.0 if figures.evicted else 0.0)
            loads.add_metric(names, figures.loads)
            unloads.add_metric(names, figures.unloads)
            evictions.add_metric(names, figures.evictions)
            load_time.add_metric(names, figures.load_ms / 1000)
        yield from (resident, evicted, loads, unloads, evictions, load_time)


MIN_RATE_FOR_BACKLOG_PER_S = 1.0
"""The backlog estimate divides by at least this rate: a queue nobody serves yet
reads as its depth in seconds, a finite number an autoscaler can act on."""


def backlog_seconds(depth: int, load: LoadFigures | None) -> float:
    """How long a request queued now would wait: the queue ahead of it at the rate the
    model is being served, and never less than what requests waited lately."""
    per_s = load.requests_per_s if load is not None else 0.0
    recent_wait_s = load.mean_queue_wait_s if load is not None else 0.0
    return max(recent_wait_s, depth / max(per_s, MIN_RATE_FOR_BACKLOG_PER_S))


class RouterCollector(Collector):
    """Readiness, queue depth by tier, recent queue wait and the autoscaling signal."""

    def __init__(self, reads: RouterReads) -> None:
        self.reads = reads

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        ready = GaugeMetricFamily("meshserve_model_ready", "1 when some live worker serves it.", labels=labels)
        depth = GaugeMetricFamily(
            "meshserve_queue_depth", "Requests waiting in the model's queue, by tier.", labels=[*labels, "tier"]
        )
        wait = GaugeMetricFamily(
            "meshserve_queue_wait_seconds",
            "Mean enqueue-to-claim time of the requests workers took over their last report interval.",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            "meshserve_served_requests_per_second", "Requests computed per second, all workers.", labels=labels
        )
        backlog = GaugeMetricFamily(
            "meshserve_autoscale_backlog_seconds",
            "The autoscaling signal: seconds a request queued now would wait (queued requests over the"
            " rate they are served, at least the recent queue wait). Scale out above your target.",
            labels=labels,
        )
        unplaceable = GaugeMetricFamily(
            "meshserve_model_unplaceable",
            "1 when placement found no allowed device with room for it (see the router's log for the numbers).",
            labels=labels,
        )
        failed = GaugeMetricFamily(
            "meshserve_model_load_failed",
            "1 while it is not served because its load failed (or it fits no device); the reason label says why.",
            labels=[*labels, "reason"],
        )
        for (name, version), reason in sorted(self.reads.load_failures().items()):
            failed.add_metric([name, str(version), reason], 1.0)
        depths, loads, stuck = self.reads.depths(), self.reads.loads(), self.reads.unplaceable()
        for key, is_ready in sorted(self.reads.ready().items()):
            names = [key[0], str(key[1])]
            ready.add_metric(names, 1.0 if is_ready else 0.0)
            tiers = depths.get(key, {})
            for tier, count in tiers.items():
                depth.add_metric([*names, tier], count)
            load = loads.get(key)
            wait.add_metric(names, load.mean_queue_wait_s if load else 0.0)
            rate.add_metric(names, load.requests_per_s if load else 0.0)
            backlog.add_metric(names, backlog_seconds(sum(tiers.values()), load))
            unplaceable.add_metric(names, 1.0 if stuck.get(key, False) else 0.0)
        yield from (ready, depth, wait, rate, backlog, unplaceable, failed)


@dataclass(frozen=True)
class RouterMetrics:
    registry: CollectorRegistry

    @classmethod
    def create(cls, reads: RouterReads) -> RouterMetrics:
        registry = CollectorRegistry()
        registry.register(RouterCollector(reads))
        registry.register(ResidencyCollector(reads))
        return cls(registry)
