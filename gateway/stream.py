"""ModelStreamInfer: many inference requests in flight over one bidirectional stream.

Wire-compatible with Triton and tritonclient (``start_stream``/``async_stream_infer``,
and the asyncio client's ``stream_infer``): each ModelInferRequest read off the
stream is answered by one ModelStreamInferResponse carrying the request's id, in the
order the answers come (not the order of the requests). Each request goes the
ModelInfer way (:meth:`gateway.servicer.InferenceServicer.answer_or_raise`: the
core's admission, validation, queue and metrics) with the tenant the stream
authenticated once, its own ``priority`` and ``timeout`` parameters, the stream's
deadline, and the gateway's default timeout.

A failed request is answered in ``error_message`` with the request's id, as Triton
does; with the ``triton_grpc_error: true`` header, the first failure ends the stream
with its gRPC status instead (the other requests are cancelled).

Flow control: at most ``max_inflight`` requests of a stream are read and not yet
answered; past that the gateway stops reading the stream (HTTP/2 flow control then
holds the client back) until an answer has been handed to gRPC. An answer counts
until it is written, so a client that does not read its answers stops the gateway
reading too, and nothing of a stream is buffered without bound.

A decoupled model's request (gateway/decoupled.py) is answered many times: its
responses before the last are written as they come and hold no slot of their own
(the request's slot is freed by its last response), so a stream buffers at most a
request's responses (``max_tokens`` of a generating model) beyond the bound.

A stream the client cancels (or that ends with a status) cancels its requests: the
core withdraws each queued job (never computed) and forgets its waiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from meshserve.errors import MeshError
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.rawfields import ReceivedRequest
from protos import grpc_service_pb2 as pb

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)

GRPC_ERROR_HEADER = "triton_grpc_error"
"""Metadata a client sends (value ``true``) to have a failure end the stream with its
gRPC status rather than arrive in ``error_message``, as Triton's server does."""


class Answering(Protocol):
    """What a stream needs of the servicer: one request answered, or a MeshError."""

    async def answer_or_raise(
        self,
        request: Any,
        context: Context,
        tenant: Tenant | None = None,
        *,
        streamed: bool = False,
        partial: Callable[[bytes], None] | None = None,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Failed:
    """A request of the stream that failed: what its error response names."""

    request: Any  # ReceivedRequest, or gateway.servicer.Oversized (no id to name)
    error: MeshError

    def response(self) -> bytes:
        """Triton's answer: the message in ``error_message``, the request's id (and
        model) in an otherwise empty ``infer_response``."""
        answer = pb.ModelStreamInferResponse(error_message=self.error.message)
        if isinstance(self.request, ReceivedRequest):
            message = self.request.message
            answer.infer_response.id = message.id
            answer.infer_response.model_name = message.model_name
            answer.infer_response.model_version = message.model_version
        return answer.SerializeToString()


@dataclass(frozen=True, slots=True)
class Partial:
    """A decoupled request's response before its last: written, no slot freed."""

    response: bytes


_END = None  # the reader's last item: the client half-closed and every request is answered


def wants_grpc_errors(context: Context) -> bool:
    """Whether the call sent ``triton_grpc_error: true``."""
    for name, value in context.invocation_metadata() or ():
        if name == GRPC_ERROR_HEADER and isinstance(value, str):
            return value.strip().lower() == "true"
    return False


class InferStream:
    """One ModelStreamInfer call: owns its reader task and one task per request in
    flight, all cancelled when the call ends however it ends."""

    def __init__(self, answering: Answering, context: Context, tenant: Tenant, max_inflight: int) -> None:
        self.answering = answering
        self.context = context
        self.tenant = tenant
        self.grpc_errors = wants_grpc_errors(context)
        self.slots = asyncio.Semaphore(max(1, max_inflight))
        # bounded by the slots: an item is put only by a request holding one
        self.answers: asyncio.Queue[bytes | Failed | Partial | None] = asyncio.Queue()
        self.running: set[asyncio.Task[None]] = set()

    async def serve(self, requests: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        """The stream's answers, each released to the client before its request's slot
        is freed; raises the first failure's MeshError when the client asked for gRPC
        errors."""
        reader = asyncio.create_task(self._read(requests), name="stream-reader")
        try:
            while (item := await self.answers.get()) is not _END:
                if isinstance(item, Partial):
                    yield item.response
                    continue
                if item == b"":  # a decoupled request answered zero times, no empty final asked
                    self.slots.release()
                    continue
                if isinstance(item, Failed):
                    if self.grpc_errors:
                        raise item.error
                    item = item.response()
                yield item
                self.slots.release()
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            for task in self.running:
                task.cancel()
            await asyncio.gather(reader, *self.running, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        """Read while a slot is free; after the client half-closes, wait for the
        requests in flight, then end the answers."""
        iterator = aiter(requests)
        try:
            while True:
                await self.slots.acquire()  # before the read: past the bound, the next stays unread
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    self.slots.release()
                    break
                task = asyncio.create_task(self._answer(request))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
            while self.running:
                await asyncio.wait(set(self.running))
        finally:
            self.answers.put_nowait(_END)

    def _partial(self, response: bytes) -> None:
        self.answers.put_nowait(Partial(response))

    async def _answer(self, request: ReceivedRequest | Any) -> None:
        try:
            answer = await self.answering.answer_or_raise(
                request, self.context, self.tenant, streamed=True, partial=self._partial
            )
        except MeshError as error:
            self.answers.put_nowait(Failed(request, error))
        else:
            self.answers.put_nowait(answer)
