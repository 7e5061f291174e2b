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
"""

from __future__ import annotations

from typing import Any

import hiredis
import numpy as np

LARGE_BULK_BYTES = 256 * 1024
"""Bulk strings of at least this many bytes are received into a buffer of their own."""

RECEIVE_BYTES = 256 * 1024
"""The receive buffer for everything else (framing, small replies)."""


class ProtocolError(Exception):
    """The stream is not RESP: the connection can no longer be trusted."""


class RespReader:
    """Parses a stream of RESP2 replies; see the module docstring.

    Feed it either by :meth:`feed` (any buffer), or by writing into :meth:`buffer`
    and calling :meth:`received`. :meth:`replies` returns the replies completed so far.
    """

    __slots__ = (
        "_bulk",
        "_crlf",
        "_fast",
        "_filled",
        "_need",
        "_pieces",
        "_pieces_len",
        "_receive",
        "_stack",
        "large_bytes",
    )

    def __init__(self, large_bytes: int = LARGE_BULK_BYTES) -> None:
        self.large_bytes = large_bytes
        self._receive = bytearray(RECEIVE_BYTES)
        self._pieces: list[bytes] = []  # unparsed bytes, in order
        self._pieces_len = 0
        self._need = 1  # bytes the parse needs before it can go on
        self._stack: list[list[Any]] = []  # arrays under way: [items, remaining]
        self._bulk: memoryview | None = None  # a large bulk string being received
        self._filled = 0
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
        if self._filled < len(self._bulk):
            return []
        replies: list[Any] = []
        self._finish_bulk(replies)
        return replies + self._parse()

    def _take(self, data: bytes) -> list[Any]:
        self._pieces.append(data)
        self._pieces_len += len(data)
        if self._pieces_len < self._need:
            return []
        return self._parse()

    # ------------------------------------------------------------ parsing

    def _finish_bulk(self, replies: list[Any]) -> None:
        value, self._bulk, self._filled = self._bulk, None, 0
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
                value, pos = _bulk_value(buf, start, length)
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
        buffer, with what ``buf`` holds of it; the rest is received into that buffer."""
        bulk = np.empty(length, dtype=np.uint8).data
        have = min(len(buf) - start, length)
        bulk[:have] = memoryview(buf)[start : start + have]
        self._need = 1
        if have < length:
            self._bulk, self._filled = bulk, have
            return
        self._crlf = 2  # the body is all here, its CRLF not (or only its CR)
        self._complete(bulk, replies)
        if start + have < len(buf):
            self._skip_crlf(buf[start + have :])

    def _keep(self, buf: bytes, pos: int, need: int) -> None:
        """Keep ``buf[pos:]`` for the next parse, which needs ``need`` bytes from ``pos``."""
        rest = buf[pos:] if pos else buf
        self._pieces.append(rest)
        self._pieces_len = len(rest)
        self._need = need


def _bulk_value(buf: bytes, start: int, length: int) -> tuple[bytes | None, int]:
    """A bulk string whose body (and CRLF) ``buf`` holds: its value, and where the next reply element starts."""
    if length < 0:
        return None, start
    stop = start + length
    if buf[stop : stop + 2] != b"\r\n":
        raise ProtocolError("bulk string not followed by CRLF")
    return buf[start:stop], stop + 2


def _line_value(kind: int, line: bytes) -> Any:
    """The value of a one-line reply element of type byte ``kind``."""
    if kind == 58:  # : integer
        return int(line)
    if kind == 43:  # + simple string
        return line
    if kind == 45:  # - error
        return hiredis.ReplyError(line.decode(errors="replace"))
    raise ProtocolError(f"unexpected RESP type byte {kind!r}")
