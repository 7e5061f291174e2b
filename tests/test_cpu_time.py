"""A model's compute CPU: the calling thread inside ONNX Runtime's run plus the
session's own intra-op pool threads, told apart from the worker's other threads."""

from __future__ import annotations

import threading
from pathlib import Path

from meshserve.models.repository import load_model
from model_workers.cpu_time import thread_cpu_s, thread_ids
from model_workers.engines import SPIN_BOUNDED, SPIN_OFF, EngineSetting
from model_workers.session import LoadedModel


def test_a_threads_cpu_is_read_while_it_lives() -> None:
    mine = threading.get_native_id()
    assert mine in thread_ids()
    assert (thread_cpu_s(mine) or 0.0) > 0.0
    assert thread_cpu_s(2**22 + 7) is None  # past any pid_max the kernel allows: no such thread


def test_a_sessions_pool_threads_are_the_ones_onnx_runtime_started_for_it(model_repository: Path) -> None:
    info = load_model(model_repository / "cnn", 1)
    single = LoadedModel(info, engine=EngineSetting(1, SPIN_OFF))
    pooled = LoadedModel(info, engine=EngineSetting(3, SPIN_OFF))
    python_threads = {t.native_id for t in threading.enumerate()}
    assert single.pool_threads == frozenset()  # one thread: the caller runs every op
    assert len(pooled.pool_threads) == 2  # three threads: the caller and two of the pool
    assert pooled.pool_threads <= thread_ids()
    assert pooled.pool_threads.isdisjoint(python_threads)


def test_compute_cpu_counts_the_pool_threads_work_and_survives_a_rebuild(model_repository: Path) -> None:
    model = LoadedModel(load_model(model_repository / "cnn", 1), engine=EngineSetting(3, SPIN_BOUNDED))
    pool = model.pool_threads
    pool_before = {tid: thread_cpu_s(tid) or 0.0 for tid in pool}
    assert model.compute_cpu_s() >= 0.0
    big = model.sample_inputs(8)
    for _ in range(5):
        model.run(big)
    ran = model.compute_cpu_s()
    # a batch of 8 convs is split across the pool: its threads did part of the work
    assert any((thread_cpu_s(tid) or 0.0) > pool_before[tid] for tid in pool)
    assert ran > 0.0

    model.use_engine(EngineSetting(2, SPIN_OFF))  # the old session's pool is retired, not forgotten
    assert model.pool_threads.isdisjoint(pool)
    assert len(model.pool_threads) == 1
    assert model.compute_cpu_s() >= ran
