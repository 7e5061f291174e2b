"""ModelConfig as Triton answers it for the same model, from what the routing table carries.

tritonclient's image-classification clients read ``max_batch_size``, each input's
``format`` and ``dims`` and each output's ``label_filename`` from here, so every
field the mesh knows is filled in: platform and backend, tensors, dynamic batching
(delay, preferred sizes, queue size), instance groups and the version policy.
"""

from __future__ import annotations

from typing import cast

from meshserve.models.python_backend import PYTHON, PYTHON_FILENAME, PYTHON_PLATFORM
from meshserve.models.repository import ModelInfo
from meshserve.models.sequence import SequenceConfig
from protos import model_config_pb2 as mc

BACKEND = "onnxruntime"
MODEL_FILENAME = "model.onnx"

_KIND_BY_DEVICE = {
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "any": mc.ModelInstanceGroup.KIND_AUTO,
}


def model_config(model: ModelInfo) -> mc.ModelConfig:
    """Triton-shaped config: dims exclude the batch dim when the model batches."""
    skip = 1 if model.max_batch_size else 0
    formats = dict(model.tensors.formats)
    labels = dict(model.tensors.labels)
    python = model.platform == PYTHON_PLATFORM  # as Triton's Python backend: no platform, backend python
    config = mc.ModelConfig(
        name=model.name,
        platform="" if python else model.platform,
        backend=PYTHON if python else BACKEND,
        max_batch_size=model.max_batch_size,
        default_model_filename=PYTHON_FILENAME if python else MODEL_FILENAME,
        input=[
            mc.ModelInput(
                name=t.name,
                data_type=config_type(t.datatype),
                format=cast(mc.ModelInput.Format, mc.ModelInput.Format.Value(f"FORMAT_{formats.get(t.name, 'NONE')}")),
                dims=t.shape[skip:],
            )
            for t in model.inputs
        ],
        output=[
            mc.ModelOutput(
                name=t.name,
                data_type=config_type(t.datatype),
                dims=t.shape[skip:],
                label_filename=labels.get(t.name, ""),
            )
            for t in model.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=model.name,
                count=model.instances,
                kind=_KIND_BY_DEVICE.get(model.placement.device, mc.ModelInstanceGroup.KIND_AUTO),
            )
        ],
    )
    _set_version_policy(config.version_policy, model)
    config.model_transaction_policy.decoupled = model.decoupled
    if model.sequence is not None:
        _set_sequence_batching(config.sequence_batching, model.sequence)
    if model.max_batch_size:
        config.dynamic_batching.max_queue_delay_microseconds = model.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(model.preferred_batch_sizes)
        config.dynamic_batching.default_queue_policy.max_queue_size = model.max_queue_size
    return config


def config_type(datatype: str) -> mc.DataType:
    """Triton's config enum for a KServe datatype (BYTES is TYPE_STRING there)."""
    return cast(mc.DataType, mc.DataType.Value(f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}"))


_CONTROL_KIND = {
    "start": mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START,
    "ready": mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY,
    "end": mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END,
    "correlation_id": mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID,
}


def _set_sequence_batching(batching: mc.ModelSequenceBatching, sequence: SequenceConfig) -> None:
    """Triton's sequence_batching: idle timeout, control inputs (false/true values in
    the field of the input's type), implicit states (zero_data when they start at 0)."""
    batching.max_sequence_idle_microseconds = round(sequence.idle_timeout_s * 1_000_000)
    for control in sequence.controls:
        entry = mc.ModelSequenceBatching.Control(kind=_CONTROL_KIND[control.kind])
        if control.kind == "correlation_id":
            entry.data_type = config_type(control.datatype)
        elif control.datatype == "BOOL":
            entry.bool_false_true.extend(bool(v) for v in control.values)
        elif control.datatype.startswith("FP"):
            entry.fp32_false_true.extend(control.values)
        else:
            entry.int32_false_true.extend(int(v) for v in control.values)
        batching.control_input.append(mc.ModelSequenceBatching.ControlInput(name=control.input, control=[entry]))
    for state in sequence.states:
        initial = mc.ModelSequenceBatching.InitialState(
            data_type=config_type(state.datatype), dims=state.dims, name=f"{state.input}_initial"
        )
        if state.initial == 0:
            initial.zero_data = True
        batching.state.append(
            mc.ModelSequenceBatching.State(
                input_name=state.input,
                output_name=state.output,
                data_type=config_type(state.datatype),
                dims=state.dims,
                initial_state=[initial],
            )
        )


def _set_version_policy(policy: mc.ModelVersionPolicy, model: ModelInfo) -> None:
    if model.policy.kind == "latest":
        policy.latest.num_versions = model.policy.count
    elif model.policy.kind == "specific":
        policy.specific.versions.extend(sorted(model.policy.versions))
    else:
        policy.all.SetInParent()
