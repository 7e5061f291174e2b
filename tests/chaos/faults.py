"""Faults done to a running :class:`~tests.chaos.harness.Mesh`, on a schedule.

SIGKILL a worker every few seconds (every other kill aimed at a worker caught
holding a lease, frozen with SIGSTOP while it is checked) and start a replacement;
``kill -9`` Redis once, while it holds jobs, and restart it from its AOF; SIGTERM
one gateway once and start it again on the same port. Each fault is recorded with
the monotonic time it hit, the time the part was back and the requests it caught:
those a killed worker held leased, or those in Redis when it died (read from the
job hashes, whose payload names the client's request id).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from meshserve.queue import ModelKeys
from meshserve.wire.envelope import unframe
from protos import meshserve_pb2 as mpb
from tests.chaos.harness import GatewayFigures, Mesh, Service, gateway_figures, text

LEASE_HUNT_S = 1.0
"""How long an aimed worker kill looks for its moment (a lease held) before it strikes anyway."""
QUEUED_HUNT_S = 2.0
"""How long the Redis kill looks for jobs in Redis: the test requires it to catch one."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """When faults hit, in seconds from the start of the load."""

    worker_kills: int
    first_kill_s: float
    kill_interval_s: float
    redis_restart_s: float
    redis_down_s: float  # between kill -9 and the restart
    gateway_restart_s: float


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault: ``at_s`` when it hit, ``back_s`` when the part served again (monotonic)."""

    kind: str  # "worker_kill", "redis_restart" or "gateway_restart"
    at_s: float
    back_s: float
    detail: str = ""
    caught: tuple[str, ...] = ()  # client request ids a killed worker held, or Redis held when killed


