"""One held model version: its session, queue keys, counters and serving state.

Shared by the worker's parts (serve loop, batch runner, leases, health, assignment
follower, reporter); holds no logic beyond its own moving averages.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from meshserve.queue import ModelKeys
from model_workers.session import LoadedModel

COMPUTE_AVERAGE_WEIGHT = 0.2
"""Weight of the newest batch in a model's moving average of compute time."""

INLINE_COMPUTE_MS = 5.0
"""A model whose batches take under this long (moving average) runs them on the
worker's event-loop thread instead of handing them to the ONNX Runtime thread.
The hand-off there and back is a sizeable share of a quick model's run, while the
loop has nothing to do during a batch that cannot wait a few ms: replies leave
before the next batch starts, and leases last seconds."""


@dataclass(slots=True)
class ModelStats:
    """Counters of one model version on this worker (also exported as metrics)."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    expired: int = 0
    failed: int = 0
    redelivered: int = 0
    largest_batch: int = 0
    device_seconds: float = 0.0  # time the device spent running this model's batches
    queue_wait_seconds: float = 0.0  # summed over requests, enqueue to claim


@dataclass(slots=True)
class Served:
    model: LoadedModel
    keys: ModelKeys
    stats: ModelStats = field(default_factory=ModelStats)
    consecutive_failures: int = 0
    canary_failing: bool = False  # the last canary failed (logged at error once per outage)
    weights_bytes: int = 0
    activation_bytes: int = 0  # measured at warm-up; 0: not measured
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))  # clear while a batch is in hand
    compute_ms_avg: float = 0.0  # moving average of a batch's ONNX Runtime time
    ms_per_job_avg: float = 0.0  # moving average of the worker's own time per job (claim to replies)

    def batch_ms(self) -> int:
        """How long a batch of this model is expected to take: claims skip jobs due sooner."""
        return int(self.compute_ms_avg)

    def observe_compute(self, compute_ms: float) -> None:
        if self.compute_ms_avg == 0.0:
            self.compute_ms_avg = compute_ms
        else:
            self.compute_ms_avg += COMPUTE_AVERAGE_WEIGHT * (compute_ms - self.compute_ms_avg)

    def runs_inline(self) -> bool:
        """Whether the next batch runs on the event loop's thread (``INLINE_COMPUTE_MS``);
        never before one batch has shown how long the model takes."""
        return 0.0 < self.compute_ms_avg <= INLINE_COMPUTE_MS

    def observe_batch(self, busy_ms: float, jobs: int) -> None:
        """A batch took the worker ``busy_ms`` (waiting to fill it excluded) for
        ``jobs`` requests: the queue's estimate of how fast this worker drains it."""
        per_job = busy_ms / jobs
        if self.ms_per_job_avg == 0.0:
            self.ms_per_job_avg = per_job
        else:
            self.ms_per_job_avg += COMPUTE_AVERAGE_WEIGHT * (per_job - self.ms_per_job_avg)


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event
