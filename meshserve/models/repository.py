"""The model repository: which models exist, and what each one needs to be served.

Layout: ``<root>/<model>/<version>/model.onnx``, where ``<version>`` is a positive
integer directory name, plus an optional ``<root>/<model>/config.yaml``. Without a
config, everything is inferred from the ONNX graph: tensor names, KServe datatypes,
shapes, and whether dim 0 is a batch dimension. The config may change batching,
restrict the served versions and name the platform::

    max_batch_size: 16            # 0 disables batching
    dynamic_batching:
      max_queue_delay_ms: 0.5
      preferred_batch_sizes: [4, 8, 16]
      max_queue_size: 1000        # 0 = unbounded
    versions: [1, 3]              # default: every version directory
    version_policy: {latest: 2}   # Triton's: all | latest: N | specific: [..] (meshserve/models/traffic.py)
    traffic:                      # how requests naming no version are shared (meshserve/models/traffic.py)
      weights: {1: 95, 2: 5}
    platform: onnxruntime_onnx
    execution:                    # ONNX Runtime providers on a GPU (meshserve/execution.py)
      providers: [tensorrt, cuda, cpu]
    engine:                       # ONNX Runtime's CPU threads; default: measured at warm-up
      intra_op_threads: 1         # (model_workers/tuning.py)
      spinning: false             # true | false | bounded
    placement:                    # where the router may put it (router/placement.py)
      device: any                 # gpu | cpu | any (the default: a GPU or MIG slice first)
      min_mig_profile: 2g.20gb    # no smaller MIG slice; whole GPUs are always allowed
      memory_mb: 2048             # device memory in MiB; default: estimated
    pinned: true                  # never evicted for want of memory (docs/lifecycle.md)
    execution_timeout_ms: 20000   # a batch running longer is stopped; default: from warm-up
    instances: 1                  # batches of this model computing at once on a worker
    warmup:                       # warm-up inputs, as Triton's model_warmup (meshserve/models/warmup.py)
      - inputs: {images: {dims: [3, 640, 640], data: random}}
    input: [{name: images, format: NCHW}]       # for clients (meshserve/models/tensor_config.py)
    output: [{name: probs, label_filename: labels.txt}]
    backend: python               # <version>/model.py, with declared input/output (meshserve/models/python_backend.py)
    queue_partitions: 3           # the queue split over 3 hash tags: Cluster shards (docs/deploy.md#queue-partitions)

A batchable graph (every input's and output's dim 0 symbolic) defaults to
max_batch_size 32 and a 2 ms queue delay; any other graph gets max_batch_size 0,
a zero delay, and refuses ``max_batch_size > 0`` or preferred sizes. Unknown keys
are errors, so a typo never silently falls back to a default.

Model files are untrusted. A Python model's ``model.py`` is code: only its presence is
checked here, and only a worker started with ``--allow-python-models`` imports it
(in processes of its own: model_workers/python_runner.py). Otherwise only
``model.onnx`` is ever read, it is parsed without
its external data, and every external-data ``location`` must resolve inside the
version directory before the model is reported servable. Callers must then load
the model from :attr:`ModelInfo.path` itself, so that the runtime resolves external
data against the same directory that was checked.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
)

from meshserve.models.execution import (
    DEFAULT_ENGINE,
    DEFAULT_EXECUTION,
    EngineConfig,
    ExecutionConfig,
    parse_engine,
    parse_execution,
)
from meshserve.models.generation import GenerateConfig, check_generate, parse_generate
from meshserve.models.python_backend import (
    ONNXRUNTIME,
    PYTHON,
    PYTHON_FILENAME,
    PYTHON_PLATFORM,
    DeclaredTensor,
    parse_backend,
)
from meshserve.models.sequence import SequenceConfig, bind_sequence, parse_sequence
from meshserve.models.tensor_config import (
    NO_TENSOR_CONFIG,
    TensorConfig,
    check_tensor_config,
    parse_tensor_config,
)
from meshserve.models.traffic import ALL_VERSIONS, TrafficSplit, VersionPolicy, parse_traffic, parse_version_policy
from meshserve.models.warmup import WarmupSample, parse_warmup
from meshserve.platform.mig import parse_mig_profile
from meshserve.wire.dtypes import KSERVE_BY_ONNX

MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.yaml"
DEFAULT_PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_US = 2000
ANY_DIM = -1
_MAX_PROTOBUF_BYTES = 2**31 - 1

_VERSION_DIR = re.compile(r"[1-9][0-9]*")
_TOP_LEVEL_KEYS = frozenset(
    {
        "max_batch_size",
        "dynamic_batching",
        "versions",
        "platform",
        "placement",
        "execution",
        "execution_timeout_ms",
        "instances",
        "warmup",
        "engine",
        "version_policy",
        "traffic",
        "pinned",
        "response_cache",
        "cache_shared",
        "backend",
        "input",
        "output",
        "sequence",
        "decoupled",
        "generate",
        "queue_partitions",
    }
)
_BATCHING_KEYS = frozenset({"max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size"})


class RepositoryError(Exception):
    """A model directory, config file or model file cannot be served.

    The message starts with the path at fault (and the line, for YAML errors).
    """


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One graph input or output as clients see it.

    ``datatype`` is the KServe v2 name (e.g. "FP32"); ``shape`` is the full graph
    shape with -1 for every symbolic or unknown dim, dim 0 included.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """A model's ``placement`` section: which devices may hold it, and how big it is."""

    device: str = "any"  # "gpu" | "cpu" | "any"; any prefers a GPU or MIG slice
    min_mig_profile: str | None = None  # e.g. "2g.20gb": smaller MIG slices refused
    memory_bytes: int | None = None  # from memory_mb (MiB); None: estimated


