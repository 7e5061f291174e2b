"""How busy a worker's device is, and how much of its memory is used.

A worker samples its device about once a second (with its router heartbeat) and
the metrics endpoint reads the latest sample, so a scrape costs nothing. On a GPU
the figures come from NVML (``nvidia-ml-py``, in the ``[gpu]`` extra); the seam is
:class:`Nvml`, the few NVML calls used, so tests can stand in for a GPU this
machine does not have. Without NVML the device is the CPU: utilization is the
share of wall time the worker spent in model runs (its executor runs one batch at
a time), and memory is the worker process's resident set against the host's RAM.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceSample:
    device: str
    utilization_ratio: float  # 0..1 over the last sampling interval
    memory_used_bytes: int
    memory_total_bytes: int


class DeviceMonitor(Protocol):
    def sample(self) -> DeviceSample: ...


class Nvml(Protocol):
    """The NVML calls a monitor makes (``pynvml`` satisfies it)."""

    def nvmlInit(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...  # noqa: N802
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # noqa: N802 (.gpu: percent)
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # noqa: N802 (.used, .total: bytes)


class CpuMonitor:
    """The CPU as a device; ``busy_seconds`` reads the worker's cumulative model-run time."""

    def __init__(
        self, busy_seconds: Callable[[], float], device: str = "cpu", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.device, self._busy_seconds, self._clock = device, busy_seconds, clock
        self._last = (clock(), busy_seconds())

    def sample(self) -> DeviceSample:
        now_s, busy_s = self._clock(), self._busy_seconds()
        then_s, busy_then_s = self._last
        self._last = (now_s, busy_s)
        elapsed_s = now_s - then_s
        ratio = min(1.0, max(0.0, (busy_s - busy_then_s) / elapsed_s)) if elapsed_s > 0 else 0.0
        return DeviceSample(self.device, ratio, _resident_bytes(), _host_memory_bytes())


class NvmlMonitor:
    """One GPU through NVML (utilization as NVML reports it: its own sampling window)."""

    def __init__(self, nvml: Nvml, index: int, device: str) -> None:
        self.device, self._nvml = device, nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> DeviceSample:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return DeviceSample(self.device, rates.gpu / 100, int(memory.used), int(memory.total))


def monitor_for(device: str, busy_seconds: Callable[[], float], nvml: Nvml | None = None) -> DeviceMonitor:
    """NVML for ``cuda:<index>`` when it loads, else the CPU monitor (said once in the log)."""
    if not device.startswith("cuda:"):
        return CpuMonitor(busy_seconds, device)
    try:
        if nvml is None:
            import pynvml  # type: ignore[import-not-found,unused-ignore]

            nvml = pynvml
        nvml.nvmlInit()
        return NvmlMonitor(nvml, int(device.partition(":")[2]), device)
    except Exception as exc:  # no driver, no library, a MIG UUID (TODO(#6)): figures from the CPU side
        log.warning("no NVML figures for %s (%s); reporting model-run time as its utilization", device, exc)
        return CpuMonitor(busy_seconds, device)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
