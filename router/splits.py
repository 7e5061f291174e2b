"""Traffic splits as the router publishes them: each model's configured split
(config.yaml ``traffic``), unless a run-time override (SetTrafficSplit) replaces it.

Off the hot path: read when a routing-table generation is built. Gateways apply
the split per request (gateway/versions.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from meshserve.errors import InvalidArgument, NotFound
from meshserve.models.repository import ModelInfo
from meshserve.models.traffic import TrafficSplit, check_weights


class Splits:
    """The run-time overrides, by model name; the configured splits come with the
    models (every version of a model carries its ``traffic``)."""

    def __init__(self) -> None:
        self.overrides: dict[str, TrafficSplit] = {}

    def effective(self, models: Mapping[tuple[str, int], ModelInfo]) -> tuple[TrafficSplit, ...]:
        """Every model's split in force, sorted by model; models without one left out.
        An override of a model no longer in ``models`` is left out too (kept, in case
        the model comes back)."""
        configured: dict[str, TrafficSplit] = {}
        for (name, _), info in models.items():
            if info.traffic is not None:
                configured[name] = info.traffic
        names = {name for name, _ in models}
        splits = configured | {name: split for name, split in self.overrides.items() if name in names}
        return tuple(splits[name] for name in sorted(splits))

    def set(self, split: TrafficSplit, models: Mapping[tuple[str, int], ModelInfo]) -> TrafficSplit:
        """Override the split of ``split.model`` (no weights: back to the configured
        split); the split now in force (weights empty: none, the latest ready version).
        Raises NotFound for an unknown model, InvalidArgument naming the field at fault; nothing changes then."""
        versions = {version for name, version in models if name == split.model}
        if not versions:
            raise NotFound(f"unknown model '{split.model}'")
        if not split.weights:
            self.overrides.pop(split.model, None)
        else:
            try:
                weights = check_weights(dict(split.weights), "weights")
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            unknown = sorted(v for v, _ in weights if v not in versions)
            if unknown:
                raise InvalidArgument(
                    f"weights: model '{split.model}' has no version {unknown[0]} (it has {sorted(versions)})"
                )
            if split.shadow_version and split.shadow_version not in versions:
                raise InvalidArgument(f"shadow_version: model '{split.model}' has no version {split.shadow_version}")
            if not 0 <= split.shadow_share <= 1:
                raise InvalidArgument(f"shadow_share: must be from 0 to 1, got {split.shadow_share}")
            self.overrides[split.model] = replace(split, weights=weights)
        for current in self.effective(models):
            if current.model == split.model:
                return current
        return TrafficSplit(split.model)
