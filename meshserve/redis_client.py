"""Redis clients as the services use them: one pooled client for commands, one
single-connection client for blocking reads (BLPOP/BLMPOP hold their connection)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
POOL_WAIT_S = 2.0


def command_client(url: str, max_connections: int = 64) -> Redis:
    """Pooled client for scripts and pipelines; calls fail fast when Redis is down.

    One quick retry on a connection error: after a Redis restart every pooled
    connection is stale and would fail its next command once. Running a queue
    script twice is safe: enqueue and ack are idempotent, a reply delivered twice
    is dropped by the gateway, and a claim whose answer was lost leaves a lease
    that expires and is redelivered.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        # A burst waits for a connection instead of failing ("Too many connections"):
        # under one tenant's flood, another tenant's call must not error out.
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def blocking_client(url: str) -> Redis:
    """Client for one task's blocking reads: no read timeout (the command's own applies)."""
    return Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=None, max_connections=4)
