"""Which device holds which model version: best-fit decreasing by device memory.

Pure: plain values in, a frozen :class:`Placement` out; no I/O, no clock, no
randomness, so the same devices and models always give the same placement.

Each model version has an estimate of the device memory it needs
(:func:`estimate_bytes`) and constraints from its config's ``placement`` section.
Models are taken largest first (ties by name and version); each goes to the
allowed device with the least free memory that still fits it (ties by device id),
keeping ``headroom_ratio`` of every device's memory free. ``device: any`` models
try the accelerators (GPUs and MIG slices) first and the CPU only when no
accelerator fits. A device whose memory is unknown (0) fits anything, and is
chosen last among its peers. A model that fits on no allowed device is
:class:`Unplaceable`, with the numbers that say why.

Each placeable model version lands on exactly one device; several replicas of a
model on several devices are not done here (workers that share a device id all
serve that device's models).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.models.ensemble import ENSEMBLE_PLATFORM
from meshserve.models.repository import ModelInfo
from meshserve.platform.mig import parse_mig_profile

ModelKey = tuple[str, int]

DEFAULT_HEADROOM_RATIO = 0.1
"""Share of each device's memory kept free: estimates are rough, and ONNX Runtime's
arena and the CUDA context take memory no estimate counts."""

UNMEASURED_FACTOR = 2
"""Estimate before a worker has measured a model: its weights times this.

Until the first warm-up nobody knows the activations. ONNX Runtime holds the
weights a second time while it builds the session (the parsed file and the
optimized, pre-packed initializers), and at the batch sizes served here the
activations of the dense models we serve are of the order of the weights; twice
the weights errs on the side of room and is replaced by the measurement."""

ACCELERATOR_KINDS = frozenset({"gpu", "mig"})


@dataclass(frozen=True, slots=True)
class Slot:
    """A device workers serve: the CPU, a whole GPU or a MIG slice."""

    device_id: str  # "cpu", "cuda:0", a MIG UUID, ...
    kind: str  # "cpu" | "gpu" | "mig"
    profile: str = ""  # MIG profile, e.g. "3g.40gb"; empty for the CPU and whole GPUs
    memory_bytes: int = 0  # 0: unknown, and anything fits


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a worker measured for one model version (the latest report wins)."""

    weights_bytes: int
    activation_bytes: int  # 0: not measured (e.g. on a GPU, for now)


