"""Job ids: unique across gateways, processes and restarts, and cheap to make.

A job id keys the job's hash in Redis and makes its enqueue idempotent, so two
jobs must never share one. ``uuid.uuid4().hex`` gives that at the cost of a system
call per request (``os.urandom`` reads 16 bytes from the kernel) and a UUID object.
Here the 128 bits come from a Mersenne Twister seeded with 256 bits from the
kernel, once per process and again in a forked child (``os.register_at_fork``):
two processes draw from independent seeds, so ids collide no more often than
random 128-bit values do. The ids are not secrets (no caller ever sees one, and
none grants anything), so a predictable generator is fine.
"""

from __future__ import annotations

import os
import random

_generator = random.Random(os.urandom(32))


def _reseed() -> None:
    _generator.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)

_bits = _generator.getrandbits


def new_job_id() -> str:
    """32 lower-case hex digits, as ``uuid.uuid4().hex`` writes them."""
    return f"{_bits(128):032x}"
