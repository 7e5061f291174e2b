"""The router's one read of the queues: how many jobs wait per model and tier.

Read at scrape time, in the metrics thread, so with a synchronous client of its
own (the router's event loop does not touch Redis). Without a Redis URL there is
nothing to read and every read is empty.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from meshserve.queue import queue_depths
from router.placement import ModelKey

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0
"""A scrape gives up on Redis after this long: the other metrics still go out."""


class QueueDepths:
    """Jobs waiting in each model version's ready queue, by tier name."""

    def __init__(self, redis_url: str | None) -> None:
        self._redis = SyncRedis.from_url(redis_url, socket_timeout=READ_TIMEOUT_S) if redis_url else None

    def read(self, models: Collection[ModelKey]) -> dict[ModelKey, dict[str, int]]:
        """One pipelined round trip; {} without Redis or while it is unavailable."""
        if self._redis is None:
            return {}
        try:
            return queue_depths(self._redis, list(models))
        except RedisError as exc:  # a scrape during a Redis outage: no depths, the rest still exported
            log.warning("queue depths unavailable: %s", exc)
            return {}

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
