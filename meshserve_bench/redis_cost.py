"""What a bench point cost Redis: commands and main-thread CPU, read from its own counters.

``INFO stats`` and ``INFO cpu`` at the start and the end of a point's measured window.
Commands include those the queue scripts run (Redis counts each ``redis.call``); CPU is
the server's main thread, where every command and script runs. Other clients of the
same Redis during the window count too: point the bench at a Redis only this mesh uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SNAPSHOT_COMMANDS = 2
"""The INFO commands of one snapshot: the next snapshot counts them."""


@dataclass(frozen=True, slots=True)
class RedisUsage:
    """What Redis did between two snapshots."""

    commands: int  # script-internal commands included
    cpu_s: float  # main thread, user + system


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


async def snapshot(client: Any) -> RedisCounters:
    """``client``: a ``redis.asyncio.Redis``. Two INFO commands (``SNAPSHOT_COMMANDS``)."""
    stats = await client.info("stats")
    cpu = await client.info("cpu")
    # the main thread's figures where the server has them (Redis 6.2+, Valkey); the process's otherwise
    user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
    return RedisCounters(int(stats["total_commands_processed"]), float(user) + float(system))


def per_call(usage: RedisUsage, calls: int) -> dict[str, float | None]:
    """Commands and main-thread CPU µs per call (failed calls count: they cost Redis too),
    and the calls per second one Redis core would carry at that cost (None when no CPU was
    seen); {} without calls."""
    if calls <= 0:
        return {}
    cpu_us = usage.cpu_s / calls * 1e6
    return {
        "redis_commands_per_call": usage.commands / calls,
        "redis_cpu_us_per_call": cpu_us,
        "redis_core_calls_per_s": 1e6 / cpu_us if cpu_us > 0 else None,
    }
