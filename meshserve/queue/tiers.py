"""Priority tiers: their names, their count, and where they sit in a ready set's scores.

The one definition. Tenants name tiers in the tenants file, the gateway clamps a
request's ``priority`` onto them, the Lua scripts place a job at
``tier * TIER_SPAN + virtual start`` (the loader writes ``TIER_SPAN`` and
``NUM_TIERS`` into every script, see :mod:`meshserve.queue.scripts`), and queue
depth is counted per tier from the same ranges.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

TIER_NAMES: tuple[str, ...] = ("realtime", "standard", "batch")
"""Tier names, highest first: a tier's number is its index (0 is served first)."""

TIERS: Mapping[str, int] = MappingProxyType({name: tier for tier, name in enumerate(TIER_NAMES)})
"""Tier name -> tier number."""

NUM_TIERS = len(TIER_NAMES)

DEFAULT_TIER = TIERS["standard"]
"""The tier of a tenant, or of a request, that names none."""

TIER_SPAN = 2**40
"""Score distance between tiers: tiers stay strict, fair queuing inside one. Virtual
starts (in batch items) stay below it for 2^40 items of a tier's history."""


def tier_score_range(tier: int) -> tuple[int, str]:
    """The ready-set score range of ``tier`` as ZCOUNT/ZRANGE BYSCORE bounds: its
    lowest score, and the next tier's lowest, exclusive."""
    return tier * TIER_SPAN, f"({(tier + 1) * TIER_SPAN}"
