"""Runs an ensemble (:mod:`meshserve.models.ensemble`) for one client call: each step
goes through the core as a call of its own (authorized, admitted, validated, queued,
traced and counted like any ModelInfer), its outputs kept in the gateway for the
steps after it, and only the ensemble's outputs answered to the client.

A step that fails ends the call with that step's status, the message naming the
ensemble, the step and its model. Every step shares the call's deadline, tenant,
tier and request id.

Not yet wired in: the servicer does not dispatch ModelInfer to an ensemble, since the
routing table does not carry ensembles yet (see :mod:`meshserve.models.ensemble`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.core import Gateway
from gateway.request import InferCall
from meshserve.errors import InvalidArgument, MeshError
from meshserve.models.ensemble import Ensemble
from meshserve.tenancy.tenants import Tenant
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb


@dataclass(frozen=True, slots=True)
class Tensor:
    """An ensemble tensor held in the gateway between steps."""

    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def ensemble_inputs(
    ensemble: Ensemble, request: pb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None = None
) -> dict[str, Tensor]:
    """The ensemble's inputs from a client request (raw contents only); the first step
    that reads each checks its shape and bytes."""
    contents = request.raw_input_contents if raw is None else raw
    if len(contents) != len(request.inputs):
        raise InvalidArgument(
            f"ensemble '{ensemble.name}': send every input in raw_input_contents"
            f" ({len(contents)} entries for {len(request.inputs)} inputs)"
        )
    sent = {tensor.name: (tensor, data) for tensor, data in zip(request.inputs, contents, strict=True)}
    tensors = {}
    for wanted in ensemble.inputs:
        if wanted.name not in sent:
            raise InvalidArgument(f"ensemble '{ensemble.name}': input '{wanted.name}' is missing")
        tensor, data = sent.pop(wanted.name)
        if tensor.datatype != wanted.datatype:
            raise InvalidArgument(f"input '{wanted.name}': expected {wanted.datatype}, got {tensor.datatype}")
        tensors[wanted.name] = Tensor(tensor.datatype, tuple(tensor.shape), data)
    if sent:
        raise InvalidArgument(f"ensemble '{ensemble.name}': '{sorted(sent)[0]}' is not one of its inputs")
    return tensors


async def run_ensemble(
    gateway: Gateway,
    ensemble: Ensemble,
    inputs: Mapping[str, Tensor],
    *,
    deadline_ms: float,
    tenant: Tenant,
    tier: int | None = None,
    request_id: str = "",
) -> tuple[mpb.InferReply, list[bytes | memoryview]]:
    """Every step in order; the ensemble's outputs as a reply and their bytes (in the
    form :func:`meshserve.wire.codec.encode_infer_response` takes). Raises the failing
    step's MeshError, its message prefixed with the step."""
    tensors = dict(inputs)
    for number, step in enumerate(ensemble.steps, start=1):
        request = pb.ModelInferRequest(model_name=step.model, model_version=str(step.version), id=request_id)
        for step_input, source in step.input_map:
            tensor = tensors[source]
            request.inputs.add(name=step_input, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(bytes(tensor.data))
        for step_output, _ in step.output_map:
            request.outputs.add(name=step_output)
        call = InferCall(step.model, str(step.version), request_id, tier, None, request)
        try:
            answer = await gateway.infer(call, deadline_ms=deadline_ms, tenant=tenant)
        except MeshError as error:
            error.message = f"ensemble '{ensemble.name}' step {number} (model '{step.model}'): {error.message}"
            error.args = (error.message,)
            raise
        produced = {
            out.name: Tensor(out.datatype, tuple(out.shape), answer.data[index] if answer.data else out.data)
            for index, out in enumerate(answer.message.outputs)
        }
        for step_output, target in step.output_map:
            tensors[target] = produced[step_output]
    reply = mpb.InferReply(id=request_id, model=ensemble.name, version=ensemble.version)
    data: list[bytes | memoryview] = []
    for output in ensemble.outputs:
        tensor = tensors[output.name]
        reply.outputs.add(name=output.name, datatype=tensor.datatype, shape=tensor.shape)
        data.append(tensor.data)
    return reply, data
