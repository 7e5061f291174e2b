"""A gRPC server of the bench's own (the reference, the gRPC floor) in a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator, Sequence

import grpc

from meshserve.devkit.redis_server import free_port

STOP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def server_process(command: Sequence[str], name: str, ready_timeout_s: float) -> Iterator[tuple[str, int]]:
    """Run ``command`` with ``--port`` and a free loopback port; yields the server's
    address and process id once it accepts calls (within ``ready_timeout_s``), and
    stops it on exit (SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``). ``name`` says which
    server in errors."""
    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdin=subprocess.DEVNULL, start_new_session=True)
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(_until_ready(target, proc, name, ready_timeout_s))
        yield target, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _until_ready(target: str, proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError:
            raise SystemExit(f"bench: the {name} was not up within {timeout_s:g} s") from None
    if proc.poll() is not None:
        raise SystemExit(f"bench: the {name} exited (code {proc.returncode})")
