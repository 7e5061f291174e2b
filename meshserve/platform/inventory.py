"""What a worker host has to serve on: its GPUs, their MIG slices, and the CPU.

:func:`discover` asks NVML (``nvidia-ml-py``, in the ``[gpu]`` extra) once at start.
A GPU with MIG enabled contributes its slices, not itself (CUDA cannot use the whole
GPU then); one without MIG contributes itself. The CPU always comes last. No NVML,
no driver, no GPU, or any NVML error on the way: the CPU alone, said in one log line.

MIG layouts are read, never changed: no function here creates, destroys or
reconfigures a GPU or compute instance, nor sets the MIG mode. Every call used is
in :class:`Nvml`, which is also the seam tests stand in for (``pynvml`` satisfies it).

One worker runs per device. It is pinned by ``CUDA_VISIBLE_DEVICES``, which CUDA
reads once, when it initializes; ONNX Runtime initializes CUDA when the first
session with the CUDA or TensorRT provider is created, not when ``onnxruntime`` is
imported, so :func:`pin_device` must run before any session exists (``meshserve
worker`` runs it first thing). NVML enumerates GPUs in PCI bus order and CUDA,
by default, fastest first: ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes a GPU index
mean the same GPU to both.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

DeviceKind = Literal["cpu", "gpu", "mig"]

_GIB = 2**30
_NVML_DEVICE_MIG_ENABLE = 1
# NVML_GPU_INSTANCE_PROFILE_1_SLICE .. _3_SLICE_GFX: the profile table a GPU may offer.
_GPU_INSTANCE_PROFILES = range(0x12)
_CUDA_ID = re.compile(r"cuda:(\d+)")


@dataclass(frozen=True, slots=True)
class Device:
    """One device a worker can serve on; ``id`` is that worker's ``--device``."""

    id: str  # "cpu", "cuda:<index>", or the MIG slice's UUID ("MIG-...")
    kind: DeviceKind
    name: str  # "NVIDIA H100 80GB HBM3"; a slice has its GPU's name
    uuid: str  # NVML's "GPU-..." or "MIG-..."; "" for the CPU
    index: int  # NVML's GPU index (PCI bus order); a slice's is its GPU's; -1 for the CPU
    profile: str  # a slice's MIG profile ("1g.10gb"); "" otherwise
    memory_bytes: int  # total device memory; the host's RAM for the CPU

    @property
    def cuda_visible_devices(self) -> str:
        """What CUDA_VISIBLE_DEVICES must hold for a process that uses only this device."""
        if self.kind == "gpu":
            return str(self.index)
        if self.kind == "mig":
            return self.uuid
        return ""  # the CPU: no GPU visible

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / _GIB


class Nvml(Protocol):
    """The NVML calls :func:`discover` makes, as ``pynvml`` names them; all read-only."""

    NVMLError: type[Exception]  # every NVML failure; pynvml raises a subclass per code
    NVMLError_NotFound: type[Exception]

    def nvmlInit(self) -> None: ...  # noqa: N802
    def nvmlShutdown(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...  # noqa: N802
    def nvmlDeviceGetName(self, handle: Any) -> str: ...  # noqa: N802
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...  # noqa: N802
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # noqa: N802 (.total: bytes)
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]: ...  # noqa: N802 ([current, pending])
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int: ...  # noqa: N802
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any: ...  # noqa: N802
    # A slice's .gpuInstanceSliceCount and .memorySizeMB (not a privileged call)
    def nvmlDeviceGetAttributes(self, handle: Any) -> Any: ...  # noqa: N802
    # The GPU's profile table: .name ("MIG 1g.10gb"), .sliceCount, .memorySizeMB
    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int) -> Any: ...  # noqa: N802


def cpu_device() -> Device:
    return Device("cpu", "cpu", _cpu_name(), "", -1, "", _host_memory_bytes())


def discover(nvml: Nvml | None = None) -> list[Device]:
    """Every GPU or MIG slice NVML reports, then the CPU; the CPU alone without them."""
    try:
        if nvml is None:
            import pynvml  # type: ignore[import-not-found,unused-ignore]

            nvml = pynvml
    except ImportError:
        log.info("devices: CPU only (nvidia-ml-py is not installed; pip install 'meshserve[gpu]')")
        return [cpu_device()]
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.info("devices: CPU only (NVML did not start: %s)", exc)
        return [cpu_device()]
    try:
        gpus = _gpus(nvml)
    except Exception as exc:  # any NVML error on the way: serve on what is sure
        log.warning("devices: CPU only (NVML failed while listing GPUs: %s)", exc)
        return [cpu_device()]
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)
    if not gpus:
        log.info("devices: CPU only (NVML found no usable GPU)")
    return [*gpus, cpu_device()]


def _gpus(nvml: Nvml) -> list[Device]:
    devices: list[Device] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
        if not _mig_enabled(nvml, handle):
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            devices.append(Device(f"cuda:{index}", "gpu", name, uuid, index, "", memory))
            continue
        slices = _mig_slices(nvml, handle, index, name)
        if not slices:
            log.warning("GPU %d (%s) has MIG enabled and no MIG slice: nothing to serve on there", index, name)
        devices.extend(slices)
    return devices


