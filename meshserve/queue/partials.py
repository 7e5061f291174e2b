"""A decoupled model's partial replies: responses written while its job stays leased.

A worker streams a request's responses but the last through REPLY_PARTIAL
(``lua/reply_partial.lua``): fenced by the lease's token, counted on the job hash
(field ``o``), never acked. The last one goes through REPLY_ACK with the ack, as any
reply does, so a job ends exactly as before. A worker that claims a job someone
already streamed from (a redelivery after a crash) reads that count
(:func:`streamed_counts`) and ends the request instead of restarting it. A caller
that goes away marks its leased job (:func:`abandon`): the next partial is refused
and the worker ends the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from meshserve.queue.keys import ModelKeys
from meshserve.queue.replies import REPLY_TTL_S
from meshserve.queue.scripts import ABANDON, REPLY_PARTIAL
from meshserve.store.link import Chunks, Command, RedisLink

STREAMED_FIELD = "o"
"""The job hash's count of responses sent (REPLY_PARTIAL increments it)."""


def partial_command(keys: ModelKeys, reply_to: str, partials: Sequence[tuple[int, str, bytes | Chunks]]) -> Command:
    """REPLY_PARTIAL for one gateway's list: ``partials`` are (lease token, job id,
    serialized reply), pushed in order. Its reply: 1 per partial pushed, 0 per one
    dropped (the lease moved on), -1 per one whose caller went away (end the job);
    a ``NoScriptError`` after a Redis restart."""
    flat = [part for token, job_id, blob in partials for part in (token, job_id, blob)]
    return REPLY_PARTIAL.call([reply_to], [keys.job_prefix, REPLY_TTL_S, *flat])


async def load_partial_script(redis: RedisLink) -> None:
    """Load REPLY_PARTIAL (at start, and after Redis lost its scripts)."""
    await redis.load(REPLY_PARTIAL)


async def streamed_counts(redis: RedisLink, keys: ModelKeys, job_ids: Sequence[str]) -> list[int]:
    """How many responses each job had streamed already (0 for a fresh job), in one
    round trip; raises the first error reply."""
    if not job_ids:
        return []
    found: list[Any] = await redis.pipeline([("HGET", keys.job(job_id), STREAMED_FIELD) for job_id in job_ids])
    if failed := next((r for r in found if isinstance(r, RedisError)), None):
        raise failed
    return [int(count) if count else 0 for count in found]


async def abandon(redis: RedisLink, keys: ModelKeys, job_id: str) -> bool:
    """Mark a leased job whose caller went away (ABANDON); False if no worker holds it."""
    return bool(await redis.script(ABANDON, keys=[keys.job(job_id)], args=[]))
