"""What a bench point cost Redis: commands, by name, and main-thread CPU, from its own counters.

``INFO stats``, ``INFO cpu`` and ``INFO commandstats`` at the start and the end of a
point's measured window. Commands include those the queue scripts run (Redis counts
each ``redis.call`` under its own name, and the script call under ``evalsha``); CPU is
the server's main thread, where every command and script runs. Other clients of the
same Redis during the window count too: point the bench at a Redis only this mesh uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SNAPSHOT_COMMANDS = 3
"""The INFO commands of one snapshot: the next snapshot counts them."""

CLIENT_COMMANDS = frozenset(
    {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "exec", "blpop", "blmpop", "lmpop", "mget"}
)
"""Commands the mesh's request path sends itself, never from inside a script: each one
(a transaction counted once, by its EXEC) is a round trip, or a command pipelined behind
one (a claim behind a wake-up's BLPOP counts on its own: an upper bound). MGET is
a worker's read of a batch's payload keys after its claim."""


@dataclass(frozen=True, slots=True)
class RedisUsage:
    """What Redis did between two snapshots."""

    commands: int  # script-internal commands included
    cpu_s: float  # main thread, user + system
    by_command: Mapping[str, int] = field(default_factory=dict)  # lower-case name -> calls, INFO excluded


@dataclass(frozen=True, slots=True)
class RedisCounters:
    """Redis's running totals at one moment."""

    commands: int
    main_thread_cpu_s: float
    by_command: Mapping[str, int] = field(default_factory=dict)

    def usage_since(self, earlier: RedisCounters) -> RedisUsage:
        by_command = {
            name: calls - earlier.by_command.get(name, 0)
            for name, calls in self.by_command.items()
            if name != "info" and calls > earlier.by_command.get(name, 0)
        }
        return RedisUsage(
            commands=self.commands - earlier.commands - SNAPSHOT_COMMANDS,
            cpu_s=self.main_thread_cpu_s - earlier.main_thread_cpu_s,
            by_command=dict(sorted(by_command.items(), key=lambda item: (-item[1], item[0]))),
        )


def command_calls(commandstats: Mapping[str, Any]) -> dict[str, int]:
    """``INFO commandstats`` (as redis-py parses it: ``cmdstat_<name>`` -> {calls, ...})
    as name -> calls; a subcommand keeps its ``name|sub`` form."""
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in commandstats.items()
        if key.startswith("cmdstat_") and isinstance(value, Mapping)
    }


async def snapshot(client: Any) -> RedisCounters:
    """``client``: a ``redis.asyncio.Redis``. Three INFO commands (``SNAPSHOT_COMMANDS``)."""
    stats = await client.info("stats")
    cpu = await client.info("cpu")
    commandstats = await client.info("commandstats")
    # the main thread's figures where the server has them (Redis 6.2+, Valkey); the process's otherwise
    user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
    return RedisCounters(
        int(stats["total_commands_processed"]), float(user) + float(system), command_calls(commandstats)
    )


def per_call(usage: RedisUsage, calls: int) -> dict[str, Any]:
    """Commands, round trips (see ``CLIENT_COMMANDS``) and main-thread CPU µs per call
    (failed calls count: they cost Redis too), each command's calls per call, and the
    calls per second one Redis core would carry at that cost (None when no CPU was
    seen); {} without calls."""
    if calls <= 0:
        return {}
    cpu_us = usage.cpu_s / calls * 1e6
    figures: dict[str, Any] = {
        "redis_commands_per_call": usage.commands / calls,
        "redis_cpu_us_per_call": cpu_us,
        "redis_core_calls_per_s": 1e6 / cpu_us if cpu_us > 0 else None,
    }
    if usage.by_command:
        round_trips = sum(n for name, n in usage.by_command.items() if name in CLIENT_COMMANDS)
        figures["redis_round_trips_per_call"] = round_trips / calls
        figures["redis_commands_by_name_per_call"] = {name: n / calls for name, n in usage.by_command.items()}
    return figures
