"""A model's ``execution`` section: which ONNX Runtime execution providers run it, and how.

In ``<model>/config.yaml``; every key is optional::

    execution:
      providers: [tensorrt, cuda, cpu]    # order = preference; the default
      tensorrt:
        fp16: false
        int8: false
        int8_calibration_table: calib.flatbuffers  # relative to the model directory
        engine_cache_dir: /var/cache/meshserve/trt/resnet  # default: ~/.cache/meshserve/trt/<model>/<version>
        workspace_mb: 4096                # default: ONNX Runtime's
      cuda:
        memory_limit_mb: 2048             # arena limit per session; default: none
        cudnn_conv_algo_search: EXHAUSTIVE  # | HEURISTIC | DEFAULT

A model's ``engine`` section (also optional) fixes ONNX Runtime's CPU thread pool
instead of letting the worker measure the fastest setting at warm-up::

    engine:
      intra_op_threads: 1                 # 0: ONNX Runtime's choice; absent: measured
      spinning: false                     # true | false | bounded; absent: measured

The execution section only says what a model wants on a GPU; ``model_workers/engines.py`` turns
it into ONNX Runtime provider options for one device, and a CPU worker ignores it.
Parsing raises ``ValueError`` with the key at fault; the repository adds the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS = ("tensorrt", "cuda", "cpu")
CUDNN_CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
_KEYS = frozenset({"providers", "tensorrt", "cuda"})
_TENSORRT_KEYS = frozenset({"fp16", "int8", "int8_calibration_table", "engine_cache_dir", "workspace_mb"})
_CUDA_KEYS = frozenset({"memory_limit_mb", "cudnn_conv_algo_search"})


@dataclass(frozen=True, slots=True)
class TensorRTConfig:
    fp16: bool = False
    int8: bool = False
    int8_calibration_table: Path | None = None  # absolute; checked to lie inside the model dir
    engine_cache_dir: Path | None = None  # absolute; None: the per-user default
    workspace_bytes: int | None = None  # from workspace_mb; None: ONNX Runtime's default


@dataclass(frozen=True, slots=True)
class CudaConfig:
    memory_limit_bytes: int | None = None  # from memory_limit_mb; None: no limit
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # ONNX Runtime's default


@dataclass(frozen=True, slots=True)
class ExecutionConfig:
    providers: tuple[str, ...] = PROVIDERS  # preference order, names from PROVIDERS
    tensorrt: TensorRTConfig = TensorRTConfig()
    cuda: CudaConfig = CudaConfig()


DEFAULT_EXECUTION = ExecutionConfig()

SPINNING = {False: "off", True: "on", "bounded": "bounded"}
"""``engine.spinning`` values (YAML booleans) to ``model_workers.engines`` spin names."""
_ENGINE_KEYS = frozenset({"intra_op_threads", "spinning"})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What config.yaml fixes of ONNX Runtime's CPU threads; None: the worker measures it."""

    intra_op_threads: int | None = None
    spin: str | None = None  # "off", "on" or "bounded"


DEFAULT_ENGINE = EngineConfig()


def parse_engine(value: object) -> EngineConfig:
    """The ``engine`` section of config.yaml; None means nothing fixed.

    Raises ValueError naming the key, e.g. "'engine.spinning' must be ...".
    """
    if value is None:
        return DEFAULT_ENGINE
    section = _mapping(value, "engine", _ENGINE_KEYS)
    threads = section.get("intra_op_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(
            f"'engine.intra_op_threads' must be an integer >= 0 (0: ONNX Runtime's choice), got {threads!r}"
        )
    spinning = section.get("spinning")
    if spinning is not None and (not isinstance(spinning, bool | str) or spinning not in SPINNING):
        raise ValueError(f"'engine.spinning' must be true, false or bounded, got {spinning!r}")
    return EngineConfig(intra_op_threads=threads, spin=None if spinning is None else SPINNING[spinning])


