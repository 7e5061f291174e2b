"""Which versions of a model are served, and how unpinned requests are shared between them.

Two config.yaml sections (docs/lifecycle.md#versions-splits-and-rollback)::

    version_policy:               # Triton's: one of
      latest: 2                   #   the 2 highest version directories
      # all: {}                   #   every version directory (meshserve's default)
      # specific: [1, 3]          #   exactly these
    traffic:                      # requests that name no version (default: latest ready)
      weights: {1: 95, 2: 5}      # version -> weight, shared among the READY ones
      sticky_by: user             # request parameter or metadata key: one caller, one version
      shadow: {version: 3, share: 0.1}   # copy 10% of requests to version 3, compared, never returned

The parsing raises ``ValueError`` naming the key; the repository adds the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Triton's version policy: ``kind`` is "all", "latest" (the ``count`` highest)
    or "specific" (exactly ``versions``)."""

    kind: str = "all"
    count: int = 0
    versions: frozenset[int] = frozenset()

    def select(self, available: list[int]) -> list[int]:
        """The served versions among ``available`` (ascending in, ascending out)."""
        if self.kind == "latest":
            return available[-self.count :]
        if self.kind == "specific":
            return [v for v in available if v in self.versions]
        return list(available)


ALL_VERSIONS = VersionPolicy()


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    """How requests naming model ``model`` but no version are shared between its versions.

    ``weights``: (version, weight) pairs, ascending by version; a version absent or
    not ready gets no share. ``sticky_by``: a request parameter or gRPC metadata key
    whose value picks the version (empty: drawn per request). ``shadow_version`` 0: no
    shadow traffic; else ``shadow_share`` (0..1) of requests are copied to it.
    """

    model: str
    weights: tuple[tuple[int, int], ...] = ()
    sticky_by: str = ""
    shadow_version: int = 0
    shadow_share: float = 0.0


_POLICY_KINDS = ("all", "latest", "specific")
_TRAFFIC_KEYS = frozenset({"weights", "sticky_by", "shadow"})
_SHADOW_KEYS = frozenset({"version", "share"})


def parse_version_policy(value: object) -> VersionPolicy:
    """The ``version_policy`` section; absent: every version (:data:`ALL_VERSIONS`)."""
    if value is None:
        return ALL_VERSIONS
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _POLICY_KINDS:
        raise ValueError(
            f"'version_policy' must be one of {{all: {{}}}}, {{latest: N}}, {{specific: [..]}}, got {value!r}"
        )
    kind, arg = next(iter(value.items()))
    if kind == "all":
        if arg not in (None, {}, True):
            raise ValueError(f"'version_policy.all' takes no value (write 'all: {{}}'), got {arg!r}")
        return ALL_VERSIONS
    if kind == "latest":
        count = arg.get("num_versions") if isinstance(arg, dict) else arg
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"'version_policy.latest' must be an integer >= 1, got {arg!r}")
        return VersionPolicy("latest", count=count)
    versions = arg.get("versions") if isinstance(arg, dict) else arg
    if (
        not isinstance(versions, list)
        or not versions
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions)
    ):
        raise ValueError(f"'version_policy.specific' must be a non-empty list of positive integers, got {arg!r}")
    return VersionPolicy("specific", versions=frozenset(versions))


def parse_traffic(value: object, model: str) -> TrafficSplit | None:
    """The ``traffic`` section of model ``model``; absent: None (the latest ready version)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("'traffic' must be a mapping")
    unknown = sorted(str(k) for k in value if k not in _TRAFFIC_KEYS)
    if unknown:
        raise ValueError(f"unknown key 'traffic.{unknown[0]}' (allowed: {', '.join(sorted(_TRAFFIC_KEYS))})")
    weights = check_weights(value.get("weights") or {}, "traffic.weights")
    sticky_by = value.get("sticky_by") or ""
    if not isinstance(sticky_by, str):
        raise ValueError(f"'traffic.sticky_by' must be a parameter or header name, got {sticky_by!r}")
    shadow_version, shadow_share = _shadow(value.get("shadow"))
    return TrafficSplit(model, weights, sticky_by, shadow_version, shadow_share)


def check_weights(weights: Mapping[Any, Any], where: str) -> tuple[tuple[int, int], ...]:
    """``weights`` (version -> weight) as sorted pairs; each version a positive int,
    each weight an int >= 0, their sum > 0 unless there are none. Raises ValueError."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"'{where}' must be a mapping of version to weight, got {weights!r}")
    pairs: list[tuple[int, int]] = []
    for version, weight in weights.items():
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"'{where}': version {version!r} is not a positive integer")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"'{where}': weight of version {version} must be an integer >= 0, got {weight!r}")
        pairs.append((version, weight))
    if pairs and sum(w for _, w in pairs) <= 0:
        raise ValueError(f"'{where}': the weights sum to 0; give some version a weight")
    return tuple(sorted(pairs))


def _shadow(value: object) -> tuple[int, float]:
    if value is None:
        return 0, 0.0
    if not isinstance(value, dict):
        raise ValueError("'traffic.shadow' must be a mapping with 'version' and 'share'")
    unknown = sorted(str(k) for k in value if k not in _SHADOW_KEYS)
    if unknown:
        raise ValueError(f"unknown key 'traffic.shadow.{unknown[0]}' (allowed: share, version)")
    version, share = value.get("version"), value.get("share", 0.1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"'traffic.shadow.version' must be a positive integer, got {version!r}")
    if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share) or not 0 <= share <= 1:
        raise ValueError(f"'traffic.shadow.share' must be a number from 0 to 1, got {share!r}")
    return version, float(share)
