"""Redis's memory as the services see it: the eviction policy they require, and how
close the server is to ``maxmemory``.

With any ``maxmemory-policy`` but ``noeviction``, Redis may evict job hashes, queue
sets and reply lists when it fills up: accepted requests would vanish without an
answer. So each service reads the policy when a connection opens (at start and on
every reconnect) and refuses one that evicts, unless told ``--allow-eviction``.
With ``noeviction`` a full Redis refuses writes instead (``OOM``), which the mesh
answers; :class:`MemoryWatch` lets the gateway refuse new requests a little before
that point, so a write never fails half-way through a request.

Both read ``INFO memory`` (``used_memory``, ``maxmemory``, ``maxmemory_policy``):
``CONFIG GET`` is an admin command a least-privilege user lacks, INFO only needs
``+info`` in its ACL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoPermissionError, RedisError, ResponseError

from meshserve.store.link import ConnectCheck, RedisLink

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"

INFO_MEMORY: tuple[str, str] = ("INFO", "memory")


class EvictionPolicyError(RedisError):
    """Redis may evict keys (``maxmemory-policy`` is not ``noeviction``): refused."""


@dataclass(frozen=True, slots=True)
class StoreMemory:
    """One reading of ``INFO memory``; ``maxmemory_bytes`` 0 means no limit."""

    used_bytes: int
    maxmemory_bytes: int
    policy: str

    @property
    def over(self) -> bool:
        """Whether Redis uses more than its ``maxmemory``: it refuses every write that
        could grow it (``OOM``), a worker's claim included."""
        return 0 < self.maxmemory_bytes < self.used_bytes

    def full(self, headroom_ratio: float) -> bool:
        """Whether less than ``headroom_ratio`` of ``maxmemory`` is left (never without a limit)."""
        limit = self.maxmemory_bytes
        return limit > 0 and self.used_bytes >= limit * (1.0 - headroom_ratio)


def parse_info_memory(reply: bytes | str) -> StoreMemory:
    """``INFO memory``'s text as a :class:`StoreMemory`."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return StoreMemory(
        used_bytes=int(fields.get("used_memory", 0)),
        maxmemory_bytes=int(fields.get("maxmemory", 0)),
        policy=fields.get("maxmemory_policy", "").strip(),
    )


def check_policy(memory: StoreMemory, *, allow_eviction: bool, service: str) -> None:
    """Raise :class:`EvictionPolicyError` naming the setting when Redis may evict keys;
    with ``allow_eviction`` log it loudly instead."""
    if memory.policy == SAFE_POLICY:
        return
    message = (
        f"Redis maxmemory-policy is '{memory.policy}': it may evict queued requests and replies,"
        f" which then vanish without an answer; set maxmemory-policy {SAFE_POLICY}"
        f" (CONFIG SET maxmemory-policy {SAFE_POLICY}, or in redis.conf)"
    )
    if not allow_eviction:
        raise EvictionPolicyError(f"{message}, or start the {service} with --allow-eviction")
    log.error("%s; running anyway (--allow-eviction): requests may be lost", message)


def policy_check(*, allow_eviction: bool, service: str) -> ConnectCheck:
    """The check a service's links run on every connection they open (start and
    reconnect): ``INFO memory``, then :func:`check_policy`. A user without INFO
    is refused too (unless ``allow_eviction``): the policy could not be read."""

    def verify(reply: Any) -> None:
        if isinstance(reply, NoPermissionError | ResponseError) and "NOPERM" in str(reply):
            message = "cannot read Redis maxmemory-policy: the user lacks INFO (add +info to its ACL)"
            if not allow_eviction:
                raise EvictionPolicyError(f"{message}, or start the {service} with --allow-eviction")
            log.error("%s; running anyway (--allow-eviction)", message)
            return
        if isinstance(reply, RedisError):
            raise reply
        check_policy(parse_info_memory(reply), allow_eviction=allow_eviction, service=service)

    return INFO_MEMORY, verify


class MemoryWatch:
    """The latest ``INFO memory`` reading, refreshed every ``interval_ms`` by its own
    task (so the request path reads a field, never Redis). ``full`` is False until
    a first reading, and after a failed one: a Redis that cannot be read refuses
    requests by itself. ``on_tick`` is awaited after each reading, in the watch's
    task (it must not raise)."""

    def __init__(
        self,
        redis: RedisLink,
        *,
        interval_ms: int,
        headroom_ratio: float,
        on_tick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._interval_s = interval_ms / 1000
        self.headroom_ratio = headroom_ratio
        self._on_tick = on_tick
        self.latest: StoreMemory | None = None
        self.readings = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        """Whether Redis was within the headroom of its ``maxmemory`` at the last reading."""
        latest = self.latest
        return latest is not None and latest.full(self.headroom_ratio)

    def start(self) -> None:
        if self._interval_s > 0:
            self._task = asyncio.create_task(self._watch(), name="store-memory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read(self) -> StoreMemory | None:
        """Read ``INFO memory`` now; None (and ``latest`` cleared) if it cannot be read."""
        try:
            self.latest = parse_info_memory(await self._redis.execute(*INFO_MEMORY))
        except RedisError as exc:
            if self.latest is not None or self.readings == 0:
                log.debug("redis memory unreadable: %s", exc)
            self.latest = None
        self.readings += 1
        return self.latest

    async def _watch(self) -> None:
        while True:
            await self.read()
            if self._on_tick is not None:
                await self._on_tick()
            await asyncio.sleep(self._interval_s)
