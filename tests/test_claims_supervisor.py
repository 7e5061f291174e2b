"""What docs/reliability.md and meshserve/cli/supervisor.py promise of ``meshserve
up``'s supervision: a child that dies is restarted after 0.5 s, twice as long after
each quick death, up to 30 s; one that stayed up for a minute starts again from
0.5 s. Checked on a real child process killed again and again; the supervisor's
clock is the ``now_s`` it is handed, so the delays are checked without waiting them."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from meshserve.cli.supervisor import STABLE_AFTER_S, Child
from meshserve.devkit.examples import write_example_repository


def kill(child: Child) -> None:
    assert child.proc is not None
    assert child.alive()
    child.proc.kill()
    child.proc.wait()


def restart_delay(child: Child, caplog: pytest.LogCaptureFixture) -> float:
    """Let the supervisor see the death; the delay it schedules (logged), checked to the
    instant: not restarted just before it, restarted at it."""
    died_s = child.started_at_s + 1.0  # a quick death
    caplog.clear()
    child.supervise(died_s)
    (line,) = [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]
    found = re.search(r"restarting in (\S+)s$", line)
    assert found, line
    delay_s = float(found.group(1))
    restarts = child.restarts
    child.supervise(died_s + delay_s - 0.01)
    assert (child.restarts, child.alive()) == (restarts, False)  # still waiting
    child.supervise(died_s + delay_s)
    assert (child.restarts, child.alive()) == (restarts + 1, True)
    return delay_s


@pytest.mark.timeout(40)
def test_each_quick_death_doubles_the_restart_delay_up_to_30_s_and_a_stable_run_resets_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshserve.up")
    repository = write_example_repository(tmp_path, ["mlp"])
    child = Child("router", ["--model-repository", str(repository), "--port", "0", "--metrics-port", "0"])
    child.start()
    try:
        delays = []
        for _ in range(8):
            kill(child)
            delays.append(restart_delay(child, caplog))
        child.supervise(child.started_at_s + STABLE_AFTER_S + 1)  # up for over a minute
        kill(child)
        after_a_stable_run = restart_delay(child, caplog)
    finally:
        if child.alive():
            kill(child)

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert after_a_stable_run == 0.5
    assert child.restarts == 9
