"""The request path's link on a Redis Cluster (or Valkey in cluster mode).

A ``redis+cluster://host:port,host:port/`` URL names seed nodes; :class:`ClusterLink`
is a :class:`~meshserve.store.link.RedisLink` whose commands are routed by hash slot:

- the slot map comes from ``CLUSTER SLOTS`` on any reachable node, and is read again
  on a ``MOVED`` reply (the slot moved: a failover or a resharding) and after a lost
  connection (a master that died: its replica takes its slots);
- one multiplexed :class:`RedisLink` per master node, shared by every caller, so
  hiredis packing and parsing, pipelining and the NOSCRIPT retry stay as they are;
- a pipeline is split by node, its parts written at once and the replies put back in
  order; a MULTI ... EXEC block goes to the node of its keys as one unit;
- ``ASK`` (a slot being migrated) sends ``ASKING`` and the command to the node named;
  a MULTI ... EXEC block redirected so (a queued command answered ASK, so EXEC
  aborted, or EXEC itself answered ASK: either way nothing ran) is replayed whole
  there after one ``ASKING`` before its MULTI, which holds until EXEC (the server
  keeps the flag for a transaction; an ASKING inside the block would be queued and
  its reply land in EXEC's). This is the cluster specification's way; redis-py's
  cluster transactions instead retry the block until the migration ends;
- ``TRYAGAIN`` (a command or a transaction of several keys whose slot is being
  migrated while only some of its keys have moved: the server refuses it, and runs
  nothing) is sent again to the same node after a short wait, for up to
  ``TRYAGAIN_BUDGET_S``, then given to the caller;
- a blocking pop (BLPOP, BLMPOP) whose keys lie in several slots, which a cluster
  refuses as CROSSSLOT, blocks on each slot at once on a connection per slot; the
  first answer wins and the others are woken with ``CLIENT UNBLOCK`` (their
  connections stay open for the next wait). Commands after the pop in the same
  pipeline run after it, as on one server, in the pop's slot's connection when they
  share its slot (a wake-up and its claim: one round trip), else in a second one.

Every key of the request path carries a hash tag (:mod:`meshserve.queue.keys`), so
each script's keys are in one slot. The one script that is not, REPLY_ACK (a
gateway's reply list and a model's leases), is not sent to a cluster: the reply
writer pushes the replies first and acks after (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any, TypeAlias, cast
from urllib.parse import quote, urlsplit

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError

from meshserve.store.link import Arg, Command, ConnectCheck, RedisLink, Script

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SLOTS = 16384
MAX_REDIRECTS = 5
"""MOVED/ASK hops one command may take before the error is given to the caller."""

TRYAGAIN_WAIT_S = (0.005, 0.1)
"""The first wait before a TRYAGAIN is retried, doubling up to the second."""
TRYAGAIN_BUDGET_S = 2.0
"""How long a unit answered TRYAGAIN is retried before the error is the caller's:
a slot's keys are MIGRATEd in batches, so the window is usually milliseconds."""

UNBLOCK_WAIT_S = 1.0
"""How long a slot's pop may take to answer CLIENT UNBLOCK before it is cancelled."""

Unit: TypeAlias = tuple[list[int], tuple[str, int] | None]
"""Indexes of commands sent together (a MULTI ... EXEC block, or one command), and
the node an ASK redirected them to (None: the node of their slot)."""

_KEYLESS = frozenset(
    {b"MULTI", b"EXEC", b"DISCARD", b"SCRIPT", b"PING", b"TIME", b"CLIENT", b"ROLE", b"INFO", b"ASKING"}
)
_BLOCKING = frozenset({b"BLPOP", b"BLMPOP"})


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.startswith(CLUSTER_SCHEMES)


def seed_urls(url: str) -> list[str]:
    """Each seed node of a cluster URL as a plain ``redis://`` (``rediss://``) URL, with
    the URL's credentials and query (TLS options) kept."""
    scheme = "rediss" if url.startswith("rediss+") else "redis"
    parts = urlsplit(scheme + url[url.index("://") :])
    auth, _, hosts = parts.netloc.rpartition("@")
    query = f"?{parts.query}" if parts.query else ""
    return [f"{scheme}://{auth + '@' if auth else ''}{host}/0{query}" for host in hosts.split(",") if host]


