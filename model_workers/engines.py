"""Which ONNX Runtime execution providers run a model on one device, with which options,
and how the CPU thread pool runs it (``EngineSetting``; chosen in ``tuning.py``).

The provider choice is pure: the caller passes what ONNX Runtime offers (``ort.get_available_providers()``),
so the choice is testable on a CPU-only host. A GPU worker process sees only its own
device (``CUDA_VISIBLE_DEVICES``), so inside it the CUDA device id is always 0.
Option names are ONNX Runtime's ("TensorRT Execution Provider" and "CUDA Execution
Provider" pages of its documentation); every value is a string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from meshserve.models.execution import ExecutionConfig
from meshserve.models.repository import ModelInfo

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})
ORT_NAMES = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}

ProviderChain = list[tuple[str, dict[str, str]]]

_warned_unavailable: set[str] = set()

SPIN_OFF = "off"
SPIN_BOUNDED = "bounded"
SPIN_ON = "on"
BOUNDED_SPIN_US = 100
"""How long an idle intra-op thread spins before it sleeps, under bounded spinning:
about the gap between two small ops of one run, far less than between requests."""
SPIN_DURATION_SINCE = (1, 32)
"""The first ONNX Runtime release known here to honour ``session.intra_op.spin_duration_us``
(unknown config keys are ignored silently, so support cannot be probed)."""


@dataclass(frozen=True, slots=True)
class EngineSetting:
    """How ONNX Runtime's CPU thread pool runs one session.

    ``intra_op_threads``: 0 is ONNX Runtime's choice (one per physical core).
    ``spin``: what idle pool threads do between ops: ``SPIN_OFF`` sleep (they leave
    the CPU to the rest of the host, and each op wakes them), ``SPIN_BOUNDED`` spin
    ``BOUNDED_SPIN_US`` then sleep, ``SPIN_ON`` ONNX Runtime's default spinning.
    """

    intra_op_threads: int = 0
    spin: str = SPIN_OFF

    @property
    def label(self) -> str:
        """``threads=N,spin=S``: the metric label and the log's name for it."""
        threads = self.intra_op_threads or "auto"
        return f"threads={threads},spin={self.spin}"

    def apply(self, options: ort.SessionOptions) -> None:
        """Set these on ``options``; with one thread there is no pool, and nothing spins."""
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        spinning = self.spin != SPIN_OFF and self.intra_op_threads != 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if spinning and self.spin == SPIN_BOUNDED:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(BOUNDED_SPIN_US))


@dataclass(frozen=True, slots=True)
class Trial:
    """One setting's timings at warm-up: batch 1 after an idle gap, and the max batch
    (None when the model is not batchable or its max batch is 1)."""

    setting: EngineSetting
    batch1_s: float
    max_batch_s: float | None


def bounded_spin_supported(version: str | None = None) -> bool:
    """Whether this ONNX Runtime (``version``, default the installed one) bounds spinning."""
    parts = (version or ort.__version__).split(".")[:2]
    try:
        return (int(parts[0]), int(parts[1])) >= SPIN_DURATION_SINCE
    except (ValueError, IndexError):
        return False


def cpu_budget() -> int:
    """The CPUs this worker may use: its affinity set (what ``taskset`` or a cgroup
    cpuset leaves it), so its threads never outnumber them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def provider_chain(
    config: ExecutionConfig,
    device: str,
    available: Sequence[str],
    info: ModelInfo,
    *,
    warned: set[str] | None = None,
) -> ProviderChain:
    """The providers, best first, for ``info`` on ``device``; always ends with the CPU.

    On "cpu" only the CPU provider. On a GPU ("cuda:N" or a MIG UUID) the configured
    order, less what ``available`` lacks: each wanted-but-missing provider is logged
    once per process (once per ``warned`` set, which tests pass in).
    """
    if device == "cpu":
        return [(CPU, {})]
    warned = _warned_unavailable if warned is None else warned
    chain: ProviderChain = []
    for name in config.providers:
        provider = ORT_NAMES[name]
        if provider == CPU:
            continue
        if provider not in available:
            if provider not in warned:
                warned.add(provider)
                log.warning(
                    "%s is configured but this ONNX Runtime does not offer it (available: %s); "
                    "install meshserve[gpu] on GPU hosts",
                    provider,
                    ", ".join(available),
                )
            continue
        options = tensorrt_options(config, info) if provider == TENSORRT else cuda_options(config)
        chain.append((provider, options))
    chain.append((CPU, {}))
    return chain


def tensorrt_options(config: ExecutionConfig, info: ModelInfo) -> dict[str, str]:
    """TensorRT provider options: precision, engine and timing caches, batch profile."""
    trt = config.tensorrt
    cache_dir = trt.engine_cache_dir or default_engine_cache_dir(info)
    options = {
        "device_id": "0",
        "trt_fp16_enable": str(trt.fp16),
        "trt_int8_enable": str(trt.int8),
        # Engines are built once per model, GPU and profile and reused across restarts;
        # ONNX Runtime names the files by a hash of the graph and the GPU's compute capability.
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
    }
    if trt.int8_calibration_table is not None:
        # ONNX Runtime joins this name to the cache path; an absolute path stays as is.
        options["trt_int8_calibration_table_name"] = str(trt.int8_calibration_table)
    if trt.workspace_bytes is not None:
        options["trt_max_workspace_size"] = str(trt.workspace_bytes)
    options.update(batch_profile(info))
    return options


def cuda_options(config: ExecutionConfig) -> dict[str, str]:
    """CUDA provider options: device 0, the arena limit, cuDNN's conv algorithm search."""
    cuda = config.cuda
    options = {
        "device_id": "0",
        "cudnn_conv_algo_search": cuda.cudnn_conv_algo_search,
        # Grow the arena by what is asked, not to the next power of two, so models that
        # share one GPU or MIG slice are held to about what they use.
        "arena_extend_strategy": "kSameAsRequested",
    }
    if cuda.memory_limit_bytes is not None:
        options["gpu_mem_limit"] = str(cuda.memory_limit_bytes)
    return options


def batch_profile(info: ModelInfo) -> dict[str, str]:
    """Explicit TensorRT optimization profile over the batch dim, or {} when none applies.

    Batch 1 (min), the largest preferred batch size or else the max (opt), and
    ``max_batch_size`` (max); other dims as the graph declares them. TensorRT needs
    every dim of a profile, so a symbolic non-batch dim means no explicit profile:
    ONNX Runtime then builds one from the shapes it sees (a rebuild per new shape).
    """
    if info.max_batch_size == 0:
        return {}  # fixed shapes need no profile; other symbolic dims are handled below
    opt = max(info.preferred_batch_sizes, default=info.max_batch_size)
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for tensor in info.inputs:
        rest = tensor.shape[1:]
        if any(dim < 0 for dim in rest):
            log.info(
                "%s version %d: input '%s' has a symbolic non-batch dim %s; no explicit TensorRT profile",
                info.name,
                info.version,
                tensor.name,
                list(tensor.shape),
            )
            return {}
        for key, batch in (("min", 1), ("opt", opt), ("max", info.max_batch_size)):
            shapes[key].append(f"{tensor.name}:" + "x".join(str(dim) for dim in (batch, *rest)))
    return {f"trt_profile_{key}_shapes": ",".join(values) for key, values in shapes.items()}


def default_engine_cache_dir(info: ModelInfo) -> Path:
    """``~/.cache/meshserve/trt/<model>/<version>``: per user, outside the repository."""
    return Path.home() / ".cache" / "meshserve" / "trt" / info.name / str(info.version)
