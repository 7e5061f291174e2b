"""The request path's RESP reader (meshserve.store.resp): the same replies as hiredis
however the stream is cut into reads, large bulk strings received into a buffer of
their own (at any depth, exactly at the threshold), and a link whose connection is
lost in the middle of a large reply failing its callers and reconnecting."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from meshserve.store.link import RedisLink
from meshserve.store.resp import ProtocolError, RespReader

LARGE = 64  # a small threshold, so that the cases below stay small


def plain(value: Any) -> Any:
    """A reply with memoryviews as bytes and errors as (type, text), to compare with hiredis's."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, hiredis.ReplyError):
        return ("error", str(value))
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def hiredis_replies(stream: bytes) -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(stream)
    replies = []
    while (reply := reader.gets()) is not False:
        replies.append(reply)
    return replies


def receive(reader: RespReader, stream: bytes, cuts: list[int]) -> list[Any]:
    """``stream`` through ``reader`` as a transport would deliver it: each read at most
    the next cut's length and never more than the buffer the reader offers."""
    replies: list[Any] = []
    position, index = 0, 0
    while position < len(stream):
        want = cuts[index % len(cuts)]
        index += 1
        target = reader.buffer()
        size = min(want, len(target), len(stream) - position)
        target[:size] = stream[position : position + size]
        position += size
        replies.extend(reader.received(size))
    return replies


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


BIG = bytes(random.Random(7).getrandbits(8) for _ in range(1000))  # holds CR LF and '$' bytes

STREAM = b"".join(
    [
        b"+OK\r\n",
        b":42\r\n",
        b":-3\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"-ERR wrong kind\r\n",
        bulk(b""),
        bulk(b"small \r\n value"),
        bulk(BIG[: LARGE - 1]),  # one under the threshold: bytes
        bulk(BIG[:LARGE]),  # exactly at it: a buffer of its own
        bulk(BIG),
        array(bulk(b"reply:1"), array(bulk(BIG), bulk(BIG[:LARGE]), b":7\r\n"), b"-NOSCRIPT gone\r\n"),
        array(array(array(bulk(BIG[:300])))),  # the large bulk is the last byte of three arrays
        array(b"*0\r\n", b"$-1\r\n", bulk(BIG[:500])),
        b"+PONG\r\n",
    ]
)


@pytest.mark.parametrize("cuts", [[1], [2], [3], [7], [64], [65], [4096], [1, 500, 2, 13], [10**9]])
def test_replies_equal_hiredis_however_the_stream_is_cut(cuts: list[int]) -> None:
    replies = receive(RespReader(large_bytes=LARGE), STREAM, cuts)
    assert plain(replies) == plain(hiredis_replies(STREAM))


def test_random_cuts_of_many_replies_equal_hiredis() -> None:
    rng = random.Random(16)
    parts = []
    for _ in range(300):
        size = rng.choice([0, 1, LARGE - 1, LARGE, LARGE + 1, 700])
        parts.append(rng.choice([bulk(BIG[:size]), array(bulk(BIG[:size]), b":1\r\n"), b":5\r\n", b"+OK\r\n"]))
    stream = b"".join(parts)
    for _ in range(20):
        cuts = [rng.randint(1, 900) for _ in range(50)]
        assert plain(receive(RespReader(large_bytes=LARGE), stream, cuts)) == plain(hiredis_replies(stream))


def test_a_large_bulk_is_received_into_its_own_buffer_and_a_smaller_one_is_bytes() -> None:
    reader = RespReader(large_bytes=LARGE)
    stream = bulk(BIG[: LARGE - 1]) + array(bulk(b"k"), array(bulk(BIG[:LARGE])))
    small, nested = receive(reader, stream, [5])
    assert type(small) is bytes
    (payload,) = nested[1]
    assert type(payload) is memoryview
    assert payload == BIG[:LARGE]


def test_the_body_of_a_large_bulk_goes_straight_into_the_reply() -> None:
    """After the header, the buffer offered is the reply's own, sized to what is left
    of the body: the transport writes the payload where the caller will read it."""
    reader = RespReader(large_bytes=LARGE)
    head = b"*2\r\n$3\r\nkey\r\n$1000\r\n"
    target = reader.buffer()
    target[: len(head) + 10] = head + BIG[:10]
    assert reader.received(len(head) + 10) == []
    rest = reader.buffer()
    assert len(rest) == 990  # the bulk's remaining body, not the receive buffer
    rest[:] = BIG[10:]
    ((key, payload),) = reader.received(990)  # complete with its body; the CRLF is checked as it comes
    assert key == b"key"
    assert payload == BIG
    assert type(payload) is memoryview
    crlf = reader.buffer()
    crlf[:3] = b"\r\n:"
    assert reader.received(3) == []
    crlf = reader.buffer()
    crlf[:3] = b"1\r\n"
    assert reader.received(3) == [1]


def test_feed_takes_any_buffer_split_anywhere() -> None:
    reader = RespReader(large_bytes=LARGE)
    view = memoryview(STREAM)
    replies: list[Any] = []
    for start in range(0, len(STREAM), 333):
        replies.extend(reader.feed(view[start : start + 333]))
    assert plain(replies) == plain(hiredis_replies(STREAM))


@pytest.mark.parametrize("cut", [1, 1000])
@pytest.mark.parametrize("stream", [b"?what\r\n", b":1\r\n*2\r\n?\r\n", bulk(BIG[:LARGE])[:-2] + b"xx"])
def test_a_stream_that_is_not_resp_is_refused(stream: bytes, cut: int) -> None:
    with pytest.raises((ProtocolError, hiredis.ProtocolError)):
        receive(RespReader(large_bytes=LARGE), stream, [cut])


async def test_large_values_round_trip_through_redis(link: RedisLink, redis: Redis) -> None:
    values = {f"v{size}": random.Random(size).randbytes(size) for size in (0, 1, 1 << 18, (1 << 18) - 1, 3 << 20)}
    await redis.mset(values)
    got = await link.pipeline([("GET", key) for key in values])
    assert [bytes(v) for v in got] == list(values.values())
    assert [type(v) for v in got] == [bytes, bytes, memoryview, bytes, memoryview]  # 256 KiB and over: its own buffer
    await redis.rpush("list", *values.values())
    popped = await link.execute("LMPOP", 1, "list", "LEFT", "COUNT", len(values))
    assert popped[0] == b"list"
    assert [bytes(v) for v in popped[1]] == list(values.values())


async def test_a_connection_lost_in_the_middle_of_a_large_reply_fails_the_call_and_the_next_reconnects() -> None:
    """A server that answers GET with a large reply's header and part of its body, then
    closes: the caller gets ConnectionError (not a truncated value; the link's one retry
    is cut the same way), and the next call reconnects."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while command := await reader.read(65536):
            if b"GET" in command:
                writer.write(b"$4194304\r\n" + b"x" * 300_000)
                await writer.drain()
                break
            writer.write(b"+PONG\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = RedisLink(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(ConnectionError):
            await link.execute("GET", "big")
        assert await link.execute("PING") == b"PONG"
        assert connections == link.connections == 3
    finally:
        await link.aclose()
        server.close()
        await server.wait_closed()
