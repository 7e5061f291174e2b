"""A RESP2 reply reader that receives large bulk strings straight into their own buffer.

hiredis, fed what the socket delivered, holds a large reply in its own buffer and then
copies it into a new ``bytes``: the process holds the payload twice, and the copy
into fresh memory costs about 10 ms at 16 MiB. :class:`RespReader` reads the
replies' framing itself; once a bulk string's length is known and it is at least
``large_bytes`` long, it allocates one buffer of that length, moves in what was
read of it already, and hands the rest of that buffer to the transport to receive
into (:meth:`RespReader.buffer`, as a ``BufferedProtocol``'s ``get_buffer``): the
payload is written once, by the kernel, and the reply is a memoryview of that buffer.

The buffer is numpy's ``empty`` (malloc, which leaves a large block's pages
untouched, with transparent huge pages asked for), not a ``bytearray``, which zeroes
its memory: on the event loop's thread that would be one pass over the whole payload
at once (8-60 ms at 64 MiB on the 2-core development VM). Untouched, each page is
faulted in by the read that fills it, a socket buffer's worth per loop iteration.

Replies are what ``hiredis.Reader()`` gives (RESP2): bytes for simple and bulk strings,
int, None for a nil bulk or array, lists for arrays, ``hiredis.ReplyError`` for
errors, at any depth; a large bulk string is a writable ``memoryview`` (format ``B``)
instead of bytes: ``len``, slicing, ``bytes()``, comparison with bytes,
``np.frombuffer`` and protobuf's parsing take it as they take bytes; hashing does not.

Headed bulk strings (``RespReader(headed=True)``, the gateway's reply link): a large
bulk string that starts with byte ``HEADED_MARKER`` and a 4-byte little-endian length
``n`` (at most ``MAX_HEAD_BYTES``) is returned as a :class:`HeadedBulk`: its ``n`` bytes of head, and the rest
received straight into a ``bytes`` object of its own. A worker lays a reply out so
that this rest is the client's serialized response (meshserve/wire/envelope.py),
which the gateway hands to gRPC as it is: grpc-python sends only ``bytes``, and a
``bytes`` object cannot otherwise be written into without a copy. The object is
created uninitialized (``PyBytes_FromStringAndSize(NULL, n)``, through ctypes: malloc,
its pages untouched, as numpy's ``empty``) and its memory filled through a ctypes
view before anything else sees it, as C code builds a ``bytes``; it is never
changed after the reply is returned. A bulk that starts otherwise, or whose head
length does not fit in it, is read as any other.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, NamedTuple

import hiredis
import numpy as np

LARGE_BULK_BYTES = 256 * 1024
"""Bulk strings of at least this many bytes are received into a buffer of their own."""

RECEIVE_BYTES = 256 * 1024
"""The receive buffer for everything else (framing, small replies)."""


HEADED_MARKER = 0x01
"""The first byte of a headed bulk string (no protobuf message starts with it: field 0
does not exist)."""

HEAD_PREFIX = struct.Struct("<BI")
"""A headed bulk string's first bytes: ``HEADED_MARKER``, the head's length in bytes."""


MAX_HEAD_BYTES = RECEIVE_BYTES
"""A head longer than this is not taken for one (heads are a few hundred bytes): the
bulk string is read whole."""


class ProtocolError(Exception):
    """The stream is not RESP: the connection can no longer be trusted."""


class HeadedBulk(NamedTuple):
    """A headed bulk string, as a reader with ``headed=True`` returns it (see the
    module docstring): the bytes after the prefix, cut at the head's length."""

    head: bytes
    body: bytes


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object