DEFAULT_PLACEMENT = PlacementConfig()
PLACEMENT_DEVICES = ("gpu", "cpu", "any")
_PLACEMENT_KEYS = frozenset({"device", "min_mig_profile", "memory_mb"})


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Everything the mesh needs to serve one version of one model."""

    name: str
    version: int
    path: Path  # absolute path of model.onnx; load from here, not from its realpath
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch_size: int  # 0 = not batchable (dim 0 is not a batch dim)
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_size: int  # 0 = unbounded
    platform: str = DEFAULT_PLATFORM
    placement: PlacementConfig = DEFAULT_PLACEMENT
    weights_bytes: int = 0  # files in the version directory: model.onnx plus external data
    execution: ExecutionConfig = DEFAULT_EXECUTION
    warmup: tuple[WarmupSample, ...] = ()  # from config.yaml; (): the worker picks the inputs
    execution_timeout_ms: int = 0  # 0: derived from the warm-up time (model_workers/served.py)
    instances: int = 1  # batches computing at once per worker
    engine: EngineConfig = DEFAULT_ENGINE  # CPU thread settings config.yaml fixes
    traffic: TrafficSplit | None = None  # the model's configured split (every version carries it)
    pinned: bool = False  # never evicted to make room for another model
    response_cache: bool = False  # the gateway answers a repeated request from its cache
    cache_shared: bool = False  # one cache for every tenant (default: one per tenant)
    tensors: TensorConfig = NO_TENSOR_CONFIG  # input formats and output labels, for clients
    policy: VersionPolicy = ALL_VERSIONS  # the model's version policy, for clients
    backend: str = ONNXRUNTIME  # or "python": ``path`` is model.py (meshserve/models/python_backend.py)
    sequence: SequenceConfig | None = None  # a stateful model (meshserve/models/sequence.py); None: stateless
    decoupled: bool = False  # may answer a request many times: ModelStreamInfer only
    generation: GenerateConfig | None = None  # the ``generate`` mode's step graph (meshserve/models/generation.py)
    queue_partitions: int = 1  # the model's queue split over this many hash tags (docs/deploy.md#queue-partitions)


@dataclass(frozen=True, slots=True)
class _Config:
    """A parsed config.yaml; None means "not set, infer or default"."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0
    versions: frozenset[int] | None = None
    platform: str = DEFAULT_PLATFORM
    placement: PlacementConfig = DEFAULT_PLACEMENT
    execution: ExecutionConfig = DEFAULT_EXECUTION
    warmup: tuple[WarmupSample, ...] = ()
    execution_timeout_ms: int = 0
    instances: int = 1
    engine: EngineConfig = DEFAULT_ENGINE
    policy: VersionPolicy = ALL_VERSIONS
    traffic: TrafficSplit | None = None
    pinned: bool = False
    response_cache: bool = False
    cache_shared: bool = False
    tensors: TensorConfig = NO_TENSOR_CONFIG
    backend: str = ONNXRUNTIME
    inputs: tuple[DeclaredTensor, ...] = ()  # declared: Python models only
    outputs: tuple[DeclaredTensor, ...] = ()
    sequence: SequenceConfig | None = None
    decoupled: bool = False
    generation: GenerateConfig | None = None
    queue_partitions: int = 1


