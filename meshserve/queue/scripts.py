"""The queue's Lua scripts, read once from ``lua/*.lua`` beside this module.

Each file starts with a header listing its KEYS and ARGV, with units. The loader
puts one line in front of every body, ``local TIER_SPAN, NUM_TIERS = ...``, from
:mod:`meshserve.queue.tiers`, so the tier layout is declared in Python only. A
script is known to Redis by the SHA1 of that whole text (:class:`Script`).
"""

from __future__ import annotations

from importlib import resources

from meshserve.queue.tiers import NUM_TIERS, TIER_SPAN
from meshserve.store.link import Script

PRELUDE = f"local TIER_SPAN, NUM_TIERS = {TIER_SPAN}, {NUM_TIERS}\n"
"""Constants every script may use; one line, so Lua's line numbers in errors are off by one."""


def load_script(name: str) -> Script:
    """``lua/<name>.lua`` behind the prelude."""
    body = resources.files("meshserve.queue").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return Script(PRELUDE + body)


ENQUEUE = load_script("enqueue")
CLAIM = load_script("claim")
ACK = load_script("ack")
REPLY_ACK = load_script("reply_ack")
REPLY_PARTIAL = load_script("reply_partial")
ABANDON = load_script("abandon")
EXTEND = load_script("extend")
RELEASE = load_script("release")
REAP = load_script("reap")
WITHDRAW = load_script("withdraw")
REWAKE = load_script("rewake")
SEQ_ADMIT = load_script("seq_admit")
SEQ_REPLY_ACK = load_script("seq_reply_ack")
