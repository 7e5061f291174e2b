"""A lean Redis connection for the request path: one socket, many callers.

redis-py's asyncio client spends many times more Python per command than the
round trip needs (a connection checked out of a pool, retry and observability
wrappers, two timeout scopes). A request crosses Redis five times, so that cost
would be most of the gateway's and the worker's own CPU per request.
``RedisLink`` keeps what the hot path needs and nothing else:

- one connection, multiplexed: every caller's command is written at once and
  the replies come back in order (Redis answers a connection in order), so
  concurrent callers in one loop iteration share a write and a read;
- commands packed by hiredis (C), the parser redis-py itself uses when it is
  installed; replies parsed by hiredis too, except that a large bulk string (a
  payload) is received straight into a buffer of its own (:mod:`meshserve.store.resp`);
- pipelines (several commands, one write, replies in place, errors as values);
- a large argument as :class:`Chunks` (buffers that make one bulk string), written
  as they are, never joined or copied into a packed command;
- Lua scripts by SHA with a load-and-retry on NOSCRIPT (a restarted Redis);
- a lost connection fails the calls in flight with redis-py's ``ConnectionError``
  and the next call reconnects; a reply later than ``command_timeout_s`` means
  the stream can no longer be trusted, so the connection is closed;
- a READONLY, LOADING or MASTERDOWN reply (a server that is, or is becoming, a
  replica: what a failover leaves behind) closes the connection the same way, so
  that the retry reconnects, asking the link's resolver (a
  ``redis+sentinel://`` URL's sentinels, :mod:`meshserve.store.sentinel`) where
  the master is now; a resolved connection is refused unless ROLE says master.

The errors are redis-py's classes, so callers keep catching ``RedisError``.
Everything else (admin commands, the router's scrapes, tests) uses redis-py.
A blocking command (BLPOP, BLMPOP) holds its connection, so it gets a link of
its own, created with ``command_timeout_s=None``; cancelling a call on such a
link closes the connection, since the server would keep it blocked.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import hiredis
from redis.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from meshserve.store.resp import ProtocolError, RespReader
from meshserve.store.sentinel import Resolver, SentinelTarget, is_sentinel_url


@dataclass(frozen=True, slots=True)
class Chunks:
    """One argument made of several buffers (bytes, memoryviews, numpy arrays: anything
    contiguous with the buffer protocol), sent as one bulk string without joining them:
    a request's tensors go to Redis from the buffers they arrived in."""

    buffers: tuple[Any, ...]
    nbytes: int

    @classmethod
    def of(cls, buffers: Sequence[Any]) -> Chunks:
        views = tuple(memoryview(b).cast("B") for b in buffers)
        return cls(views, sum(len(v) for v in views))


Arg: TypeAlias = bytes | str | int | float | Chunks
Command: TypeAlias = Sequence[Arg]
ConnectCheck: TypeAlias = tuple[Command, Callable[[Any], None]]
"""A command run on every new connection, in its handshake, and a function given its
reply (an error reply as a ``RedisError`` value) that raises to refuse the connection."""


@dataclass(frozen=True)
class Script:
    """A Lua script known by its SHA1; the body is sent only after NOSCRIPT."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())

    def call(self, keys: Sequence[Arg], args: Sequence[Arg] = ()) -> tuple[Arg, ...]:
        """The EVALSHA command, to run alone or inside a pipeline."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def as_redis_error(reply: hiredis.ReplyError) -> RedisError:
    """An error reply as redis-py's exception class for it (NOSCRIPT, auth, the rest).

    Replies are converted in place at the top level; a transaction's EXEC array
    holds its commands' errors unconverted, for the caller to pass through this."""
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    return ResponseError(message)


NOT_MASTER_REPLIES = ("READONLY", "LOADING", "MASTERDOWN")
"""Error replies that say this server cannot take the request path's writes now,
though another (the master after a failover) may: the connection is given up."""


