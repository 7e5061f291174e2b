"""Keep long-lived objects out of Python's cyclic garbage collector, and large
buffers from lingering in the C heap after they are freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)

MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations of at least this many bytes get pages of their own, returned on free."""


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES``; True if it was set.

    glibc raises the threshold to the size of each large block freed (up to 32 MiB),
    so after one large request every later tensor buffer comes from the heap, and a
    freed one stays resident in the arena of the thread that freed it (decoding and
    encoding run on several threads): a process serving 16 MiB tensors then holds
    several times what it uses. A fixed threshold gives each large buffer its own
    mapping, returned when it is freed; mapping pages costs about a millisecond per
    16 MiB. Does nothing off glibc (musl, macOS) or where MALLOC_MMAP_THRESHOLD_
    already decides.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def freeze_startup_heap() -> None:
    """Collect once, then freeze every object alive now (modules, models, descriptors).

    A full collection walks every tracked object: with grpc, protobuf, numpy and
    OpenTelemetry loaded that is tens of milliseconds, a pause that lands on
    whichever requests are in flight and sets their p99. Frozen objects are never
    walked again, so later full collections see only what serving allocates. Call
    it when start-up is done, before serving or measuring.
    """
    gc.collect()
    gc.freeze()
