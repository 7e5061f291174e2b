"""``meshserve top`` against real /metrics servers: rates and quantiles over the interval.

The servers expose the services' own metric classes (GatewayMetrics, WorkerMetrics,
RouterMetrics), fed through their real methods and collectors, so a metric renamed
or relabelled in a service breaks these tests instead of leaving top blank."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from meshserve.cli.main import main
from meshserve.cli.top import (
    ModelRow,
    Snapshot,
    TenantRow,
    View,
    build_view,
    fetch_text,
    histogram_quantile,
    take_snapshot,
)
from meshserve.observe.metrics import (
    GatewayMetrics,
    MetricsServer,
    ModelCounters,
    ModelKey,
    RouterMetrics,
    RouterReads,
    WorkerMetrics,
    WorkerReads,
)
from model_workers.devices import DeviceSample
from router.core import LoadRate

PRICE_PER_DEVICE_HOUR = 9.0  # 100 device seconds over 1000 requests: 0.25 per 1000 requests


@dataclass
class WorkerState:
    """The plain counters a worker's core keeps; its collector reads them at scrape time."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    device_seconds: float = 0.0
    tenant_device_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    devices: list[DeviceSample] = field(default_factory=list)

    def models(self) -> list[ModelCounters]:
        if not self.batches:
            return []
        return [ModelCounters("cnn", 1, self.batches, self.items, self.requests, 0, 0, self.device_seconds, 0)]


@dataclass
class RouterState:
    """What the router's collector reads at scrape time."""

    ready: dict[ModelKey, bool] = field(default_factory=dict)
    depths: dict[ModelKey, Mapping[str, int]] = field(default_factory=dict)
    loads: dict[ModelKey, LoadRate] = field(default_factory=dict)


@dataclass
class Mesh:
    """The services' real metric classes, each on its own registry and /metrics server."""

    gateway: GatewayMetrics
    worker: WorkerMetrics
    worker_state: WorkerState
    router_state: RouterState
    urls: list[str]  # gateway, worker, router


def _url(server: MetricsServer) -> str:
    return f"http://127.0.0.1:{server.port}/metrics"


@pytest.fixture
def served() -> Iterator[Mesh]:
    worker_state, router_state = WorkerState(), RouterState()
    worker = WorkerMetrics.create(
        WorkerReads(
            models=worker_state.models,
            tenant_device_seconds=lambda: worker_state.tenant_device_seconds,
            devices=lambda: worker_state.devices,
            device="cpu",
            price_per_device_hour=PRICE_PER_DEVICE_HOUR,
        )
    )
    router = RouterMetrics.create(
        RouterReads(
            ready=lambda: router_state.ready, depths=lambda: router_state.depths, loads=lambda: router_state.loads
        )
    )
    mesh = Mesh(GatewayMetrics.create(), worker, worker_state, router_state, [])
    registries = (mesh.gateway.registry, worker.registry, router.registry)
    servers = [MetricsServer(registry, 0, host="127.0.0.1") for registry in registries]
    mesh.urls.extend(_url(server) for server in servers)
    try:
        yield mesh
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def down_url() -> str:
    """The address of a metrics server that has stopped: connections are refused."""
    server = MetricsServer(CollectorRegistry(), 0, host="127.0.0.1")
    server.stop()
    return _url(server)


def _history(mesh: Mesh) -> None:
    """What happened before the first scrape: none of it may show in the figures."""
    g, w, ws = mesh.gateway, mesh.worker, mesh.worker_state
    g.requests.labels("cnn", "OK").inc(1000)
    g.requests.labels("cnn", "UNAVAILABLE").inc(1000)
    g.tenant_requests.labels("acme", "OK").inc(1000)
    g.rejections.labels("acme", "rate").inc(50)
    for _ in range(1000):
        g.latency.labels("cnn").observe(5.0)
        g.tenant_latency.labels("acme").observe(5.0)
        w.compute.labels("cnn", "1").observe(0.09)
    ws.batches += 1000
    ws.items += 1000
    ws.requests += 920
    ws.device_seconds += 98.5
    ws.tenant_device_seconds["acme", "cnn"] = 100.0