class Faults:
    """Runs a :class:`FaultPlan` against a :class:`Mesh` and records what happened."""

    def __init__(self, mesh: Mesh, plan: FaultPlan, model: str, redis: Redis, rng: random.Random) -> None:
        """``redis`` (a client of ``mesh.redis`` that retries) is for looking at the queue."""
        self.mesh = mesh
        self._redis = redis
        self.plan = plan
        self.keys = ModelKeys.for_model(model, 1)
        self.rng = rng
        self.events: list[FaultEvent] = []
        self.retired_gateway_figures = GatewayFigures(0, 0)

    async def run(self, t0_s: float) -> None:
        """Every scheduled fault, each at its time after ``t0_s`` (monotonic)."""
        await asyncio.gather(
            self._worker_kills(t0_s),
            self._at(t0_s + self.plan.redis_restart_s, self._restart_redis),
            self._at(t0_s + self.plan.gateway_restart_s, self._restart_gateway),
        )

    async def _at(self, when_s: float, fault: Callable[[], Awaitable[None]]) -> None:
        await sleep_until(when_s)
        await fault()

    async def _worker_kills(self, t0_s: float) -> None:
        """Even-numbered kills aim at a worker holding a lease; odd ones pick any worker."""
        for n in range(self.plan.worker_kills):
            await sleep_until(t0_s + self.plan.first_kill_s + n * self.plan.kill_interval_s)
            aimed = await self._hunt_lease_holder() if n % 2 == 0 else None
            victim = aimed or self.rng.choice([w for w in self.mesh.workers if w.alive()])
            at_s = time.monotonic()
            await victim.kill()
            back_s = time.monotonic()
            self.mesh.workers.remove(victim)
            self.mesh.start_worker()
            try:  # its leases outlive it, until they expire and a reaper puts them back
                leases = await self._leases(self._redis)
                caught = [request for worker, request in leases if worker == victim.worker_id()]
                how = "aimed" if aimed else "random"
            except RedisError:
                caught, how = [], "random, while Redis was down"
            self.events.append(FaultEvent("worker_kill", at_s, back_s, how, tuple(caught)))

    async def _hunt_lease_holder(self) -> Service | None:
        """A worker frozen (SIGSTOP) while it holds a lease, or None.

        Looks for up to LEASE_HUNT_S; a worker found idle after all is resumed.
        """
        deadline_s = time.monotonic() + LEASE_HUNT_S
        while time.monotonic() < deadline_s:
            try:
                holders = {worker for worker, _ in await self._leases(self._redis)}
                for worker in self.mesh.workers:
                    if not worker.alive() or worker.worker_id() not in holders:
                        continue
                    worker.signal(signal.SIGSTOP)
                    holds = False
                    try:
                        holds = any(w == worker.worker_id() for w, _ in await self._leases(self._redis))
                    finally:
                        if not holds:
                            worker.signal(signal.SIGCONT)
                    if holds:
                        return worker
            except RedisError:
                return None  # Redis is the fault of the moment; kill at random
            await asyncio.sleep(0.002)  # leases last milliseconds: look again soon
        return None

    async def _leases(self, redis: Redis) -> list[tuple[str, str]]:
        """(worker id, client request id) of every job now leased."""
        return await self._jobs(redis, await _members(redis, self.keys.inflight))

    async def _queued(self, redis: Redis) -> list[str]:
        """Client request ids of the jobs in Redis that are waiting or leased by a live
        worker (a killed worker's lease is already counted against its kill)."""
        job_ids = [*await _members(redis, self.keys.ready), *await _members(redis, self.keys.inflight)]
        live = {w.worker_id() for w in self.mesh.workers if w.alive()}
        return [request for worker, request in await self._jobs(redis, job_ids) if not worker or worker in live]

    async def _jobs(self, redis: Redis, job_ids: Sequence[str]) -> list[tuple[str, str]]:
        """(worker id or "", client request id) of these jobs, read from their hashes
        and payloads (in the hash, or in a key of their own: QueueProtocol.enqueue)."""
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), ["w", "p", "b"])
                pipe.get(self.keys.payload(job_id))
            read = await pipe.execute()
        jobs = [(fields[0], fields[1] or fields[2] or own) for fields, own in zip(read[::2], read[1::2], strict=True)]
        return [
            (text(worker or b""), unframe(payload, mpb.QueuedRequest).message.client_request_id)
            for worker, payload in jobs
            if payload
        ]

    async def _restart_redis(self) -> None:
        """``kill -9`` Redis while it holds jobs (workers frozen, so none finishes between
        the look and the kill), wait ``redis_down_s``, restart it from its AOF."""
        try:
            caught = await self._hunt_queued_jobs()
            at_s = time.monotonic()
            await self.mesh.redis.kill()
        finally:
            self._freeze_workers(False)
        await asyncio.sleep(self.plan.redis_down_s)  # the outage itself
        await self.mesh.redis.start()
        detail = f"down {self.plan.redis_down_s:.1f}s, {len(caught)} job(s) in it"
        self.events.append(FaultEvent("redis_restart", at_s, time.monotonic(), detail, tuple(caught)))

    async def _hunt_queued_jobs(self) -> list[str]:
        """Client ids of the jobs in Redis, found within QUEUED_HUNT_S, with every worker
        left frozen (SIGSTOP) so that the list stays true until Redis dies."""
        deadline_s = time.monotonic() + QUEUED_HUNT_S
        while time.monotonic() < deadline_s:
            if await self._queued(self._redis):
                self._freeze_workers(True)
                caught = await self._queued(self._redis)
                if caught:
                    return caught
                self._freeze_workers(False)
            await asyncio.sleep(0.002)  # jobs stay milliseconds: look again soon
        self._freeze_workers(True)
        return await self._queued(self._redis)

    def _freeze_workers(self, frozen: bool) -> None:
        for worker in self.mesh.workers:
            worker.signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    async def _restart_gateway(self) -> None:
        self.retired_gateway_figures = await gateway_figures(self.mesh.metrics_urls()[0])
        at_s = time.monotonic()
        code = await self.mesh.restart_gateway(0)
        self.events.append(FaultEvent("gateway_restart", at_s, time.monotonic(), f"SIGTERM, exit code {code}"))


async def sleep_until(when_s: float) -> None:
    """Sleep until the monotonic clock reads ``when_s`` (the fault schedule's clock)."""
    await asyncio.sleep(max(0.0, when_s - time.monotonic()))


async def _members(redis: Redis, key: str) -> list[str]:
    """A sorted set's members, decoded."""
    return [member.decode() for member in cast(list[bytes], await redis.zrange(key, 0, -1))]
