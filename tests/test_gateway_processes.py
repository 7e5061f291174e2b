"""``meshserve gateway --processes N``: how many by default, and two processes on one
port that both answer, each call's reply reaching the process that holds the call."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.cli.gateway_processes import cgroup_cpu_limit, default_processes
from meshserve.devkit.redis_server import free_port
from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

AFFINITY = len(os.sched_getaffinity(0))
ONE_CONNECTION_EACH = [("grpc.use_local_subchannel_pool", 1)]
"""Channels with the same target otherwise share one connection, hence one process."""


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", AFFINITY), ("50000 100000\n", 1), ("150000 100000\n", min(AFFINITY, 2)), (None, AFFINITY)],
)
def test_the_default_is_one_process_per_core_the_container_allows(
    tmp_path: Path, cpu_max: str | None, expected: int
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert default_processes(path) == expected
    assert (cgroup_cpu_limit(path) is None) == (cpu_max is None or cpu_max.startswith("max"))


def _served(metrics_port: int) -> int | None:
    """Calls the process on ``metrics_port`` answered OK; None while it is not listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            page = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    counts = re.findall(r'^meshserve_requests_total\{[^}]*code="OK"[^}]*\} (\S+)$', page, re.MULTILINE)
    return sum(int(float(n)) for n in counts)


def _free_port_pair() -> int:
    """A port free on loopback whose successor is free too (process 1's /metrics)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports on loopback")


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


async def _call(address: str, index: int) -> None:
    """One call on a connection of its own; the answer must be this call's."""
    async with grpc.aio.insecure_channel(address, options=ONE_CONNECTION_EACH) as channel:
        request = infer_request("mlp", {"features": np.full((1, 64), index, np.float32)})
        request.id = f"call-{index}"
        response = await infer_stub(channel).ModelInfer(request, timeout=10, wait_for_ready=True)
    assert response.id == request.id
    assert output_arrays(response)["logits"].shape == (1, 10)


async def test_two_gateway_processes_share_one_port_and_each_gets_its_own_replies(
    redis_url: str, model_repository: Path, tmp_path: Path
) -> None:
    mesh = await start_mesh(redis_url, model_repository)
    port, metrics_port = free_port(), _free_port_pair()
    log_path = tmp_path / "gateway.log"
    argv = [sys.executable, "-m", "meshserve", "gateway", "--processes", "2", "--redis-url", redis_url]
    argv += ["--router", mesh.router.address, "--host", "127.0.0.1", "--grpc-port", str(port)]
    argv += ["--metrics-port", str(metrics_port), "--lame-duck-s", "0"]
    proc = _spawn(argv, log_path)
    try:
        ports = (metrics_port, metrics_port + 1)
        async with asyncio.timeout(40):
            while None in [await asyncio.to_thread(_served, p) for p in ports]:
                assert proc.poll() is None, log_path.read_text()
                await asyncio.sleep(0.1)  # both processes starting: no signal to wait on
        calls = 0
        async with asyncio.timeout(30):  # connections spread by a hash: a few rounds reach both
            while 0 in [await asyncio.to_thread(_served, p) for p in ports]:
                await asyncio.gather(*(_call(f"127.0.0.1:{port}", calls + i) for i in range(8)))
                calls += 8
        served = [await asyncio.to_thread(_served, p) for p in ports]
        assert sum(n or 0 for n in served) == calls
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        ids = set(re.findall(r"gateway (gateway-\S+) listening", log_path.read_text()))
        assert len(ids) == 2, log_path.read_text()  # a gateway id, hence a reply list, per process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await stop_mesh(mesh)
