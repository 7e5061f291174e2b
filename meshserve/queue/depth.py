"""Queue depth by tier, for the router's metrics (off the request path).

The router scrapes from its metrics thread with a synchronous redis-py client, so
this takes one rather than a :class:`~meshserve.store.link.RedisLink`.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis import Redis

from meshserve.queue.keys import ModelKeys
from meshserve.queue.tiers import NUM_TIERS, TIER_NAMES, tier_score_range


def queue_depths(client: Redis, models: Sequence[tuple[str, int]]) -> dict[tuple[str, int], dict[str, int]]:
    """Jobs waiting in each model version's ready set, by tier name, in one
    pipelined round trip. Raises redis-py's errors."""
    with client.pipeline(transaction=False) as pipe:
        for name, version in models:
            ready = ModelKeys.for_model(name, version).ready
            for tier in range(NUM_TIERS):
                pipe.zcount(ready, *tier_score_range(tier))
        counts = pipe.execute()
    return {
        model: dict(zip(TIER_NAMES, (int(c) for c in counts[i * NUM_TIERS : (i + 1) * NUM_TIERS]), strict=True))
        for i, model in enumerate(models)
    }


def pending_jobs(client: Redis, models: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Jobs not yet answered for each model version: waiting in its ready set plus
    leased to a worker (in flight), in one pipelined round trip. What an unload
    drains to zero. Raises redis-py's errors."""
    with client.pipeline(transaction=False) as pipe:
        for name, version in models:
            keys = ModelKeys.for_model(name, version)
            pipe.zcard(keys.ready)
            pipe.zcard(keys.inflight)
        counts = pipe.execute()
    return {model: int(counts[2 * i]) + int(counts[2 * i + 1]) for i, model in enumerate(models)}
