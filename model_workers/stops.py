"""Stopping a running ONNX Runtime call at a time limit, from a thread of its own.

ONNX Runtime checks ``RunOptions.terminate`` between nodes (and between a Loop's
iterations), and the call then raises. Setting it must come from outside the
running call: for a run on the event loop's thread (a quick model's) nothing else on
that thread can, so one watchdog thread per worker keeps every armed limit and sets
the flag of each that comes due.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

import onnxruntime as ort


def _quiet_options() -> ort.RunOptions:
    """Run options whose failures ONNX Runtime does not print itself: the exception it
    raises carries the same text, and the worker logs it (or answers a stopped run)."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    return options


@dataclass(slots=True)
class Stop:
    """One run's options and its limits; ``reason`` says which limit stopped it ('' if none)."""

    options: ort.RunOptions = field(default_factory=_quiet_options)
    reason: str = ""
    armed: bool = False
    later: dict[str, float] = field(default_factory=dict)  # reason -> when it is due now (``postpone``)


class Watchdog:
    """Sets ``terminate`` on each armed run whose limit passes; ``close`` ends its thread."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Stop, str]] = []  # (monotonic s, order, stop, reason)
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="run-watchdog", daemon=True)
        self._thread.start()

    def arm(self, stop: Stop, at_s: float, reason: str) -> None:
        """Stop ``stop``'s run at monotonic time ``at_s`` for ``reason``, unless disarmed first."""
        with self._changed:
            stop.armed = True
            heapq.heappush(self._due, (at_s, next(self._order), stop, reason))
            if self._due[0][2] is stop:
                self._changed.notify()

    def postpone(self, stop: Stop, at_s: float, reason: str) -> None:
        """Move ``stop``'s limit for ``reason`` to monotonic ``at_s`` (later only: a
        stream's time limit runs again from each response)."""
        with self._changed:
            stop.later[reason] = at_s

    def disarm(self, stop: Stop) -> None:
        """The run ended: none of its limits fire now (entries left in the heap are skipped)."""
        with self._changed:
            stop.armed = False

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                while self._due and not self._due[0][2].armed:
                    heapq.heappop(self._due)
                if not self._due:
                    self._changed.wait()
                    continue
                at_s, _, stop, reason = self._due[0]
                wait_s = at_s - time.monotonic()
                if wait_s > 0:
                    self._changed.wait(wait_s)
                    continue
                heapq.heappop(self._due)
                if stop.later.get(reason, at_s) > at_s:  # postponed: due again later
                    heapq.heappush(self._due, (stop.later[reason], next(self._order), stop, reason))
                    continue
                stop.reason = reason
                stop.armed = False
                stop.options.terminate = True
