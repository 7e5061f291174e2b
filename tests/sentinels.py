"""A Sentinel-managed Redis on loopback: a master, a replica and three sentinels,
all from the suite's server binary (``redis-server --sentinel`` is the same program),
with a quick failover: the master is held down after ``DOWN_AFTER_MS`` without an
answer, and two of the three sentinels agree on it."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from redis.asyncio import Redis
from redis.exceptions import RedisError

from meshserve.devkit.redis_server import RedisServer, free_port, suite_binary_from_env

MASTER_NAME = "queues"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2


class Sentinels:
    """Start with ``with``; ``url`` is the mesh's ``redis+sentinel://`` URL."""

    def __init__(self, count: int = 3) -> None:
        self.master = RedisServer(suite_binary_from_env())
        self.replica = RedisServer(
            suite_binary_from_env(), extra_args=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self.ports = [free_port() for _ in range(count)]
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}?db=0"

    def __enter__(self) -> Sentinels:
        self.master.start()
        self.replica.start()
        self._dir = tempfile.TemporaryDirectory(prefix="meshserve-sentinel-")
        for port in self.ports:
            config = Path(self._dir.name) / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\nlogfile {self._dir.name}/sentinel-{port}.log\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            )
            self._procs.append(
                subprocess.Popen(
                    [str(self.master.binary), str(config), "--sentinel"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()
        self.replica.stop()
        self.master.stop()
        if self._dir is not None:
            self._dir.cleanup()

    async def masters(self) -> list[int | None]:
        """The master's port as each sentinel names it now (None: not answering)."""
        ports: list[int | None] = []
        for port in self.ports:
            try:
                async with Redis(host="127.0.0.1", port=port, socket_timeout=0.5) as sentinel:
                    host_port = await sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                ports.append(int(host_port[1]) if host_port else None)
            except (OSError, RedisError):
                ports.append(None)
        return ports

    async def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until every sentinel knows the replica and the other sentinels (what a
        failover needs); they learn them by INFO and hello messages, every 1-2 s."""
        async with asyncio.timeout(timeout_s):
            while not await self._ready():  # noqa: ASYNC110 - sentinels signal nothing
                await asyncio.sleep(0.1)

    async def _ready(self) -> bool:
        for port in self.ports:
            try:
                async with Redis(host="127.0.0.1", port=port, socket_timeout=0.5) as sentinel:
                    state = (await sentinel.sentinel_masters()).get(MASTER_NAME)
                    replicas = await sentinel.sentinel_slaves(MASTER_NAME)
            except (OSError, RedisError):
                return False
            if not state or state["num-other-sentinels"] < len(self.ports) - 1 or not replicas:
                return False
            if not any(replica["master-link-status"] == "ok" for replica in replicas):
                return False
        return True

    async def wait_failover(self, timeout_s: float = 20.0) -> float:
        """Until every sentinel names the replica as master; the seconds it took."""
        started = time.monotonic()
        async with asyncio.timeout(timeout_s):
            while await self.masters() != [self.replica.port] * len(self.ports):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return time.monotonic() - started
