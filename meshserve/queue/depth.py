"""Queue depth by tier, for the router's metrics (off the request path).

The router scrapes from its metrics thread with a synchronous redis-py client, so
this takes one rather than a :class:`~meshserve.store.link.RedisLink`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redis import Redis

from meshserve.queue.keys import partition_keys
from meshserve.queue.tiers import NUM_TIERS, TIER_NAMES, tier_score_range

PartitionsOf = Callable[[tuple[str, int]], int]
"""How many queue partitions a model version has (config.yaml ``queue_partitions``)."""


def _one(_: tuple[str, int]) -> int:
    return 1


def queue_depths(
    client: Redis, models: Sequence[tuple[str, int]], partitions: PartitionsOf = _one
) -> dict[tuple[str, int], dict[str, int]]:
    """Jobs waiting in each model version's ready sets, by tier name, summed over its
    queue partitions, in one pipelined round trip (split by node on a cluster).
    Raises redis-py's errors."""
    spans = []
    with client.pipeline(transaction=False) as pipe:
        for name, version in models:
            every = partition_keys(name, version, partitions((name, version)))
            spans.append(len(every))
            for keys in every:
                for tier in range(NUM_TIERS):
                    pipe.zcount(keys.ready, *tier_score_range(tier))
        counts = [int(c) for c in pipe.execute()]
    depths: dict[tuple[str, int], dict[str, int]] = {}
    at = 0
    for model, span in zip(models, spans, strict=True):
        by_tier = [sum(counts[at + p * NUM_TIERS + tier] for p in range(span)) for tier in range(NUM_TIERS)]
        depths[model] = dict(zip(TIER_NAMES, by_tier, strict=True))
        at += span * NUM_TIERS
    return depths


def pending_jobs(
    client: Redis, models: Sequence[tuple[str, int]], partitions: PartitionsOf = _one
) -> dict[tuple[str, int], int]:
    """Jobs not yet answered for each model version: waiting in its ready sets plus
    leased to a worker (in flight), over all its queue partitions, in one pipelined
    round trip. What an unload drains to zero. Raises redis-py's errors."""
    spans = []
    with client.pipeline(transaction=False) as pipe:
        for name, version in models:
            every = partition_keys(name, version, partitions((name, version)))
            spans.append(len(every))
            for keys in every:
                pipe.zcard(keys.ready)
                pipe.zcard(keys.inflight)
        counts = [int(c) for c in pipe.execute()]
    pending: dict[tuple[str, int], int] = {}
    at = 0
    for model, span in zip(models, spans, strict=True):
        pending[model] = sum(counts[at : at + 2 * span])
        at += 2 * span
    return pending