def sync_cluster_client(url: str, **kwargs: Any) -> Redis:
    """redis-py's synchronous cluster client on a cluster URL's seeds, for readers off
    the request path (the router's depth scrapes). Typed as ``Redis``: it answers the
    same single-key commands and non-transactional pipelines, routed by slot."""
    seeds = [urlsplit(u) for u in seed_urls(url)]
    first = seeds[0]
    nodes = [ClusterNode(s.hostname or "127.0.0.1", s.port or 6379) for s in seeds]  # type: ignore[no-untyped-call]
    client = SyncRedisCluster(
        startup_nodes=nodes,
        username=first.username,
        password=first.password,
        ssl=first.scheme == "rediss",
        **kwargs,
    )
    return cast(Redis, client)


def async_cluster_client(url: str, **kwargs: Any) -> AsyncRedis:
    """redis-py's asyncio cluster client on a cluster URL's seeds (the router's leader
    lease: single-key commands and one-key scripts). Typed as ``Redis`` likewise."""
    seeds = [urlsplit(u) for u in seed_urls(url)]
    first = seeds[0]
    nodes = [AsyncClusterNode(s.hostname or "127.0.0.1", s.port or 6379) for s in seeds]
    client = AsyncRedisCluster(
        startup_nodes=nodes,
        username=first.username,
        password=first.password,
        ssl=first.scheme == "rediss",
        **kwargs,
    )
    return cast(AsyncRedis, client)


def _name(command: Command) -> bytes:
    head = command[0]
    return (head.encode() if isinstance(head, str) else bytes(head)).upper()  # type: ignore[arg-type]


def command_keys(command: Command) -> Sequence[Arg]:
    """The keys of a request-path command (empty for keyless ones)."""
    name = _name(command)
    if name in (b"EVALSHA", b"EVAL", b"FCALL"):
        return command[3 : 3 + _count(command[2])]
    if name == b"BLPOP":
        return command[1:-1]
    if name in (b"BLMPOP", b"LMPOP"):
        first = 3 if name == b"BLMPOP" else 2
        return command[first : first + _count(command[first - 1])]
    if name in _KEYLESS or len(command) < 2:
        return ()
    return command[1:2]


def _count(arg: Arg) -> int:
    if isinstance(arg, int | str | bytes):
        return int(arg)
    raise TypeError(f"a key count must be a number, not {type(arg).__name__}")


