"""Triton's JSON model config (``RepositoryModelLoad``'s ``config`` parameter) as ours.

Triton takes a whole model config as JSON in place of the directory's
``config.pbtxt``; meshserve maps what it can onto ``config.yaml``
(``meshserve/models/repository.py``) and refuses the rest with INVALID_ARGUMENT
naming the field, so an override is never half applied:

    name                                  must be the model's name
    platform / backend                    onnxruntime_onnx / onnxruntime only
    max_batch_size                        max_batch_size
    dynamic_batching.max_queue_delay_microseconds   dynamic_batching.max_queue_delay_ms
    dynamic_batching.preferred_batch_size           dynamic_batching.preferred_batch_sizes
    dynamic_batching.default_queue_policy.max_queue_size   dynamic_batching.max_queue_size
    version_policy (latest / all / specific)        versions
    instance_group[].count, .kind         instances (summed), placement.device
    input[] / output[] name, data_type, dims        checked against the ONNX graph
    input[].format, output[].label_filename         input[].format, output[].label_filename

Triton's JSON writes 64-bit integers as strings; both forms are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshserve.errors import InvalidArgument
from meshserve.models.repository import ModelInfo, TensorInfo

_TOP = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "dynamic_batching",
        "version_policy",
        "instance_group",
        "input",
        "output",
        "default_model_filename",
    }
)
_BATCHING = frozenset({"max_queue_delay_microseconds", "preferred_batch_size", "default_queue_policy"})
_INSTANCE = frozenset({"count", "kind", "name"})
_TENSOR = frozenset({"name", "data_type", "dims"})
_CLIENT_KEYS = {"input": "format", "output": "label_filename"}
_KINDS = {"KIND_CPU": "cpu", "KIND_GPU": "gpu", "KIND_AUTO": "any"}


@dataclass(frozen=True, slots=True)
class TensorClaim:
    """One ``input`` or ``output`` entry: what the override says the graph has."""

    role: str  # "input" | "output"
    name: str
    datatype: str  # KServe name ("FP32"); "" when not given
    dims: tuple[int, ...] | None  # without the batch dim when max_batch_size > 0


@dataclass(frozen=True, slots=True)
class TritonConfig:
    """An override, read: ``yaml`` is our config.yaml; the rest is checked once the
    model's versions are known (the policy) and read (the tensors)."""

    yaml: dict[str, Any]
    latest_versions: int | None  # version_policy.latest.num_versions
    tensors: tuple[TensorClaim, ...]


def parse_triton_config(text: str, model: str) -> TritonConfig:
    """Read ``text`` (Triton's JSON model config) for model ``model``; raises InvalidArgument."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"parameter 'config': not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument("parameter 'config': expected a JSON object (Triton's model config)")
    _known(raw, _TOP, "")
    if raw.get("name", model) != model:
        raise InvalidArgument(f"config 'name': {raw['name']!r} is not the model being loaded, {model!r}")
    if raw.get("platform", "onnxruntime_onnx") != "onnxruntime_onnx" or raw.get("backend", "onnxruntime") not in (
        "onnxruntime",
        "onnx",
    ):
        raise InvalidArgument("config 'platform'/'backend': meshserve serves onnxruntime_onnx models only")
    if raw.get("default_model_filename", "model.onnx") != "model.onnx":
        raise InvalidArgument("config 'default_model_filename': only model.onnx is read")
    yaml: dict[str, Any] = {}
    if "max_batch_size" in raw:
        yaml["max_batch_size"] = _int(raw["max_batch_size"], "max_batch_size")
    if "dynamic_batching" in raw:
        yaml["dynamic_batching"] = _batching(raw["dynamic_batching"])
    latest: int | None = None
    if "version_policy" in raw:
        latest, versions = _version_policy(raw["version_policy"])
        if versions is not None:
            yaml["versions"] = list(versions)
    if "instance_group" in raw:
        yaml.update(_instances(raw["instance_group"]))
    tensors = tuple(
        _tensor(entry, role, i)
        for role in ("input", "output")
        for i, entry in enumerate(_list(raw.get(role, []), role))
    )
    for role in ("input", "output"):
        yaml.update(_client_setting(raw.get(role, []), role))
    return TritonConfig(yaml, latest, tensors)


def _client_setting(entries: list[dict[str, Any]], role: str) -> dict[str, Any]:
    """``input[].format`` / ``output[].label_filename`` as config.yaml's ``input`` /
    ``output`` entries (checked there: meshserve/models/tensor_config.py); FORMAT_NONE
    and an empty file name say nothing."""
    key = _CLIENT_KEYS[role]
    found = []
    for entry in entries:
        value = entry.get(key)
        if key == "format" and isinstance(value, str):
            value = value.removeprefix("FORMAT_")
            value = None if value == "NONE" else value
        if value:
            found.append({"name": entry["name"], key: value})
    return {role: found} if found else {}


def check_tensors(config: TritonConfig, models: Sequence[ModelInfo]) -> None:
    """Each ``input``/``output`` the override names must be the graph's; raises InvalidArgument."""
    for model in models:
        skip = 1 if model.max_batch_size else 0
        graph = {("input", t.name): t for t in model.inputs} | {("output", t.name): t for t in model.outputs}
        for claim in config.tensors:
            tensor: TensorInfo | None = graph.get((claim.role, claim.name))
            where = f"config {claim.role} '{claim.name}'"
            if tensor is None:
                names = ", ".join(name for role, name in graph if role == claim.role)
                raise InvalidArgument(f"{where}: version {model.version} has no such {claim.role} (it has: {names})")
            if claim.datatype and claim.datatype != tensor.datatype:
                raise InvalidArgument(f"{where}: data_type {claim.datatype}, but the graph's is {tensor.datatype}")
            graph_dims = tensor.shape[skip:]
            if claim.dims is not None and (
                len(claim.dims) != len(graph_dims)
                or any(c != g and -1 not in (c, g) for c, g in zip(claim.dims, graph_dims, strict=True))
            ):
                raise InvalidArgument(f"{where}: dims {list(claim.dims)}, but the graph's are {list(graph_dims)}")


