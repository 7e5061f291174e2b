"""What each process of the mesh spent per request: CPU by hop, from /proc.

The processes are those below the bench (``meshserve up``'s children and the Redis the
bench started), told apart by their command line. Each one's user + system CPU over a
point's measured window (``/proc/<pid>/stat``, every thread) divided by the calls
answered in it gives its CPU µs per request. The worker's model compute (ONNX Runtime's
wall time per batch, the worker's own ``meshserve_worker_compute_seconds`` histogram)
is read from its ``/metrics`` (the port its command line names), and reported beside the
worker's CPU: what the worker spends beyond the model is the difference (an estimate:
ONNX Runtime's threads may spend more or less CPU than its wall time).
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve_bench.load import Window, process_cpu_s, sleep_until

ROLES = ("gateway", "worker", "router")
"""``meshserve`` subcommands whose processes are measured (several workers sum)."""

COMPUTE_METRIC = "meshserve_worker_compute_seconds_sum"
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


def compute_s(urls: Sequence[str | None]) -> float | None:
    """The workers' summed model compute seconds, every model, from their /metrics;
    None when one has no URL or cannot be read."""
    total = 0.0
    for url in urls:
        if url is None:
            return None
        try:
            with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(COMPUTE_METRIC))
    return total


@dataclass(frozen=True, slots=True)
class HopUsage:
    """CPU seconds each hop spent inside a window, and the worker's model compute seconds."""

    cpu_s: Mapping[str, float]
    compute_s: float | None

    def per_request(self, calls: int) -> dict[str, Any]:
        """µs per answered call: each hop's CPU, the model's compute and the worker's
        CPU beyond it; {} without calls."""
        if calls <= 0:
            return {}
        cpu_us = {role: seconds / calls * 1e6 for role, seconds in self.cpu_s.items()}
        figures: dict[str, Any] = {"cpu_us_per_request": cpu_us}
        if self.compute_s is not None:
            compute_us = self.compute_s / calls * 1e6
            figures["model_compute_us_per_request"] = compute_us
            if "worker" in cpu_us:
                figures["worker_beyond_compute_us_per_request"] = cpu_us["worker"] - compute_us
        return figures


async def hop_usage_during(window: Window, pids: Sequence[int]) -> HopUsage:
    """What each hop of ``pids`` spent inside ``window`` (a process that ended meanwhile
    is left out of its hop's sum)."""
    by_role = roles(pids)
    worker_metrics_urls = [metrics_url(command_line(pid)) for pid in by_role.get("worker", [])]
    await sleep_until(window.start_ns)
    before = {pid: process_cpu_s(pid) for group in by_role.values() for pid in group}
    compute_before = await asyncio.to_thread(compute_s, worker_metrics_urls)
    await sleep_until(window.end_ns)
    after = {pid: process_cpu_s(pid) for pid in before}
    compute_after = await asyncio.to_thread(compute_s, worker_metrics_urls)
    cpu: dict[str, float] = {}
    for role, group in by_role.items():
        spent = [(after[pid] or 0.0) - (before[pid] or 0.0) for pid in group if before[pid] is not None]
        cpu[role] = sum(spent)
    compute = None if compute_before is None or compute_after is None else compute_after - compute_before
    return HopUsage(cpu, compute)
