"""Routing-table messages <-> ModelInfo: what the router sends, gateways and workers read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshserve.models.ensemble import ENSEMBLE_PLATFORM, Ensemble, EnsembleStep
from meshserve.models.repository import ModelInfo, PlacementConfig, TensorInfo
from meshserve.models.sequence import SequenceConfig, SequenceControl, SequenceState
from meshserve.models.tensor_config import TensorConfig
from meshserve.models.traffic import TrafficSplit, VersionPolicy
from protos import meshserve_pb2 as mpb

GENERATION_TRAILER = "meshserve-table-generation"
"""The router's Load and Unload answer with the routing-table generation that has the
change (trailing metadata): a gateway waits for its copy of the table to reach it
before it answers its client, so that a call right after a load finds the model."""


def spec_from_info(model: ModelInfo, *, ready: bool, repository: Path, load_error: str = "") -> mpb.ModelSpec:
    """What gateways and workers learn of ``model``. A generating model shows clients
    its prompt and token (:func:`client_tensors`), not its step graph's tensors."""
    inputs, outputs, max_batch_size = client_tensors(model)
    try:
        relative = str(model.path.relative_to(repository))
    except ValueError:
        relative = str(model.path)
    return mpb.ModelSpec(
        name=model.name,
        version=model.version,
        platform=model.platform,
        inputs=[mpb.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
        outputs=[mpb.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
        max_batch_size=max_batch_size,
        max_queue_delay_us=model.max_queue_delay_us,
        preferred_batch_sizes=model.preferred_batch_sizes,
        max_queue_size=model.max_queue_size,
        ready=ready,
        path=relative,
        load_error=load_error,
        response_cache=model.response_cache,
        cache_shared=model.cache_shared,
        client_config=client_config_to_pb(model),
        decoupled=model.decoupled,
        queue_partitions=model.queue_partitions,
    )


def client_tensors(model: ModelInfo) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...], int]:
    """The inputs, outputs and max batch clients see. A generating model takes a
    prompt (its ``tokens`` input, INT64 ``[-1]``) and answers one token per response
    (INT64 ``[1]``), one request at a time as clients see it (the worker batches the
    steps of many requests itself)."""
    generation = model.generation
    if generation is None:
        return model.inputs, model.outputs, model.max_batch_size
    prompt = TensorInfo(generation.tokens, "INT64", (-1,))
    return (prompt,), (TensorInfo(generation.output, "INT64", (1,)),), 0


def info_from_spec(spec: mpb.ModelSpec, repository: Path | None = None) -> ModelInfo:
    path = Path(spec.path)
    if repository is not None and not path.is_absolute():
        path = repository / path
    return ModelInfo(
        name=spec.name,
        version=spec.version,
        path=path,
        inputs=tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in spec.inputs),
        outputs=tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in spec.outputs),
        max_batch_size=spec.max_batch_size,
        max_queue_delay_us=spec.max_queue_delay_us,
        preferred_batch_sizes=tuple(spec.preferred_batch_sizes),
        max_queue_size=spec.max_queue_size,
        platform=spec.platform,
        response_cache=spec.response_cache,
        cache_shared=spec.cache_shared,
        decoupled=spec.decoupled,
        queue_partitions=max(1, spec.queue_partitions),
        **client_config_from_pb(spec.client_config),
    )


def client_config_to_pb(model: ModelInfo) -> mpb.ClientConfig:
    """What only ModelConfig reports: formats, labels, instances, device, version policy."""
    return mpb.ClientConfig(
        input_formats=dict(model.tensors.formats),
        label_filenames=dict(model.tensors.labels),
        instances=model.instances,
        device=model.placement.device,
        version_policy=model.policy.kind,
        latest_versions=model.policy.count,
        specific_versions=sorted(model.policy.versions),
        sequence=sequence_to_pb(model.sequence),
    )


