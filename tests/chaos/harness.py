"""The mesh for the chaos suite as child processes, and what it leaves behind.

The test owns every process (not ``meshserve up``, which owns a Redis it cannot
restart with its data): a Redis with an append-only file, so ``kill -9`` and a
restart on the same port keep the queue, as a production Redis would; one router;
gateways and workers as ``python -m meshserve <role>`` children, each logging to
its own file under the test's tmp dir. After the load: the gateways' counters,
the workers' logs, and what is left in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.devkit.redis_server import free_port, server_binary, suite_binary_from_env

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
REDIS_START_TIMEOUT_S = 10.0

LOG_LEVEL = "DEBUG"
"""Every batch and every call gets a log line: when a run fails, the logs say which
worker took which job and when (a few hundred lines a second, beside the load)."""

FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
"""For readiness checks: see a process the moment it listens (gRPC's default backoff is 1 s and grows)."""

_WORKER_ID = re.compile(rb"worker (\S+) serving")


class Service:
    """One ``python -m meshserve <role>`` child, its output in ``log_path``."""

    def __init__(self, role: str, args: Sequence[str], log_path: Path) -> None:
        self.role = role
        self.args = [sys.executable, "-m", "meshserve", "--log-level", LOG_LEVEL, role, *args]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Service:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    async def kill(self) -> None:
        """SIGKILL, and reap the process."""
        self.signal(signal.SIGKILL)
        await self.wait(STOP_TIMEOUT_S)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the service drains), SIGKILL if it is not gone within ``timeout_s``;
        returns the exit code (0 for a clean drain)."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def wait(self, timeout_s: float) -> int | None:
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc is not None else None

    def worker_id(self) -> str | None:
        """The id a worker logged once it serves (the ``w`` field of the jobs it leases)."""
        found = _WORKER_ID.search(self.log_path.read_bytes()) if self.log_path.exists() else None
        return found.group(1).decode() if found else None


class AofRedis:
    """The bundled Valkey/Redis with ``appendonly yes``: a restart on the same port and
    dir replays the AOF, so queued jobs, leases and reply lists survive ``kill -9``.

    ``appendfsync always``: with ``everysec`` Redis postpones its AOF writes (for up to
    2 s) while a background fsync is still running, yet answers the commands, so on a
    slow disk a process kill loses writes it acknowledged (the likeliest cause of one
    CI run whose accepted job was gone after the restart). The gateway answers such
    calls UNAVAILABLE (test_resilience.py); here every accepted job must survive."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (or restart, replaying the AOF) and wait until it accepts commands."""
        self.proc = self._spawn()
        await self._wait_until_accepting()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(server_binary(suite_binary_from_env())),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)),
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            *("--loglevel", "warning", "--logfile", str(self.data_dir / "server.log")),
        ]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    async def _wait_until_accepting(self) -> None:
        """Until PING answers PONG (not LOADING: the AOF is replayed by then)."""
        assert self.proc is not None
        async with asyncio.timeout(REDIS_START_TIMEOUT_S):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis exited with {self.proc.returncode}; see {self.data_dir}/server.log")
                with contextlib.suppress(OSError):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    try:
                        writer.write(b"PING\r\n")
                        if (await reader.readline()).startswith(b"+PONG"):
                            return
                    finally:
                        writer.close()
                        await writer.wait_closed()
                await asyncio.sleep(0.02)  # start-up only: the server gives no readiness signal

    async def kill(self) -> None:
        """``kill -9``: what an OOM kill or a crash does."""
        assert self.proc is not None
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)


