"""``meshserve top``: a live terminal view of models, tenants, queues, latency and devices.

It scrapes the services' Prometheus endpoints over HTTP and shows what changed
between two scrapes: a rate is a counter's increase over the interval, and a
quantile comes from the increases of a histogram's buckets, interpolated inside
the bucket as Prometheus' ``histogram_quantile`` does; so a p99 is the p99 of the
last interval, not of everything since start.

The pure part (two ``Snapshot`` values -> ``build_view`` -> a frozen ``View``)
knows nothing of HTTP or terminals; ``take_snapshot`` fetches, ``render`` draws,
``run_top`` loops.

Several endpoints may export the same series. Counters and histograms are summed
(each worker counts its own work); gauges take the largest value (the router's
queue depth, or one device seen by two workers, is one thing measured twice).
The gateway's ``model`` label has no version, so its figures sit on the model's
first row. An endpoint that does not answer is listed as down in the footer and
its series are left out; a series whose endpoint was down at the first scrape has
no rate, and a new series on an endpoint that was up counts from zero.
"""

from __future__ import annotations

import bisect
import http.client
import itertools
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from meshserve.queue import TIER_NAMES

DEFAULT_ENDPOINTS = (
    "http://127.0.0.1:8002/metrics",  # gateway: `meshserve up --metrics-port`
    "http://127.0.0.1:8003/metrics",  # worker 0 (worker i: 8003 + i)
    "http://127.0.0.1:8004/metrics",  # router: after the workers (one worker here)
)
SCRAPE_TIMEOUT_S = 2.0
PIPE_WIDTH_COLUMNS = 200  # output that is not a terminal is not squeezed to 80 columns

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Key = tuple[str, ...]  # the values of the labels a figure is grouped by
Fetch = Callable[[str, float], str]  # (url, timeout_s) -> Prometheus text exposition