def parse_execution(value: object, model_dir: Path) -> ExecutionConfig:
    """The ``execution`` section of ``<model_dir>/config.yaml``; None means the defaults.

    Raises ValueError naming the key, e.g. "'execution.cuda.memory_limit_mb' must be ...".
    """
    if value is None:
        return DEFAULT_EXECUTION
    section = _mapping(value, "execution", _KEYS)
    providers = section.get("providers", list(PROVIDERS))
    if (
        not isinstance(providers, list)
        or not providers
        or not all(isinstance(p, str) and p in PROVIDERS for p in providers)
        or len(set(providers)) != len(providers)
    ):
        raise ValueError(
            f"'execution.providers' must be a non-empty list of distinct names from {list(PROVIDERS)}, "
            f"got {providers!r}"
        )
    return ExecutionConfig(
        providers=tuple(providers),
        tensorrt=_tensorrt(section.get("tensorrt"), model_dir),
        cuda=_cuda(section.get("cuda")),
    )


def _tensorrt(value: object, model_dir: Path) -> TensorRTConfig:
    if value is None:
        return TensorRTConfig()
    section = _mapping(value, "execution.tensorrt", _TENSORRT_KEYS)
    int8 = _bool(section, "int8")
    table = section.get("int8_calibration_table")
    table_path = None
    if table is not None:
        if not int8:
            raise ValueError("'execution.tensorrt.int8_calibration_table' is set but 'execution.tensorrt.int8' is not")
        table_path = _file_inside(table, model_dir, "execution.tensorrt.int8_calibration_table")
    cache = section.get("engine_cache_dir")
    cache_dir = None
    if cache is not None:
        cache_dir = _cache_dir(cache, model_dir)
    workspace_mb = _positive_int(section, "workspace_mb", "execution.tensorrt.")
    return TensorRTConfig(
        fp16=_bool(section, "fp16"),
        int8=int8,
        int8_calibration_table=table_path,
        engine_cache_dir=cache_dir,
        workspace_bytes=None if workspace_mb is None else workspace_mb * 2**20,
    )


def _cuda(value: object) -> CudaConfig:
    if value is None:
        return CudaConfig()
    section = _mapping(value, "execution.cuda", _CUDA_KEYS)
    search = section.get("cudnn_conv_algo_search", "EXHAUSTIVE")
    if search not in CUDNN_CONV_ALGO_SEARCHES:
        raise ValueError(
            f"'execution.cuda.cudnn_conv_algo_search' must be one of {', '.join(CUDNN_CONV_ALGO_SEARCHES)}, "
            f"got {search!r}"
        )
    limit_mb = _positive_int(section, "memory_limit_mb", "execution.cuda.")
    return CudaConfig(
        memory_limit_bytes=None if limit_mb is None else limit_mb * 2**20,
        cudnn_conv_algo_search=search,
    )


def _mapping(value: object, key: str, allowed: frozenset[str]) -> dict[Any, Any]:
    """``value`` as a mapping with only ``allowed`` keys."""
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be a mapping")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key '{key}.{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
    return value


def _bool(section: dict[Any, Any], key: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"'execution.tensorrt.{key}' must be true or false, got {value!r}")
    return value


def _positive_int(section: dict[Any, Any], key: str, prefix: str) -> int | None:
    value = section.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"'{prefix}{key}' must be a positive integer (MiB), got {value!r}")
    return value


def _file_inside(value: object, model_dir: Path, key: str) -> Path:
    """A relative path to an existing file that, symlinks followed, stays in ``model_dir``."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or "\x00" in value:
        raise ValueError(f"'{key}' must be a path relative to the model directory, got {value!r}")
    path = model_dir.absolute() / value
    if not _is_inside(path, model_dir):
        raise ValueError(f"'{key}' {value!r} points outside the model directory")
    if not path.is_file():
        raise ValueError(f"'{key}' {value!r}: no such file in the model directory")
    return path


def _cache_dir(value: object, model_dir: Path) -> Path:
    """An absolute directory outside the model repository.

    Engines are deserialized from this directory, and DESIGN.md promises TensorRT
    engines are only ever built locally from ONNX: a directory under the repository
    would let whoever ships a model ship a prebuilt engine too.
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ValueError(f"'execution.tensorrt.engine_cache_dir' must be a path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(f"'execution.tensorrt.engine_cache_dir' must be an absolute path, got {value!r}")
    if _is_inside(path, model_dir.absolute().parent):
        raise ValueError(
            f"'execution.tensorrt.engine_cache_dir' {value!r} is inside the model repository; "
            "engines must be built locally, not shipped with models"
        )
    return path


def _is_inside(path: Path, directory: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies within ``directory``."""
    real_dir = os.path.realpath(directory)
    return os.path.commonpath([real_dir, os.path.realpath(path)]) == real_dir
