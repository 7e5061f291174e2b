"""The CPU a model's runs take inside ONNX Runtime, thread by thread.

A batch's wall time says little about its CPU: ONNX Runtime's intra-op pool threads
work beside the calling thread, and with spinning on they burn CPU after a run has
returned. So a session's compute CPU is counted as two parts, both exact per thread:

- the calling thread's CPU inside ``Session.run`` (``time.thread_time()`` around the
  call: the thread a batch runs on, an executor thread or the event loop's), and
- every CPU second of the session's own intra-op pool threads, spinning included
  (found as the threads that appeared while ONNX Runtime built the session; read
  from ``/proc/self/task/<tid>/schedstat``, nanoseconds on the CPU).

What the worker spends on anything else (stacking and splitting a batch, thread
hand-offs, Redis, gRPC, metrics) is then its process CPU less these.

A session built while another thread starts a native thread of its own (a gRPC
poller, say) could count that thread too; Python threads are left out by their
native ids, and sessions are built one at a time (``_building``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TASKS = Path("/proc/self/task")
_building = threading.Lock()  # a session's new threads are told apart by a before/after diff


def thread_ids() -> set[int]:
    """The ids of this process's threads now (empty where /proc is not there)."""
    try:
        return {int(name) for name in os.listdir(TASKS)}
    except OSError:
        return set()


def thread_cpu_s(tid: int) -> float | None:
    """CPU seconds thread ``tid`` of this process has run; None once it is gone.

    ``schedstat``'s first field (ns on the CPU); ``stat``'s user + system clock
    ticks where that is missing (a kernel without scheduler statistics)."""
    try:
        return int((TASKS / str(tid) / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = (TASKS / str(tid) / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ComputeCpu:
    """One model's compute CPU: its runs' calling-thread CPU plus its sessions' pool threads'.

    ``ran`` is called from whichever thread ran the model (several at once: a lock);
    ``seconds`` at scrape time. A session replaced (``build`` again, before the model
    is served) leaves its pool threads' CPU, read just before, in ``_retired_s``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs_s = 0.0
        self._retired_s = 0.0
        self._pool: frozenset[int] = frozenset()

    @property
    def pool_threads(self) -> frozenset[int]:
        """The native ids of the current session's intra-op pool threads."""
        return self._pool

    def build(self, create: Callable[[], T]) -> T:
        """``create()`` (which builds an ONNX Runtime session), noting the threads it starts
        as that session's pool; the previous session's pool is retired."""
        with _building:
            before = thread_ids()
            made = create()
            started = thread_ids() - before - {t.native_id for t in threading.enumerate()}
        retired = self._pool_s()
        with self._lock:
            self._retired_s += retired
            self._pool = frozenset(started)
        return made

    def ran(self, thread_cpu_s: float) -> None:
        """Count one run's calling-thread CPU (``time.thread_time()`` after less before)."""
        with self._lock:
            self._runs_s += thread_cpu_s

    def seconds(self) -> float:
        """Compute CPU seconds so far: every run's calling-thread CPU and every pool thread's."""
        pool_s = self._pool_s()
        with self._lock:
            return self._runs_s + self._retired_s + pool_s

    def _pool_s(self) -> float:
        return sum(cpu_s for tid in self._pool if (cpu_s := thread_cpu_s(tid)) is not None)
