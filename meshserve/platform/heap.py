"""Keep long-lived objects out of Python's cyclic garbage collector, and large
buffers from lingering in the C heap after they are freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Mapping

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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
"""glibc's tunable (2.35 and later) that asks for transparent huge pages on the
memory malloc maps (``madvise(MADV_HUGEPAGE)``); read once, when a process starts."""


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`HUGE_PAGES_TUNABLE` added to ``GLIBC_TUNABLES`` (kept
    as given where it names ``glibc.malloc.hugetlb`` already): the environment a
    service process is started with.

    With :func:`return_large_buffers`, every tensor-sized buffer is a fresh mapping,
    and touching a fresh mapping faults in each 4 KiB page: on a virtual machine
    about 25 ms per 16 MiB, on every copy of a payload (a Redis read, a response's
    bytes, a model's outputs). Huge pages fault in 2 MiB at a time: measured on
    the 2-core development VM, a fresh 16 MiB copy went from 50-100 ms to about
    12 ms, hiredis reading a 16 MiB reply from 40-65 ms to 15 ms. Freed buffers
    still leave the process. Where the kernel's THP mode is ``never``, or glibc is
    older or absent, the tunable does nothing.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return dict(environ)
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


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
