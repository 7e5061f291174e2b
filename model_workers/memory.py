"""What the router needs for placement: this worker's device, and each model's memory.

A model's weights are the files of its version directory (``ModelInfo.weights_bytes``).
Its activations are measured once, around the warm-up (which runs the max batch):
on the CPU as the growth of the process's peak resident set, a rough figure (it
also counts ONNX Runtime's arena and anything else the process touched meanwhile),
never less than the max-batch inputs themselves. On a GPU the figure would come
from the CUDA allocator; that seam is :class:`PeakMemoryProbe`, and until it is
filled (TODO(#6)) a GPU worker reports 0, "not measured", and the router keeps its
estimate from the weights.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Protocol

from meshserve.platform import inventory
from model_workers.runners import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceDescription:
    """This worker's device as the router's placement sees it."""

    kind: str  # "cpu" | "gpu" | "mig"
    profile: str  # MIG profile; "" otherwise
    memory_bytes: int  # 0: unknown


def describe_device(
    device_id: str, devices: list[inventory.Device] | None = None, *, budget_bytes: int = 0
) -> DeviceDescription:
    """The CPU with the host's RAM, or the GPU or MIG slice the inventory lists under
    ``device_id`` (``devices``: default, ask NVML now). A GPU the inventory does not
    list gets its kind from the id and memory 0, which the router reads as
    "fits anything": said once, at warning level.

    ``budget_bytes`` (``--memory-budget-mb``), when > 0, is reported instead of the
    measured memory: the share of RAM (or of the GPU) the router may fill."""
    measured = _describe(device_id, devices)
    if budget_bytes > 0:
        return DeviceDescription(measured.kind, measured.profile, budget_bytes)
    return measured


def _describe(device_id: str, devices: list[inventory.Device] | None) -> DeviceDescription:
    if device_id == "cpu":
        cpu = inventory.cpu_device()
        return DeviceDescription("cpu", "", cpu.memory_bytes)
    for device in inventory.discover() if devices is None else devices:
        if device.id == device_id:
            return DeviceDescription(device.kind, device.profile, device.memory_bytes)
    kind = "mig" if device_id.startswith("MIG-") else "gpu"
    log.warning(
        "device %s is not in the inventory: reporting it as a %s of unknown memory, where any model fits",
        device_id,
        kind,
    )
    return DeviceDescription(kind, "", 0)


class PeakMemoryProbe(Protocol):
    """Measures how much device memory a piece of work needed at its peak."""

    def start(self) -> None: ...
    def peak_growth_bytes(self) -> int | None: ...  # since start; None: cannot measure


class HostPeakRss:
    """Peak resident set growth of this process (Linux: VmHWM, reset through clear_refs).

    Without a writable ``/proc/self/clear_refs`` the peak cannot be reset, and the
    growth of ``ru_maxrss`` is used: 0 when the work stayed under an earlier peak.
    """

    def __init__(self) -> None:
        self._baseline_bytes = 0
        self._reset = False

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak RSS (VmHWM) to the current RSS
            self._baseline_bytes = _status_bytes("VmRSS")
            self._reset = True
        except (OSError, ValueError):  # not Linux, or not allowed
            self._baseline_bytes = _max_rss_bytes()
            self._reset = False

    def peak_growth_bytes(self) -> int | None:
        try:
            peak = _status_bytes("VmHWM") if self._reset else _max_rss_bytes()
        except (OSError, ValueError):
            return None
        return max(0, peak - self._baseline_bytes)


class UnmeasuredGpu:
    """TODO(#6): measure a GPU's activations (ONNX Runtime's CUDA arena, or
    cudaMemGetInfo before and after the max-batch warm-up). Until then: None."""

    def start(self) -> None:
        pass

    def peak_growth_bytes(self) -> int | None:
        return None


def probe_for(device_id: str) -> PeakMemoryProbe:
    return HostPeakRss() if device_id == "cpu" else UnmeasuredGpu()


def warm_up_measured(model: ModelRunner, probe: PeakMemoryProbe) -> tuple[float, int]:
    """Warm ``model`` up (max batch included) under ``probe``.

    Returns (warm-up seconds, activation bytes); 0 bytes means not measured. Runs
    the model: call it in the worker's loader thread, one model at a time, or the
    figures of concurrent loads mix (batches of other models running meanwhile in
    the worker's compute thread can still inflate the CPU figure).
    """
    probe.start()
    took_s = model.warm_up()
    growth = probe.peak_growth_bytes()
    if growth is None:
        return took_s, 0
    inputs = model.sample_inputs(max(1, model.info.max_batch_size)) if model.warmed else {}
    return took_s, max(growth, sum(array.nbytes for array in inputs.values()))


def _status_bytes(field: str) -> int:
    """A ``kB`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in /proc/self/status")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
