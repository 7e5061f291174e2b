"""Reaching a mesh: start ``meshserve up`` on free ports, check the model is ready, stop it."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
import onnxruntime as ort

from meshserve.devkit.redis_server import free_port
from meshserve.models.repository import ModelInfo, scan_repository
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

READY_PREFIX = "meshserve ready:"
MESH_READY_TIMEOUT_S = 180.0
MESH_STOP_TIMEOUT_S = 60.0
READY_CALL_TIMEOUT_S = 10.0


def progress(message: str) -> None:
    """One line on stderr while the bench runs; the report goes to stdout."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def find_model(repository: Path, name: str) -> ModelInfo:
    """The newest servable version of ``name`` in ``repository``."""
    models, problems = scan_repository(repository)
    versions = [model for model in models if model.name == name]
    if not versions:
        detail = "".join(f"\n  {problem}" for problem in problems)
        raise SystemExit(f"bench: no servable model '{name}' in {repository}{detail}")
    return max(versions, key=lambda model: model.version)


def model_json(model: ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "version": model.version, "max_batch_size": model.max_batch_size}


async def require_ready(target: str, model: ModelInfo) -> None:
    """Fail fast, with the reason, when the mesh does not serve the model."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelReadyRequest(name=model.name, version=str(model.version))
        try:
            reply = await stub.ModelReady(request, timeout=READY_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SystemExit(f"bench: {target}: ModelReady failed: {exc.code().name}: {exc.details()}") from exc
    if not reply.ready:
        raise SystemExit(f"bench: {target}: model '{model.name}' version {model.version} is not ready")


def wait_for_ready_line(stdout: IO[str], timeout_s: float) -> bool:
    """True once ``stdout`` shows the ready line, False at EOF (the mesh exited).

    A daemon thread keeps draining ``stdout`` afterwards, so the pipe never fills.
    """
    seen, finished = threading.Event(), threading.Event()

    def pump() -> None:
        for line in stdout:
            if line.startswith(READY_PREFIX):
                seen.set()
                finished.set()
        finished.set()

    threading.Thread(target=pump, name="mesh-stdout", daemon=True).start()
    if not finished.wait(timeout_s):
        raise SystemExit(f"bench: the mesh was not ready within {timeout_s:.0f} s")
    return seen.is_set()


@contextlib.contextmanager
def own_mesh(repository: Path, up_args: Sequence[str] = ()) -> Iterator[str]:
    """Run ``meshserve up`` (plus ``up_args``; a later flag wins) on free loopback ports;
    yields its gRPC address and stops it on exit (SIGTERM, SIGKILL after a deadline)."""
    command = [sys.executable, "-m", "meshserve", "up", "--host", "127.0.0.1", "--grpc-port", str(free_port())]
    command += ["--metrics-port", str(free_port()), "--model-repository", str(repository), *up_args]
    progress("starting a mesh: python " + " ".join(command[1:]))
    env = {"MESHSERVE_LOG_LEVEL": "WARNING", **os.environ}
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        if not wait_for_ready_line(proc.stdout, MESH_READY_TIMEOUT_S):
            raise SystemExit(f"bench: the mesh exited (code {proc.wait()}) before it was ready")
        yield f"127.0.0.1:{command[command.index('--grpc-port') + 1]}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the mesh drains and stops its children
        try:
            proc.wait(MESH_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            progress(f"the mesh did not stop within {MESH_STOP_TIMEOUT_S:.0f} s; killing it")
            proc.kill()
            proc.wait()


def gateway_pid(target: str) -> int | None:
    """The process of the gateway ``own_mesh`` started for ``target`` (``meshserve up``'s
    child with its gRPC port), from /proc; None when none is found (off Linux)."""
    port = target.rsplit(":", 1)[1]
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "gateway" in argv and ("--grpc-port", port) in itertools.pairwise(argv):
            return int(entry.name)
    return None


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: unwind (stopping the mesh this bench started) instead of dying on the spot."""
    raise SystemExit(128 + signum)


def machine_info() -> dict[str, Any]:
    """What the report says about where it ran."""
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_average_1m": os.getloadavg()[0],
    }