def _known(mapping: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise InvalidArgument(
            f"config '{prefix}{unknown[0]}': not supported by meshserve (supported: {', '.join(sorted(allowed))})"
        )


def _int(value: object, field: str) -> int:
    """An integer, or Triton's JSON string form of a 64-bit one."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"config '{field}': expected an integer, got {value!r}")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"config '{field}': expected a list, got {value!r}")
    return value


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"config '{field}': expected an object, got {value!r}")
    return value


def _batching(value: object) -> dict[str, Any]:
    raw = _object(value, "dynamic_batching")
    _known(raw, _BATCHING, "dynamic_batching.")
    out: dict[str, Any] = {}
    if "max_queue_delay_microseconds" in raw:
        delay_us = _int(raw["max_queue_delay_microseconds"], "dynamic_batching.max_queue_delay_microseconds")
        out["max_queue_delay_ms"] = delay_us / 1000
    if "preferred_batch_size" in raw:
        field = "dynamic_batching.preferred_batch_size"
        out["preferred_batch_sizes"] = [_int(size, field) for size in _list(raw["preferred_batch_size"], field)]
    if "default_queue_policy" in raw:
        policy = _object(raw["default_queue_policy"], "dynamic_batching.default_queue_policy")
        _known(policy, frozenset({"max_queue_size"}), "dynamic_batching.default_queue_policy.")
        if "max_queue_size" in policy:
            field = "dynamic_batching.default_queue_policy.max_queue_size"
            out["max_queue_size"] = _int(policy["max_queue_size"], field)
    return out


def _version_policy(value: object) -> tuple[int | None, tuple[int, ...] | None]:
    """(latest N, specific versions); (None, None) for ``all``."""
    raw = _object(value, "version_policy")
    _known(raw, frozenset({"latest", "all", "specific"}), "version_policy.")
    if len(raw) != 1:
        raise InvalidArgument("config 'version_policy': exactly one of latest, all, specific")
    if "latest" in raw:
        latest = _object(raw["latest"], "version_policy.latest")
        count = _int(latest.get("num_versions", 1), "version_policy.latest.num_versions")
        if count < 1:
            raise InvalidArgument("config 'version_policy.latest.num_versions': must be at least 1")
        return count, None
    if "specific" in raw:
        specific = _object(raw["specific"], "version_policy.specific")
        field = "version_policy.specific.versions"
        return None, tuple(_int(v, field) for v in _list(specific.get("versions", []), field))
    return None, None


def _instances(value: object) -> dict[str, Any]:
    groups = [_object(group, "instance_group[]") for group in _list(value, "instance_group")]
    count = 0
    devices = set()
    for group in groups:
        _known(group, _INSTANCE, "instance_group[].")
        count += _int(group.get("count", 1), "instance_group[].count")
        kind = group.get("kind", "KIND_AUTO")
        if kind not in _KINDS:
            raise InvalidArgument(f"config 'instance_group[].kind': {kind!r} is not one of {', '.join(_KINDS)}")
        devices.add(_KINDS[kind])
    if not groups:
        return {}
    if count < 1:
        raise InvalidArgument("config 'instance_group[].count': at least 1 instance in all")
    return {"instances": count, "placement": {"device": devices.pop() if len(devices) == 1 else "any"}}


def _tensor(value: object, role: str, index: int) -> TensorClaim:
    raw = _object(value, f"{role}[{index}]")
    _known(raw, _TENSOR | {_CLIENT_KEYS[role]}, f"{role}[{index}].")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"config '{role}[{index}].name': a tensor name is required")
    datatype = raw.get("data_type", "")
    if not isinstance(datatype, str) or (datatype and not datatype.startswith("TYPE_")):
        raise InvalidArgument(f"config '{role}[{index}].data_type': expected TYPE_<name>, got {datatype!r}")
    kserve = datatype.removeprefix("TYPE_")
    dims = None
    if "dims" in raw:
        dims = tuple(_int(d, f"{role}[{index}].dims") for d in _list(raw["dims"], f"{role}[{index}].dims"))
    return TensorClaim(role, name, "BYTES" if kserve == "STRING" else kserve, dims)
