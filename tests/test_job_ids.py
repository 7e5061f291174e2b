"""Job ids: the format every key and script expects, and no shared draws across a fork
(a gateway's ``--processes`` children must not make each other's ids)."""

from __future__ import annotations

import os
import re

from gateway.job_ids import new_job_id


def test_a_job_id_is_32_lower_case_hex_digits_and_ids_differ() -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", job_id) for job_id in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without running the parent's cleanups
        os.write(write_end, new_job_id().encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_id = pipe.read().decode()
    os.waitpid(pid, 0)
    # without a reseed at fork the child's first draw is the parent's next one
    assert child_id != new_job_id()
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
