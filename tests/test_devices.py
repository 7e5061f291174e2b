"""Device figures for /metrics: the CPU from the worker's own run time, GPUs from NVML.

This machine has no GPU, so NVML is the one thing stood in for, through the
:class:`model_workers.devices.Nvml` seam (the four calls a monitor makes).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from model_workers.devices import CpuMonitor, NvmlMonitor, monitor_for


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_cpu_utilization_is_run_time_over_wall_time_between_samples() -> None:
    clock, busy = Clock(), [0.0]
    monitor = CpuMonitor(lambda: busy[0], clock=clock)
    clock.now_s += 2.0
    busy[0] += 0.5
    sample = monitor.sample()
    assert sample.utilization_ratio == pytest.approx(0.25)
    assert 0 < sample.memory_used_bytes < sample.memory_total_bytes
    clock.now_s += 1.0  # idle second: the ratio is of the last interval only
    assert monitor.sample().utilization_ratio == 0.0
    clock.now_s += 1.0
    busy[0] += 3.0  # more run time than wall time (a late sample) is capped
    assert monitor.sample().utilization_ratio == 1.0


class FakeNvml:
    """The NVML calls, answering for one GPU at index 1."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:  # noqa: N802
        assert index == 1
        return "handle-1"

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:  # noqa: N802
        assert handle == "handle-1"
        return SimpleNamespace(gpu=73, memory=20)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)


def test_a_gpu_reports_what_nvml_says() -> None:
    monitor = monitor_for("cuda:1", lambda: 0.0, nvml=FakeNvml())
    assert isinstance(monitor, NvmlMonitor)
    sample = monitor.sample()
    assert (sample.device, sample.utilization_ratio) == ("cuda:1", pytest.approx(0.73))
    assert (sample.memory_used_bytes, sample.memory_total_bytes) == (3 * 2**30, 80 * 2**30)


def test_without_nvml_a_gpu_worker_falls_back_to_its_run_time(caplog: pytest.LogCaptureFixture) -> None:
    monitor = monitor_for("cuda:1", lambda: 0.0, nvml=FakeNvml(fail_init=True))
    assert isinstance(monitor, CpuMonitor)
    assert monitor.sample().device == "cuda:1"
    assert "no NVML figures for cuda:1" in caplog.text


def test_the_cpu_device_never_asks_nvml() -> None:
    assert isinstance(monitor_for("cpu", lambda: 0.0, nvml=FakeNvml(fail_init=True)), CpuMonitor)
