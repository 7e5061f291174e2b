"""A Redis Cluster on loopback for tests and benchmarks: M masters with a replica each,
``cluster-enabled yes``, from the same server binary as :class:`RedisServer`.

``redis-cli --cluster create`` is not shipped with the bundled server, so the cluster
is formed with plain commands: CLUSTER MEET, ADDSLOTSRANGE (the slots split evenly
over the masters) and REPLICATE. ``node_timeout_ms`` is low so that a master killed
with SIGKILL fails over to its replica within about two seconds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from meshserve.devkit.redis_server import RedisServer, RedisServerError, free_port

SLOTS = 16384


class RedisCluster:
    """Start with ``with`` (or :meth:`start`); ``url`` is the mesh's ``redis+cluster://`` URL."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        form_timeout_s: float = 20.0,
    ) -> None:
        self.form_timeout_s = form_timeout_s
        self.nodes = [
            RedisServer(
                binary,
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # A replica takes over however stale it is: tests kill masters.
                    "--cluster-replica-validity-factor",
                    "0",
                ),
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.masters = self.nodes[:masters]
        self.replicas = self.nodes[masters:]
        self._replica_count = replicas

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.masters) + "/"

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self, node: RedisServer) -> Redis:
        return Redis(host="127.0.0.1", port=node.port, socket_timeout=2.0)

    def role(self, node: RedisServer) -> bytes:
        """'master' or 'slave', as the node says now."""
        return bytes(self._ask(node, "ROLE")[0])

    def _ask(self, node: RedisServer, *command: str | int) -> Any:
        return self.client(node).execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    def master_of_slot(self, slot: int) -> RedisServer:
        """The node that serves ``slot`` now (asked of any live node)."""
        for node in self.nodes:
            if node.pid is None:
                continue
            try:
                for start, end, master, *_ in self._ask(node, "CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(master[1]))
            except RedisError:
                continue
        raise RedisServerError(f"no live node knows who serves slot {slot}")

    def _form(self) -> None:
        for node in self.nodes[1:]:
            self._ask(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", node.port, self._bus_port(node))
        count = len(self.masters)
        for i, node in enumerate(self.masters):
            start, end = i * SLOTS // count, (i + 1) * SLOTS // count - 1
            self._ask(node, "CLUSTER", "ADDSLOTSRANGE", start, end)
        self._wait(lambda c: len(_raw(_call(c, "CLUSTER", "NODES")).strip().splitlines()) == len(self.nodes))
        ids = [bytes(self._ask(m, "CLUSTER", "MYID")).decode() for m in self.masters]
        for i, replica in enumerate(self.replicas):
            master_id = ids[i % count]
            self._wait_one(replica, functools.partial(_knows, master_id=master_id))
            self._ask(replica, "CLUSTER", "REPLICATE", master_id)
        self._wait(lambda c: b"cluster_state:ok" in _raw(_call(c, "CLUSTER", "INFO")))
        self._wait(lambda c: _raw(_call(c, "CLUSTER", "NODES")).count(b"slave") == len(self.replicas))
        for replica in self.replicas:
            self._wait_one(replica, lambda c: c.info("replication").get("master_link_status") == "up")

    def _bus_port(self, node: RedisServer) -> int:
        args = node.extra_args
        return int(args[args.index("--cluster-port") + 1])

    def _wait(self, ready: Callable[[Redis], bool]) -> None:
        for node in self.nodes:
            self._wait_one(node, ready)

    def _wait_one(self, node: RedisServer, ready: Callable[[Redis], bool]) -> None:
        """Poll until ``ready(client)`` (forming a cluster has no event to wait on)."""
        client = self.client(node)
        deadline = time.monotonic() + self.form_timeout_s
        while time.monotonic() < deadline:
            try:
                if ready(client):
                    return
            except RedisError:
                pass
            time.sleep(0.05)
        raise RedisServerError(f"Redis Cluster did not form in {self.form_timeout_s:g} s (node :{node.port})")

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _knows(client: Redis, master_id: str) -> bool:
    """Whether the node has heard of the master (gossip), so it may replicate it."""
    return master_id.encode() in _raw(_call(client, "CLUSTER", "NODES"))


def _call(client: Redis, *command: str) -> Any:
    return client.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


def _raw(reply: object) -> bytes:
    return reply if isinstance(reply, bytes) else str(reply).encode()
