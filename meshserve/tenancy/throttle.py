"""A gateway's local memory of the tenants Redis last refused for their rate.

The admission script's rate limit is GCRA: once it refuses a tenant with a retry-after
of N ms, it admits none of that tenant's requests for N ms, whoever asks (the
theoretical arrival time only moves forward). Until then the answer to the tenant is
known without the round trip, so a gateway answers from here, before the call's
message is read (:mod:`gateway.refusal`) or, for calls that got past that, before
admission in the core. The entry ends at its retry-after: the next call after it asks
Redis again, so the cache is refreshed no more often than the retry-after, and an
admitted call always goes through the real admission.

Only rate refusals are remembered. An in-flight refusal has no retry-after (a slot
may free any moment), and queue depth is per model, which the message names: both
are decided by Redis each time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from meshserve.errors import ResourceExhausted
from meshserve.tenancy.tenants import Tenant


def rate_refusal_message(tenant: Tenant, retry_after_ms: int) -> str:
    """The RESOURCE_EXHAUSTED details of a rate refusal, whether Redis or the cache decided."""
    return (
        f"tenant '{tenant.name}' is over its rate limit of {tenant.rate_per_s:g} requests/s"
        f" (burst {tenant.burst}); retry after {retry_after_ms} ms"
    )


class RateRefusals:
    """Tenant name -> the monotonic second its last rate refusal's retry-after ends.

    One per gateway process, read and written on its event loop only. Bounded by the
    tenants file (names come only from it). ``clock`` is monotonic seconds; tests pass
    their own.
    """

    __slots__ = ("_clock", "_until_s")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until_s: dict[str, float] = {}

    def remember(self, tenant: Tenant, retry_after_ms: int) -> None:
        """Redis refused ``tenant`` for its rate with this retry-after (ms, > 0 to count)."""
        if retry_after_ms > 0:
            self._until_s[tenant.name] = self._clock() + retry_after_ms / 1000

    def check(self, tenant: Tenant) -> None:
        """Raise the rate refusal Redis would answer while ``tenant``'s last retry-after
        runs, with the time left (whole ms, rounded up); nothing once it has ended."""
        until_s = self._until_s.get(tenant.name)
        if until_s is None:
            return
        wait_s = until_s - self._clock()
        if wait_s <= 0:
            del self._until_s[tenant.name]  # ended: the next call asks Redis
            return
        retry_after_ms = max(1, math.ceil(wait_s * 1000))  # rounded up, as the script does
        raise ResourceExhausted(
            rate_refusal_message(tenant, retry_after_ms), reason="rate", retry_after_ms=retry_after_ms
        )

    def clear(self) -> None:
        """Forget every refusal (a tenants reload may have raised a limit)."""
        self._until_s.clear()

    def __len__(self) -> int:
        return len(self._until_s)
