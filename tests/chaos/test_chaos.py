"""Chaos: closed-loop gRPC load while workers are SIGKILLed, Redis is killed -9 and
restarted from its AOF, and a gateway restarts. Every request must end in exactly one
outcome, its own; nothing is lost; Redis is left clean. ``pytest -s`` shows the figures.

The short run is part of ``make test``; ``make chaos`` runs the long one.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from meshserve.devkit.examples import write_example_repository
from tests.chaos.faults import FaultPlan, Faults
from tests.chaos.harness import Mesh, count_in_logs, gateway_figures, settle
from tests.chaos.ledger import MODEL, Ledger, LoadPlan, Report, Requests, run_load, summarize

# Errors a client may see while parts are down; anything else is a bug. CANCELLED:
# grpcio's server cancels calls that reach it after its graceful stop began
# (grpc/grpc#41785), so a client racing the gateway's SIGTERM may get it.
EXPECTED_ERRORS = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    load: LoadPlan
    faults: FaultPlan
    lease_ms: int
    gateways: int = 2
    workers: int = 3


SHORT = ChaosPlan(
    LoadPlan(requests=300, duration_s=12.0, clients=8),
    FaultPlan(
        worker_kills=2,
        first_kill_s=1.5,
        kill_interval_s=6.0,
        redis_restart_s=4.0,
        redis_down_s=1.0,
        gateway_restart_s=8.5,
    ),
    lease_ms=2000,
)
LONG = ChaosPlan(
    LoadPlan(requests=2000, duration_s=60.0, clients=8),
    FaultPlan(
        worker_kills=20,
        first_kill_s=4.0,
        kill_interval_s=2.5,
        redis_restart_s=25.25,  # between two kills: their look-ups freeze workers too
        redis_down_s=2.0,
        gateway_restart_s=40.0,
    ),
    lease_ms=5000,  # the product default
)


async def run_chaos(plan: ChaosPlan, root: Path) -> Report:
    repository = write_example_repository(root / "models", [MODEL])
    requests = Requests(repository, plan.load.requests)
    mesh = Mesh(root, repository, plan.lease_ms)
    # retries: its pooled connections go stale when Redis restarts
    redis = Redis.from_url(mesh.redis.url, retry=Retry(ExponentialBackoff(cap=0.5), 5))
    faults = Faults(mesh, plan.faults, MODEL, redis, random.Random(7))
    ledger = Ledger()
    try:
        await mesh.start(plan.gateways, plan.workers)
        t0_s = time.monotonic()
        await asyncio.gather(run_load(mesh.gateway_addresses, plan.load, requests, ledger, t0_s), faults.run(t0_s))
        load_s = time.monotonic() - t0_s
        ledger.dump(root / "outcomes.jsonl", t0_s)
        settle_s, leftovers, expiring = await settle(redis, timeout_s=2 * plan.lease_ms / 1000 + 10)
        gateways = await asyncio.gather(*(gateway_figures(url) for url in mesh.metrics_urls()))
        figures = sum(gateways, faults.retired_gateway_figures)
    finally:
        await redis.aclose()
        unclean = await mesh.stop()
    return summarize(
        plan.load,
        ledger,
        faults.events,
        t0_s,
        load_s,
        redelivered=count_in_logs(mesh.logs("worker"), r"redelivering (\d+) requests"),
        late_replies=figures.late_replies,
        unavailable_answers=figures.unavailable_answers,
        settle_s=settle_s,
        leftover_keys=leftovers,
        expiring_reply_lists=expiring,
        unclean_exits=unclean,
    )


RECOVERY_SLACK_S = 6.0
"""Beyond a lease and a half (the lease runs out, then the next sweep, every half lease,
puts the job back): a batch, and a machine whose 2 cores also start a replacement worker."""


def recovery_bound_s(plan: ChaosPlan) -> float:
    """The longest a request held by a killed worker may wait for its answer."""
    return 1.5 * plan.lease_ms / 1000 + RECOVERY_SLACK_S


def check(report: Report, plan: ChaosPlan, root: Path) -> None:
    path = root / "chaos-report.json"
    path.write_text(report.to_json())
    print(f"\n{report.table()}\nfigures: {path}\nlogs: {root / 'logs'}")
    assert report.lost == 0
    assert report.mismatched == 0
    assert report.succeeded + sum(report.failed.values()) == report.sent
    assert set(report.failed) <= EXPECTED_ERRORS, report.failed
    assert report.succeeded >= 0.9 * report.sent
    # Worker kills: at least one caught leases; every request it held came back and was answered.
    assert report.kills_catching_a_lease >= 1, report.faults
    assert report.requests_caught_by_kills_ok == report.requests_caught_by_kills, report.faults
    assert report.redelivered >= report.requests_caught_by_kills
    assert report.worst_worker_kill_recovery_s <= recovery_bound_s(plan), report.faults
    # Redis kill -9: it held jobs, and the AOF kept each one until it was answered.
    assert report.redis_jobs_at_kill >= 1, report.faults
    assert report.redis_jobs_at_kill_ok == report.redis_jobs_at_kill, report.faults
    # No reply delivered twice, and none computed for a caller that had given up.
    assert report.late_replies == 0
    assert report.leftover_keys == []
    assert report.unclean_exits == []


@pytest.mark.slow
@pytest.mark.timeout(120)  # a 12 s load, but 8 processes to start and stop on 2 cores
async def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    check(await run_chaos(SHORT, tmp_path), SHORT, tmp_path)


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_long_chaos_run_loses_nothing(tmp_path: Path) -> None:
    check(await run_chaos(LONG, tmp_path), LONG, tmp_path)