async def wait_serving(address: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until ``address`` reports SERVING on grpc.health.v1 (Watch, waiting for the port)."""
    request = health_pb2.HealthCheckRequest(service="")
    async with grpc.aio.insecure_channel(address, options=FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    async for status in stub.Watch(request, wait_for_ready=True):
                        if status.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.aio.AioRpcError as exc:
                    # a process that is still binding its port, or one that drained
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise


@dataclass
class Mesh:
    """Redis, router, gateways and workers for one chaos run."""

    root: Path
    repository: Path
    lease_ms: int
    redis: AofRedis = field(init=False)
    router_address: str = field(init=False)
    router: Service | None = None
    gateway_ports: list[int] = field(default_factory=list)
    gateways: list[Service] = field(default_factory=list)
    workers: list[Service] = field(default_factory=list)  # the live ones
    _started: int = 0

    def __post_init__(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.redis = AofRedis(self.root / "redis")
        self.router_address = f"127.0.0.1:{free_port()}"

    @property
    def gateway_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.gateway_ports]

    def _service(self, role: str, args: Sequence[str]) -> Service:
        self._started += 1
        return Service(role, args, self.root / "logs" / f"{self._started:02d}-{role}.log").start()

    async def start(self, gateways: int, workers: int) -> None:
        await self.redis.start()
        port = self.router_address.rsplit(":", 1)[1]
        self.router = self._service("router", ["--model-repository", str(self.repository), "--port", port])
        self.gateway_ports = [free_port() for _ in range(gateways)]
        self.gateways = [self._start_gateway(port) for port in self.gateway_ports]
        health = [self.start_worker() for _ in range(workers)]
        await asyncio.gather(*(wait_serving(a) for a in [*health, *self.gateway_addresses]))

    def _start_gateway(self, port: int) -> Service:
        args = ["--redis-url", self.redis.url, "--router", self.router_address, "--host", "127.0.0.1"]
        args += ["--grpc-port", str(port), "--metrics-port", str(free_port()), "--processes", "1"]
        return self._service("gateway", args)

    def start_worker(self) -> str:
        """Start one worker; returns its health address."""
        health_port = free_port()
        args = ["--redis-url", self.redis.url, "--router", self.router_address]
        args += ["--model-repository", str(self.repository), "--lease-ms", str(self.lease_ms)]
        args += ["--intra-op-threads", "1", "--health-host", "127.0.0.1", "--health-port", str(health_port)]
        self.workers.append(self._service("worker", args))
        return f"127.0.0.1:{health_port}"

    async def restart_gateway(self, index: int) -> int | None:
        """SIGTERM (it drains its calls), then a new gateway process on the same port;
        returns the old one's exit code."""
        code = await self.gateways[index].stop()
        self.gateways[index] = self._start_gateway(self.gateway_ports[index])
        await wait_serving(self.gateway_addresses[index])
        return code

    def metrics_urls(self) -> list[str]:
        urls = []
        for gateway in self.gateways:
            port = gateway.args[gateway.args.index("--metrics-port") + 1]
            urls.append(f"http://127.0.0.1:{port}/metrics")
        return urls

    async def stop(self) -> list[str]:
        """Gateways first (they drain), then workers, router and Redis; every process reaped.

        Returns the services that did not exit 0 on SIGTERM (an unclean drain).
        """
        services = [*self.gateways, *self.workers]
        codes = await asyncio.gather(*(g.stop() for g in self.gateways))
        codes += await asyncio.gather(*(w.stop() for w in self.workers))
        if self.router is not None:
            services.append(self.router)
            codes.append(await self.router.stop())
        await self.redis.stop()
        return [f"{s.log_path.name} exited {code}" for s, code in zip(services, codes, strict=True) if code != 0]

    def logs(self, role: str) -> list[Path]:
        """Log files of every process of ``role`` this run started, killed ones included."""
        return sorted(self.root.glob(f"logs/*-{role}.log"))


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """From a gateway's /metrics: replies nobody waited for, and calls it answered UNAVAILABLE."""

    late_replies: int
    unavailable_answers: int

    def __add__(self, other: GatewayFigures) -> GatewayFigures:
        return GatewayFigures(
            self.late_replies + other.late_replies, self.unavailable_answers + other.unavailable_answers
        )


async def gateway_figures(url: str) -> GatewayFigures:
    """Scrape one gateway's /metrics (in a thread: urllib blocks)."""

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    page = await asyncio.to_thread(scrape)
    late = re.search(r"^meshserve_late_replies_total (\S+)$", page, re.MULTILINE)
    unavailable = re.findall(r'^meshserve_requests_total\{[^}]*code="UNAVAILABLE"[^}]*\} (\S+)$', page, re.MULTILINE)
    return GatewayFigures(int(float(late.group(1))) if late else 0, sum(int(float(n)) for n in unavailable))


def count_in_logs(paths: Sequence[Path], pattern: str) -> int:
    """Sum of the first number captured by ``pattern`` over every line of ``paths``."""
    regex = re.compile(pattern)
    total = 0
    for path in paths:
        for match in regex.finditer(path.read_text(errors="replace")):
            total += int(match.group(1))
    return total


async def settle(redis: Redis, timeout_s: float) -> tuple[float, list[str], int]:
    """Wait until Redis holds no job, lease or queued entry (polling: nothing signals it).

    Returns the time it took, the keys still left over at the end (empty when settled),
    and how many reply lists remain that expire by themselves.
    """
    started_s = time.monotonic()
    while True:
        leftovers, expiring = await queue_state(redis)
        if not leftovers or time.monotonic() - started_s > timeout_s:
            return time.monotonic() - started_s, leftovers, expiring
        await asyncio.sleep(0.1)  # leases expire and reapers sweep on their own clock


async def queue_state(redis: Redis) -> tuple[list[str], int]:
    """Keys that should not outlive the load, and the count of reply lists with a TTL.

    Allowed: per-model ``fence`` counters, a ``wake`` list with at most one
    token, and reply lists that expire (a restarted gateway's, holding late replies).
    """
    leftovers, expiring = [], 0
    for raw in await redis.keys("ms:*"):
        key = text(raw)
        if key.endswith(":fence"):
            continue
        if key.endswith(":wake") and await redis.llen(key) <= 1:
            continue
        if key.endswith(":replies") and await redis.ttl(key) > 0:
            expiring += 1
            continue
        leftovers.append(key)
    return sorted(leftovers), expiring


def text(value: bytes | str) -> str:
    """A Redis reply as str (clients here do not decode responses: payloads are binary)."""
    return value.decode() if isinstance(value, bytes) else value
