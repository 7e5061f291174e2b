"""Which queue partition a request goes to (config.yaml ``queue_partitions``).

A model with P > 1 partitions has P sets of queue keys, each with a hash tag of its
own (meshserve/queue/keys.py), so that they spread over a Redis Cluster's shards.
The gateway puts each request on the partition where it has the fewest requests of
its own waiting, ties taken in turn: what it already knows, with no round trip. A
gateway's calls are its share of the mesh's, so the partitions' depths stay within
a few requests of each other for each gateway, and so in sum; at concurrency 1 the
turn alone spreads them. A partition that refuses a request (its share of the
model's or the tenant's queue cap is full, or it would answer past the deadline)
hands it to the next: nothing was written, so the retry cannot duplicate it (a
hash of the job id would spread as well, but leaves nowhere to go on a refusal).
"""

from __future__ import annotations

from meshserve.models.repository import ModelInfo
from meshserve.queue import ModelKeys, partition_keys


def share(cap: int, partitions: int) -> int:
    """One partition's share of a queue cap (0: unbounded). A request is refused only
    when every partition holds its share, so never below ``cap``; accepted ones can
    pass it by ``partitions - 1`` at most."""
    return -(-cap // partitions) if cap > 0 else 0


class PartitionChooser:
    """This gateway's requests waiting in each partition of each partitioned model."""

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}  # a partition's ready key -> this gateway's requests in it
        self._turn = 0

    def order(self, model: ModelInfo) -> tuple[ModelKeys, ...]:
        """The partitions to try for one request of ``model``, best first."""
        every = partition_keys(model.name, model.version, model.queue_partitions)
        if len(every) == 1:
            return every
        self._turn += 1
        start = self._turn % len(every)
        ranked = sorted(
            range(len(every)), key=lambda p: (self._waiting.get(every[p].ready, 0), (p - start) % len(every))
        )
        return tuple(every[p] for p in ranked)

    def queued(self, keys: ModelKeys) -> None:
        """A request of this gateway's was queued on ``keys``' partition."""
        self._waiting[keys.ready] = self._waiting.get(keys.ready, 0) + 1

    def answered(self, keys: ModelKeys) -> None:
        """... and is answered (or abandoned)."""
        left = self._waiting.get(keys.ready, 0) - 1
        if left > 0:
            self._waiting[keys.ready] = left
        else:
            self._waiting.pop(keys.ready, None)
