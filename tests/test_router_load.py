"""The router's view of load: rates from workers' cumulative counters, and the
autoscaling signal built from them and the queue depth."""

from __future__ import annotations

import pytest

from meshserve.observe.metrics import MIN_RATE_FOR_BACKLOG_PER_S, backlog_seconds
from router.core import LoadRate, RouterCore

MLP = ("mlp", 1)


async def test_rates_come_from_the_last_two_reports_of_each_worker_summed() -> None:
    now = [1000.0]
    core = RouterCore([], clock=lambda: now[0])
    await core.report("w1", "cpu", set(), draining=False, loads={MLP: (100, 5.0)})
    await core.report("w2", "cpu", set(), draining=False, loads={MLP: (0, 0.0)})
    assert core.load_rates() == {}  # one report each: no interval yet
    now[0] += 2.0
    await core.report("w1", "cpu", set(), draining=False, loads={MLP: (140, 7.0)})  # 20/s, waits 2 s over 40
    await core.report("w2", "cpu", set(), draining=False, loads={MLP: (20, 3.0)})  # 10/s, waits 3 s over 20
    rate = core.load_rates()[MLP]
    assert rate.requests_per_s == pytest.approx(30.0)
    assert rate.mean_queue_wait_s == pytest.approx(5.0 / 60)
    now[0] += 1.0
    await core.report("w1", "cpu", set(), draining=False, loads={MLP: (0, 0.0)})  # restarted: counters went back
    assert core.load_rates()[MLP].requests_per_s == pytest.approx(30.0)  # the old interval stands, no negative rate


def test_backlog_is_the_queue_over_the_rate_and_never_below_the_recent_wait() -> None:
    assert backlog_seconds(60, LoadRate(requests_per_s=30.0, mean_queue_wait_s=0.1)) == pytest.approx(2.0)
    assert backlog_seconds(0, LoadRate(requests_per_s=30.0, mean_queue_wait_s=0.1)) == pytest.approx(0.1)
    assert backlog_seconds(5, None) == pytest.approx(5 / MIN_RATE_FOR_BACKLOG_PER_S)  # nobody serving
    assert backlog_seconds(0, None) == 0.0
