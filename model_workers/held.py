"""The model versions a worker holds, and which of them the serve loop claims from.

A held model is claimed from from the moment it is added until ``stop_claiming``
(the router placed it elsewhere); it stays held, and counted, until ``remove``,
once the batch in hand has finished. Every other part asks here, never keeps a copy.
"""

from __future__ import annotations

from meshserve.observe.metrics import EngineFigures, ModelCounters
from meshserve.queue import ModelKeys
from model_workers.served import Served

ModelKey = tuple[str, int]
"""A model version: (name, version)."""


class HeldModels:
    """The held models by version, those claimed from by wake key, and every model's keys ever held."""

    def __init__(self) -> None:
        self.served: dict[ModelKey, Served] = {}
        self._by_wake: dict[str, Served] = {}
        self._known_keys: dict[str, ModelKeys] = {}  # wake key -> keys, of every model ever served

    def add(self, key: ModelKey, served: Served) -> None:
        """Hold ``served`` and claim from it (every queue partition of it) from now on."""
        self.served[key] = served
        for keys in served.partitions:
            self._by_wake[keys.wake] = served
            self._known_keys[keys.wake] = keys

    def stop_claiming(self, served: Served) -> None:
        """Claim from ``served`` no more; it stays held until ``remove``."""
        for keys in served.partitions:
            del self._by_wake[keys.wake]

    def remove(self, key: ModelKey) -> None:
        del self.served[key]

    def claims(self, served: Served) -> bool:
        """Whether the serve loop takes work for ``served`` (False once it is being dropped)."""
        return self._by_wake.get(served.keys.wake) is served

    def claimed(self) -> list[Served]:
        """The models claimed from, in the order they were added."""
        claimed: list[Served] = []
        for served in self._by_wake.values():  # a partitioned model's wake lists are adjacent
            if not claimed or claimed[-1] is not served:
                claimed.append(served)
        return claimed

    def only_claimed(self) -> Served | None:
        """The model claimed from, if it is the only one."""
        claimed = self.claimed()
        return claimed[0] if len(claimed) == 1 else None

    def wake_keys(self) -> list[str]:
        """The wake lists of the models claimed from (one per queue partition)."""
        return list(self._by_wake)

    def by_wake_key(self, wake: str) -> Served | None:
        """The model claimed from one of whose wake lists is ``wake``, if any (its
        partition's keys: :meth:`keys_of`)."""
        return self._by_wake.get(wake)

    def keys_of(self, wake: str) -> ModelKeys:
        """The keys of the model's queue partition, held now or before, whose wake list is ``wake``."""
        return self._known_keys[wake]

    def readiness(self) -> dict[ModelKey, bool]:
        """Each held model version: whether it is in service (warm, healthy, not being dropped)."""
        return {key: s.model.ready and self.claims(s) for key, s in self.served.items()}

    def counters(self) -> list[ModelCounters]:
        """Every held model's counters, for the metrics endpoint."""
        return [
            ModelCounters(
                name,
                version,
                s.stats.batches,
                s.stats.items,
                s.stats.requests,
                s.stats.expired,
                s.stats.failed,
                s.stats.device_seconds,
                s.weights_bytes,
                s.model.compute_cpu_s(),
            )
            for (name, version), s in self.served.items()
        ]

    def engines(self) -> list[EngineFigures]:
        """Every held model's engine setting and the trials it was chosen by, for the metrics endpoint."""
        return [
            EngineFigures(
                name,
                version,
                s.model.engine.label,
                s.model.engine_source,
                tuple((t.setting.label, t.batch1_s, t.max_batch_s) for t in s.model.engine_trials),
            )
            for (name, version), s in self.served.items()
        ]

    def busy_seconds(self) -> float:
        """Device time spent on the held models' batches, summed."""
        return sum(s.stats.device_seconds for s in self.served.values())