def sequence_to_pb(config: SequenceConfig | None) -> mpb.SequenceSpec | None:
    if config is None:
        return None
    return mpb.SequenceSpec(
        idle_timeout_ms=config.idle_timeout_ms,
        max_sequences=config.max_sequences,
        max_sequences_per_tenant=config.max_sequences_per_tenant,
        controls=[
            mpb.SequenceSpec.Control(
                kind=c.kind, input=c.input, datatype=c.datatype, false_value=c.values[0], true_value=c.values[1]
            )
            for c in config.controls
        ],
        states=[
            mpb.SequenceSpec.State(input=s.input, output=s.output, datatype=s.datatype, dims=s.dims, initial=s.initial)
            for s in config.states
        ],
    )


def sequence_from_pb(message: mpb.ClientConfig) -> SequenceConfig | None:
    """The model's sequence section; None for a stateless model (the field unset)."""
    if not message.HasField("sequence"):
        return None
    spec = message.sequence
    return SequenceConfig(
        idle_timeout_s=spec.idle_timeout_ms / 1000,
        max_sequences=spec.max_sequences,
        max_sequences_per_tenant=spec.max_sequences_per_tenant,
        controls=tuple(
            SequenceControl(c.kind, c.input, c.datatype, (c.false_value, c.true_value)) for c in spec.controls
        ),
        states=tuple(SequenceState(s.input, s.output, s.datatype, tuple(s.dims), s.initial) for s in spec.states),
    )


def client_config_from_pb(message: mpb.ClientConfig) -> dict[str, Any]:
    """ModelInfo's keyword arguments for the message (an older router's empty one
    reads as the defaults)."""
    policy = VersionPolicy(
        kind=message.version_policy or "all",
        count=message.latest_versions,
        versions=frozenset(message.specific_versions),
    )
    return {
        "tensors": TensorConfig(
            formats=tuple(sorted(message.input_formats.items())),
            labels=tuple(sorted(message.label_filenames.items())),
        ),
        "instances": message.instances or 1,
        "placement": PlacementConfig(device=message.device or "any"),
        "policy": policy,
        "sequence": sequence_from_pb(message),
    }


def ensemble_steps_to_pb(ensemble: Ensemble) -> list[mpb.EnsembleStep]:
    """An ensemble's steps as ``ModelSpec.ensemble_steps``."""
    return [
        mpb.EnsembleStep(
            model=step.model,
            version=step.version,
            input_map=[mpb.TensorMapping(step_tensor=a, ensemble_tensor=b) for a, b in step.input_map],
            output_map=[mpb.TensorMapping(step_tensor=a, ensemble_tensor=b) for a, b in step.output_map],
        )
        for step in ensemble.steps
    ]


def ensemble_from_spec(spec: mpb.ModelSpec) -> Ensemble | None:
    """The ensemble a spec describes; None for a model, or an ensemble that cannot run
    (no steps: the router found it invalid, and says why in ``load_error``)."""
    if spec.platform != ENSEMBLE_PLATFORM or not spec.ensemble_steps:
        return None
    steps = tuple(
        EnsembleStep(
            step.model,
            step.version,
            tuple((m.step_tensor, m.ensemble_tensor) for m in step.input_map),
            tuple((m.step_tensor, m.ensemble_tensor) for m in step.output_map),
        )
        for step in spec.ensemble_steps
    )
    return Ensemble(
        spec.name,
        spec.version,
        steps,
        tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in spec.inputs),
        tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in spec.outputs),
    )


def split_to_pb(split: TrafficSplit) -> mpb.TrafficSplit:
    return mpb.TrafficSplit(
        model=split.model,
        weights=dict(split.weights),
        sticky_by=split.sticky_by,
        shadow_version=split.shadow_version,
        shadow_share=split.shadow_share,
    )


def split_from_pb(message: mpb.TrafficSplit) -> TrafficSplit:
    """The message's split; weights as given (the router validates them)."""
    return TrafficSplit(
        model=message.model,
        weights=tuple(sorted((int(v), int(w)) for v, w in message.weights.items())),
        sticky_by=message.sticky_by,
        shadow_version=message.shadow_version,
        shadow_share=message.shadow_share,
    )