def load_model(model_dir: Path, version: int) -> ModelInfo:
    """Read ``<model_dir>/<version>/model.onnx`` and the model's config.yaml.

    Raises RepositoryError when the config is invalid, the version is not one the
    config serves, or the model file is missing, unreadable or unsafe.
    """
    config = _read_config(model_dir)
    if config.versions is not None and version not in config.versions:
        raise RepositoryError(f"{model_dir / CONFIG_FILENAME}: version {version} is not listed in 'versions'")
    if version not in config.policy.select(_version_dirs(model_dir)):
        raise RepositoryError(f"{model_dir / CONFIG_FILENAME}: version {version} is outside 'version_policy'")
    return _load_version(model_dir, version, config)


def scan_repository(root: Path) -> tuple[list[ModelInfo], list[str]]:
    """Find every servable (model, version) under ``root``, sorted by (name, version).

    A bad model or version is skipped and described in the second list; only an
    unreadable ``root`` raises RepositoryError. Hidden directories are ignored.
    """
    scan = scan_repository_failures(root)
    return scan.models, scan.problems


@dataclass(frozen=True, slots=True)
class RepositoryScan:
    """What :func:`scan_repository_failures` found: servable versions, every problem,
    and the versions that exist but cannot be served, each with its problem."""

    models: list[ModelInfo]
    problems: list[str]
    unservable: dict[tuple[str, int], str]  # (model, version) -> the problem


def scan_repository_failures(root: Path) -> RepositoryScan:
    """:func:`scan_repository`, plus the version directories that failed: the router
    lists them as failed to load (ModelReady false, with the reason) rather than
    letting a typo in config.yaml make a model unknown."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: model repository is not a directory")
    scan = RepositoryScan([], [], {})
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        one = scan_model_dir(model_dir)
        scan.models.extend(one.models)
        scan.problems.extend(one.problems)
        scan.unservable.update(one.unservable)
    return scan


def model_names(root: Path) -> list[str]:
    """The model directories under ``root`` (hidden ones ignored), sorted; nothing read."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: model repository is not a directory")
    return sorted(child.name for child in root.iterdir() if not child.name.startswith(".") and child.is_dir())


def scan_model_dir(model_dir: Path) -> RepositoryScan:
    """One model directory, as :func:`scan_repository_failures` reads each: its servable
    versions, its problems, the versions that exist but cannot be served."""
    models: list[ModelInfo] = []
    problems: list[str] = []
    unservable: dict[tuple[str, int], str] = {}
    if is_ensemble_dir(model_dir):  # no model of its own: meshserve/models/ensemble.py reads it
        return RepositoryScan(models, problems, unservable)
    versions = _version_dirs(model_dir)
    try:
        config = _read_config(model_dir)
    except RepositoryError as exc:
        unservable.update(((model_dir.name, version), str(exc)) for version in versions)
        return RepositoryScan(models, [str(exc)], unservable)
    if config.versions is not None:
        missing = sorted(config.versions - set(versions))
        if missing:
            problems.append(
                f"{model_dir / CONFIG_FILENAME}: 'versions' lists {missing} but there is no such version directory"
            )
        versions = [v for v in versions if v in config.versions]
    elif not versions:
        problems.append(f"{model_dir}: no version directories (positive integers)")
    for version in config.policy.select(versions):
        try:
            models.append(_load_version(model_dir, version, config))
        except RepositoryError as exc:
            problems.append(str(exc))
            unservable[model_dir.name, version] = str(exc)
    return RepositoryScan(models, problems, unservable)


