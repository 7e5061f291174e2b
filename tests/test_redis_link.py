"""The request path's Redis connection on a real server: replies matched to their
callers, pipelines, scripts after a flush, and recovery from a lost connection."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from meshserve.devkit.redis_server import RedisServer, suite_binary_from_env
from meshserve.store.link import Chunks, RedisLink, Script, pack_command

COUNT = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


async def test_concurrent_callers_each_get_their_own_reply(link: RedisLink) -> None:
    keys = [f"k{i}" for i in range(200)]
    await asyncio.gather(*(link.execute("SET", key, i) for i, key in enumerate(keys)))
    values = await asyncio.gather(*(link.execute("GET", key) for key in keys))
    assert values == [str(i).encode() for i in range(200)]


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "sha", 2, "k1", "k2", "id", 0, "PAYLOAD", 1.5, "dev", -3),  # a queue script's shape
        ("SET", "k", "PAYLOAD"),
        ("PAYLOAD",),
        ("HSET", "k", "a", "PAYLOAD", "b", "PAYLOAD", "tail"),
        ("RPUSH", "k", "PAYLOAD", "PAYLOAD"),
    ],
)
def test_a_command_with_chunks_is_packed_as_the_same_command_joined(command: tuple[object, ...]) -> None:
    chunks = Chunks.of([b"\x00head", bytes(range(256)) * 40, memoryview(b"tail")])
    joined = b"".join(bytes(buffer) for buffer in chunks.buffers)
    packed = pack_command(tuple(chunks if arg == "PAYLOAD" else arg for arg in command))  # type: ignore[misc]
    assert not isinstance(packed, bytes)  # the chunks' buffers pass through, never joined
    assert any(buffer is chunk for buffer in packed for chunk in chunks.buffers)
    assert b"".join(bytes(buffer) for buffer in packed) == hiredis.pack_command(
        tuple(joined if arg == "PAYLOAD" else arg for arg in command)  # type: ignore[arg-type]
    )


async def test_chunks_reach_redis_as_one_value_between_plain_arguments(link: RedisLink) -> None:
    chunks = Chunks.of([b"\x00head", bytes(range(256)) * 64])
    assert await link.execute("HSET", "h", "a", chunks, "b", "plain", "c", chunks) == 3
    joined = b"".join(bytes(buffer) for buffer in chunks.buffers)
    assert await link.execute("HMGET", "h", "a", "b", "c") == [joined, b"plain", joined]


async def test_a_pipeline_returns_errors_in_place_and_raises_nothing(link: RedisLink) -> None:
    replies = await link.pipeline([("SET", "s", "text"), ("INCR", "s"), ("RPUSH", "l", "a", "b"), ("LLEN", "l")])
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ResponseError)
    assert replies[2:] == [2, 2]
    with pytest.raises(ResponseError, match="not an integer"):
        await link.execute("INCR", "s")


async def test_a_script_runs_again_after_redis_forgets_it(link: RedisLink, redis: Redis) -> None:
    assert await link.script(COUNT, ["n"], [2]) == 2
    await redis.script_flush()
    assert await link.script(COUNT, ["n"], [3]) == 5
    await redis.script_flush()
    (reply,) = await link.pipeline([COUNT.call(["n"], [1])])
    assert isinstance(reply, NoScriptError)  # by SHA alone inside a pipeline: the caller decides
    await link.load(COUNT)
    assert await link.pipeline([COUNT.call(["n"], [1])]) == [6]


async def test_a_killed_connection_is_replaced_on_the_next_call(link: RedisLink, redis: Redis) -> None:
    await link.execute("CLIENT", "SETNAME", "doomed")
    assert link.connections == 1
    assert await redis.client_kill_filter(_type="normal", skipme=True) >= 1
    assert await link.execute("PING") == b"PONG"  # one retry on a fresh connection
    assert await link.execute("CLIENT", "GETNAME") is None  # it is a new one
    assert link.connections == 2  # the retry hid the reconnect from the caller, not from the count


async def test_pipeline_now_sends_before_its_replies_are_awaited(link: RedisLink, redis: Redis) -> None:
    await link.execute("PING")  # connected: the write happens in the call itself
    replies = link.pipeline_now([("RPUSH", "sent", "a"), ("LLEN", "sent")])
    # Nothing has awaited the replies, yet Redis has the command: a plain
    # pipeline() coroutine would not have written anything by now.
    assert await redis.blpop(["sent"], timeout=5) == (b"sent", b"a")
    assert await replies == [1, 1]


async def test_pipeline_now_on_a_killed_connection_retries_once(link: RedisLink, redis: Redis) -> None:
    await link.execute("PING")
    assert await redis.client_kill_filter(_type="normal", skipme=True) >= 1
    assert await link.pipeline_now([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
    assert link.connections == 2


async def test_pipeline_now_before_any_connection_connects(redis_url: str) -> None:
    link = RedisLink(redis_url)
    try:
        assert await link.pipeline_now([("PING",)]) == [b"PONG"]
    finally:
        await link.aclose()


async def test_a_reply_later_than_the_timeout_fails_the_call_not_the_link(redis_url: str, redis: Redis) -> None:
    link = RedisLink(redis_url, command_timeout_s=0.05)
    try:
        with pytest.raises(TimeoutError):
            await link.execute("BLPOP", "never", 5)  # the server holds it for 5 s
        # The late BLPOP reply would have been read as this call's: the link
        # started over on a new connection instead.
        await redis.rpush("never", "x")
        assert await link.execute("LPOP", "never") == b"x"
    finally:
        await link.aclose()


async def test_cancelling_a_blocking_call_frees_the_link(redis_url: str, redis: Redis) -> None:
    link = RedisLink(redis_url, command_timeout_s=None, name="cancel-me")

    async def blocked_here() -> list[bool]:
        return [c["cmd"] == "blpop" for c in await redis.client_list() if c["name"] == "cancel-me"]

    try:
        waiting = asyncio.ensure_future(link.execute("BLPOP", "wake", 0))
        async with asyncio.timeout(10):  # polls the server's client list: nothing else to await
            while await blocked_here() != [True]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with asyncio.timeout(10):  # the server drops the blocked connection: the link closed it
            while await blocked_here():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await redis.rpush("wake", "token")
        assert await link.execute("BLPOP", "wake", 1) == [b"wake", b"token"]  # on a new connection
    finally:
        await link.aclose()


async def test_a_closed_link_refuses_calls(redis_url: str) -> None:
    link = RedisLink(redis_url)
    assert await link.execute("PING") == b"PONG"
    await link.aclose()
    with pytest.raises(ConnectionError):
        await link.execute("PING")


async def test_a_server_that_is_not_there_is_a_connection_error() -> None:
    link = RedisLink("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await link.execute("PING")


async def test_the_private_server_is_reachable_over_its_unix_socket() -> None:
    with RedisServer(suite_binary_from_env()) as server:
        link = RedisLink(server.socket_url)
        tcp = Redis.from_url(server.url)
        try:
            await link.execute("SET", "where", "socket")
            assert await tcp.get("where") == b"socket"  # one server, two ways in
        finally:
            await link.aclose()
            await tcp.aclose()
