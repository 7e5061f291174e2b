"""What each process of the mesh spent per request: CPU by hop, from /proc.

The processes are those below the bench (``meshserve up``'s children and the Redis the
bench started), told apart by their command line. Each one's user + system CPU over a
point's measured window (``/proc/<pid>/stat``, every thread) divided by the calls
answered in it gives its CPU µs per request. The worker's model compute is read from
its ``/metrics`` (the port its command line names) two ways:

- CPU (``meshserve_worker_compute_cpu_seconds``): what the threads running the model
  spent inside ONNX Runtime, its intra-op pool threads and their spinning included
  (``model_workers/cpu_time.py``). The worker's CPU less this is what the worker
  itself spends per request beyond the model: ``worker_beyond_compute_cpu_us_per_request``.
- wall (``meshserve_worker_compute_seconds``, the histogram of each batch's wall
  time): ``worker_beyond_compute_us_per_request`` is the worker's CPU less this, the
  older estimate, kept for comparison. It counts a second intra-op thread's work and
  its spinning as the worker's own, and a run slowed by a busy host as compute.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshserve_bench.load import Window, process_cpu_s, sleep_until

ROLES = ("gateway", "worker", "router")
"""``meshserve`` subcommands whose processes are measured (several workers sum)."""

COMPUTE_METRIC = "meshserve_worker_compute_seconds_sum"
COMPUTE_CPU_METRIC = "meshserve_worker_compute_cpu_seconds_total"
ENGINE_METRIC = "meshserve_engine_setting"
BATCH_ITEMS_METRIC = "meshserve_worker_batch_size_sum"
BATCHES_METRIC = "meshserve_worker_batch_size_count"
METRICS_TIMEOUT_S = 2.0


def role_of(argv: Sequence[str]) -> str | None:
    """The hop a process plays, from its command line: a ``ROLES`` subcommand of
    ``meshserve``, ``redis`` for a Redis or Valkey server, None for anything else."""
    if argv and any(name in Path(argv[0]).name for name in ("redis-server", "valkey-server")):
        return "redis"
    if "meshserve" not in argv[:3]:
        return None
    following = argv[argv.index("meshserve") + 1 :]
    return following[0] if following and following[0] in ROLES else None


def command_line(pid: int) -> list[str]:
    """The argv of ``pid`` ([] when it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def roles(pids: Sequence[int]) -> dict[str, list[int]]:
    """``pids`` by hop (see :func:`role_of`), from /proc; a process gone meanwhile is left out."""
    found: dict[str, list[int]] = {}
    for pid in pids:
        if (role := role_of(command_line(pid))) is not None:
            found.setdefault(role, []).append(pid)
    return found


def metrics_url(argv: Sequence[str]) -> str | None:
    """The /metrics URL a service's command line gives it (``--metrics-host``,
    ``--metrics-port``); None when it has none or port 0 (off)."""
    flags = dict(itertools.pairwise(argv))
    port, host = flags.get("--metrics-port"), flags.get("--metrics-host", "127.0.0.1")
    return None if port in (None, "0") else f"http://{host}:{port}/metrics"


def worker_sums(urls: Sequence[str | None]) -> dict[str, float] | None:
    """The workers' model compute seconds (wall and CPU), batch items and batches, each
    summed over every model and worker (``COMPUTE_METRIC``, ``COMPUTE_CPU_METRIC``,
    ``BATCH_ITEMS_METRIC``, ``BATCHES_METRIC`` -> total), from one read of each
    /metrics; None when one has no URL or cannot be read."""
    totals = dict.fromkeys((COMPUTE_METRIC, COMPUTE_CPU_METRIC, BATCH_ITEMS_METRIC, BATCHES_METRIC), 0.0)
    for url in urls:
        if (text := _metrics_text(url)) is None:
            return None
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _metrics_text(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def engine_settings(text: str) -> list[str]:
    """``model/version setting (source)`` for each model a worker's /metrics text says it
    runs (``meshserve_engine_setting``): which ONNX Runtime threads a point's CPU came from."""
    found = []
    for family in text_string_to_metric_families(text):
        if family.name == ENGINE_METRIC:
            for sample in family.samples:
                labels = sample.labels
                found.append(f"{labels['model']}/{labels['version']} {labels['setting']} ({labels['source']})")
    return sorted(found)


def worker_engines(urls: Sequence[str | None]) -> list[str]:
    """Every worker's engine settings (``engine_settings``); a worker unread is left out."""
    return sorted(e for url in urls if (text := _metrics_text(url)) is not None for e in engine_settings(text))


def compute_s(urls: Sequence[str | None]) -> float | None:
    """The workers' summed model compute seconds, every model, from their /metrics;
    None when one has no URL or cannot be read."""
    sums = worker_sums(urls)
    return None if sums is None else sums[COMPUTE_METRIC]


@dataclass(frozen=True, slots=True)
class HopUsage:
    """CPU seconds each hop spent inside a window, and the worker's model compute seconds
    (wall time of its batches, and the CPU of the threads that computed them)."""

    cpu_s: Mapping[str, float]
    compute_s: float | None
    batch_items: float | None = None  # items the workers ran in batches; None: unread
    batches: float | None = None
    compute_cpu_s: float | None = None  # None: unread, or a worker without the metric
    engines: tuple[str, ...] = ()  # the workers' ONNX Runtime settings (``engine_settings``)

    def per_request(self, calls: int) -> dict[str, Any]:
        """µs per answered call: each hop's CPU, the model's compute (wall and CPU) and
        the worker's CPU beyond each; {} without calls."""
        if calls <= 0:
            return {}
        cpu_us = {role: seconds / calls * 1e6 for role, seconds in self.cpu_s.items()}
        figures: dict[str, Any] = {"cpu_us_per_request": cpu_us}
        if self.compute_s is not None:
            compute_us = self.compute_s / calls * 1e6
            figures["model_compute_us_per_request"] = compute_us
            if "worker" in cpu_us:
                figures["worker_beyond_compute_us_per_request"] = cpu_us["worker"] - compute_us
        if self.compute_cpu_s is not None:
            compute_cpu_us = self.compute_cpu_s / calls * 1e6
            figures["model_compute_cpu_us_per_request"] = compute_cpu_us
            if "worker" in cpu_us:
                figures["worker_beyond_compute_cpu_us_per_request"] = cpu_us["worker"] - compute_cpu_us
        if self.batches:
            figures["mean_batch"] = (self.batch_items or 0.0) / self.batches
        if self.engines:
            figures["worker_engines"] = list(self.engines)
        return figures


async def hop_usage_during(window: Window, pids: Sequence[int]) -> HopUsage:
    """What each hop of ``pids`` spent inside ``window`` (a process that ended meanwhile
    is left out of its hop's sum), and the workers' compute and batches.

    The workers' /metrics are read just before the CPU window opens and just after it
    closes: a read costs a worker CPU in proportion to its series (one per tenant and
    model for device time), which is the bench's own load, not the calls'."""
    by_role = roles(pids)
    worker_metrics_urls = [metrics_url(command_line(pid)) for pid in by_role.get("worker", [])]
    await sleep_until(window.start_ns)
    sums_before = await asyncio.to_thread(worker_sums, worker_metrics_urls)
    before = {pid: process_cpu_s(pid) for group in by_role.values() for pid in group}
    await sleep_until(window.end_ns)
    after = {pid: process_cpu_s(pid) for pid in before}
    sums_after = await asyncio.to_thread(worker_sums, worker_metrics_urls)
    engines = tuple(await asyncio.to_thread(worker_engines, worker_metrics_urls))
    cpu: dict[str, float] = {}
    for role, group in by_role.items():
        spent = [(after[pid] or 0.0) - (before[pid] or 0.0) for pid in group if before[pid] is not None]
        cpu[role] = sum(spent)
    if sums_before is None or sums_after is None:
        return HopUsage(cpu, None, engines=engines)
    spent_sums = {name: sums_after[name] - sums_before[name] for name in sums_before}
    return HopUsage(
        cpu,
        spent_sums[COMPUTE_METRIC],
        spent_sums[BATCH_ITEMS_METRIC],
        spent_sums[BATCHES_METRIC],
        # a worker older than the metric reads 0 before and after: unknown, not free
        spent_sums[COMPUTE_CPU_METRIC] if sums_after[COMPUTE_CPU_METRIC] > 0 else None,
        engines,
    )