def _mig_enabled(nvml: Nvml, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # NotSupported: a GPU without MIG
        return False
    return int(current) == _NVML_DEVICE_MIG_ENABLE


def _mig_slices(nvml: Nvml, gpu: Any, index: int, name: str) -> list[Device]:
    profiles = _profile_table(nvml, gpu)
    slices: list[Device] = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
        try:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
        except nvml.NVMLError_NotFound:  # an empty slot: fewer slices than the maximum
            continue
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        attributes = nvml.nvmlDeviceGetAttributes(handle)
        profile = _profile_name(int(attributes.gpuInstanceSliceCount), int(attributes.memorySizeMB), profiles)
        slices.append(Device(uuid, "mig", name, uuid, index, profile, memory))
    return slices


def _profile_table(nvml: Nvml, gpu: Any) -> list[tuple[int, int, str]]:
    """(slice count, memory MiB, "1g.10gb") for each GPU instance profile this GPU offers."""
    table = []
    for profile in _GPU_INSTANCE_PROFILES:
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, profile)
        except nvml.NVMLError:  # NotSupported on this GPU, or an older driver
            continue
        label = _text(getattr(info, "name", b"")).removeprefix("MIG ").strip()
        if label:
            table.append((int(info.sliceCount), int(info.memorySizeMB), label))
    return table


def _profile_name(slice_count: int, memory_mib: int, profiles: list[tuple[int, int, str]]) -> str:
    """NVIDIA's name for a slice: the GPU's profile with its slice count and the nearest memory.

    Profiles that differ only in media engines ("1g.10gb" and "1g.10gb+me") have the
    same slices and memory; the first in NVML's order (the plain one) is named. Without
    a profile table the name is built as ``<slices>g.<GiB, rounded up>gb``, which
    matches NVIDIA's for most but not all profiles (their names round to marketing sizes).
    """
    same = [(abs(mib - memory_mib), label) for count, mib, label in profiles if count == slice_count]
    if same:
        return min(same, key=lambda pair: pair[0])[1]
    return f"{slice_count}g.{math.ceil(memory_mib / 1024)}gb"


def visible_devices(devices: list[Device], visible: str | None) -> list[Device]:
    """The devices left to this host's workers by a CUDA_VISIBLE_DEVICES set before
    ``meshserve up`` started (by the operator, a scheduler or a device plugin).

    ``None`` (unset) leaves every device. Otherwise the value is read as CUDA reads
    it: a comma-separated list of GPU indices (NVML's, in PCI bus order, as
    ``meshserve devices`` prints them), ``GPU-`` UUIDs of whole GPUs or ``MIG-``
    UUIDs of slices, each possibly a unique prefix; an index of a GPU in MIG mode
    stands for its slices; everything from the first entry that names nothing is
    ignored, as CUDA does, and an empty value hides every GPU. The CPU is always kept.
    """
    if visible is None:
        return devices
    gpus = [d for d in devices if d.kind != "cpu"]
    chosen: list[Device] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit():
            picked = [d for d in gpus if d.index == int(entry)]
        elif entry.startswith(("GPU-", "MIG-")):
            picked = [d for d in gpus if d.uuid.startswith(entry)]
            picked = picked if len(picked) == 1 else []  # a prefix must be unique
        else:
            picked = []
        if not picked:
            break
        chosen += [d for d in picked if d not in chosen]
    return [*chosen, *(d for d in devices if d.kind == "cpu")]


def pin_device(device_id: str, environ: MutableMapping[str, str]) -> None:
    """Make ``device_id`` the only GPU CUDA will see, unless the caller already chose.

    ``environ`` is ``os.environ`` in a worker; call before any ONNX Runtime session
    is created (see the module docstring). A CUDA_VISIBLE_DEVICES already set (by
    ``meshserve up``, or Kubernetes' device plugin) is left as it is. Raises
    ValueError for an id that is not "cpu", "cuda:<index>" or a MIG UUID.
    """
    if device_id == "cpu":
        visible = ""
    elif match := _CUDA_ID.fullmatch(device_id):
        visible = match.group(1)
        environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    elif device_id.startswith("MIG-"):
        visible = device_id
    else:
        raise ValueError(f"--device {device_id!r}: expected cpu, cuda:<index> or a MIG UUID (MIG-...)")
    environ.setdefault("CUDA_VISIBLE_DEVICES", visible)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "cpu"


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def as_dict(device: Device) -> dict[str, str | int]:
    """The device as ``meshserve devices --json`` prints it."""
    return {
        "id": device.id,
        "kind": device.kind,
        "name": device.name,
        "uuid": device.uuid,
        "index": device.index,
        "profile": device.profile,
        "memory_bytes": device.memory_bytes,
        "cuda_visible_devices": device.cuda_visible_devices,
    }


def inventory_table(devices: list[Device]) -> str:
    """A plain-text table, one device a line, for the terminal and the log."""
    header = ("ID", "KIND", "NAME", "PROFILE", "MEMORY GiB", "CUDA_VISIBLE_DEVICES")
    rows = [header] + [
        (
            d.id,
            d.kind,
            d.name,
            d.profile or "-",
            f"{d.memory_gib:.1f}",
            d.cuda_visible_devices or '"" (none)',
        )
        for d in devices
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
