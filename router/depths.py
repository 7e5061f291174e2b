"""The router's one read of the queues: how many jobs wait per model and tier.

Read at scrape time, in the metrics thread, so with a synchronous client of its
own (the router's event loop does not touch Redis). Without a Redis URL there is
nothing to read and every read is empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from redis import Redis as SyncRedis
from redis.connection import AbstractConnection
from redis.exceptions import RedisError

from meshserve.queue import pending_jobs, queue_depths
from meshserve.queue.depth import PartitionsOf
from meshserve.store.cluster import is_cluster_url, sync_cluster_client
from meshserve.store.memory import EvictionPolicyError, check_policy, parse_info_memory
from meshserve.store.sentinel import SentinelTarget, is_sentinel_url
from router.placement import ModelKey

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0
"""A scrape gives up on Redis after this long: the other metrics still go out."""


class QueueDepths:
    """Jobs waiting in each model version's ready queue, by tier name, summed over
    its queue partitions (``partitions`` says how many each has)."""

    def __init__(
        self, redis_url: str | None, *, allow_eviction: bool = False, partitions: PartitionsOf | None = None
    ) -> None:
        self._allow_eviction = allow_eviction
        # each model version's queue partitions (config.yaml queue_partitions): every read sums them
        self.partitions: PartitionsOf = partitions or (lambda _: 1)
        self._redis: SyncRedis | None = None
        self._close: Callable[[], None] = lambda: None
        if redis_url and is_sentinel_url(redis_url):
            target = SentinelTarget.parse(redis_url)
            self._redis, self._close = target.sync_client(
                socket_timeout=READ_TIMEOUT_S, redis_connect_func=self._on_connect
            )
        elif redis_url and is_cluster_url(redis_url):
            self._redis = sync_cluster_client(
                redis_url, socket_timeout=READ_TIMEOUT_S, redis_connect_func=self._on_connect
            )
            self._close = self._redis.close
        elif redis_url:
            self._redis = SyncRedis.from_url(
                redis_url, socket_timeout=READ_TIMEOUT_S, redis_connect_func=self._on_connect
            )
            self._close = self._redis.close

    def _on_connect(self, connection: AbstractConnection) -> None:
        """Every connection opened (at start, and after Redis came back) reads the
        eviction policy first: ``EvictionPolicyError`` unless it is noeviction."""
        connection.on_connect()  # type: ignore[no-untyped-call]  # redis-py leaves these untyped
        connection.send_command("INFO", "memory")  # type: ignore[no-untyped-call]
        reply = connection.read_response()
        check_policy(parse_info_memory(reply), allow_eviction=self._allow_eviction, service="router")

    def check(self) -> None:
        """At start: raise ``EvictionPolicyError`` for a Redis that may evict; one that
        cannot be reached is only logged (the next scrape tries again)."""
        if self._redis is None:
            return
        try:
            self._redis.ping()
        except EvictionPolicyError:
            raise
        except RedisError as exc:
            log.warning("queue depths: redis unavailable at start (%s)", exc)

    @property
    def configured(self) -> bool:
        """Whether there is a Redis to read (the router was given a URL)."""
        return self._redis is not None

    def read_or_raise(self, models: Collection[ModelKey]) -> dict[ModelKey, dict[str, int]]:
        """One pipelined round trip; {} without Redis. Raises redis-py's errors: for a
        reader (the KEDA scaler) to which "unknown" and "empty" must differ."""
        if self._redis is None:
            return {}
        return queue_depths(self._redis, list(models), self.partitions)

    def read(self, models: Collection[ModelKey]) -> dict[ModelKey, dict[str, int]]:
        """One pipelined round trip; {} without Redis or while it is unavailable."""
        try:
            return self.read_or_raise(models)
        except RedisError as exc:  # a scrape during a Redis outage: no depths, the rest still exported
            log.warning("queue depths unavailable: %s", exc)
            return {}

    def pending(self, models: Collection[ModelKey]) -> dict[ModelKey, int] | None:
        """Jobs queued or in flight per model version (an unload drains them to 0);
        None without Redis or while it is unavailable. Blocking: call it in a thread."""
        if self._redis is None:
            return None
        try:
            return pending_jobs(self._redis, list(models), self.partitions)
        except RedisError as exc:
            log.warning("queue depths unavailable while draining: %s", exc)
            return None

    def close(self) -> None:
        self._close()