@dataclass(frozen=True, slots=True)
class Demand:
    """One model version to place: its estimate and its constraints."""

    key: ModelKey
    estimate_bytes: int
    device: str = "any"  # "gpu" | "cpu" | "any"
    min_mig_profile: str | None = None

    def constraint(self) -> str:
        """The constraints as the config spells them, for messages."""
        if self.min_mig_profile is None:
            return f"device: {self.device}"
        return f"device: {self.device}, min_mig_profile: {self.min_mig_profile}"


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """A model version no allowed device has room for, with the numbers."""

    key: ModelKey
    estimate_bytes: int
    constraint: str
    allowed_devices: int  # live devices its constraints allow, room or not
    largest_free_bytes: int  # most free memory (after headroom) among them; 0 when none

    def message(self) -> str:
        name, version = self.key
        needs = f"model {name} version {version} needs {_human(self.estimate_bytes)} ({self.constraint})"
        if self.allowed_devices == 0:
            return f"{needs}, and no live device allows it"
        return (
            f"{needs}; the most free memory on the {self.allowed_devices} allowed device(s) is"
            f" {_human(self.largest_free_bytes)} after headroom"
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """Device id -> the model versions it holds, and what could not be placed."""

    assignments: tuple[tuple[str, tuple[ModelKey, ...]], ...] = ()  # by device id; keys sorted
    unplaceable: tuple[Unplaceable, ...] = ()  # by model key

    def on(self, device_id: str) -> tuple[ModelKey, ...]:
        """The model versions placed on ``device_id`` (none for an unknown id)."""
        return dict(self.assignments).get(device_id, ())

    def unplaceable_keys(self) -> frozenset[ModelKey]:
        return frozenset(entry.key for entry in self.unplaceable)


def estimate_bytes(info: ModelInfo, footprint: Footprint | None) -> int:
    """Device memory ``info`` needs: the config's ``memory_mb`` if set, else weights
    plus measured activations, else weights times :data:`UNMEASURED_FACTOR`.

    Weights come from the worker's report when there is one, else from the files
    the repository scan saw.
    """
    if info.placement.memory_bytes is not None:
        return info.placement.memory_bytes
    weights = footprint.weights_bytes if footprint is not None and footprint.weights_bytes else info.weights_bytes
    if footprint is not None and footprint.activation_bytes > 0:
        return weights + footprint.activation_bytes
    return weights * UNMEASURED_FACTOR


def placeable(info: ModelInfo) -> bool:
    """Whether ``info`` is placed on a device at all: an ensemble (its steps' models
    are placed, the gateway runs the steps) never is."""
    return info.platform != ENSEMBLE_PLATFORM


def demand_for(info: ModelInfo, footprint: Footprint | None) -> Demand:
    return Demand(
        (info.name, info.version),
        estimate_bytes(info, footprint),
        info.placement.device,
        info.placement.min_mig_profile,
    )


def allows(slot: Slot, demand: Demand) -> bool:
    """Whether ``demand``'s constraints let it onto ``slot`` (room aside).

    A MIG slice whose profile is unknown or unparsable is refused to models with a
    ``min_mig_profile``: it cannot be shown to be large enough.
    """
    if slot.kind == "cpu":
        return demand.device in ("cpu", "any")
    if slot.kind not in ACCELERATOR_KINDS or demand.device not in ("gpu", "any"):
        return False
    if slot.kind == "gpu" or demand.min_mig_profile is None:
        return True
    have, need = parse_mig_profile(slot.profile), parse_mig_profile(demand.min_mig_profile)
    return have is not None and need is not None and have.covers(need)


def place(
    slots: Iterable[Slot], demands: Iterable[Demand], *, headroom_ratio: float = DEFAULT_HEADROOM_RATIO
) -> Placement:
    """Best-fit decreasing; see the module docstring. Device ids must be unique."""
    if not 0 <= headroom_ratio < 1:
        raise ValueError(f"headroom_ratio must be in [0, 1), got {headroom_ratio}")
    devices = sorted(slots, key=lambda slot: slot.device_id)
    if len({slot.device_id for slot in devices}) != len(devices):
        raise ValueError("device ids must be unique")
    # None: unknown memory, room for anything.
    free: dict[str, int | None] = {
        slot.device_id: int(slot.memory_bytes * (1 - headroom_ratio)) if slot.memory_bytes > 0 else None
        for slot in devices
    }
    placed: dict[str, list[ModelKey]] = {}
    unplaceable: list[Unplaceable] = []
    for demand in sorted(demands, key=lambda d: (-d.estimate_bytes, d.key)):
        allowed = [slot for slot in devices if allows(slot, demand)]
        chosen = _best_fit(allowed, demand, free)
        if chosen is None:
            room = [free[slot.device_id] or 0 for slot in allowed]
            unplaceable.append(
                Unplaceable(demand.key, demand.estimate_bytes, demand.constraint(), len(allowed), max(room, default=0))
            )
            continue
        left = free[chosen]
        if left is not None:
            free[chosen] = left - demand.estimate_bytes
        placed.setdefault(chosen, []).append(demand.key)
    return Placement(
        tuple((device_id, tuple(sorted(keys))) for device_id, keys in sorted(placed.items())),
        tuple(sorted(unplaceable, key=lambda entry: entry.key)),
    )


def _best_fit(allowed: list[Slot], demand: Demand, free: dict[str, int | None]) -> str | None:
    """The device id with the least free memory that still fits, accelerators first
    for ``device: any``; None when nothing fits."""
    tiers = [allowed]
    if demand.device == "any":
        tiers = [[s for s in allowed if s.kind in ACCELERATOR_KINDS], [s for s in allowed if s.kind == "cpu"]]
    for tier in tiers:
        fitting = [
            slot.device_id for slot in tier if (room := free[slot.device_id]) is None or room >= demand.estimate_bytes
        ]
        if fitting:
            # Known free memory before unknown, then the tightest fit, then the id.
            return min(fitting, key=lambda device_id: (free[device_id] is None, free[device_id] or 0, device_id))
    return None


def _human(size_bytes: int) -> str:
    """Bytes as GiB (MiB below 1 GiB), for messages; the exact figure follows."""
    if size_bytes >= 2**30:
        return f"{size_bytes / 2**30:.2f} GiB ({size_bytes} bytes)"
    return f"{size_bytes / 2**20:.1f} MiB ({size_bytes} bytes)"
