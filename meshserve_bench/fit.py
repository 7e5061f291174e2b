"""How a cost grows along one axis: flat, falling, linear (with its constant) or worse.

The ``scaling`` scenario measures a few points per axis (batch size, payload, tenants,
models) and hands each hop's cost per request to :func:`fit`. A least-squares line
``cost = intercept + slope * x`` gives the constant; the verdict:

- ``flat``: the spread of the points (max - min) is within ``FLAT_SHARE`` of their
  median plus the series' absolute noise floor (a few µs are noise on a shared machine);
- ``falling``: not flat, and the slope is negative (a batch amortizes a fixed cost);
- ``linear``: not flat, rising, and the last segment's cost per unit is at most
  ``SUPERLINEAR_FACTOR`` times the segment's before it (when that one rose beyond the
  noise too: below it the comparison says nothing);
- ``super-linear``: the last segment rises faster than that: a defect to look for.

Points are few and log-spaced, so a convex curve is seen only when its upper decade
rises well beyond the noise; the report says so beside the verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FLAT_SHARE = 0.25
SUPERLINEAR_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class Fit:
    """A series' line and verdict; ``slope`` is per unit of x."""

    kind: str  # "flat", "falling", "linear" or "super-linear"
    intercept: float
    slope: float
    spread_ratio: float | None  # max / min of the points; None when min <= 0
    points: int


def fit(xs: Sequence[float], ys: Sequence[float], noise_floor: float = 0.0) -> Fit | None:
    """The line through ``(xs, ys)`` and its verdict (see the module docstring); None
    with fewer than two points or no spread of x. NaN points are left out."""
    pairs = sorted((float(x), float(y)) for x, y in zip(xs, ys, strict=True) if not (np.isnan(x) or np.isnan(y)))
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return None
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    slope, intercept = np.polyfit(x, y, 1)
    lowest, highest = float(y.min()), float(y.max())
    ratio = highest / lowest if lowest > 0 else None
    noise = FLAT_SHARE * abs(float(np.median(y))) + noise_floor
    if highest - lowest <= noise:
        kind = "flat"
    elif slope < 0:
        kind = "falling"
    else:
        kind = "linear"
        if len(pairs) >= 3:
            last = (y[-1] - y[-2]) / (x[-1] - x[-2])
            before = (y[-2] - y[-3]) / (x[-2] - x[-3])
            if y[-2] - y[-3] > noise and last > SUPERLINEAR_FACTOR * before:
                kind = "super-linear"
    return Fit(kind, float(intercept), float(slope), ratio, len(pairs))
