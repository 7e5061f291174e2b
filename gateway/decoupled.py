"""A decoupled model's request on a stream: many responses, the last flagged.

Triton's way, which tritonclient reads: every response of a decoupled model carries
the response parameter ``triton_final_response`` (false but for the last). The
worker's partial replies (``InferReply.more``) reach :class:`Responses` through the
core's reply reader, in the order they were written; the final reply answers the
call as any reply does. A final reply with no outputs is Triton's empty final
response (a request answered zero times, e.g. ``max_tokens`` 0, or a model whose
last response had gone out before it knew it was the last): sent only when the
request asks for it (``triton_enable_empty_final_response``, tritonclient's
``enable_empty_final_response=True``), as Triton does.

Duplicates: a partial whose ``index`` is not the next one expected is dropped
(a job that streamed is never restarted, model_workers/generate.py, so this only
guards against a stray write). A failure after partials says how many responses
the client got (:meth:`Responses.failed`).
"""

from __future__ import annotations

from collections.abc import Callable

from meshserve.errors import MeshError, error_for_status
from meshserve.models.generation import PARAMETERS
from meshserve.wire.codec import encode_infer_response, stream_response
from meshserve.wire.envelope import Unframed
from protos import grpc_service_pb2 as pb

FINAL_FLAG = "triton_final_response"
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"

_FINAL = pb.ModelInferResponse(parameters={FINAL_FLAG: pb.InferParameter(bool_param=True)}).SerializeToString()
_NOT_FINAL = pb.ModelInferResponse(parameters={FINAL_FLAG: pb.InferParameter(bool_param=False)}).SerializeToString()
# Appended to an encoded ModelInferResponse: protobuf merges concatenated encodings,
# so the flag joins the response without re-serializing its outputs.


def decoupled_response(answer: Unframed, model_name: str, request_id: str, *, final: bool) -> bytes:
    """One response of a decoupled model, as a ModelStreamInferResponse's bytes."""
    inner = encode_infer_response(answer.message, answer.data, model_name, request_id)
    return stream_response(inner + (_FINAL if final else _NOT_FINAL))


class Responses:
    """The partial responses of one request, handed to ``emit`` as they come."""

    __slots__ = ("emit", "model_name", "request_id", "sent")

    def __init__(self, emit: Callable[[bytes], None], model_name: str, request_id: str) -> None:
        self.emit = emit
        self.model_name = model_name
        self.request_id = request_id
        self.sent = 0  # partial responses handed to the stream

    def __call__(self, answer: Unframed) -> None:
        """A partial reply from the reply reader (on the event loop)."""
        if answer.message.index != self.sent:
            return  # a duplicate or a stray write: the client never sees one twice
        self.sent += 1
        self.emit(decoupled_response(answer, self.model_name, self.request_id, final=False))

    def failed(self, error: MeshError) -> MeshError:
        """``error``, saying how many responses came before it (when any did)."""
        if not self.sent:
            return error
        return error_for_status(error.code, f"{error.message} ({self.sent} responses of this request were sent)")


def wants_empty_final(request: pb.ModelInferRequest) -> bool:
    """Whether the request asks for an empty final response (Triton's parameter)."""
    param = request.parameters.get(EMPTY_FINAL_PARAMETER)
    return param is not None and param.bool_param


def worker_parameters(request: pb.ModelInferRequest) -> dict[str, str]:
    """The request parameters a decoupled model's worker reads
    (:data:`meshserve.models.generation.PARAMETERS`), as text."""
    found: dict[str, str] = {}
    for name in PARAMETERS:
        param = request.parameters.get(name)
        if param is None:
            continue
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            found[name] = str(getattr(param, kind))
    return found