# ------------------------------------------------------------------ scraping


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    url: str
    error: str | None = None  # why it did not answer; None: it did

    @property
    def up(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every sample of one scrape of all endpoints.

    ``series`` maps a sample name (``meshserve_requests_total``,
    ``meshserve_request_duration_seconds_bucket``) to its values by (endpoint url, labels).
    """

    at_s: float  # a monotonic clock's reading, taken as the scrape began
    series: Mapping[str, Mapping[tuple[str, Labels], float]]
    endpoints: tuple[EndpointStatus, ...]


def fetch_text(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: bytes = response.read()
    return body.decode()


def take_snapshot(
    urls: Sequence[str],
    *,
    fetch: Fetch = fetch_text,
    clock: Callable[[], float] = time.monotonic,
    timeout_s: float = SCRAPE_TIMEOUT_S,
) -> Snapshot:
    """Scrape every endpoint at once; one that fails (refused, timed out, unparsable) is down."""
    at_s = clock()
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        results = list(pool.map(lambda url: _scrape(fetch, url, timeout_s), urls))
    series: defaultdict[str, dict[tuple[str, Labels], float]] = defaultdict(dict)
    endpoints = []
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, str):
            endpoints.append(EndpointStatus(url, result))
            continue
        endpoints.append(EndpointStatus(url))
        for (name, labels), value in result.items():
            series[name][url, labels] = value
    return Snapshot(at_s, dict(series), tuple(endpoints))


def _scrape(fetch: Fetch, url: str, timeout_s: float) -> dict[tuple[str, Labels], float] | str:
    """One endpoint's samples, or why there are none."""
    try:
        return _parse(fetch(url, timeout_s))
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return str(exc) or type(exc).__name__


def _parse(text: str) -> dict[tuple[str, Labels], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# ------------------------------------------------------------------ the view model


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """One model name as the gateway saw it over the interval (all versions)."""

    requests_per_s: float | None
    error_ratio: float | None  # non-OK over all; None without requests
    p50_s: float | None
    p99_s: float | None


@dataclass(frozen=True, slots=True)
class VersionRow:
    version: str
    ready: bool | None
    queue_depth_by_tier: Mapping[str, float]
    queue_wait_s: float | None
    backlog_s: float | None
    batch_size_avg: float | None  # items per batch over the interval
    compute_p99_s: float | None
    device_seconds_per_s: float | None
    cost_per_1000_requests: float | None
    load_error: str | None = None  # why it failed to load (the router's); None: it did not fail
    resident_on: tuple[str, ...] = ()  # devices the router placed it on (more models than memory)
    evicted: bool = False  # not resident: loads on demand


@dataclass(frozen=True, slots=True)
class ModelRow:
    model: str
    gateway: GatewayFigures
    versions: tuple[VersionRow, ...]  # empty when only the gateway knows the model


@dataclass(frozen=True, slots=True)
class TenantRow:
    tenant: str
    requests_per_s: float | None
    rejected_per_s_by_reason: Mapping[str, float]
    p99_s: float | None
    device_seconds_per_s: float | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    utilization_ratio: float | None  # 0..1
    memory_used_bytes: float | None
    memory_total_bytes: float | None


@dataclass(frozen=True, slots=True)
class View:
    interval_s: float  # between the two scrapes; 0 before there are two
    inflight_requests: float | None
    models: tuple[ModelRow, ...]
    tenants: tuple[TenantRow, ...]
    devices: tuple[DeviceRow, ...]
    endpoints: tuple[EndpointStatus, ...]  # as of the later scrape


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """The ``q``-quantile (0 < q <= 1) of cumulative bucket counts ``{upper bound: count}``.

    As Prometheus computes it: linear inside the bucket that holds the rank, from 0
    in the first bucket (when its bound is positive); the highest finite bound when
    the rank falls in the +Inf bucket; NaN without observations or a +Inf bucket.
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q}: expected 0 < q <= 1")
    bounds = sorted(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf:
        return math.nan
    # Cumulative counts never fall; increases of a restarted series can, so flatten them.
    counts = list(itertools.accumulate((buckets[bound] for bound in bounds), max))
    if counts[-1] <= 0:
        return math.nan
    rank = q * counts[-1]
    i = bisect.bisect_left(counts, rank)
    if i == len(bounds) - 1:
        return bounds[-2]
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    lower, below = (bounds[i - 1], counts[i - 1]) if i > 0 else (0.0, 0.0)
    return lower + (bounds[i] - lower) * (rank - below) / (counts[i] - below)


@dataclass(frozen=True, slots=True)
class _Window:
    """Two snapshots, and figures over the time between them grouped by some labels."""

    before: Snapshot
    after: Snapshot

    @property
    def seconds(self) -> float:
        return self.after.at_s - self.before.at_s

    def _increases(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        was_up = {endpoint.url for endpoint in self.before.endpoints if endpoint.up}
        old = self.before.series.get(name, {})
        for key, value in self.after.series.get(name, {}).items():
            base = old.get(key, 0.0 if key[0] in was_up else None)
            if base is not None:
                yield dict(key[1]), value - base if value >= base else value  # a reset: counted from 0

    def rates(self, name: str, by: Sequence[str]) -> dict[Key, float]:
        if self.seconds <= 0:
            return {}
        sums: defaultdict[Key, float] = defaultdict(float)
        for labels, increase in self._increases(name):
            sums[_key(labels, by)] += increase
        return {key: total / self.seconds for key, total in sums.items()}

    def quantiles(self, name: str, by: Sequence[str], q: float) -> dict[Key, float]:
        """``q`` of histogram ``name`` over the interval, from its buckets' increases."""
        buckets: defaultdict[Key, defaultdict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, increase in self._increases(f"{name}_bucket"):
            buckets[_key(labels, by)][float(labels["le"])] += increase
        found = {key: histogram_quantile(q, counts) for key, counts in buckets.items()}
        return {key: value for key, value in found.items() if not math.isnan(value)}

    def gauge_sum(self, name: str) -> float | None:
        """Every series of a gauge added up (in-flight calls over models and gateways)."""
        series = self.after.series.get(name)
        return sum(series.values()) if series else None

    def gauges(self, name: str, by: Sequence[str]) -> dict[Key, float]:
        largest: dict[Key, float] = {}
        for (_, labels), value in self.after.series.get(name, {}).items():
            key = _key(dict(labels), by)
            largest[key] = max(value, largest.get(key, -math.inf))
        return largest


def _key(labels: Mapping[str, str], by: Sequence[str]) -> Key:
    return tuple(labels.get(name, "") for name in by)


def build_view(before: Snapshot, after: Snapshot) -> View:
    """The figures between two snapshots of the same endpoints (``before`` is the earlier)."""
    window = _Window(before, after)
    inflight = window.gauge_sum("meshserve_inflight_requests")
    return View(
        interval_s=max(0.0, window.seconds),
        inflight_requests=inflight,
        models=_models(window),
        tenants=_tenants(window),
        devices=_devices(window),
        endpoints=after.endpoints,
    )


def _gateway(window: _Window) -> dict[str, GatewayFigures]:
    by_code = window.rates("meshserve_requests_total", ("model", "code"))
    total: defaultdict[str, float] = defaultdict(float)
    failed: defaultdict[str, float] = defaultdict(float)
    for (model, code), rate in by_code.items():
        total[model] += rate
        failed[model] += rate if code != "OK" else 0.0
    p50 = window.quantiles("meshserve_request_duration_seconds", ("model",), 0.5)
    p99 = window.quantiles("meshserve_request_duration_seconds", ("model",), 0.99)
    return {
        model: GatewayFigures(
            requests_per_s=total.get(model),
            error_ratio=failed[model] / total[model] if total.get(model) else None,
            p50_s=p50.get((model,)),
            p99_s=p99.get((model,)),
        )
        for model in {*total, *(key[0] for key in p99)}
    }


def _versions(window: _Window) -> dict[Key, VersionRow]:
    by = ("model", "version")
    ready = window.gauges("meshserve_model_ready", by)
    depth = window.gauges("meshserve_queue_depth", (*by, "tier"))
    queue_wait = window.gauges("meshserve_queue_wait_seconds", by)
    backlog = window.gauges("meshserve_autoscale_backlog_seconds", by)
    cost = window.gauges("meshserve_cost_per_1000_requests", by)
    batches = window.rates("meshserve_worker_batches_total", by)
    items = window.rates("meshserve_worker_items_total", by)
    compute = window.quantiles("meshserve_worker_compute_seconds", by, 0.99)
    device = window.rates("meshserve_device_seconds_total", by)
    failed: dict[Key, str] = {
        key[:2]: key[2] for key, value in window.gauges("meshserve_model_load_failed", (*by, "reason")).items() if value
    }
    resident = [key for key, value in window.gauges("meshserve_model_resident", (*by, "device")).items() if value]
    evicted = window.gauges("meshserve_model_evicted", by)
    keys = {*ready, *failed, *queue_wait, *backlog, *cost, *batches, *compute, *device, *(key[:2] for key in depth)}
    return {
        key: VersionRow(
            version=key[1],
            ready=bool(ready[key]) if key in ready else None,
            queue_depth_by_tier={tier: value for (*at, tier), value in depth.items() if tuple(at) == key},
            queue_wait_s=queue_wait.get(key),
            backlog_s=backlog.get(key),
            batch_size_avg=items.get(key, 0.0) / batches[key] if batches.get(key) else None,
            compute_p99_s=compute.get(key),
            device_seconds_per_s=device.get(key),
            cost_per_1000_requests=cost.get(key),
            load_error=failed.get(key),
            resident_on=tuple(sorted(at[2] for at in resident if at[:2] == key)),
            evicted=bool(evicted.get(key)),
        )
        for key in keys
    }


def _models(window: _Window) -> tuple[ModelRow, ...]:
    gateway = _gateway(window)
    versions = _versions(window)
    names = sorted({*gateway, *(model for model, _ in versions)})
    nothing = GatewayFigures(None, None, None, None)
    return tuple(
        ModelRow(
            model=name,
            gateway=gateway.get(name, nothing),
            versions=tuple(row for (model, _), row in sorted(versions.items(), key=_version_order) if model == name),
        )
        for name in names
    )


def _version_order(item: tuple[Key, VersionRow]) -> tuple[str, int, str]:
    model, version = item[0]
    return model, len(version), version  # "10" after "9"


def _tenants(window: _Window) -> tuple[TenantRow, ...]:
    requests = window.rates("meshserve_tenant_requests_total", ("tenant",))
    rejected = window.rates("meshserve_rejections_total", ("tenant", "reason"))
    p99 = window.quantiles("meshserve_tenant_request_duration_seconds", ("tenant",), 0.99)
    device = window.rates("meshserve_tenant_device_seconds_total", ("tenant",))
    names = sorted({*requests, *p99, *device, *(key[:1] for key in rejected)})
    return tuple(
        TenantRow(
            tenant=name,
            requests_per_s=requests.get((name,)),
            rejected_per_s_by_reason={reason: rate for (tenant, reason), rate in rejected.items() if tenant == name},
            p99_s=p99.get((name,)),
            device_seconds_per_s=device.get((name,)),
        )
        for (name,) in names
    )


def _devices(window: _Window) -> tuple[DeviceRow, ...]:
    utilization = window.gauges("meshserve_device_utilization_ratio", ("device",))
    used = window.gauges("meshserve_device_memory_used_bytes", ("device",))
    total = window.gauges("meshserve_device_memory_total_bytes", ("device",))
    return tuple(
        DeviceRow(key[0], utilization.get(key), used.get(key), total.get(key))
        for key in sorted({*utilization, *used, *total})
    )


# ------------------------------------------------------------------ rendering


def render(view: View) -> RenderableType:
    """The tables of one frame; a figure nobody exports shows as "-"."""
    return Group(_models_table(view), _failures(view), _tenants_table(view), _devices_table(view), _footer(view))


def _models_table(view: View) -> Table:
    inflight = _number(view.inflight_requests, "{:.0f}")
    table = Table(title=f"models (over {view.interval_s:.2f}s; gateway in flight: {inflight})", title_justify="left")
    table.add_column("model", no_wrap=True)
    for header in ("req/s", "err", "p50", "p99"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("ver", no_wrap=True)
    for header in (
        "ready",
        "resident",
        "queue rt/std/batch",
        "queue wait",
        "backlog",
        "batch avg",
        "compute p99",
        "device s/s",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("cost/1k", justify="right", no_wrap=True)
    for model in view.models:
        gateway = _gateway_cells(model)
        for row in model.versions or (None,):
            table.add_row(*gateway, *_version_cells(row))
            gateway = [""] * len(gateway)  # the gateway's figures are per name: on the first row only
    return table


def _gateway_cells(model: ModelRow) -> list[str]:
    figures = model.gateway
    return [
        model.model,
        _number(figures.requests_per_s, "{:.1f}"),
        _number(figures.error_ratio, "{:.1%}"),
        _duration(figures.p50_s),
        _duration(figures.p99_s),
    ]


def _version_cells(row: VersionRow | None) -> list[str]:
    if row is None:
        return ["-"] * 10
    depth = row.queue_depth_by_tier
    return [
        row.version,
        "failed" if row.load_error else "-" if row.ready is None else "yes" if row.ready else "no",
        "evicted" if row.evicted else ",".join(row.resident_on) or "-",
        "/".join(_number(depth.get(tier), "{:.0f}") for tier in TIER_NAMES) if depth else "-",
        _duration(row.queue_wait_s),
        _duration(row.backlog_s),
        _number(row.batch_size_avg, "{:.1f}"),
        _duration(row.compute_p99_s),
        _number(row.device_seconds_per_s, "{:.2f}"),
        _number(row.cost_per_1000_requests, "{:.4f}"),
    ]


def _failures(view: View) -> Text:
    """Why each failed model version failed, one line each (nothing when none failed)."""
    text = Text()
    for model in view.models:
        for row in model.versions:
            if row.load_error:
                text.append(f"{chr(10) if text.plain else ''}failed to load: {model.model} version {row.version}: ")
                text.append(row.load_error, style="red")
    return text


def _tenants_table(view: View) -> Table:
    table = Table(title="tenants", title_justify="left")
    table.add_column("tenant", no_wrap=True)
    for header in ("req/s", "rejected/s", "p99", "device s/s"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in view.tenants:
        rejected = ", ".join(f"{reason} {rate:.1f}" for reason, rate in sorted(row.rejected_per_s_by_reason.items()))
        table.add_row(
            row.tenant,
            _number(row.requests_per_s, "{:.1f}"),
            rejected or "-",
            _duration(row.p99_s),
            _number(row.device_seconds_per_s, "{:.2f}"),
        )
    return table


def _devices_table(view: View) -> Table:
    table = Table(title="devices", title_justify="left")
    table.add_column("device", no_wrap=True)
    for header in ("utilization", "memory used", "memory total"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in view.devices:
        table.add_row(
            row.device,
            _number(row.utilization_ratio, "{:.0%}"),
            _bytes(row.memory_used_bytes),
            _bytes(row.memory_total_bytes),
        )
    return table


def _footer(view: View) -> Text:
    up = sum(endpoint.up for endpoint in view.endpoints)
    text = Text(f"endpoints: {up} of {len(view.endpoints)} up")
    for endpoint in view.endpoints:
        if not endpoint.up:
            text.append(f"\ndown: {endpoint.url} ({endpoint.error})", style="red")
    return text


def _number(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _bytes(count: float | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**30:.1f}GiB" if count >= 2**30 else f"{count / 2**20:.0f}MiB"


# ------------------------------------------------------------------ the command


def run_top(urls: Sequence[str], interval_s: float, *, once: bool, fetch: Fetch = fetch_text) -> int:
    """Scrape ``urls`` every ``interval_s`` and redraw until Ctrl-C.

    ``once``: scrape twice ``interval_s`` apart, print that frame plainly, return.
    """
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH_COLUMNS)
    try:
        before = take_snapshot(urls, fetch=fetch)
        if once:
            time.sleep(interval_s)
            console.print(render(build_view(before, take_snapshot(urls, fetch=fetch))))
        else:
            _redraw_forever(console, before, interval_s, lambda: take_snapshot(urls, fetch=fetch))
    except KeyboardInterrupt:
        pass
    return 0


def _redraw_forever(console: Console, first: Snapshot, interval_s: float, scrape: Callable[[], Snapshot]) -> None:
    """A full-screen frame every ``interval_s``, each from the last two scrapes, until interrupted."""
    before = first
    with Live(render(build_view(first, first)), console=console, screen=True, auto_refresh=False) as live:
        while True:
            time.sleep(max(0.0, before.at_s + interval_s - time.monotonic()))
            after = scrape()
            live.update(render(build_view(before, after)), refresh=True)
            before = after
