"""The gRPC floor: what a bare grpc.aio server costs per call, at the mesh's pace.

    python -m meshserve_bench.floor --port PORT --delay-ms MS

A grpc.aio server on uvloop (as the gateway runs) and nothing else: every method is
served as the gateway serves ModelInfer (stream-unary, :mod:`gateway.refusal`): the
one message is read, and after ``delay_ms`` an empty ModelInferResponse is answered.
``meshserve bench`` (sweep) runs it after the mesh's points, one run per point, with
the same load generator, channels and concurrency, and a delay that makes the same
closed loop run at the mesh point's throughput: concurrency / calls per second. The
pace matters: a gRPC server's CPU per call grows as calls come further apart (fewer
share each wake-up of its threads), so a floor measured flat out is lower than the
one the gateway stands on. The gateway's CPU per request over this floor is what the
gateway itself (its Python, Redis and the way it uses gRPC) spends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from meshserve_bench.servers import server_process

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 1.0
MAX_MESSAGE_BYTES = 256 << 20


class _EveryMethod(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no type hints
    """Any method: read one message (bytes, never parsed), wait, answer empty bytes
    (an empty ModelInferResponse)."""

    def __init__(self, delay_s: float) -> None:
        self._handler = grpc.stream_unary_rpc_method_handler(self._answer)
        self._delay_s = delay_s

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler

    async def _answer(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        await context.read()
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        return b""


@contextlib.asynccontextmanager
async def running(port: int, delay_s: float) -> AsyncIterator[None]:
    """The floor server on ``127.0.0.1:port``, in this event loop, until exit."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    server.add_generic_rpc_handlers([_EveryMethod(delay_s)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield
    finally:
        await server.stop(STOP_GRACE_S)


async def serve(port: int, delay_s: float) -> None:
    """Serve until cancelled or SIGTERM."""
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    async with running(port, delay_s):
        await stopped.wait()


@contextlib.contextmanager
def floor_server(delay_ms: float) -> Iterator[tuple[str, int]]:
    """Run the floor server in a process of its own
    (:func:`~meshserve_bench.servers.server_process`)."""
    command = [sys.executable, "-m", "meshserve_bench.floor", "--delay-ms", f"{delay_ms:g}"]
    with server_process(command, "gRPC floor server", READY_TIMEOUT_S) as server:
        yield server


def pace_delay_ms(concurrency: int, ok_per_s: float) -> float:
    """The wait per call that makes ``concurrency`` closed-loop clients run at
    ``ok_per_s`` (each client's call takes concurrency / ok_per_s seconds)."""
    return concurrency / ok_per_s * 1000 if ok_per_s > 0 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve_bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before each answer")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
