"""Leader election among router replicas, with a lease in Redis.

Two or more routers may run (a Deployment with 2 replicas); one leads. Only the
leader's health ``""`` is SERVING, so the router Service routes gateways, workers
and KEDA to it alone; the others wait, NOT_SERVING, and try for the lease every
third of its length. The leader renews it at the same pace. A leader that cannot
renew before the lease runs out (Redis unreachable, the process stalled) steps
down on its own; one that stops releases the lease, so the next replica takes over
at its next try. A crashed leader is replaced within one lease plus one try plus
the time readiness takes to move the Service (``docs/deploy.md``).

The new leader starts with no worker records: workers report every report interval
and are placed again from their reports, and gateways reconnect their routing-table
watch to it through the Service. The lease is the only state the routers share.

The key is ``ms:{router}:leader`` (value: this router's id, set with ``NX PX``);
renewing and releasing check the value in one script, so a router never extends or
deletes a lease another one holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from meshserve.store.cluster import async_cluster_client, is_cluster_url

log = logging.getLogger(__name__)

LEADER_KEY = "ms:{router}:leader"

# KEYS[1] the lease; ARGV[1] this router's id, ARGV[2] the lease in ms. 1 if renewed.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease; ARGV[1] this router's id. 1 if released.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

OnChange = Callable[[bool], Awaitable[None]]


class Leadership:
    """Holds or waits for the lease; ``on_change(leading)`` runs on every change.

    Owns one task (``start``/``stop``). ``leading`` is this router's belief, which
    errs on the side of not leading: it turns false as soon as a renewal fails to
    confirm the lease within its length.
    """

    def __init__(self, redis_url: str, router_id: str, lease_ms: int, on_change: OnChange) -> None:
        timeout_s = lease_ms / 3000
        self._redis = (
            async_cluster_client(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            if is_cluster_url(redis_url)
            else Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        )
        self.router_id = router_id
        self.lease_ms = lease_ms
        self.leading = False
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        """Stop trying; release the lease if held, so another router takes over now."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.leading:
            try:
                await self._redis.eval(RELEASE, 1, LEADER_KEY, self.router_id)
            except RedisError as exc:
                log.warning("leadership: could not release the lease (it lapses in %d ms): %s", self.lease_ms, exc)
            await self._set(False)
        await self._redis.aclose()

    async def _run(self) -> None:
        interval_s = self.lease_ms / 3000
        confirmed_at = 0.0  # monotonic time the lease was last confirmed ours
        while True:
            try:
                if self.leading:
                    held = bool(await self._redis.eval(RENEW, 1, LEADER_KEY, self.router_id, self.lease_ms))
                else:
                    held = bool(await self._redis.set(LEADER_KEY, self.router_id, nx=True, px=self.lease_ms))
            except RedisError as exc:
                log.warning("leadership: redis unavailable: %s", exc)
                held = self.leading and time.monotonic() - confirmed_at < self.lease_ms / 1000 - interval_s
            else:
                if held:
                    confirmed_at = time.monotonic()
            await self._set(held)
            await asyncio.sleep(interval_s)

    async def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        log.warning("router %s %s", self.router_id, "now leads" if leading else "no longer leads")
        await self._on_change(leading)
