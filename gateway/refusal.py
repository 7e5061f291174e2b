"""Refusals before the message: ModelInfer decides from the call's metadata first.

A unary gRPC handler runs only once the whole request has arrived and been parsed:
for a 110 KB tensor that is most of what a refused call costs the gateway, and a
client retrying in a loop makes the gateway pay it for every refusal. This server
interceptor serves ModelInfer through a stream-unary handler instead (on the wire a
unary call is a stream of one message), which runs as soon as the metadata is in:

- a call with no valid credential is answered UNAUTHENTICATED;
- a tenant the admission script last refused for its rate, within that refusal's
  retry-after (:class:`meshserve.tenancy.throttle.RateRefusals`), is answered
  RESOURCE_EXHAUSTED with the time left in ``retry-after-ms``;

with the status, details and trailer the full path gives, counted in the same
metrics (model label ``<unread>``), and without reading the message: gRPC ends the
stream, and the client stops sending. Any other call reads its one message and goes
the usual way (:meth:`InferenceServicer.answer`), through the real admission.

A cached refusal comes before the model is looked at: a tenant over its rate that
names a model it may not use, or one that does not exist, hears RESOURCE_EXHAUSTED
instead of PERMISSION_DENIED or NOT_FOUND until its retry-after ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway.core import Gateway
from gateway.servicer import Context, InferenceServicer, Oversized, request_parser, serialize_infer_response, set_status
from meshserve.errors import MeshError
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.rawfields import ReceivedRequest

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class RefusalInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no type hints
    """Serves ModelInfer through :meth:`model_infer`; every other method as registered."""

    def __init__(self, gateway: Gateway, servicer: InferenceServicer) -> None:
        self.gateway = gateway
        self.servicer = servicer
        # the message as the unary handler reads it: raw contents left in the received
        # bytes, or Oversized past --max-message-bytes (never parsed)
        self.parse = request_parser(gateway.settings.max_message_bytes)
        self.handler = grpc.stream_unary_rpc_method_handler(
            self.model_infer, response_serializer=serialize_infer_response
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method == MODEL_INFER:
            return self.handler
        return await continuation(handler_call_details)

    async def model_infer(self, requests: AsyncIterator[bytes], context: Context) -> bytes | None:
        """Refuse from the metadata when it says enough; else read, parse and answer the call."""
        started_s = time.perf_counter()
        tenant: Tenant | None = None
        try:
            tenant = self.servicer.authenticate(context)
            self.gateway.throttle.check(tenant)
        except MeshError as error:
            self.servicer.count_unread_refusal(error, tenant, started_s)
            set_status(context, error)
            return None  # a non-OK code: gRPC sends no message, only the status
        request = await _one_request(context, self.parse)
        if request is None:
            return None
        return await self.servicer.answer(request, context, tenant)


async def _one_request(
    context: Context, parse: Callable[[bytes], ReceivedRequest | Oversized]
) -> ReceivedRequest | Oversized | None:
    """The call's message, parsed; None (with the status set) when there is none or it
    does not parse: INVALID_ARGUMENT, where a unary handler left gRPC to answer
    UNKNOWN with the parser's exception."""
    raw: Any = await context.read()
    if raw is grpc.aio.EOF:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details("ModelInfer takes one ModelInferRequest message; the call sent none")
        return None
    try:
        return parse(raw)
    except DecodeError as exc:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(f"the call's message is not a valid ModelInferRequest: {exc}")
        return None