class _Pending:
    """A caller waiting for ``count`` replies, in order."""

    __slots__ = ("count", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []


class _Protocol(asyncio.BufferedProtocol):
    """The replies are read by :class:`~meshserve.store.resp.RespReader`: the transport
    receives into its buffers, a large bulk string (a payload) straight into the one
    that becomes the reply, with no copy by a parser."""

    def __init__(self, headed: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        # Python 3.11's get_running_loop makes a getpid system call each time: once here, not per command
        self.loop = asyncio.get_running_loop()
        self.reader = RespReader(headed=headed)
        self.pending: collections.deque[_Pending] = collections.deque()
        self.closed = False
        self.lost = asyncio.Event()  # set once the transport has closed its socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            replies = self.reader.received(nbytes)
        except (ProtocolError, hiredis.ProtocolError, ValueError) as exc:
            self.abort(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        pending = self.pending
        for reply in replies:
            if not pending:  # a reply no one asked for: the stream is out of step
                self.abort(ConnectionError("unexpected reply from Redis"))
                return
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith(NOT_MASTER_REPLIES):
                    self.abort(ConnectionError(f"Redis is not the master now ({reply}): reconnecting"))
                    return
                reply = as_redis_error(reply)
            waiter = pending[0]
            waiter.replies.append(reply)
            if len(waiter.replies) == waiter.count:
                pending.popleft()
                if not waiter.future.done():  # a cancelled caller's replies are read and dropped
                    waiter.future.set_result(waiter.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost.set()
        error = ConnectionError(f"connection to Redis lost: {exc}" if exc else "connection to Redis closed")
        while self.pending:
            waiter = self.pending.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def abort(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            waiter = self.pending.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)


class RedisLink:
    """One multiplexed connection to Redis; see the module docstring."""

    cluster = False
    """True for :class:`meshserve.store.cluster.ClusterLink`: no script may touch two slots."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        command_timeout_s: float | None = 5.0,
        name: str = "",
        check: ConnectCheck | None = None,
        resolver: Resolver | None = None,
        headed: bool = False,
    ) -> None:
        """``resolver``: asked for the address on every connect (the URL's host and
        port are then unused); a ``redis+sentinel://`` URL brings its own. ``headed``:
        large bulk strings that start with a head are returned as
        :class:`~meshserve.store.resp.HeadedBulk` (the gateway's reply link)."""
        self.url = url
        self._check = check
        self._headed = headed
        if is_sentinel_url(url):
            target = SentinelTarget.parse(url)
            self._options: dict[str, Any] = target.options
            resolver = resolver or target.resolve
        else:
            self._options = parse_url(url)  # type: ignore[no-untyped-call]
        self._resolver = resolver
        self._address: tuple[str, int] | None = None  # the resolver's last answer
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.name = name
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self.connections = 0
        """Connections opened so far. A reconnect can hide inside a call's retry, so a
        caller that must know of one (the server may have restarted without its data)
        compares this count."""

    # ------------------------------------------------------------ commands

    async def execute(self, *command: Arg) -> Any:
        """Run one command; a Redis error reply raises."""
        (reply,) = await self._send([command], retry=True)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Run several commands in one write; error replies come back as values
        (``ResponseError`` instances) in their places, like redis-py's
        ``execute(raise_on_error=False)``."""
        if not commands:
            return []
        return await self._send(commands, retry=True)

    def pipeline_now(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        """``pipeline``, with the commands written before this returns (when the
        connection is up) rather than when the awaitable first runs: a caller that
        goes on with other work, awaiting the replies later, has them on the wire
        already instead of behind that work."""
        protocol = self._protocol
        if not commands or protocol is None or protocol.closed:
            return self.pipeline(commands)
        return self._replies_of(commands, protocol, self._write(protocol, commands))

    async def script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg] = ()) -> Any:
        """EVALSHA; on NOSCRIPT (Redis restarted or flushed its scripts), load the
        script and run it again."""
        (reply,) = await self._send([script.call(keys, args)], retry=True)
        if isinstance(reply, NoScriptError):
            _, reply = await self._send([("SCRIPT", "LOAD", script.body), script.call(keys, args)], retry=False)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def load(self, script: Script) -> None:
        """Load a script now, so that pipelines may call it by SHA from the start."""
        await self.execute("SCRIPT", "LOAD", script.body)

    async def aclose(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is None or protocol.transport is None:
            return
        protocol.transport.close()
        # Closed when this returns: over TLS, closing is an exchange with the server
        # (close_notify) that would otherwise still be under way, or cut off with its
        # socket left open if the loop stopped first.
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await protocol.lost.wait()
        except TimeoutError:
            protocol.transport.abort()

    # ------------------------------------------------------------ plumbing

    async def _send(self, commands: Sequence[Command], *, retry: bool) -> list[Any]:
        """Write the commands, await their replies. One retry on a connection that
        was found dead: after a Redis restart the old socket fails once. Every
        command the request path sends is safe to run twice (the queue's scripts
        are idempotent by job id and lease token)."""
        try:
            return await self._round_trip(commands)
        except ConnectionError:
            if not retry or self._closed:
                raise
            return await self._round_trip(commands)

    async def _replies_of(
        self, commands: Sequence[Command], protocol: _Protocol, future: asyncio.Future[list[Any]]
    ) -> list[Any]:
        """The replies to commands written already; on a dead connection, ``_send``'s one retry."""
        try:
            return await self._wait(protocol, future)
        except ConnectionError:
            if self._closed:
                raise
            return await self._round_trip(commands)

    async def _round_trip(self, commands: Sequence[Command]) -> list[Any]:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await self._wait(protocol, self._write(protocol, commands))

    def _write(self, protocol: _Protocol, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Queue the commands' reply slot and write them; the future gets the replies."""
        assert protocol.transport is not None
        future: asyncio.Future[list[Any]] = protocol.loop.create_future()
        protocol.pending.append(_Pending(future, len(commands)))
        if len(commands) == 1:
            packed = pack_command(commands[0])
            if isinstance(packed, bytes):
                protocol.transport.write(packed)
            else:
                protocol.transport.writelines(packed)
        else:
            protocol.transport.writelines(_pack_all(commands))
        return future

    async def _wait(self, protocol: _Protocol, future: asyncio.Future[list[Any]]) -> list[Any]:
        if self.command_timeout_s is None:
            try:
                return await future
            except asyncio.CancelledError:
                # The server still holds a blocking command; nothing else could use
                # this connection until it ends.
                protocol.abort(ConnectionError("blocking call cancelled"))
                raise
        # A timer that fails the connection, not asyncio.timeout: the replies' future then
        # raises the timeout itself. About 1 µs a round trip against 4 for a timeout
        # scope (uvloop, 2-core development machine); every request crosses it twice.
        expiry = protocol.loop.call_later(self.command_timeout_s, self._expire, protocol)
        try:
            return await future
        finally:
            expiry.cancel()

    def _expire(self, protocol: _Protocol) -> None:
        """No reply within ``command_timeout_s``: the stream can no longer be trusted."""
        protocol.abort(RedisTimeoutError(f"no reply from Redis in {self.command_timeout_s:g} s"))

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise ConnectionError("link closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and not protocol.closed:
                return protocol  # another caller connected while this one waited
            opened: _Protocol | None = None
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    opened = await self._open()
                    await self._handshake(opened)
                if self._closed:  # aclose() ran while this connected: nobody would close it
                    raise ConnectionError("link closed")
            except BaseException as exc:
                if opened is not None:
                    opened.abort(ConnectionError("connection abandoned"))
                if isinstance(exc, OSError | TimeoutError):
                    raise ConnectionError(f"cannot connect to Redis at {self._where()}: {exc!r}") from exc
                raise
            self._protocol = opened
            self.connections += 1
            return opened

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        headed = self._headed

        def made() -> _Protocol:
            return _Protocol(headed)

        if self._resolver is not None:
            self._address = host, port = await self._resolver()
            _, protocol = await loop.create_connection(made, host, port)
        elif "path" in options:
            _, protocol = await loop.create_unix_connection(made, options["path"])
        else:
            context = _ssl_context(options) if self.url.startswith("rediss://") else None
            _, protocol = await loop.create_connection(
                made, options.get("host", "localhost"), int(options.get("port", 6379)), ssl=context
            )
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        """AUTH, SELECT, CLIENT SETNAME and the link's check, pipelined, before anyone
        else may use it; the check's error refuses the connection (every call fails
        with it until a connection passes)."""
        commands = self._handshake_commands()
        if not commands:
            return
        assert protocol.transport is not None
        future: asyncio.Future[list[Any]] = protocol.loop.create_future()
        protocol.pending.append(_Pending(future, len(commands)))
        protocol.transport.writelines(_pack_all(commands))
        replies = await future
        if self._resolver is not None:
            *replies, role = replies
            self._check_master(protocol, role)
        if self._check is not None:
            *replies, checked = replies
        for reply in replies:
            if isinstance(reply, RedisError):
                protocol.abort(reply)
                raise reply
        if self._check is not None:
            try:
                self._check[1](checked)
            except RedisError as exc:
                protocol.abort(exc)
                raise

    def _handshake_commands(self) -> list[tuple[Arg, ...]]:
        options = self._options
        commands: list[tuple[Arg, ...]] = []
        if options.get("password") is not None:
            user = options.get("username")
            commands.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db", 0) or 0):
            commands.append(("SELECT", int(options["db"])))
        if self.name:
            commands.append(("CLIENT", "SETNAME", self.name))
        if self._check is not None:
            commands.append(tuple(self._check[0]))
        if self._resolver is not None:
            # A sentinel's answer may be a moment old (the master just demoted):
            # ask the server itself before anyone writes to it.
            commands.append(("ROLE",))
        return commands

    def _check_master(self, protocol: _Protocol, role: Any) -> None:
        """Refuse a resolved connection to a server whose ROLE is not master."""
        if isinstance(role, RedisError) or not role or role[0] != b"master":
            error = ConnectionError(f"Redis at {self._where()} is not the master (ROLE: {role!r})")
            protocol.abort(error)
            raise error

    def _where(self) -> str:
        if self._resolver is not None:
            return f"{self._address[0]}:{self._address[1]}" if self._address else "(not resolved yet)"
        options = self._options
        return options.get("path") or f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


def pack_command(command: Command) -> bytes | list[Any]:
    """The command in RESP: one bytes object (hiredis), or a list of buffers when an
    argument is :class:`Chunks` (hiredis refuses those, so plain commands pay nothing)."""
    try:
        packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]  # the stub wants a 1-tuple
    except TypeError:
        if not any(isinstance(arg, Chunks) for arg in command):
            raise
        return _pack_chunked(command)
    return packed


def _pack_all(commands: Sequence[Command]) -> list[Any]:
    buffers: list[Any] = []
    for command in commands:
        packed = pack_command(command)
        if isinstance(packed, bytes):
            buffers.append(packed)
        else:
            buffers.extend(packed)
    return buffers


def _pack_chunked(command: Command) -> list[Any]:
    """RESP for a command with :class:`Chunks` arguments: their buffers are passed
    through between the framing bytes (a transport's ``writelines`` sends them as
    they are on uvloop; asyncio's own loop joins them once). The plain arguments
    between them are packed by hiredis a run at a time, not one by one: a queue
    script's twenty arguments cost one call instead of twenty (about 20 µs of a
    large request's enqueue)."""
    buffers: list[Any] = []
    head = [b"*%d\r\n" % len(command)]
    start = 0
    for index, arg in enumerate(command):
        if not isinstance(arg, Chunks):
            continue
        if index > start:
            head.append(_pack_run(command[start:index]))
        head.append(b"$%d\r\n" % arg.nbytes)
        buffers.append(b"".join(head))
        buffers.extend(arg.buffers)
        head = [b"\r\n"]
        start = index + 1
    if start < len(command):
        head.append(_pack_run(command[start:]))
    buffers.append(b"".join(head))
    return buffers


def _pack_run(args: Sequence[Arg]) -> bytes:
    """Plain arguments in RESP, without the array header hiredis puts before them."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # the stub wants a 1-tuple
    return packed[packed.index(b"\n") + 1 :]


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """TLS as redis-py reads a rediss:// URL: ssl_ca_certs, ssl_ca_path, ssl_certfile,
    ssl_keyfile, ssl_password, ssl_cert_reqs (none | optional | required) and
    ssl_check_hostname from the query. Hostnames are checked unless
    ssl_check_hostname=false or ssl_cert_reqs=none, as redis-py does: the router's
    client and the request path's links must take the same URL the same way."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"), capath=options.get("ssl_ca_path"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"), options.get("ssl_password"))
    if options.get("ssl_check_hostname") is False:  # parse_url makes "false", "no", "0" False
        context.check_hostname = False
    requirement = str(options.get("ssl_cert_reqs") or "required").lower()
    if requirement == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif requirement == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