def empty_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` object of ``size`` (> 1) bytes, uninitialized, and a writable view
    of its memory. The caller fills it through the view before anyone else sees the
    object, and never writes to it after (see the module docstring)."""
    if size < 2:  # CPython shares its objects of length 0 and 1
        raise ValueError(f"empty_bytes needs at least 2 bytes, not {size}")
    value = _new_bytes(None, size)
    address = ctypes.cast(ctypes.c_char_p(value), ctypes.c_void_p).value
    return value, memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")  # type: ignore[arg-type]


_NEVER = 1 << 62  # a length no bulk string has

_WHOLE, _PREFIX, _HEAD, _BODY = range(4)
"""What a large bulk's current buffer receives: the whole bulk (a plain one), or the
prefix, the head or the body of a headed one."""


class RespReader:
    """Parses a stream of RESP2 replies; see the module docstring.

    Feed it either by :meth:`feed` (any buffer), or by writing into :meth:`buffer`
    and calling :meth:`received`. :meth:`replies` returns the replies completed so far.
    """

    __slots__ = (
        "_body",
        "_bulk",
        "_crlf",
        "_fast",
        "_filled",
        "_head",
        "_length",
        "_need",
        "_pieces",
        "_pieces_len",
        "_receive",
        "_stack",
        "_stage",
        "headed",
        "large_bytes",
    )

    def __init__(self, large_bytes: int = LARGE_BULK_BYTES, *, headed: bool = False) -> None:
        self.large_bytes = large_bytes
        self.headed = headed
        self._receive = bytearray(RECEIVE_BYTES)
        self._pieces: list[bytes] = []  # unparsed bytes, in order
        self._pieces_len = 0
        self._need = 1  # bytes the parse needs before it can go on
        self._stack: list[list[Any]] = []  # arrays under way: [items, remaining]
        self._bulk: memoryview | None = None  # the buffer a large bulk string is being received into
        self._filled = 0
        self._stage = _WHOLE  # what ``_bulk`` receives
        self._length = 0  # the large bulk's length
        self._head = b""  # a headed bulk's head, once read
        self._body = b""  # and the bytes object its body is received into
        self._crlf = 0  # the bulk's trailing CRLF bytes still to skip
        self._fast = hiredis.Reader()  # for reads of whole small replies

    # ------------------------------------------------------------ input

    def buffer(self) -> memoryview:
        """Where the next bytes should go: the rest of a large bulk string, or the receive buffer."""
        if self._bulk is not None:
            return memoryview(self._bulk)[self._filled :]
        return memoryview(self._receive)

    def received(self, nbytes: int) -> list[Any]:
        """``nbytes`` were written at the start of :meth:`buffer`; the replies completed."""
        if self._bulk is not None:
            return self._bulk_received(nbytes)
        if nbytes < self.large_bytes and not self._pieces and not self._stack and not self._crlf:
            return self._hiredis(nbytes)
        return self._take(bytes(memoryview(self._receive)[:nbytes]))

    def _hiredis(self, nbytes: int) -> list[Any]:
        """The replies in the receive buffer's first ``nbytes``, which start a reply, parsed by hiredis when they are
        all complete in it (the common case: a fraction of a microsecond a reply, where
        the walk here costs several). hiredis is at a reply boundary after them exactly
        when nothing is left in its buffer and a reply fed after them (``+``, an empty
        simple string) comes back alone: not as an element of an array under way, nor
        read as the rest of a reply whose type byte hiredis had taken already. Any
        other ending (a reply cut by the read, a large bulk string starting) is parsed
        here again from the start, hiredis's answer dropped."""
        reader = self._fast
        reader.feed(self._receive, 0, nbytes)  # type: ignore[arg-type]  # takes any buffer
        replies: list[Any] = []
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        if not reader.has_data():
            reader.feed(b"+\r\n")
            try:
                marker = reader.gets()
            except hiredis.ProtocolError:  # hiredis had read a reply's type byte
                marker = None
            if isinstance(marker, bytes) and not marker:
                return replies
        self._fast = hiredis.Reader()
        return self._take(bytes(memoryview(self._receive)[:nbytes]))  # the completed ones again, and the rest

    def feed(self, data: Any) -> list[Any]:
        """Take ``data`` (any buffer); the replies completed."""
        view = memoryview(data).cast("B")
        replies: list[Any] = []
        while len(view):
            if self._bulk is not None:
                take = min(len(view), len(self._bulk) - self._filled)
                self._bulk[self._filled : self._filled + take] = view[:take]
                view = view[take:]
                replies.extend(self._bulk_received(take))
            else:
                replies.extend(self._take(bytes(view)))
                break
        return replies

    def _bulk_received(self, nbytes: int) -> list[Any]:
        assert self._bulk is not None
        self._filled += nbytes
        if self._filled < len(self._bulk) or not self._next_buffer():
            return []
        replies: list[Any] = []
        self._finish_bulk(replies)
        return replies + self._parse()

    def _next_buffer(self) -> bool:
        """The current buffer of a large bulk is full: True when the bulk is complete,
        else the next buffer is set (a headed bulk's head, then its body)."""
        stage = self._stage
        if stage == _WHOLE:
            return True
        if stage == _PREFIX:
            assert self._bulk is not None
            marker, head_bytes = HEAD_PREFIX.unpack(self._bulk)
            rest = self._length - HEAD_PREFIX.size
            if marker != HEADED_MARKER or head_bytes > min(rest, MAX_HEAD_BYTES):  # not headed: read whole
                whole = np.empty(self._length, dtype=np.uint8).data
                whole[: HEAD_PREFIX.size] = self._bulk
                self._set_buffer(whole, _WHOLE, HEAD_PREFIX.size)
                return self._length == HEAD_PREFIX.size
            self._set_buffer(memoryview(bytearray(head_bytes)), _HEAD)
            if head_bytes:
                return False
            stage = _HEAD
        if stage == _HEAD:
            assert self._bulk is not None
            self._head = bytes(self._bulk)
            body_bytes = self._length - HEAD_PREFIX.size - len(self._head)
            if body_bytes >= 2:
                self._body, view = empty_bytes(body_bytes)
                self._set_buffer(view, _BODY)
                return False
            self._body = b""  # too short for a bytes object of its own (empty_bytes): read below
            self._set_buffer(memoryview(bytearray(body_bytes)), _BODY)
            if body_bytes:
                return False
        assert self._bulk is not None
        if len(self._body) != len(self._bulk):  # a body of one byte, received into a bytearray
            self._body = bytes(self._bulk)
        return True

    def _set_buffer(self, buffer: memoryview, stage: int, filled: int = 0) -> None:
        self._bulk, self._stage, self._filled = buffer, stage, filled

    def _take(self, data: bytes) -> list[Any]:
        self._pieces.append(data)
        self._pieces_len += len(data)
        if self._pieces_len < self._need:
            return []
        return self._parse()

    # ------------------------------------------------------------ parsing

    def _finish_bulk(self, replies: list[Any]) -> None:
        value: Any = self._bulk
        if self._stage == _BODY:
            value = HeadedBulk(self._head, self._body)
            self._head = self._body = b""
        self._bulk, self._filled, self._stage = None, 0, _WHOLE
        self._crlf = 2
        self._need = 1
        self._complete(value, replies)

    def _complete(self, value: Any, replies: list[Any]) -> None:
        stack = self._stack
        while stack:
            top = stack[-1]
            top[0].append(value)
            top[1] -= 1
            if top[1]:
                return
            stack.pop()
            value = top[0]
        replies.append(value)

    def _parse(self) -> list[Any]:
        """Parse what is buffered; the replies completed."""
        pieces = self._pieces
        if not pieces:
            return []
        buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._pieces_len = 0
        end = len(buf)
        pos = 0
        replies: list[Any] = []
        if self._crlf:
            pos = self._skip_crlf(buf)
        stack = self._stack
        large = self.large_bytes
        headed_from = large if self.headed else _NEVER  # a large bulk that came whole in one read
        value: Any
        while pos < end:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self._keep(buf, pos, end - pos + 1)
                return replies
            kind = buf[pos]
            if kind == 36:  # $ bulk string
                length = int(buf[pos + 1 : eol])
                start = eol + 2
                if length >= 0 and start + length + 2 > end:  # not all here yet
                    if length >= large:
                        self._start_bulk(buf, start, length, replies)
                    else:
                        self._keep(buf, pos, start - pos + length + 2)
                    return replies
                value, pos = _bulk_value(buf, start, length, headed=length >= headed_from)
            elif kind == 42:  # * array
                count = int(buf[pos + 1 : eol])
                pos = eol + 2
                if count > 0:
                    stack.append([[], count])
                    continue
                value = None if count < 0 else []
            else:
                value = _line_value(kind, buf[pos + 1 : eol])
                pos = eol + 2
            # _complete, inline: this loop runs for every reply element
            while stack:
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = top[0]
            else:
                replies.append(value)
        self._need = 1
        return replies

    def _skip_crlf(self, buf: bytes) -> int:
        """Skip what is left of a large bulk string's CRLF at the start of ``buf``; where the parse goes on."""
        skip = min(self._crlf, len(buf))
        if buf[:skip] != b"\r\n"[2 - self._crlf : 2 - self._crlf + skip]:
            raise ProtocolError("bulk string not followed by CRLF")
        self._crlf -= skip
        return skip

    def _start_bulk(self, buf: bytes, start: int, length: int, replies: list[Any]) -> None:
        """A large bulk string starts at ``buf[start]`` and is not all in ``buf``: its
        buffer (a headed one's: first that of its prefix), with what ``buf`` holds of
        it; the rest is received into that buffer and the ones that follow it."""
        self._need = 1
        self._length = length
        if self.headed and length >= HEAD_PREFIX.size:
            self._set_buffer(memoryview(bytearray(HEAD_PREFIX.size)), _PREFIX)
        else:
            self._set_buffer(np.empty(length, dtype=np.uint8).data, _WHOLE)
        have = min(len(buf) - start, length)
        view = memoryview(buf)[start : start + have]
        while self._bulk is not None and len(view):  # the bulk's part in ``buf``, buffer by buffer
            take = min(len(view), len(self._bulk) - self._filled)
            self._bulk[self._filled : self._filled + take] = view[:take]
            view = view[take:]
            self._filled += take
            if self._filled == len(self._bulk) and self._next_buffer():
                self._finish_bulk(replies)  # the body is all here, its CRLF not (or only its CR)
        if self._bulk is None and start + have < len(buf):
            self._skip_crlf(buf[start + have :])

    def _keep(self, buf: bytes, pos: int, need: int) -> None:
        """Keep ``buf[pos:]`` for the next parse, which needs ``need`` bytes from ``pos``."""
        rest = buf[pos:] if pos else buf
        self._pieces.append(rest)
        self._pieces_len = len(rest)
        self._need = need


def _bulk_value(buf: bytes, start: int, length: int, *, headed: bool = False) -> tuple[Any, int]:
    """A bulk string whose body (and CRLF) ``buf`` holds: its value (``headed``: as a
    :class:`HeadedBulk` when it is one), and where the next reply element starts."""
    if length < 0:
        return None, start
    stop = start + length
    if buf[stop : stop + 2] != b"\r\n":
        raise ProtocolError("bulk string not followed by CRLF")
    value = buf[start:stop]
    return (_headed_value(value) if headed else value), stop + 2


def _headed_value(value: Any) -> Any:
    """A whole bulk string's value, as a :class:`HeadedBulk` when it is one."""
    if len(value) < HEAD_PREFIX.size:
        return value
    marker, head_bytes = HEAD_PREFIX.unpack_from(value)
    if marker != HEADED_MARKER or head_bytes > min(len(value) - HEAD_PREFIX.size, MAX_HEAD_BYTES):
        return value
    end = HEAD_PREFIX.size + head_bytes
    return HeadedBulk(value[HEAD_PREFIX.size : end], value[end:])


def _line_value(kind: int, line: bytes) -> Any:
    """The value of a one-line reply element of type byte ``kind``."""
    if kind == 58:  # : integer
        return int(line)
    if kind == 43:  # + simple string
        return line
    if kind == 45:  # - error
        return hiredis.ReplyError(line.decode(errors="replace"))
    raise ProtocolError(f"unexpected RESP type byte {kind!r}")
