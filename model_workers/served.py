"""One held model version: its session, queue keys, counters and serving state.

Shared by the worker's parts (serve loop, batch runner, leases, health, assignment
follower, reporter); holds no logic beyond its own moving averages.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from meshserve.queue import ModelKeys, partition_keys
from meshserve.queue.keys import SequenceKeys
from model_workers.runners import ModelRunner
from model_workers.statistics import ModelStatistics

COMPUTE_HALF_LIFE_BATCHES = 3.0
"""A batch's weight in a model's moving averages halves after this many newer batches:
one slow batch moves the estimate, and a few quick ones bring it back."""

COMPUTE_AVERAGE_WEIGHT = 1 - 0.5 ** (1 / COMPUTE_HALF_LIFE_BATCHES)
"""Weight of the newest batch in a model's moving averages (about 0.2)."""

INLINE_COMPUTE_MS = 5.0
"""A model whose batches take under this long (moving average, and the last batch)
runs them on the worker's event-loop thread instead of handing them to an ONNX
Runtime thread. The hand-off there and back is a sizeable share of a quick model's
run, while the loop has nothing to do during a batch that cannot wait a few ms:
replies leave before the next batch starts, and leases last seconds."""

INLINE_LIMIT_MS = 20.0
"""An inline run still going after this long is stopped (``stops.Watchdog``) and its
batch runs again on a task and ONNX Runtime thread of its own: a quick model that
turns slow holds the event loop (every other model's batches and replies, the
leases, the reports) for this long at most, once."""

EXECUTION_TIMEOUT_FLOOR_MS = 10_000
EXECUTION_TIMEOUT_WARMUP_MULTIPLE = 100
EXECUTION_TIMEOUT_CAP_MS = 60_000
"""Without ``execution_timeout_ms`` in config.yaml a batch may run for the warm-up's
time (batch 1 and the max batch, first runs included) times the multiple, within
the floor and the cap."""

LEASE_BATCH_MULTIPLE = 3
"""A model's lease is at least this many of its recent batch times (and at least the
worker's ``lease_ms``): a slow model's jobs are not redelivered between extensions."""

CANARY_MEASURED_MULTIPLE = 4
"""A canary may take this many times the model's measured time (its recent batches,
or its warm-up) before it counts as failed; at least the worker's
``canary_timeout_ms``, at most the execution timeout."""


@dataclass(slots=True)
class ModelStats:
    """Counters of one model version on this worker (also exported as metrics)."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    expired: int = 0
    failed: int = 0
    stopped: int = 0  # requests of batches stopped at the execution timeout or their deadlines
    redelivered: int = 0
    largest_batch: int = 0
    device_seconds: float = 0.0  # time the device spent running this model's batches
    queue_wait_seconds: float = 0.0  # summed over requests, enqueue to claim


@dataclass(slots=True)
class Served:
    model: ModelRunner
    keys: ModelKeys  # partition 0's (the only one of most models): a stateful or generating model's
    stats: ModelStats = field(default_factory=ModelStats)
    statistics: ModelStatistics = field(default_factory=ModelStatistics)  # Triton's, for the report
    consecutive_failures: int = 0
    canary_failing: bool = False  # the last canary failed (logged at error once per outage)
    weights_bytes: int = 0
    activation_bytes: int = 0  # measured at warm-up; 0: not measured
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))  # clear while a batch is in hand
    compute_ms_avg: float = 0.0  # moving average of a batch's ONNX Runtime time
    last_compute_ms: float = 0.0  # the latest batch's
    ms_per_job_avg: float = 0.0  # moving average of the worker's own time per job (claim to replies)
    warmup_ms: float = 0.0  # the warm-up's time (batch 1 and the max batch, first runs included)
    running: int = 0  # batches in hand, claim to replies (at most ``info.instances``)
    instances: asyncio.Semaphore = field(init=False)  # held by each run (batch or canary) of this model
    partitions: tuple[ModelKeys, ...] = field(init=False)  # every queue partition's keys, partition 0 first
    _turn: int = 0  # which partition goes first in the next claim order

    def __post_init__(self) -> None:
        self.instances = asyncio.Semaphore(self.model.info.instances)
        info = self.model.info
        self.partitions = (
            partition_keys(info.name, info.version, info.queue_partitions)
            if info.queue_partitions > 1
            else (self.keys,)
        )

    def claim_order(self) -> tuple[ModelKeys, ...]:
        """The partitions in the order to look at them now: each call starts one further
        on, so a worker serving several takes from each in turn (and so does its
        blocking wait, which pops the first list with a token)."""
        if len(self.partitions) == 1:
            return self.partitions
        self._turn = (self._turn + 1) % len(self.partitions)
        return self.partitions[self._turn :] + self.partitions[: self._turn]

    @property
    def sequence_prefix(self) -> str:
        """Where a stateful model's sequences live, for its claims."""
        return SequenceKeys.of(self.keys).state_prefix

    def execution_timeout_ms(self) -> int:
        """How long one run of this model may take before it is stopped: config.yaml's
        ``execution_timeout_ms``, else derived from the warm-up (``EXECUTION_TIMEOUT_*``)."""
        if configured := self.model.info.execution_timeout_ms:
            return configured
        derived = int(self.warmup_ms * EXECUTION_TIMEOUT_WARMUP_MULTIPLE)
        return min(EXECUTION_TIMEOUT_CAP_MS, max(EXECUTION_TIMEOUT_FLOOR_MS, derived))

    def batch_ms(self) -> int:
        """How long a batch of this model is expected to take: claims skip jobs due
        sooner (but always try one, queue.claim.lua). Capped at the execution timeout,
        since no run lasts longer."""
        return min(int(self.compute_ms_avg), self.execution_timeout_ms())

    def lease_ms(self, floor_ms: int) -> int:
        """The lease of this model's claims: ``floor_ms`` (the worker's ``lease_ms``) or
        ``LEASE_BATCH_MULTIPLE`` recent batch times, whichever is longer."""
        return max(floor_ms, LEASE_BATCH_MULTIPLE * self.batch_ms())

    def canary_timeout_s(self, floor_ms: int) -> float:
        """How long this model's canary may run (``CANARY_MEASURED_MULTIPLE``)."""
        measured_ms = max(self.compute_ms_avg, self.warmup_ms)
        limit_ms = max(floor_ms, CANARY_MEASURED_MULTIPLE * measured_ms)
        return min(limit_ms, self.execution_timeout_ms()) / 1000

    def observe_compute(self, compute_ms: float) -> None:
        self.last_compute_ms = compute_ms
        if self.compute_ms_avg == 0.0:
            self.compute_ms_avg = compute_ms
        else:
            self.compute_ms_avg += COMPUTE_AVERAGE_WEIGHT * (compute_ms - self.compute_ms_avg)

    def runs_inline(self) -> bool:
        """Whether the next batch runs on the event loop's thread: while the recent
        batches and the last one took under ``INLINE_COMPUTE_MS``; never before one
        batch has shown how long the model takes. Bounded by ``INLINE_LIMIT_MS``."""
        return (
            self.model.may_run_inline
            and 0.0 < self.compute_ms_avg <= INLINE_COMPUTE_MS
            and self.last_compute_ms <= INLINE_COMPUTE_MS
        )

    def at_capacity(self) -> bool:
        """Whether ``info.instances`` batches are in hand: claim no more until one ends."""
        return self.running >= self.model.info.instances

    def began(self) -> None:
        """A batch is in hand (claimed, not yet answered)."""
        self.running += 1
        self.idle.clear()

    def ended(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.idle.set()

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
