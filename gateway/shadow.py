"""Shadow traffic: a copy of a share of a model's requests goes to a candidate
version, whose answer is compared with the one the caller got, and counted.

The copy is its own job (own id, the lowest tier, the caller's deadline), enqueued
beside the caller's and never returned: the caller's answer never waits for it.
What is compared is the first output: the largest absolute difference, and whether
the argmax over the last axis agrees on every row. Counts live here as plain
numbers; the gateway's metrics read them at scrape time
(``meshserve_shadow_comparisons``, ``meshserve_shadow_max_abs_diff``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np

from meshserve.errors import MeshError
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve.wire.envelope import Unframed

log = logging.getLogger(__name__)

AGREE, DISAGREE, FAILED = "agree", "disagree", "failed"
"""Outcomes: the argmax agreed on every row, did not (or the shapes differ), or
the shadow version answered with an error."""


@dataclass(frozen=True, slots=True)
class Comparison:
    agree: bool
    max_abs_diff: float  # inf when the shapes or datatypes differ


class ShadowCounts:
    """Comparisons by (model, version, outcome), and the largest difference seen
    by (model, version); written in the event loop, read by the metrics thread
    (whole-value replacements and int increments only)."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, int, str], int] = {}
        self.max_abs_diff: dict[tuple[str, int], float] = {}
        self.changed = asyncio.Event()  # set after each count (tests wait on it)

    def count(self, model: str, version: int, outcome: str, diff: float | None = None) -> None:
        key = (model, version, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if diff is not None:
            self.max_abs_diff[model, version] = max(diff, self.max_abs_diff.get((model, version), 0.0))
        self.changed.set()

    def total(self, model: str, version: int) -> int:
        return sum(n for (m, v, _), n in self.outcomes.items() if (m, v) == (model, version))


def first_output(answer: Unframed) -> np.ndarray | None:
    """The first output of a reply as an array (a view of the reply's bytes); None: no output."""
    outputs = answer.message.outputs
    if not outputs:
        return None
    tensor = outputs[0]
    raw = answer.data[0] if answer.data else tensor.data
    dtype = NUMPY_BY_KSERVE.get(tensor.datatype)
    if dtype is None:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))


def compare(primary: Unframed, shadow: Unframed) -> Comparison:
    """The two answers' first outputs: max abs difference, argmax agreement per row."""
    ours, theirs = first_output(primary), first_output(shadow)
    if ours is None or theirs is None or ours.shape != theirs.shape or ours.size == 0:
        return Comparison(False, float("inf"))
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
    if ours.ndim == 0:
        return Comparison(True, diff)
    agree = bool(np.array_equal(np.argmax(ours, axis=-1), np.argmax(theirs, axis=-1)))
    return Comparison(agree, diff)


async def shadow_and_compare(
    copy: Awaitable[Unframed],
    primary: asyncio.Future[Unframed],
    model: str,
    version: int,
    counts: ShadowCounts,
) -> None:
    """Await the shadow's answer and the caller's (``primary``, cancelled when the
    caller got none), then count the comparison. Owned by the gateway core."""
    try:
        answer = await copy
    except MeshError as error:
        log.debug("shadow request to %s version %d failed: %s", model, version, error.message)
        counts.count(model, version, FAILED)
        primary.cancel()
        return
    try:
        served = await primary
    except asyncio.CancelledError:
        return  # the caller got no answer: nothing to compare with
    result = compare(served, answer)
    counts.count(model, version, AGREE if result.agree else DISAGREE, result.max_abs_diff)
