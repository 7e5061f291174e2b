"""Redis connections as the services use them.

The request path (queue scripts, admission, replies) goes through
:class:`~meshserve.store.link.RedisLink`: one multiplexed connection for commands
and pipelines, and one per blocking reader (BLPOP/BLMPOP hold their connection). A
``redis+cluster://`` URL gets a :class:`~meshserve.store.cluster.ClusterLink`.
"""

from __future__ import annotations

from meshserve.store.cluster import ClusterLink, is_cluster_url
from meshserve.store.link import ConnectCheck, RedisLink

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0


def command_link(url: str, name: str = "", check: ConnectCheck | None = None) -> RedisLink:
    """For scripts and pipelines; a call fails after ``COMMAND_TIMEOUT_S`` without a reply.

    One quick retry when the connection is found dead: after a Redis restart the
    old socket fails its next command once. Running a queue script twice is safe:
    enqueue and ack are idempotent, a reply delivered twice is dropped by the
    gateway, and a claim whose answer was lost leaves a lease that expires and is
    redelivered.
    """
    kind = ClusterLink if is_cluster_url(url) else RedisLink
    return kind(url, connect_timeout_s=CONNECT_TIMEOUT_S, command_timeout_s=COMMAND_TIMEOUT_S, name=name, check=check)


def blocking_link(url: str, name: str = "", check: ConnectCheck | None = None, *, headed: bool = False) -> RedisLink:
    """For one task's blocking reads: no read timeout (the command's own applies).
    ``check`` (both kinds): run on every connection opened, e.g. the eviction policy's.
    ``headed``: large replies laid out with a head are read as head and body
    (:class:`~meshserve.store.resp.HeadedBulk`; a gateway's reply reader)."""
    kind = ClusterLink if is_cluster_url(url) else RedisLink
    return kind(url, connect_timeout_s=CONNECT_TIMEOUT_S, command_timeout_s=None, name=name, check=check, headed=headed)
