"""The queue protocol: every Redis key, script and command of the request path.

Gateways enqueue and read replies, workers wait, claim, extend, release, reap and
ack, and the router counts depth, all through this package; nothing else on the
request path names a Redis key or command.

- :mod:`~meshserve.queue.tiers`: priority tiers (names, count, score span), defined once
- :mod:`~meshserve.queue.keys`: the key layout, every key with its Cluster hash tag
- :mod:`~meshserve.queue.scripts`: the Lua scripts (``lua/*.lua``), read once
- :mod:`~meshserve.queue.protocol`: :class:`QueueProtocol` and the commands to pipeline
- :mod:`~meshserve.queue.replies`: reply lists, pushed by workers and popped by gateways
- :mod:`~meshserve.queue.partials`: a decoupled model's responses before its last (no ack)
- :mod:`~meshserve.queue.depth`: queue depth by tier, for the router's metrics
"""

from meshserve.queue.depth import pending_jobs, queue_depths
from meshserve.queue.keys import ModelKeys, partition_keys, reply_key, worker_wake_key
from meshserve.queue.partials import abandon, load_partial_script, partial_command, streamed_counts
from meshserve.queue.protocol import (
    ClaimedBatch,
    ClaimedStep,
    ClaimOptions,
    Enqueued,
    QueueProtocol,
    Reaped,
    ack_command,
    claim_command,
    parse_claim,
    reply_ack_command,
    reply_ack_commands,
    reply_ack_result,
    wait_command,
    woken_key,
)
from meshserve.queue.replies import REPLY_TTL_S, pop_replies, pop_replies_now, push_commands
from meshserve.queue.tiers import DEFAULT_TIER, NUM_TIERS, TIER_NAMES, TIER_SPAN, TIERS, tier_score_range

__all__ = [
    "DEFAULT_TIER",
    "NUM_TIERS",
    "REPLY_TTL_S",
    "TIERS",
    "TIER_NAMES",
    "TIER_SPAN",
    "ClaimOptions",
    "ClaimedBatch",
    "ClaimedStep",
    "Enqueued",
    "ModelKeys",
    "QueueProtocol",
    "Reaped",
    "abandon",
    "ack_command",
    "claim_command",
    "load_partial_script",
    "parse_claim",
    "partial_command",
    "partition_keys",
    "pending_jobs",
    "pop_replies",
    "pop_replies_now",
    "push_commands",
    "queue_depths",
    "reply_ack_command",
    "reply_ack_commands",
    "reply_ack_result",
    "reply_key",
    "streamed_counts",
    "tier_score_range",
    "wait_command",
    "woken_key",
    "worker_wake_key",
]