def slot_of(key: Arg) -> int:
    """The key's hash slot (CRC16 of its hash tag, or of the whole key)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))  # type: ignore[arg-type]


def _is_tryagain(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("TRYAGAIN")


def _redirect(reply: Any) -> tuple[str, int, tuple[str, int]] | None:
    """('MOVED' | 'ASK', slot, node) for a redirect reply, else None."""
    if not isinstance(reply, ResponseError):
        return None
    message = str(reply)
    if not message.startswith(("MOVED ", "ASK ")):
        return None
    kind, slot, where = message.split()[:3]
    host, _, port = where.rpartition(":")
    return kind, int(slot), (host, int(port))


class ClusterLink(RedisLink):
    """A :class:`RedisLink` over a cluster's masters; see the module docstring."""

    cluster = True

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        command_timeout_s: float | None = 5.0,
        name: str = "",
        check: ConnectCheck | None = None,
        headed: bool = False,
    ) -> None:
        self._seeds = seed_urls(url)
        if not self._seeds:
            raise ValueError(f"redis_url {url!r} names no cluster node (redis+cluster://host:port,...)")
        super().__init__(
            self._seeds[0],
            connect_timeout_s=connect_timeout_s,
            command_timeout_s=command_timeout_s,
            name=name,
            check=check,
            headed=headed,
        )
        self.url = url
        seed = urlsplit(self._seeds[0])
        self._scheme = seed.scheme
        self._auth = seed.netloc.rpartition("@")[0]
        self._query = f"?{seed.query}" if seed.query else ""
        self._slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._masters: list[tuple[str, int]] = []
        self._nodes: dict[tuple[str, int], RedisLink] = {}
        self._waiters: dict[int, RedisLink] = {}  # blocking pops: one connection per slot
        self._waiter_ids: dict[int, tuple[int, int]] = {}  # slot -> (connections seen, CLIENT ID)
        self._refreshing: asyncio.Task[None] | None = None
        self._shut = False
        self._closing: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------ RedisLink's calls

    @property
    def connections(self) -> int:
        """Connections opened so far, over every node and slot link."""
        return sum(n.connections for n in self._nodes.values()) + sum(w.connections for w in self._waiters.values())

    @connections.setter
    def connections(self, value: int) -> None:
        """RedisLink's constructor sets it; a cluster's count is its links' sum."""

    async def execute(self, *command: Arg) -> Any:
        (reply,) = await self.pipeline([command])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        if _name(commands[0]) in _BLOCKING and self.command_timeout_s is None:
            return await self._blocking_pipeline(commands)
        return await self._routed(commands)

    def pipeline_now(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        """Commands of one node are written before this returns (as ``RedisLink``'s);
        others once the returned awaitable runs."""
        if not commands or not self._masters or _name(commands[0]) in _BLOCKING:
            return asyncio.ensure_future(self.pipeline(commands))
        nodes = {self._unit_node(commands, [i]) for i in range(len(commands))} - {None}
        if len(nodes) != 1:
            return asyncio.ensure_future(self.pipeline(commands))
        (node,) = nodes
        assert node is not None
        return self._follow(commands, self._node(node).pipeline_now(commands))

    async def _follow(self, commands: Sequence[Command], written: Awaitable[list[Any]]) -> list[Any]:
        """The replies of commands written to one node, with redirects followed."""
        try:
            replies = await written
        except ConnectionError:
            if self._shut or not await self._refresh_changed():
                raise
            return await self._routed(commands)
        if any(_redirect(reply) is not None or _is_tryagain(reply) for reply in replies):
            return await self._routed(commands, replies)
        return replies

    async def script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg] = ()) -> Any:
        (reply,) = await self.pipeline([script.call(keys, args)])
        if isinstance(reply, NoScriptError):
            _, reply = await self.pipeline([("SCRIPT", "LOAD", script.body), script.call(keys, args)])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def load(self, script: Script) -> None:
        """Load the script on every master (a pipeline's EVALSHA may go to any)."""
        if not self._masters:
            await self._refresh()
        await asyncio.gather(*(self._node(m).load(script) for m in self._masters))

    async def aclose(self) -> None:
        self._shut = True
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        links = [*self._nodes.values(), *self._waiters.values()]
        await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)

    # ------------------------------------------------------------ routing

    async def _routed(self, commands: Sequence[Command], first: list[Any] | None = None) -> list[Any]:
        """Run the commands on their nodes, following MOVED/ASK, replies in order.
        ``first``: their replies from one node already (``pipeline_now``): only the
        redirected ones are sent again."""
        if not self._masters:
            await self._refresh()
        units: list[Unit] = [(unit, None) for unit in _units(commands)]
        replies: list[Any] = [None] * len(commands) if first is None else first
        todo, waiting = (units, []) if first is None else await self._redirected(replies, units)
        hops = 0
        wait_s, waited_s = TRYAGAIN_WAIT_S[0], 0.0
        while todo or waiting:
            if waiting:
                if waited_s >= TRYAGAIN_BUDGET_S:
                    if not todo:
                        break  # their TRYAGAIN replies are the caller's
                else:
                    await asyncio.sleep(wait_s)
                    waited_s += wait_s
                    wait_s = min(2 * wait_s, TRYAGAIN_WAIT_S[1])
                    todo = sorted([*todo, *waiting], key=lambda each: each[0][0])  # in their order
            try:
                await self._run_units(commands, todo, replies)
            except ConnectionError:
                # A master may be gone and its replica promoted: read the map again and
                # retry (every request-path command is safe to run twice).
                if hops == MAX_REDIRECTS or self._shut or not await self._refresh_changed():
                    raise
                hops += 1
                waiting = []
                continue
            todo, waiting = await self._redirected(replies, todo)
            if todo:
                hops += 1
                if hops > MAX_REDIRECTS:
                    break
        return replies

    async def _redirected(self, replies: list[Any], todo: list[Unit]) -> tuple[list[Unit], list[Unit]]:
        """The units to send again: to the slot's new master after MOVED (the map read
        again), to the node named after ASK (with ASKING); and, apart, those answered
        TRYAGAIN, to the node that answered once a wait is over."""
        again: list[Unit] = []
        waiting: list[Unit] = []
        moved = False
        for unit, sent_to in todo:
            found = next((r for i in unit if (r := _redirect(replies[i])) is not None), None)
            if found is None:
                # answered; or refused while a slot's keys are half moved: TRYAGAIN (a
                # transaction's EXEC, or a script, of several keys; nothing ran).
                # An EXECABORT without a redirect inside is the caller's.
                if any(_is_tryagain(replies[i]) for i in unit):
                    waiting.append((unit, sent_to))
                continue
            kind, slot, where = found
            if kind == "MOVED":
                self._slots[slot] = where
                moved = True
                again.append((unit, None))
            else:
                again.append((unit, where))
        if moved:
            await self._refresh()
        return again, waiting

    async def _run_units(
        self,
        commands: Sequence[Command],
        todo: list[Unit],
        replies: list[Any],
    ) -> None:
        """Group the units by node, one pipeline per node, all at once."""
        groups: dict[tuple[str, int], tuple[list[int], list[Command]]] = {}
        nodes = [ask or self._unit_node(commands, unit) for unit, ask in todo]
        # A keyless command (SCRIPT LOAD before its EVALSHA) goes with the next keyed one.
        following = next((n for n in reversed(nodes) if n is not None), None) or self._masters[0]
        for i in range(len(nodes) - 1, -1, -1):
            following = nodes[i] = nodes[i] or following
        for (unit, ask), node in zip(todo, nodes, strict=True):
            assert node is not None
            indexes, sent = groups.setdefault(node, ([], []))
            if ask is not None:
                # once, before the unit: a MULTI keeps the flag until its EXEC
                sent.append(("ASKING",))
                indexes.append(-1)
            for i in unit:
                sent.append(commands[i])
                indexes.append(i)
        if len(groups) == 1:
            ((node, (indexes, sent)),) = groups.items()
            results = [await self._node(node).pipeline(sent)]
            parts = [indexes]
        else:
            parts = [indexes for indexes, _ in groups.values()]
            results = await asyncio.gather(*(self._node(n).pipeline(s) for n, (_, s) in groups.items()))
        for indexes, result in zip(parts, results, strict=True):
            for i, reply in zip(indexes, result, strict=True):
                if i >= 0:
                    replies[i] = reply

    def _unit_node(self, commands: Sequence[Command], unit: list[int]) -> tuple[str, int] | None:
        """The node of the unit's first key; None for a keyless unit."""
        for i in unit:
            if keys := command_keys(commands[i]):
                return self._slots[slot_of(keys[0])] or self._masters[0]
        return None

    def _node(self, address: tuple[str, int]) -> RedisLink:
        link = self._nodes.get(address)
        if link is None:
            link = self._nodes[address] = self._link_to(address)
        return link

    def _link_to(self, address: tuple[str, int]) -> RedisLink:
        host, port = address
        auth = f"{self._auth}@" if self._auth else ""
        return RedisLink(
            f"{self._scheme}://{auth}{quote(host)}:{port}/0{self._query}",
            connect_timeout_s=self.connect_timeout_s,
            command_timeout_s=self.command_timeout_s,
            name=self.name,
            check=self._check,
            headed=self._headed,
        )

    # ------------------------------------------------------------ the slot map

    async def _refresh(self) -> None:
        """Read the slot map (one reader at a time; callers share a refresh in flight)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_slots())
        await asyncio.shield(self._refreshing)

    async def _refresh_changed(self) -> bool:
        """Read the slot map again; whether any slot's master changed."""
        before = list(self._slots)
        try:
            await self._refresh()
        except RedisError:
            return False
        return self._slots != before

    async def _read_slots(self) -> None:
        error: Exception | None = None
        candidates = [*self._masters, *self._nodes]
        seeds = [urlsplit(u) for u in self._seeds]
        candidates += [(s.hostname or "127.0.0.1", s.port or 6379) for s in seeds]
        for address in dict.fromkeys(candidates):
            try:
                reply = await self._node(address).execute("CLUSTER", "SLOTS")
            except RedisError as exc:
                error = exc
                continue
            slots: list[tuple[str, int] | None] = [None] * SLOTS
            masters: dict[tuple[str, int], None] = {}
            for start, end, master, *_ in reply:
                host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                node = (host or address[0], int(master[1]))
                masters[node] = None
                slots[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
            if not masters:
                error = ConnectionError(f"Redis Cluster node {address[0]}:{address[1]} serves no slots")
                continue
            self._slots, self._masters = slots, list(masters)
            return
        raise ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS (last: {error})")

    # ------------------------------------------------------------ blocking pops

    async def _blocking_pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """A blocking pop first, then the rest once it has answered (see the module docstring)."""
        if not self._masters:
            await self._refresh()
        pop, rest = commands[0], list(commands[1:])
        by_slot: dict[int, list[Arg]] = {}
        for key in command_keys(pop):
            by_slot.setdefault(slot_of(key), []).append(key)
        if len(by_slot) == 1:
            (slot,) = by_slot
            if all(all(slot_of(k) == slot for k in command_keys(c)) for c in rest):
                return await self._waiter_pipeline(slot, commands)
            replies = await self._waiter_pipeline(slot, [pop])
        else:
            replies = [await self._pop_any(pop, by_slot)]
        if rest:
            replies += await self._routed(rest)
        return replies

    async def _waiter_pipeline(self, slot: int, commands: Sequence[Command]) -> list[Any]:
        """Commands of one slot on that slot's blocking connection, following MOVED."""
        for _ in range(MAX_REDIRECTS):
            link = self._waiter(slot)
            try:
                replies = await link.pipeline(commands)
            except ConnectionError:
                if self._shut or not await self._refresh_changed():
                    raise
                continue
            if _redirect(replies[0]) is None:
                return replies
            await self._refresh()
        return replies

    def _waiter(self, slot: int) -> RedisLink:
        """The slot's blocking connection, on the node that serves the slot now."""
        node = self._slots[slot] or self._masters[0]
        link = self._waiters.get(slot)
        if link is not None and urlsplit(link.url).port == node[1] and urlsplit(link.url).hostname == node[0]:
            return link
        if link is not None:  # the slot moved: this connection's node no longer serves it
            self._waiter_ids.pop(slot, None)
            closing = asyncio.ensure_future(link.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        link = self._waiters[slot] = self._link_to(node)
        return link

    async def _pop_any(self, pop: Command, by_slot: dict[int, list[Arg]]) -> Any:
        """One BLPOP per slot at once; the first answer, the others unblocked."""
        if _name(pop) != b"BLPOP":
            raise ResponseError("CROSSSLOT a cluster's BLMPOP must name keys of one slot")
        timeout = pop[-1]
        await asyncio.gather(*(self._know_id(slot) for slot in by_slot))
        tasks = {
            asyncio.ensure_future(self._waiter_pipeline(slot, [("BLPOP", *keys, timeout)])): slot
            for slot, keys in by_slot.items()
        }
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        if pending:
            await self._unblock([tasks[t] for t in pending])
            _, stuck = await asyncio.wait(pending, timeout=UNBLOCK_WAIT_S)
            for task in stuck:  # its connection changed under it: cancelling closes it
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        return await self._first_token(list(tasks))

    async def _first_token(self, tasks: list[asyncio.Future[list[Any]]]) -> Any:
        """The first slot's token (in key order); a second token, popped as the first
        won, is put back; an error only when no slot gave a token."""
        winner: Any = None
        error: BaseException | None = None
        for task in tasks:
            if task.cancelled():
                continue
            if (exc := task.exception()) is not None:
                error = error or exc
                continue
            (reply,) = task.result()
            if isinstance(reply, RedisError):
                error = error or reply
            elif reply is not None and winner is None:
                winner = reply
            elif reply is not None:
                with contextlib.suppress(RedisError):
                    await self.execute("LPUSH", reply[0], reply[1])
        if winner is None and error is not None:
            raise error
        return winner

    async def _know_id(self, slot: int) -> None:
        """The CLIENT ID of the slot's blocking connection (asked once per connection)."""
        link = self._waiter(slot)
        seen = self._waiter_ids.get(slot)
        if seen is not None and seen[0] == link.connections:
            return
        client_id = int(await link.execute("CLIENT", "ID"))
        self._waiter_ids[slot] = (link.connections, client_id)

    async def _unblock(self, slots: list[int]) -> None:
        """End these slots' blocking pops (each answers as if timed out)."""
        calls = []
        for slot in slots:
            known = self._waiter_ids.get(slot)
            if known is not None:
                calls.append(
                    self._node(self._slots[slot] or self._masters[0]).pipeline([("CLIENT", "UNBLOCK", known[1])])
                )
        await asyncio.gather(*calls, return_exceptions=True)


def _units(commands: Sequence[Command]) -> list[list[int]]:
    """The commands' indexes in units sent to one node together: a MULTI ... EXEC
    block is one unit, every other command one of its own."""
    units: list[list[int]] = []
    block: list[int] | None = None
    for i, command in enumerate(commands):
        name = _name(command)
        if name == b"MULTI":
            block = [i]
        elif block is not None:
            block.append(i)
            if name in (b"EXEC", b"DISCARD"):
                units.append(block)
                block = None
        else:
            units.append([i])
    if block is not None:
        units.append(block)
    return units
