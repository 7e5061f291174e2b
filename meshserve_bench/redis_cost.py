"""What a bench point cost Redis: commands and main-thread CPU per call.

Read from ``INFO stats`` and ``INFO cpu`` at the start and the end of a point's
measured window, so the README's figure for how many requests one Redis carries
is one anyone can rerun. Commands include those the queue scripts run (Redis
counts each ``redis.call``); CPU is the server's main thread, where every
command and script runs. Other clients of the same Redis during the window
count too: point the bench at a Redis only this mesh uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshserve_bench.display import text_table

SNAPSHOT_COMMANDS = 2
"""The INFO commands of one snapshot: the next snapshot counts them."""


@dataclass(frozen=True, slots=True)
class RedisCounters:
    """Redis's running totals at one moment."""

    commands: int
    main_thread_cpu_s: float

    def usage_since(self, earlier: RedisCounters) -> RedisUsage:
        return RedisUsage(
            commands=self.commands - earlier.commands - SNAPSHOT_COMMANDS,
            cpu_s=self.main_thread_cpu_s - earlier.main_thread_cpu_s,
        )


@dataclass(frozen=True, slots=True)
class RedisUsage:
    """What Redis did between two snapshots."""

    commands: int  # script-internal commands included
    cpu_s: float  # main thread, user + system


async def snapshot(client: Any) -> RedisCounters:
    """``client``: a ``redis.asyncio.Redis``. Two INFO commands (``SNAPSHOT_COMMANDS``)."""
    stats = await client.info("stats")
    cpu = await client.info("cpu")
    # the main thread's figures where the server has them (Redis 6.2+, Valkey); the process's otherwise
    user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
    return RedisCounters(int(stats["total_commands_processed"]), float(user) + float(system))


def per_call_lines(rows: Sequence[tuple[int, int, RedisUsage]]) -> list[str]:
    """The report's Redis lines: one row per (concurrency, calls completed, usage)."""
    body = []
    for concurrency, calls, usage in rows:
        if calls <= 0:
            continue
        cpu_us = usage.cpu_s / calls * 1e6
        carried = f"{1e6 / cpu_us:,.0f}".replace(",", " ") if cpu_us > 0 else "-"
        body.append([str(concurrency), f"{usage.commands / calls:.1f}", f"{cpu_us:.0f}", carried])
    if not body:
        return []
    header = ["concurrency", "commands", "cpu us", "calls/s one Redis core carries"]
    return [
        "redis per call (commands include those the queue scripts run; cpu is its main thread):",
        *text_table(header, body),
    ]
