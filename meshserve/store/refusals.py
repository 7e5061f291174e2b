"""Redis refusing a command while it runs: which kind, and logging each kind once
per interval instead of once per request.

A refusal is an error reply, not a lost connection: Redis is up but will not take
the write (``OOM`` at ``maxmemory`` under ``noeviction``, ``READONLY`` on a replica
after a failover, ``MISCONF`` when it cannot persist, ``NOREPLICAS``, ``BUSY`` while a
script runs, ``LOADING`` while it reads its data at start). Under load every request
meets the same refusal, so one log line per kind and interval carries the count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError, ResponseError

REFUSAL_KINDS = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "BUSY", "LOADING", "MASTERDOWN")
"""The error prefixes Redis answers a refused command with."""

LOG_INTERVAL_S = 10.0
"""Each kind of refusal is logged at most once per this long, with its count."""


def refusal_kind(error: BaseException) -> str | None:
    """The refusal's kind (``"OOM"``, ``"READONLY"``, ...); None for any other error."""
    if not isinstance(error, ResponseError):
        return None
    head = str(error).split(" ", 1)[0]
    return head if head in REFUSAL_KINDS else None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether Redis refused the command because it is at ``maxmemory``."""
    return refusal_kind(error) == "OOM"


def store_refusal_message(error: RedisError, what: str) -> str:
    """What a caller is told when Redis refused ``what`` (e.g. "the request")."""
    if is_out_of_memory(error):
        return f"queue store out of memory: Redis is at its maxmemory and refused {what}; retry later"
    return f"queue store refused {what}: {error}"


class RefusalLog:
    """Counts refusals by kind; logs a kind when first seen and then at most once
    per ``interval_s``, with how many came since its last line. Not thread-safe:
    one event loop's."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._interval_s = interval_s
        self._clock = clock
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self.totals: dict[str, int] = {}
        """Refusals by kind since start (for tests and metrics)."""

    def note(self, error: BaseException) -> bool:
        """Count ``error`` if it is a refusal (logging when its interval has passed);
        False if it is not one."""
        kind = refusal_kind(error)
        if kind is None:
            return False
        self.totals[kind] = self.totals.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        if self._clock() - self._logged_at.get(kind, -self._interval_s) >= self._interval_s:
            self._emit(kind, error)
        return True

    def flush(self) -> None:
        """Log the kinds counted since their last line whose interval has passed
        (called now and then, so the tail of a burst is not left unsaid)."""
        now = self._clock()
        for kind in [
            k for k, n in self._unlogged.items() if n and now - self._logged_at.get(k, 0.0) >= self._interval_s
        ]:
            self._emit(kind, None)

    def _emit(self, kind: str, error: BaseException | None) -> None:
        count = self._unlogged.pop(kind, 0)
        self._logged_at[kind] = self._clock()
        detail = f": {error}" if error is not None else ""
        self._log.warning(
            "redis refused %d %s with %s in the last %.0f s%s", count, self._what, kind, self._interval_s, detail
        )