def _interval(mesh: Mesh) -> None:
    """Two seconds of work between the scrapes."""
    g, w, ws, rs = mesh.gateway, mesh.worker, mesh.worker_state, mesh.router_state
    g.requests.labels("cnn", "OK").inc(90)
    g.requests.labels("cnn", "UNAVAILABLE").inc(10)
    for seconds in [0.005] * 90 + [0.03] * 10:  # ranks 91-100 in (0.02, 0.05]
        g.latency.labels("cnn").observe(seconds)
        g.tenant_latency.labels("acme").observe(seconds)
    g.tenant_requests.labels("acme", "OK").inc(100)
    g.rejections.labels("acme", "rate").inc(4)
    g.rejections.labels("acme", "inflight").inc(1)
    g.rejections.labels("bulk", "tenant_queue_full").inc(6)
    g.requests.labels("resnet", "OK").inc(4)  # a series born in the interval counts from zero
    g.inflight.labels("cnn").set(7)
    ws.batches += 10
    ws.items += 80
    ws.requests += 80  # 1000 in all, over 100 device seconds: the cost figure
    for _ in range(10):
        w.compute.labels("cnn", "1").observe(0.015)
    ws.device_seconds += 1.5
    ws.tenant_device_seconds["acme", "cnn"] += 1.0
    ws.devices.append(DeviceSample("cpu", 0.5, 2**30, 4 * 2**30))
    rs.depths["cnn", 1] = {"realtime": 3, "standard": 0, "batch": 12}
    rs.loads["cnn", 1] = LoadRate(requests_per_s=10.0, mean_queue_wait_s=0.4)  # backlog: 15 queued / 10 per s
    rs.ready["cnn", 1] = True
    rs.ready["mlp", 2] = False


def _scrape_around(mesh: Mesh, urls: list[str]) -> View:
    _history(mesh)
    before = take_snapshot(urls, clock=lambda: 10.0)
    _interval(mesh)
    return build_view(before, take_snapshot(urls, clock=lambda: 12.0))


def _models(view: View) -> dict[str, ModelRow]:
    return {row.model: row for row in view.models}


def _tenants(view: View) -> dict[str, TenantRow]:
    return {row.tenant: row for row in view.tenants}


def test_models_show_rates_and_quantiles_over_the_interval_only(served: Mesh) -> None:
    view = _scrape_around(served, served.urls)
    assert view.interval_s == 2.0
    assert view.inflight_requests == 7
    models = _models(view)
    assert sorted(models) == ["cnn", "mlp", "resnet"]
    cnn = models["cnn"].gateway
    assert cnn.requests_per_s == pytest.approx(50.0)
    assert cnn.error_ratio == pytest.approx(0.1)
    assert cnn.p50_s == pytest.approx(0.002 + 0.003 * 50 / 90)  # rank 50 of 90 in (0.002, 0.005]
    assert cnn.p99_s == pytest.approx(0.02 + 0.03 * 9 / 10)  # rank 99: 9 of 10 into (0.02, 0.05]
    (version,) = models["cnn"].versions
    assert version.version == "1"
    assert version.ready is True
    assert dict(version.queue_depth_by_tier) == {"realtime": 3, "standard": 0, "batch": 12}
    assert (version.queue_wait_s, version.backlog_s) == (0.4, 1.5)
    assert version.batch_size_avg == pytest.approx(8.0)
    assert version.compute_p99_s == pytest.approx(0.01 + 0.01 * 9.9 / 10)
    assert version.device_seconds_per_s == pytest.approx(0.75)
    assert version.cost_per_1000_requests == 0.25
    assert models["resnet"].gateway.requests_per_s == pytest.approx(2.0)
    assert models["resnet"].versions == ()
    (mlp,) = models["mlp"].versions
    assert (mlp.version, mlp.ready, dict(mlp.queue_depth_by_tier), mlp.batch_size_avg) == ("2", False, {}, None)
    assert models["mlp"].gateway.requests_per_s is None


