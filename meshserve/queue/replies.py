"""The reply half of the queue: workers push serialized ``InferReply`` messages to the
owning gateway's list (:func:`meshserve.queue.keys.reply_key`); its one reader pops them.

A list, not a stream: the reader is the only consumer, and a reply popped is
delivered to a future in the same process. The list expires ``REPLY_TTL_S`` after
its last write, so a dead gateway leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshserve.store.link import Chunks, Command, RedisLink

REPLY_TTL_S = 120
"""A gateway's reply list expires this long after the last write (dead gateway)."""


def push_commands(replies: Mapping[str, Sequence[bytes | Chunks]]) -> list[Command]:
    """The commands that write ``replies`` (reply list -> serialized replies), for a
    pipeline: one RPUSH and one EXPIRE per list."""
    commands: list[Command] = []
    for reply_to, blobs in replies.items():
        commands.append(("RPUSH", reply_to, *blobs))
        commands.append(("EXPIRE", reply_to, REPLY_TTL_S))
    return commands


async def pop_replies(blocking: RedisLink, reply_to: str, *, wait_s: float, max_count: int) -> list[Any]:
    """Up to ``max_count`` replies, oldest first, waiting up to ``wait_s`` for the
    first; empty after the wait. ``blocking`` must be a link of its own (BLMPOP).
    A reply is ``bytes``, a large one a memoryview of its buffer, a laid-out one read
    by a headed link a :class:`~meshserve.store.resp.HeadedBulk`."""
    popped: Any = await blocking.execute("BLMPOP", wait_s, 1, reply_to, "LEFT", "COUNT", max_count)
    return popped[1] if popped else []


async def pop_replies_now(link: RedisLink, reply_to: str, *, max_count: int) -> list[Any]:
    """Up to ``max_count`` replies already in the list, without waiting (LMPOP), as
    :func:`pop_replies` gives them."""
    popped: Any = await link.execute("LMPOP", 1, reply_to, "LEFT", "COUNT", max_count)
    return popped[1] if popped else []
