"""The one-process reference server: what the mesh is measured against.

    python -m meshserve_bench.reference MODEL_DIR VERSION --port PORT

A gRPC server speaking the same KServe ``ModelInfer`` as the gateway, with an
in-process asyncio batcher (the model's own max batch size and max queue delay, as
the mesh batches it) in front of one ONNX Runtime session: no Redis, no second
process, no router. ``meshserve bench`` starts it in a process of its own, after the
mesh's points, and drives it with the same load generator, so the mesh's cost is
read against what one Python process does on the same cores.

The batcher: a request joins the pending batch; the batch runs when it holds the max
batch's items, or ``max_queue_delay`` after its first request came, on a thread of
its own while the next batch fills (so one batch computes while the next waits, as a
worker's does). A model that does not batch runs each request alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from meshserve.models.repository import ModelInfo, load_model
from meshserve.wire.dtypes import KSERVE_BY_NUMPY, NUMPY_BY_KSERVE
from meshserve_bench.servers import server_process
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

Arrays = dict[str, np.ndarray[Any, Any]]
STOP_GRACE_S = 1.0
READY_TIMEOUT_S = 60.0


class Batcher:
    """Gathers requests into batches of at most ``max_batch`` items (dim 0) and runs
    each on ``session`` in a thread; ``max_batch`` 0: every request alone."""

    def __init__(self, session: ort.InferenceSession, max_batch: int, max_delay_s: float) -> None:
        self._session = session
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._pending: list[tuple[Arrays, int, asyncio.Future[Arrays]]] = []
        self._items = 0
        self._timer: asyncio.TimerHandle | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="reference-batch")
        self._outputs = [output.name for output in session.get_outputs()]

    async def infer(self, inputs: Arrays) -> Arrays:
        """The outputs of one request (its own rows of the batch it ran in)."""
        loop = asyncio.get_running_loop()
        if self._max_batch <= 0:
            return await loop.run_in_executor(self._pool, self._run, [inputs])
        items = next(iter(inputs.values())).shape[0]
        future: asyncio.Future[Arrays] = loop.create_future()
        if self._pending and self._items + items > self._max_batch:
            self._flush()
        self._pending.append((inputs, items, future))
        self._items += items
        if self._items >= self._max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_delay_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._items = self._pending, [], 0
        if batch:
            task = asyncio.get_running_loop().run_in_executor(self._pool, self._run, [b[0] for b in batch])
            task.add_done_callback(lambda done: _settle(batch, done))

    def _run(self, requests: Sequence[Arrays]) -> Arrays:
        feed = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        return dict(zip(self._outputs, self._session.run(self._outputs, feed), strict=True))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _settle(batch: list[tuple[Arrays, int, asyncio.Future[Arrays]]], done: asyncio.Future[Arrays]) -> None:
    """Hand each request its rows of a finished batch (or the batch's error)."""
    error = done.exception()
    start = 0
    for _, items, future in batch:
        if not future.done():  # not cancelled meanwhile
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result({name: array[start : start + items] for name, array in done.result().items()})
        start += items


class ReferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``ModelInfer`` and ``ModelReady`` for one model; raw tensors only."""

    def __init__(self, model: ModelInfo, batcher: Batcher) -> None:
        self._model = model
        self._batcher = batcher
        self._types = {tensor.name: NUMPY_BY_KSERVE[tensor.datatype] for tensor in model.inputs}

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name == self._model.name)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        inputs = {
            tensor.name: np.frombuffer(raw, dtype=self._types[tensor.name]).reshape(tuple(tensor.shape))
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        outputs = await self._batcher.infer(inputs)
        reply = pb.ModelInferResponse(model_name=self._model.name, model_version=str(self._model.version))
        reply.id = request.id
        for name, array in outputs.items():
            reply.outputs.add(name=name, datatype=KSERVE_BY_NUMPY[array.dtype], shape=array.shape)
            reply.raw_output_contents.append(array.tobytes())
        return reply


async def serve(model: ModelInfo, port: int, *, batching_wait: bool = True) -> None:
    """Serve ``model`` on 127.0.0.1:``port`` until SIGTERM or SIGINT; without
    ``batching_wait`` a batch runs as soon as the loop turns (a lone request at once)."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    batcher = Batcher(session, model.max_batch_size, model.max_queue_delay_us / 1e6 if batching_wait else 0.0)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceServicer(model, batcher), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop(STOP_GRACE_S)
        batcher.close()


@contextlib.contextmanager
def reference_server(model: ModelInfo, *, batching_wait: bool = True) -> Iterator[tuple[str, int]]:
    """Run the reference server for ``model`` in a process of its own
    (:func:`~meshserve_bench.servers.server_process`). Without ``batching_wait``: the
    issue's "one-process server without batching wait"."""
    command = [sys.executable, "-m", "meshserve_bench.reference", str(model.path.parent.parent), str(model.version)]
    if not batching_wait:
        command.append("--no-batching-wait")
    with server_process(command, "reference server", READY_TIMEOUT_S) as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve_bench.reference", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="the model's directory in a repository")
    parser.add_argument("version", type=int)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--no-batching-wait", action="store_true", help="run each batch at once, never waiting for the max queue delay"
    )
    args = parser.parse_args(argv)
    server = serve(load_model(args.model_dir, args.version), args.port, batching_wait=not args.no_batching_wait)
    try:
        import uvloop

        uvloop.run(server)
    except ImportError:
        asyncio.run(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
