"""The host's devices from NVML, and one worker per device under `meshserve up`.

This machine has no GPU: NVML is the one thing stood in for, through the
:class:`meshserve.platform.inventory.Nvml` seam. The fake answers only the calls in that
seam; any other NVML call (a MIG-changing one above all) fails the test.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshserve.cli.main import build_parser, main
from meshserve.cli.supervisor import ChildSpec, plan_children
from meshserve.platform.inventory import Device, discover, inventory_table, pin_device, visible_devices

GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"


class FakeNVMLError(Exception):
    pass


class FakeNotFound(FakeNVMLError):
    pass


# NVML_GPU_INSTANCE_PROFILE_* -> (slices, memory MiB, name) as an H100 80GB lists them
H100_PROFILES = {
    0x0: (1, 9856, b"MIG 1g.10gb"),
    0x1: (2, 19968, b"MIG 2g.20gb"),
    0x2: (3, 40192, b"MIG 3g.40gb"),
    0x3: (4, 40192, b"MIG 4g.40gb"),
    0x4: (7, 80384, b"MIG 7g.80gb"),
    0x7: (1, 9856, b"MIG 1g.10gb+me"),
    0x9: (1, 19968, b"MIG 1g.20gb"),
}
# MIG device slots on GPU 0 -> (UUID, slices, memory MiB); slots 2, 5, 6 are empty
GPU0_SLICES = {
    0: ("MIG-3g-aaaa", 3, 40192),
    1: ("MIG-2g-bbbb", 2, 19968),
    3: ("MIG-1g-cccc", 1, 9856),
    4: ("MIG-1g-dddd", 1, 9856),
}


class FakeNvml:
    """GPU 0: an H100 with MIG on and four slices; GPU 1: an H100 with MIG off."""

    NVMLError = FakeNVMLError
    NVMLError_NotFound = FakeNotFound

    def __init__(self, fail_init: bool = False, fail_uuid_of: str = "", gpu1_mig_supported: bool = True) -> None:
        self.fail_init, self.fail_uuid_of, self.gpu1_mig_supported = fail_init, fail_uuid_of, gpu1_mig_supported
        self.initialized = False
        self.shutdowns = 0

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"NVML call outside the seam: {name}")

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        self.initialized = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        assert self.initialized
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return ("gpu0", "gpu1")[index]

    def nvmlDeviceGetName(self, handle: str) -> str:  # noqa: N802
        assert handle in ("gpu0", "gpu1")
        return H100

    def nvmlDeviceGetUUID(self, handle: str) -> str:  # noqa: N802
        if handle == self.fail_uuid_of:
            raise FakeNVMLError("GPU is lost")
        if handle.startswith("gpu0/"):
            return GPU0_SLICES[int(handle.rpartition("/")[2])][0]
        return {"gpu0": "GPU-0000", "gpu1": "GPU-1111"}[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        if handle.startswith("gpu0/"):
            total = GPU0_SLICES[int(handle.rpartition("/")[2])][2] * 2**20
        else:
            total = 81559 * 2**20
        return SimpleNamespace(total=total, used=0, free=total)

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:  # noqa: N802
        if handle == "gpu1" and not self.gpu1_mig_supported:
            raise FakeNVMLError("Not Supported")
        return [1, 1] if handle == "gpu0" else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:  # noqa: N802
        assert handle == "gpu0"
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, index: int) -> str:  # noqa: N802
        assert handle == "gpu0"
        if index not in GPU0_SLICES:
            raise FakeNotFound("Not Found")
        return f"gpu0/{index}"

    def nvmlDeviceGetAttributes(self, handle: str) -> Any:  # noqa: N802
        _, slices, mib = GPU0_SLICES[int(handle.rpartition("/")[2])]
        return SimpleNamespace(gpuInstanceSliceCount=slices, memorySizeMB=mib)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: str, profile: int) -> Any:  # noqa: N802
        assert handle == "gpu0"
        if profile not in H100_PROFILES:
            raise FakeNVMLError("Not Supported")
        slices, mib, name = H100_PROFILES[profile]
        return SimpleNamespace(sliceCount=slices, memorySizeMB=mib, name=name)


def gpus(devices: list[Device]) -> list[Device]:
    return [d for d in devices if d.kind != "cpu"]


def test_mig_slices_stand_for_their_gpu_and_a_whole_gpu_for_itself() -> None:
    nvml = FakeNvml()
    devices = discover(nvml)
    assert [(d.id, d.kind, d.index, d.profile) for d in devices] == [
        ("MIG-3g-aaaa", "mig", 0, "3g.40gb"),
        ("MIG-2g-bbbb", "mig", 0, "2g.20gb"),
        ("MIG-1g-cccc", "mig", 0, "1g.10gb"),  # not 1g.20gb (same slices, other memory), not +me
        ("MIG-1g-dddd", "mig", 0, "1g.10gb"),
        ("cuda:1", "gpu", 1, ""),
        ("cpu", "cpu", -1, ""),
    ]
    assert [d.cuda_visible_devices for d in devices] == [
        "MIG-3g-aaaa",
        "MIG-2g-bbbb",
        "MIG-1g-cccc",
        "MIG-1g-dddd",
        "1",
        "",
    ]
    assert [d.uuid for d in devices] == ["MIG-3g-aaaa", "MIG-2g-bbbb", "MIG-1g-cccc", "MIG-1g-dddd", "GPU-1111", ""]
    assert all(d.name == H100 for d in gpus(devices))
    assert [d.memory_bytes for d in gpus(devices)] == [m * 2**20 for m in (40192, 19968, 9856, 9856, 81559)]
    cpu = devices[-1]
    assert cpu.memory_bytes > 0
    assert cpu.name
    assert nvml.shutdowns == 1


def test_a_gpu_that_cannot_do_mig_serves_whole() -> None:
    devices = discover(FakeNvml(gpu1_mig_supported=False))
    assert [d.id for d in devices if d.index == 1] == ["cuda:1"]


def test_without_nvml_the_cpu_alone_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with caplog.at_level(logging.INFO, logger="meshserve.platform.inventory"):
        devices = discover()
    assert [(d.id, d.kind, d.cuda_visible_devices) for d in devices] == [("cpu", "cpu", "")]
    assert [r.getMessage() for r in caplog.records] == [
        "devices: CPU only (nvidia-ml-py is not installed; pip install 'meshserve[gpu]')"
    ]


def test_without_a_driver_the_cpu_alone_said_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(fail_init=True)
    with caplog.at_level(logging.INFO, logger="meshserve.platform.inventory"):
        devices = discover(nvml)
    assert [d.id for d in devices] == ["cpu"]
    assert [r.getMessage() for r in caplog.records] == ["devices: CPU only (NVML did not start: Driver Not Loaded)"]
    assert nvml.shutdowns == 0  # nothing to shut down


def test_an_nvml_error_midway_leaves_the_cpu_and_shuts_nvml_down(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(fail_uuid_of="gpu1")  # the MIG slices of GPU 0 were already read
    with caplog.at_level(logging.INFO, logger="meshserve.platform.inventory"):
        devices = discover(nvml)
    assert [d.id for d in devices] == ["cpu"]
    assert [r.getMessage() for r in caplog.records] == [
        "devices: CPU only (NVML failed while listing GPUs: GPU is lost)"
    ]
    assert nvml.shutdowns == 1


def test_the_table_has_a_line_per_device() -> None:
    lines = inventory_table(discover(FakeNvml())).splitlines()
    assert lines[0].split() == ["ID", "KIND", "NAME", "PROFILE", "MEMORY", "GiB", "CUDA_VISIBLE_DEVICES"]
    assert lines[1].split()[:2] == ["MIG-3g-aaaa", "mig"]
    assert "3g.40gb  39.2" in lines[1]
    assert lines[5].split()[:2] == ["cuda:1", "gpu"]
    assert lines[5].endswith(" 1")
    assert lines[6].startswith("cpu ")


# ------------------------------------------------------------------ worker pinning


def test_a_worker_pins_its_device_unless_told_otherwise() -> None:
    env: dict[str, str] = {}
    pin_device("cuda:3", env)
    assert env == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    env = {}
    pin_device("MIG-1g-cccc", env)
    assert env == {"CUDA_VISIBLE_DEVICES": "MIG-1g-cccc"}
    env = {}
    pin_device("cpu", env)
    assert env == {"CUDA_VISIBLE_DEVICES": ""}
    env = {"CUDA_VISIBLE_DEVICES": "GPU-1111"}  # set by `meshserve up` or a device plugin
    pin_device("cuda:1", env)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1111"


def test_a_worker_refuses_a_device_it_cannot_pin() -> None:
    with pytest.raises(ValueError, match="expected cpu, cuda:<index> or a MIG UUID"):
        pin_device("gpu0", {})
    with pytest.raises(SystemExit, match="--device 'cuda:x'"):
        main(["worker", "--model-repository", "/m", "--device", "cuda:x"])


# ------------------------------------------------------------------ `meshserve up`'s plan


def plan(flags: list[str], devices: list[Device]) -> list[ChildSpec]:
    args = build_parser().parse_args(["up", *flags])
    return plan_children(
        args,
        devices,
        repository=Path("/models"),
        redis_url="redis://127.0.0.1:6399/0",
        router_address="127.0.0.1:9000",
    )


def flag(spec: ChildSpec, name: str) -> str:
    return spec.args[spec.args.index(name) + 1]


def test_up_starts_one_worker_per_gpu_or_mig_slice_pinned_by_its_environment() -> None:
    specs = plan([], discover(FakeNvml()))
    assert [s.role for s in specs] == ["router", *["worker"] * 5, "gateway"]
    workers = specs[1:-1]
    assert [flag(w, "--device") for w in workers] == [
        "MIG-3g-aaaa",
        "MIG-2g-bbbb",
        "MIG-1g-cccc",
        "MIG-1g-dddd",
        "cuda:1",
    ]
    assert [dict(w.env) for w in workers] == [
        {"CUDA_VISIBLE_DEVICES": "MIG-3g-aaaa"},
        {"CUDA_VISIBLE_DEVICES": "MIG-2g-bbbb"},
        {"CUDA_VISIBLE_DEVICES": "MIG-1g-cccc"},
        {"CUDA_VISIBLE_DEVICES": "MIG-1g-dddd"},
        {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
    ]
    assert [flag(w, "--metrics-port") for w in workers] == ["8003", "8004", "8005", "8006", "8007"]
    assert flag(specs[0], "--metrics-port") == "8008"  # the router: after the last worker
    assert flag(specs[-1], "--metrics-port") == "8002"
    assert all(flag(w, "--redis-url") == "redis://127.0.0.1:6399/0" for w in workers)
    assert all(flag(w, "--model-repository") == "/models" for w in workers)
    assert [w.label for w in workers][-1] == "worker cuda:1"


def test_cpu_workers_on_request_come_after_the_gpu_workers() -> None:
    specs = plan(["--workers", "2"], discover(FakeNvml()))
    workers = specs[1:-1]
    assert [flag(w, "--device") for w in workers][-3:] == ["cuda:1", "cpu", "cpu"]
    assert [dict(w.env) for w in workers[-2:]] == [{"CUDA_VISIBLE_DEVICES": ""}] * 2  # no GPU in sight
    assert [flag(w, "--metrics-port") for w in workers] == [str(p) for p in range(8003, 8010)]
    assert flag(specs[0], "--metrics-port") == "8010"


def test_without_gpu_workers_up_is_one_cpu_worker_as_before() -> None:
    for flags, devices in (([], [discover(FakeNvml())[-1]]), (["--gpu-workers", "none"], discover(FakeNvml()))):
        specs = plan(flags, devices)
        assert [(s.role, flag(s, "--metrics-port")) for s in specs] == [
            ("router", "8004"),
            ("worker", "8003"),
            ("gateway", "8002"),
        ]
        assert flag(specs[1], "--device") == "cpu"


def test_metrics_off_leaves_every_port_off() -> None:
    specs = plan(["--metrics-port", "0", "--workers", "1"], discover(FakeNvml()))
    assert {flag(s, "--metrics-port") for s in specs} == {"0"}


# ------------------------------------------------------------------ `meshserve devices`


def test_devices_json_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    cpu = listed[-1]  # on a GPU host the GPUs come first
    assert (cpu["id"], cpu["kind"], cpu["uuid"], cpu["index"], cpu["cuda_visible_devices"]) == (
        "cpu",
        "cpu",
        "",
        -1,
        "",
    )
    assert cpu["memory_bytes"] > 0
    assert all(set(d) == set(cpu) for d in listed)


def test_devices_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ID")
    assert lines[-1].startswith("cpu ")


@pytest.mark.parametrize(
    ("preset", "ids"),
    [
        (None, ["MIG-3g-aaaa", "MIG-2g-bbbb", "MIG-1g-cccc", "MIG-1g-dddd", "cuda:1"]),  # unset: all
        ("1", ["cuda:1"]),
        ("0", ["MIG-3g-aaaa", "MIG-2g-bbbb", "MIG-1g-cccc", "MIG-1g-dddd"]),  # a MIG GPU's index: its slices
        ("MIG-2g-bbbb,GPU-1111", ["MIG-2g-bbbb", "cuda:1"]),
        ("MIG-1g-c", ["MIG-1g-cccc"]),  # a unique prefix, as CUDA takes it
        ("MIG-1g", []),  # an ambiguous prefix names nothing
        ("1,7,0", ["cuda:1"]),  # CUDA ignores everything from the first entry it cannot use
        ("", []),  # no GPU at all
    ],
)
def test_a_preset_cuda_visible_devices_limits_the_gpu_workers(preset: str | None, ids: list[str]) -> None:
    kept = visible_devices(discover(FakeNvml()), preset)
    assert [d.id for d in kept] == [*ids, "cpu"]  # the CPU stays in every case