def test_tenants_and_devices(served: Mesh) -> None:
    view = _scrape_around(served, served.urls)
    tenants = _tenants(view)
    assert sorted(tenants) == ["acme", "bulk"]
    acme = tenants["acme"]
    assert acme.requests_per_s == pytest.approx(50.0)
    assert dict(acme.rejected_per_s_by_reason) == pytest.approx({"rate": 2.0, "inflight": 0.5})
    assert acme.p99_s == pytest.approx(0.047)
    assert acme.device_seconds_per_s == pytest.approx(0.5)
    bulk = tenants["bulk"]
    assert dict(bulk.rejected_per_s_by_reason) == pytest.approx({"tenant_queue_full": 3.0})
    assert (bulk.requests_per_s, bulk.p99_s, bulk.device_seconds_per_s) == (None, None, None)
    (device,) = view.devices
    assert (device.device, device.utilization_ratio) == ("cpu", 0.5)
    assert (device.memory_used_bytes, device.memory_total_bytes) == (2**30, 4 * 2**30)


def test_a_down_endpoint_is_reported_and_the_rest_still_shown(served: Mesh, down_url: str) -> None:
    view = _scrape_around(served, [*served.urls[:2], down_url])
    assert [endpoint.up for endpoint in view.endpoints] == [True, True, False]
    assert view.endpoints[2].url == down_url
    assert "refused" in (view.endpoints[2].error or "").lower()
    cnn = _models(view)["cnn"]
    assert cnn.gateway.requests_per_s == pytest.approx(50.0)
    assert cnn.versions[0].ready is None  # the router's figures are missing, not made up
    assert dict(cnn.versions[0].queue_depth_by_tier) == {}
    assert "mlp" not in _models(view)


def test_an_endpoint_down_at_the_first_scrape_has_no_rates_yet(served: Mesh) -> None:
    """A service that (re)appears has no baseline: its totals since start are not a rate."""

    def refused(url: str, timeout_s: float) -> str:
        raise ConnectionRefusedError("connection refused")

    _history(served)
    before = take_snapshot(served.urls, fetch=refused, clock=lambda: 10.0)
    _interval(served)
    view = build_view(before, take_snapshot(served.urls, fetch=fetch_text, clock=lambda: 12.0))
    assert all(endpoint.up for endpoint in view.endpoints)
    cnn = _models(view)["cnn"]
    assert (cnn.gateway.requests_per_s, cnn.gateway.p99_s) == (None, None)
    assert cnn.versions[0].queue_depth_by_tier["batch"] == 12  # gauges need no baseline


def test_a_restarted_counter_counts_from_zero() -> None:
    def snapshot(at_s: float, total: float) -> Snapshot:
        labels = (("code", "OK"), ("model", "cnn"))
        return Snapshot(at_s, {"meshserve_requests_total": {("u", labels): total}}, ())

    view = build_view(snapshot(0.0, 500.0), snapshot(2.0, 6.0))
    assert view.models[0].gateway.requests_per_s == pytest.approx(3.0)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.2: 30.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: half-way through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, buckets) == 0.2  # in the +Inf bucket: the highest finite bound
    assert math.isnan(histogram_quantile(0.99, {0.1: 0.0, math.inf: 0.0}))
    assert math.isnan(histogram_quantile(0.99, {0.1: 5.0}))
    with pytest.raises(ValueError, match="quantile 0"):
        histogram_quantile(0, buckets)


def test_top_once_prints_one_frame(served: Mesh, down_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _history(served)
    _interval(served)
    gateway, worker, _ = served.urls
    argv = ["top", "--once", "--interval-s", "0.05"]
    assert main([*argv, "--endpoint", gateway, "--endpoint", worker, "--endpoint", down_url]) == 0
    frame = capsys.readouterr().out
    for shown in ("cnn", "resnet", "acme", "bulk", "cpu", "endpoints: 2 of 3 up", f"down: {down_url}"):
        assert shown in frame