def is_ensemble_dir(model_dir: Path) -> bool:
    """Whether ``<model_dir>/config.yaml`` has an ``ensemble`` section (an ensemble's
    directory, meshserve/models/ensemble.py); False when it cannot be read as YAML."""
    try:
        raw = yaml.safe_load((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "ensemble" in raw


def unservable_info(root: Path, name: str, version: int) -> ModelInfo:
    """A stand-in for a version that exists but cannot be served: known by name and
    version (so it is reported not ready, never unknown), no tensors, never placed."""
    return ModelInfo(
        name=name,
        version=version,
        path=root.absolute() / name / str(version) / MODEL_FILENAME,
        inputs=(),
        outputs=(),
        max_batch_size=0,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
    )


def _version_dirs(model_dir: Path) -> list[int]:
    """Positive-integer subdirectory names of ``model_dir``, ascending."""
    return sorted(
        int(child.name) for child in model_dir.iterdir() if _VERSION_DIR.fullmatch(child.name) and child.is_dir()
    )


# --- config.yaml ---------------------------------------------------------------


def _read_config(model_dir: Path) -> _Config:
    """Parse and validate ``<model_dir>/config.yaml``; no file means an empty config."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path}: cannot read: {exc}") from exc
    try:
        raw: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RepositoryError(f"{path}: invalid YAML{_yaml_position(exc)}") from exc
    if raw is None:
        return _Config()
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path}: expected a mapping at the top level")
    _reject_unknown_keys(raw, _TOP_LEVEL_KEYS, path, "")
    batching = raw.get("dynamic_batching")
    if batching is None:
        batching = {}
    if not isinstance(batching, dict):
        raise RepositoryError(f"{path}: 'dynamic_batching' must be a mapping")
    _reject_unknown_keys(batching, _BATCHING_KEYS, path, "dynamic_batching.")
    platform = raw.get("platform", PYTHON_PLATFORM if raw.get("backend") == PYTHON else DEFAULT_PLATFORM)
    if not isinstance(platform, str) or not platform:
        raise RepositoryError(f"{path}: 'platform' must be a non-empty string")
    versions = raw.get("versions")
    if versions is not None:
        versions = frozenset(_positive_ints(versions, path, "versions"))
    try:
        policy = parse_version_policy(raw.get("version_policy"))
        traffic = parse_traffic(raw.get("traffic"), model_dir.name)
        tensors = parse_tensor_config(raw.get("input"), raw.get("output"), model_dir)
        backend, declared = parse_backend(raw)
        sequence = parse_sequence(raw.get("sequence"))
        generation = parse_generate(raw.get("generate"))
    except ValueError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc
    if versions is not None and policy != ALL_VERSIONS:
        raise RepositoryError(f"{path}: 'versions' and 'version_policy' both restrict the versions: keep one")
    return _Config(
        max_batch_size=_optional_int(raw, "max_batch_size", path, ""),
        max_queue_delay_us=_queue_delay_us(batching, path),
        preferred_batch_sizes=_positive_ints(
            batching.get("preferred_batch_sizes"),
            path,
            "dynamic_batching.preferred_batch_sizes",
        ),
        max_queue_size=_optional_int(batching, "max_queue_size", path, "dynamic_batching.") or 0,
        versions=versions,
        platform=platform,
        placement=_placement(raw.get("placement"), path),
        execution=_execution(raw.get("execution"), model_dir, path),
        warmup=_warmup(raw.get("warmup"), model_dir, path),
        execution_timeout_ms=_optional_int(raw, "execution_timeout_ms", path, "") or 0,
        instances=_instances(raw, path),
        engine=_engine(raw.get("engine"), path),
        policy=policy,
        traffic=traffic,
        pinned=_pinned(raw, path),
        response_cache=_flag(raw, "response_cache", path),
        cache_shared=_flag(raw, "cache_shared", path),
        tensors=tensors,
        backend=backend,
        inputs=declared[0],
        outputs=declared[1],
        sequence=sequence,
        decoupled=_decoupled(raw, generation, path),
        generation=generation,
        queue_partitions=_queue_partitions(raw, sequence, generation, path),
    )


MAX_QUEUE_PARTITIONS = 64
"""More partitions than a cluster has shards buy nothing; each costs every idle
worker a claim per partition at each wake-up safety timeout."""


def _queue_partitions(raw: dict[Any, Any], sequence: object, generation: object, path: Path) -> int:
    """``queue_partitions``: 1 to ``MAX_QUEUE_PARTITIONS``. A stateful or generating
    model keeps one: a sequence's steps and state, and a generation loop's claims,
    live on partition 0 (and sequences need one Redis, where partitions buy nothing)."""
    value = raw.get("queue_partitions", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUEUE_PARTITIONS:
        raise RepositoryError(f"{path}: 'queue_partitions' must be an integer from 1 to {MAX_QUEUE_PARTITIONS}")
    if value > 1 and sequence is not None:
        raise RepositoryError(f"{path}: 'queue_partitions' must be 1 for a model with 'sequence' (its state is on one)")
    if value > 1 and generation is not None:
        raise RepositoryError(f"{path}: 'queue_partitions' must be 1 for a model with 'generate' (one loop claims)")
    return value


def _decoupled(raw: dict[Any, Any], generation: GenerateConfig | None, path: Path) -> bool:
    """``decoupled``: a ``generate`` section needs it, and a decoupled model's many
    answers are never cached (the cache stores one)."""
    decoupled = _flag(raw, "decoupled", path)
    if generation is not None and not decoupled:
        raise RepositoryError(f"{path}: 'generate' answers many times per request: it needs 'decoupled: true'")
    if decoupled and _flag(raw, "response_cache", path):
        raise RepositoryError(f"{path}: 'response_cache' stores one answer per request: not for a decoupled model")
    return decoupled


def _pinned(raw: dict[Any, Any], path: Path) -> bool:
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        raise RepositoryError(f"{path}: 'pinned' must be true or false, got {pinned!r}")
    return pinned


def _flag(raw: dict[Any, Any], key: str, path: Path) -> bool:
    """``raw[key]`` as a YAML boolean; False when absent."""
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise RepositoryError(f"{path}: '{key}' must be true or false, got {value!r}")
    return value


def _instances(raw: dict[Any, Any], path: Path) -> int:
    """``instances``: at least 1 (a model with none could never run)."""
    instances = _optional_int(raw, "instances", path, "")
    if instances is None:
        return 1
    if instances < 1:
        raise RepositoryError(f"{path}: 'instances' must be an integer >= 1, got {instances}")
    return instances


def _queue_delay_us(batching: dict[Any, Any], path: Path) -> int | None:
    """``dynamic_batching.max_queue_delay_ms`` converted to whole microseconds."""
    delay_ms = batching.get("max_queue_delay_ms")
    if delay_ms is None:
        return None
    if (
        isinstance(delay_ms, bool)
        or not isinstance(delay_ms, int | float)
        or not math.isfinite(delay_ms)
        or delay_ms < 0
    ):
        raise RepositoryError(f"{path}: 'dynamic_batching.max_queue_delay_ms' must be a number >= 0, got {delay_ms!r}")
    return round(delay_ms * 1000)


def _placement(value: object, path: Path) -> PlacementConfig:
    """The ``placement`` section, validated; absent means the defaults."""
    if value is None:
        return DEFAULT_PLACEMENT
    if not isinstance(value, dict):
        raise RepositoryError(f"{path}: 'placement' must be a mapping")
    _reject_unknown_keys(value, _PLACEMENT_KEYS, path, "placement.")
    device = value.get("device", "any")
    if device not in PLACEMENT_DEVICES:
        raise RepositoryError(f"{path}: 'placement.device' must be one of gpu, cpu, any, got {device!r}")
    profile = value.get("min_mig_profile")
    if profile is not None:
        if not isinstance(profile, str) or parse_mig_profile(profile) is None:
            raise RepositoryError(
                f"{path}: 'placement.min_mig_profile' must be a MIG profile like \"2g.20gb\", got {profile!r}"
            )
        if device == "cpu":
            raise RepositoryError(f"{path}: 'placement.min_mig_profile' is set but 'placement.device' is cpu")
    memory_mb = value.get("memory_mb")
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0):
        raise RepositoryError(f"{path}: 'placement.memory_mb' must be a positive integer (MiB), got {memory_mb!r}")
    return PlacementConfig(
        device=device,
        min_mig_profile=profile,
        memory_bytes=None if memory_mb is None else memory_mb * 2**20,
    )


def _execution(value: object, model_dir: Path, path: Path) -> ExecutionConfig:
    """The ``execution`` section, validated; absent means the defaults."""
    try:
        return parse_execution(value, model_dir)
    except ValueError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc


def _warmup(value: object, model_dir: Path, path: Path) -> tuple[WarmupSample, ...]:
    """The ``warmup`` section, validated on its own; the graph's checks come later."""
    try:
        return parse_warmup(value, model_dir)
    except ValueError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc


def _engine(value: object, path: Path) -> EngineConfig:
    """The ``engine`` section, validated; absent means nothing fixed."""
    try:
        return parse_engine(value)
    except ValueError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc


def _yaml_position(exc: yaml.YAMLError) -> str:
    """Where and what a PyYAML error is: ' at line L, column C: problem' (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f": {problem}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _reject_unknown_keys(mapping: dict[Any, Any], allowed: frozenset[str], path: Path, prefix: str) -> None:
    """Raise naming the first key (sorted) of ``mapping`` that is not in ``allowed``."""
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise RepositoryError(f"{path}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _optional_int(mapping: dict[Any, Any], key: str, path: Path, prefix: str) -> int | None:
    """``mapping[key]`` as a non-negative int, None when absent."""
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RepositoryError(f"{path}: '{prefix}{key}' must be an integer >= 0, got {value!r}")
    return value


def _positive_ints(value: object, path: Path, key: str) -> tuple[int, ...]:
    """A YAML list of positive ints as a sorted, de-duplicated tuple; () when absent."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and item > 0 for item in value
    ):
        raise RepositoryError(f"{path}: '{key}' must be a list of positive integers, got {value!r}")
    return tuple(sorted(set(value)))


# --- model.onnx ------------------------------------------------------------------


def _load_version(model_dir: Path, version: int, config: _Config) -> ModelInfo:
    """Build the ModelInfo of one version once the model's config is known."""
    if config.backend == PYTHON:
        return _apply_config(model_dir.name, version, _python_file(model_dir, version), _declared(config), config)
    path, model = _open_model(model_dir, version)
    signature = _signature(model, path)
    return _apply_config(model_dir.name, version, path, signature, config)


def _open_model(model_dir: Path, version: int) -> tuple[Path, ModelProto]:
    """Parse ``<model_dir>/<version>/model.onnx`` without external data, once safe."""
    version_dir = model_dir.absolute() / str(version)
    path = version_dir / MODEL_FILENAME
    if not path.is_file():
        raise RepositoryError(f"{path}: no {MODEL_FILENAME} in version directory")
    if not _is_inside(path, model_dir):
        raise RepositoryError(f"{path}: symlink points outside the model directory {model_dir}")
    size_bytes = path.stat().st_size
    if size_bytes > _MAX_PROTOBUF_BYTES:
        raise RepositoryError(
            f"{path}: {size_bytes} bytes is over the 2 GiB protobuf limit; store the weights as external data"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    # The file is untrusted: whatever the parser raises is the file's fault.
    except Exception as exc:
        raise RepositoryError(f"{path}: not a readable ONNX model: {exc}") from exc
    _check_external_data(model, version_dir, path)
    return path, model


def _python_file(model_dir: Path, version: int) -> Path:
    """``<model_dir>/<version>/model.py``, once it is there and inside the model directory."""
    path = model_dir.absolute() / str(version) / PYTHON_FILENAME
    if not path.is_file():
        raise RepositoryError(f"{path}: no {PYTHON_FILENAME} in version directory (config.yaml says 'backend: python')")
    if not _is_inside(path, model_dir):
        raise RepositoryError(f"{path}: symlink points outside the model directory {model_dir}")
    return path


def _declared(config: _Config) -> _Signature:
    """A Python model's tensors as config.yaml declares them, with the batch dim when it batches."""
    batch = (ANY_DIM,) if config.max_batch_size else ()

    def info(tensor: DeclaredTensor) -> TensorInfo:
        return TensorInfo(tensor.name, tensor.datatype, (*batch, *tensor.dims))

    return _Signature(tuple(map(info, config.inputs)), tuple(map(info, config.outputs)), bool(config.max_batch_size))


@dataclass(frozen=True, slots=True)
class _Signature:
    """What the graph alone says: its tensors and whether dim 0 is a batch dim."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    batchable: bool


def _signature(model: ModelProto, path: Path) -> _Signature:
    """Inputs (initializers excluded), outputs and batchability of ``model``."""
    initializers = {init.name for init in model.graph.initializer}
    try:
        inputs = tuple(_tensor_info(v, "input") for v in model.graph.input if v.name not in initializers)
        outputs = tuple(_tensor_info(v, "output") for v in model.graph.output)
    except RepositoryError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc
    batchable = bool(inputs) and all(len(t.shape) > 0 and t.shape[0] == ANY_DIM for t in inputs + outputs)
    return _Signature(inputs, outputs, batchable)


def _apply_config(name: str, version: int, path: Path, signature: _Signature, config: _Config) -> ModelInfo:
    """Combine what the graph allows with what the config asks for."""
    config_path = path.parent.parent / CONFIG_FILENAME
    max_batch_size = config.max_batch_size
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if signature.batchable else 0
    elif max_batch_size > 0 and not signature.batchable:
        raise RepositoryError(
            f"{config_path}: max_batch_size {max_batch_size}, but dim 0 of {path} "
            "is not a batch dimension (every input and output needs a symbolic dim 0)"
        )
    too_big = [size for size in config.preferred_batch_sizes if size > max_batch_size]
    if too_big:
        raise RepositoryError(f"{config_path}: preferred_batch_sizes {too_big} exceed max_batch_size {max_batch_size}")
    _check_warmup(config.warmup, signature.inputs, max_batch_size, config_path)
    try:
        ranks = {t.name: len(t.shape) for t in signature.inputs}
        check_tensor_config(
            config.tensors, ranks, frozenset(t.name for t in signature.outputs), int(max_batch_size > 0)
        )
    except ValueError as exc:
        raise RepositoryError(f"{config_path}: {exc}") from exc
    inputs, sequence = signature.inputs, None
    if config.sequence is not None and config.backend == PYTHON:
        raise RepositoryError(f"{config_path}: 'sequence' is for ONNX models; a Python model keeps no sequence state")
    if config.sequence is not None and config.response_cache:
        raise RepositoryError(f"{config_path}: 'response_cache' and 'sequence': a step's answer depends on its state")
    if config.sequence is not None:
        try:
            sequence = bind_sequence(
                config.sequence,
                {t.name: (t.datatype, t.shape) for t in signature.inputs},
                {t.name: (t.datatype, t.shape) for t in signature.outputs},
                int(max_batch_size > 0),
            )
        except ValueError as exc:
            raise RepositoryError(f"{config_path}: {exc}") from exc
        hidden = sequence.hidden_inputs()
        inputs = tuple(t for t in inputs if t.name not in hidden)  # the worker feeds these
    if config.generation is not None:
        try:
            check_generate(
                config.generation,
                {t.name: t.datatype for t in signature.inputs},
                {t.name: t.datatype for t in signature.outputs},
            )
        except ValueError as exc:
            raise RepositoryError(f"{config_path}: {exc}") from exc
    delay_us = 0
    if max_batch_size > 0:
        delay_us = DEFAULT_MAX_QUEUE_DELAY_US if config.max_queue_delay_us is None else config.max_queue_delay_us
    return ModelInfo(
        name=name,
        version=version,
        path=path,
        inputs=inputs,
        outputs=signature.outputs,
        max_batch_size=max_batch_size,
        max_queue_delay_us=delay_us,
        preferred_batch_sizes=config.preferred_batch_sizes,
        max_queue_size=config.max_queue_size,
        platform=config.platform,
        placement=config.placement,
        weights_bytes=sum(file.stat().st_size for file in path.parent.iterdir() if file.is_file()),
        execution=config.execution,
        warmup=config.warmup,
        execution_timeout_ms=config.execution_timeout_ms,
        instances=config.instances,
        engine=config.engine,
        traffic=config.traffic,
        pinned=config.pinned,
        response_cache=config.response_cache,
        cache_shared=config.cache_shared,
        tensors=config.tensors,
        policy=config.policy,
        backend=config.backend,
        sequence=sequence,
        decoupled=config.decoupled,
        generation=config.generation,
        queue_partitions=config.queue_partitions,
    )


def _check_warmup(
    samples: tuple[WarmupSample, ...], inputs: tuple[TensorInfo, ...], max_batch_size: int, config_path: Path
) -> None:
    """Each sample names every graph input once, with dims that fit the graph's."""
    expected = {t.name: t for t in inputs}
    for index, sample in enumerate(samples):
        where = f"warmup[{index}]"
        if sample.batch_size > max(1, max_batch_size):
            raise RepositoryError(
                f"{config_path}: '{where}.batch_size' {sample.batch_size} exceeds max_batch_size {max_batch_size}"
            )
        names = {i.name for i in sample.inputs}
        if names != set(expected):
            missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
            raise RepositoryError(
                f"{config_path}: '{where}.inputs' must name every graph input: missing {missing}, unknown {unknown}"
            )
        for item in sample.inputs:
            graph = expected[item.name].shape[1 if max_batch_size else 0 :]
            fits = len(graph) == len(item.dims) and all(
                g in (ANY_DIM, d) for g, d in zip(graph, item.dims, strict=True)
            )
            if not fits:
                shown = [g if g != ANY_DIM else "?" for g in graph]
                raise RepositoryError(
                    f"{config_path}: '{where}.inputs.{item.name}.dims' {list(item.dims)} do not fit the graph's"
                    f" {shown}{' (batch dim excluded)' if max_batch_size else ''}"
                )


def _tensor_info(value: ValueInfoProto, role: str) -> TensorInfo:
    """Name, KServe datatype and shape (-1 for symbolic dims) of one tensor."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise RepositoryError(f"{role} '{value.name}': unsupported type {kind!r}, expected a tensor")
    tensor_type: TypeProto.Tensor = value.type.tensor_type
    datatype = KSERVE_BY_ONNX.get(tensor_type.elem_type)
    if datatype is None:
        elem = TensorProto.DataType.Name(tensor_type.elem_type)
        raise RepositoryError(f"{role} '{value.name}': unsupported element type {elem}")
    if datatype == "BF16":
        # The model would load, then fail every request: refuse it up front, with the way out.
        raise RepositoryError(
            f"{role} '{value.name}': BF16 is not served (ONNX Runtime's Python API has no bfloat16 "
            "arrays); cast to FP16 or FP32 at the model's edge"
        )
    if not tensor_type.HasField("shape"):
        raise RepositoryError(f"{role} '{value.name}': the graph gives no shape (unknown rank)")
    shape = tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else ANY_DIM for dim in tensor_type.shape.dim
    )
    return TensorInfo(name=value.name, datatype=datatype, shape=shape)


def _is_inside(path: Path, directory: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies within ``directory``."""
    real_dir = os.path.realpath(directory)
    real_path = os.path.realpath(path)
    return os.path.commonpath([real_dir, real_path]) == real_dir


def _check_external_data(model: ModelProto, version_dir: Path, path: Path) -> None:
    """Refuse any tensor whose external data would be read from outside the dir."""
    for tensor in _all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise RepositoryError(f"{path}: tensor '{tensor.name}' has external data but no location")
        if os.path.isabs(location) or "\x00" in location or not _is_inside(version_dir / location, version_dir):
            raise RepositoryError(
                f"{path}: tensor '{tensor.name}' external data '{location}' points outside the model directory"
            )


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto a runtime might read: initializers, constants, subgraphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                yield from _attribute_tensors(attribute)
    for training in model.training_info:
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Tensors of one graph and, recursively, of the subgraphs in its attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from _attribute_tensors(attribute)


def _attribute_tensors(attribute: AttributeProto) -> Iterator[TensorProto]:
    """Tensors held by one node attribute, including those of nested graphs."""
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    if attribute.HasField("sparse_tensor"):
        yield attribute.sparse_tensor.values
        yield attribute.sparse_tensor.indices
    for sparse in attribute.sparse_tensors:
        yield sparse.values
        yield sparse.indices
    if attribute.HasField("g"):
        yield from _graph_tensors(attribute.g)
    for graph in attribute.graphs:
        yield from _graph_tensors(graph)
