"""MIG profile names, and which slice is at least as large as which.

NVIDIA names a MIG slice ``<n>g.<m>gb`` (e.g. ``3g.40gb``): ``n`` compute slices
(of 7 on an A100 or H100) and ``m`` GB of memory, optionally with a ``+me``
suffix (media engines), which does not change the size. A model's
``placement.min_mig_profile`` refuses slices smaller than the profile named, in
either compute or memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PROFILE = re.compile(r"([1-9][0-9]*)g\.([1-9][0-9]*)gb(\+me)?")


@dataclass(frozen=True, slots=True)
class MigProfile:
    compute_slices: int
    memory_gb: int  # as the profile name says it (NVIDIA's GB figure)

    def covers(self, other: MigProfile) -> bool:
        """Whether a slice of this profile is at least ``other`` in compute and in memory."""
        return self.compute_slices >= other.compute_slices and self.memory_gb >= other.memory_gb


def parse_mig_profile(name: str) -> MigProfile | None:
    """``"3g.40gb"`` -> MigProfile(3, 40); None for anything else (case-insensitive)."""
    match = _PROFILE.fullmatch(name.strip().lower())
    if match is None:
        return None
    return MigProfile(int(match.group(1)), int(match.group(2)))
