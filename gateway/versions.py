"""Which version answers a request that names none: the model's traffic split, or
the latest ready version.

With a split (RoutingTable.splits, router/splits.py) the version is drawn by weight
among the READY versions: a not-ready version's weight goes to the others in
proportion; when no weighted version is ready, the latest ready version serves
(none ready: the latest version, whose not-ready error the caller hears). With
``sticky_by``, the value of that request parameter (or, failing it, gRPC metadata
key) picks the point on the weights instead of a random draw, so one caller sees
one version while the weights stand. Without a split: the latest READY version,
so that a new version serves only once it is loaded, warmed and past its canary.

Hot path: the cumulative weights are computed once per routing-table generation;
a request costs a dict lookup, a random draw (or one hash) and a bisect.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway.request import InferCall
from gateway.routing import RoutingView

_HASH_SPAN = float(2**64)


@dataclass(frozen=True, slots=True)
class Choice:
    """One model's choice of version, for one routing-table generation."""

    default: int  # the latest ready version, else the latest version
    versions: tuple[int, ...] = ()  # weighted ready versions; () when no split applies
    cumulative: tuple[float, ...] = ()  # running sums of their shares, the last 1.0
    sticky_by: str = ""
    shadow_version: int = 0  # 0: no shadow traffic (or the shadow version is not ready)
    shadow_share: float = 0.0


def choices_for(view: RoutingView) -> dict[str, Choice]:
    """Every model's :class:`Choice` in ``view``."""
    ready_by_name: dict[str, list[int]] = {}
    for name, version in sorted(view.ready):
        ready_by_name.setdefault(name, []).append(version)
    choices: dict[str, Choice] = {}
    for name, latest in view.latest.items():
        ready = ready_by_name.get(name, [])
        default = ready[-1] if ready else latest
        split = view.splits.get(name)
        if split is None:
            choices[name] = Choice(default)
            continue
        live = [(v, w) for v, w in split.weights if w > 0 and v in ready]
        total = sum(w for _, w in live)
        running, cumulative = 0, []
        for _, weight in live:
            running += weight
            cumulative.append(running / total)
        if cumulative:
            cumulative[-1] = 1.0  # no gap at the top from rounding
        shadow = split.shadow_version if split.shadow_version in ready and split.shadow_share > 0 else 0
        choices[name] = Choice(
            default,
            tuple(v for v, _ in live),
            tuple(cumulative),
            split.sticky_by,
            shadow,
            split.shadow_share if shadow else 0.0,
        )
    return choices


def sticky_point(value: str) -> float:
    """``value``'s place in [0, 1): a stable hash, the same in every gateway process."""
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


def sticky_value(call: InferCall, key: str) -> str | None:
    """The request parameter ``key`` as text, else the gRPC metadata value; None: neither."""
    param = call.message.parameters.get(key) if key in call.message.parameters else None
    if param is not None:
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            return str(getattr(param, kind))
    lowered = key.lower()  # gRPC metadata keys arrive lower-cased
    for name, value in call.metadata:
        if name == lowered:
            return value if isinstance(value, str) else bytes(value).hex()
    return None


class VersionChooser:
    """Picks the version of each unpinned request off the routing table it reads.

    ``view`` reads the current routing view; ``draw`` a uniform [0, 1) number (the
    tests fix it)."""

    def __init__(self, view: Callable[[], RoutingView], draw: Callable[[], float] = random.random) -> None:
        self.view = view
        self.draw = draw
        self._built_from: RoutingView | None = None  # each table is a new view: identity says "changed"
        self._choices: dict[str, Choice] = {}

    def choice(self, name: str) -> Choice | None:
        """Model ``name``'s choice in the current generation; None: unknown model."""
        view = self.view()
        if view is not self._built_from:
            self._choices = choices_for(view)
            self._built_from = view
        return self._choices.get(name)

    def choose(self, name: str, call: InferCall | None) -> int | None:
        """The version that answers ``call`` (None: a metadata call, the default);
        None for an unknown model."""
        choice = self.choice(name)
        if choice is None:
            return None
        if call is None or not choice.versions:
            return choice.default
        if len(choice.versions) == 1:
            return choice.versions[0]
        point = None
        if choice.sticky_by:
            value = sticky_value(call, choice.sticky_by)
            if value is not None:
                point = sticky_point(value)
        if point is None:
            point = self.draw()
        index = bisect.bisect_right(choice.cumulative, point)
        return choice.versions[min(index, len(choice.versions) - 1)]

    def shadow(self, name: str, answering: int) -> int:
        """The version to copy this request to (0: none): drawn at the split's shadow
        share, never the version already answering it."""
        choice = self._choices.get(name)
        if choice is None or not choice.shadow_version or choice.shadow_version == answering:
            return 0
        return choice.shadow_version if self.draw() < choice.shadow_share else 0
