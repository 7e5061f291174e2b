"""Runs an ensemble (:mod:`meshserve.models.ensemble`) for one client call: each step
goes through the core as a call of its own (authorized, admitted, validated, queued,
traced and counted like any ModelInfer), its outputs kept in the gateway for the
steps after it, and only the ensemble's outputs answered to the client.

A step that fails ends the call with that step's status, the message naming the
ensemble, the step and its model. Every step shares the call's deadline, tenant,
tier and request id, and has a span of its own (``ensemble step N``) under the
call's.

Rights: the tenant needs the ensemble allowed, and each step's model too (each step
is a call of its own, authorized as any): an ensemble never lets a tenant run a
model it could not call directly. The servicer sends ModelInfer here for a name the
routing table lists as an ensemble (:func:`is_ensemble`), to :func:`infer_ensemble`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from gateway.core import Gateway
from gateway.request import InferCall
from meshserve.errors import DeadlineExceeded, InvalidArgument, MeshError, Unavailable
from meshserve.models.classification import class_count
from meshserve.models.ensemble import Ensemble
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.envelope import Unframed
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


StepCounter = Callable[[str, str], None]
"""Called once per step with its model's name and its status code's name."""


def is_ensemble(gateway: Gateway, name: str) -> bool:
    """Whether the routing table lists ``name`` as an ensemble (runnable or not)."""
    return name in gateway.routing.view.ensemble_names


async def infer_ensemble(
    gateway: Gateway,
    call: InferCall,
    *,
    deadline_ms: float,
    tenant: Tenant,
    tracer: trace.Tracer | None = None,
    count: StepCounter | None = None,
) -> Unframed:
    """One client call to an ensemble, answered as :meth:`Gateway.infer` answers a
    model's: authorized, its version resolved and ready, its inputs read, its steps
    run; only the outputs the client asked for (all, when it names none)."""
    gateway.authorize(tenant, call.model_name)
    model = gateway.resolve(call.model_name, call.model_version, call)
    key = (model.name, model.version)
    view = gateway.routing.view
    ensemble = view.ensembles.get(key)
    if ensemble is None or key not in view.ready:
        why = view.failed.get(key) or "a step's model is not ready"
        raise Unavailable(f"ensemble '{model.name}' version {model.version} is not ready: {why}")
    if call.timeout_ms is not None:
        deadline_ms = min(deadline_ms, time.time() * 1000 + call.timeout_ms)
    for output in call.message.outputs:  # refused before any step runs, never answered as the scores
        if class_count(output.name, output.parameters):
            raise InvalidArgument(
                f"requested output '{output.name}': classification (class_count) is not available for "
                f"ensemble '{model.name}'; ask a step's model for it, or rank the output on the client"
            )
    inputs = ensemble_inputs(ensemble, call.message, call.raw)
    reply, data = await run_ensemble(
        gateway,
        ensemble,
        inputs,
        deadline_ms=deadline_ms,
        tenant=tenant,
        tier=call.tier,
        request_id=call.request_id,
        tracer=tracer,
        count=count,
    )
    wanted = [output.name for output in call.message.outputs]
    if wanted:
        reply, data = _only(ensemble, reply, data, wanted)
    return Unframed(reply, [memoryview(d) for d in data], True)


def _only(
    ensemble: Ensemble, reply: mpb.InferReply, data: list[bytes | memoryview], wanted: list[str]
) -> tuple[mpb.InferReply, list[bytes | memoryview]]:
    """The outputs the client named, in its order."""
    index = {output.name: i for i, output in enumerate(reply.outputs)}
    for name in wanted:
        if name not in index:
            raise InvalidArgument(f"requested output '{name}': not an output of ensemble '{ensemble.name}'")
    kept = mpb.InferReply(id=reply.id, model=reply.model, version=reply.version)
    kept.outputs.extend(reply.outputs[index[name]] for name in wanted)
    return kept, [data[index[name]] for name in wanted]


async def run_ensemble(
    gateway: Gateway,
    ensemble: Ensemble,
    inputs: Mapping[str, Tensor],
    *,
    deadline_ms: float,
    tenant: Tenant,
    tier: int | None = None,
    request_id: str = "",
    tracer: trace.Tracer | None = None,
    count: StepCounter | None = None,
) -> tuple[mpb.InferReply, list[bytes | memoryview]]:
    """Every step in order; the ensemble's outputs as a reply and their bytes (in the
    form :func:`meshserve.wire.codec.encode_infer_response` takes). Raises the failing
    step's MeshError, its message prefixed with the step. ``tracer``: a span per step;
    ``count``: told each step's outcome."""
    tensors = dict(inputs)
    for number, step in enumerate(ensemble.steps, start=1):
        if time.time() * 1000 >= deadline_ms:
            raise DeadlineExceeded(f"ensemble '{ensemble.name}': deadline exceeded before step {number}")
        request = pb.ModelInferRequest(model_name=step.model, model_version=str(step.version), id=request_id)
        raw: list[memoryview] = []  # views of the tensors held here: packed for the queue without a copy
        for step_input, source in step.input_map:
            tensor = tensors[source]
            request.inputs.add(name=step_input, datatype=tensor.datatype, shape=tensor.shape)
            raw.append(memoryview(tensor.data))
        for step_output, _ in step.output_map:
            request.outputs.add(name=step_output)
        call = InferCall(step.model, str(step.version), request_id, tier, None, request, raw)
        span = tracer.start_as_current_span(f"ensemble step {number}") if tracer else contextlib.nullcontext()
        with span as current:
            if current is not None:
                current.set_attribute("meshserve.model", step.model)
                current.set_attribute("meshserve.version", step.version)
            try:
                answer = await gateway.infer(call, deadline_ms=deadline_ms, tenant=tenant)
            except MeshError as error:
                if count is not None:
                    count(step.model, error.code.name)
                error.message = f"ensemble '{ensemble.name}' step {number} (model '{step.model}'): {error.message}"
                error.args = (error.message,)
                raise
        if count is not None:
            count(step.model, "OK")
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
