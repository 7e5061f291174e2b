"""The baseline: the same ``model.onnx`` in this process on raw ONNX Runtime.

It runs while the mesh idles (under load both would compete for the same CPUs):
batch-1 latency back to back and after an idle gap, items/s at batch 1, 8 and the
max batch, then batch 1 after an idle gap on that session, on a one-thread session
and on the session a worker builds (its engine setting chosen as a worker chooses it,
model_workers/tuning.py), in alternating rounds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from meshserve.models.repository import ModelInfo
from meshserve.settings import env_default, parse_bool
from meshserve_bench.load import cpu_s, machine_busy_s, percentile_ms, random_inputs
from model_workers.session import LoadedModel
from model_workers.tuning import choose_engine, fixed_setting

IDLE_GAP_S = 0.004
"""The sleep before each run of the idle-gap reference: about what a request spends
outside the model at concurrency 1. A run that follows an idle gap finds cold caches
and a core woken from idle, in ONNX Runtime alone, with no mesh involved."""


@dataclass(frozen=True, slots=True)
class RawFigures:
    """Batch-1 latency and items/s per batch size tried.

    ``idle_p50_ms``: batch-1 p50 when every run follows ``IDLE_GAP_S`` of sleep, as a
    worker at concurrency 1 runs it; ``one_thread_idle_p50_ms`` the same on a session
    of one thread. ``worker_idle_p50_ms``: the same on the session a worker builds,
    under ``worker_engine`` (its setting, and how it was chosen).
    ``other_cores``: how many cores other processes kept busy meanwhile (None off Linux)."""

    p50_ms: float
    p99_ms: float
    items_per_s_by_batch: dict[int, float]
    idle_p50_ms: float
    one_thread_idle_p50_ms: float
    worker_idle_p50_ms: float
    worker_engine: str
    other_cores: float | None

    def best_batch(self) -> int:
        return max(self.items_per_s_by_batch, key=lambda batch: self.items_per_s_by_batch[batch])

    def best_items_per_s(self) -> float:
        return self.items_per_s_by_batch[self.best_batch()]


def raw_batches(max_batch: int) -> list[int]:
    """Batch sizes for the raw run: 1, 8 when below the max, and the max."""
    return sorted({1, max_batch} | ({8} if 1 < 8 < max_batch else set()))


def timed_runs_ns(run: Callable[[], object], duration_s: float, gap_s: float = 0.0) -> list[int]:
    """Call ``run`` for ``duration_s``, back to back or after ``gap_s`` of sleep each time;
    the latency of each call in ns."""
    latencies_ns: list[int] = []
    end_ns = time.perf_counter_ns() + int(duration_s * 1e9)
    while time.perf_counter_ns() < end_ns:
        if gap_s:
            time.sleep(gap_s)
        start_ns = time.perf_counter_ns()
        run()
        latencies_ns.append(time.perf_counter_ns() - start_ns)
    return latencies_ns


def measure_raw(model: ModelInfo, max_batch: int, warmup_s: float, duration_s: float) -> RawFigures:
    """Run ``model`` on CPU (ONNX Runtime's default threads) at each of ``raw_batches(max_batch)``,
    then batch 1 after idle gaps on it, on one thread and on a worker's session, interleaved;
    counts what else kept the machine busy."""
    machine_before_s, own_before_s, wall_before_s = machine_busy_s(), cpu_s(), time.perf_counter()
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    items_per_s: dict[int, float] = {}
    batch1_ns: list[int] = []
    for batch in raw_batches(max_batch):
        run = functools.partial(session.run, None, random_inputs(model, batch))
        timed_runs_ns(run, warmup_s)
        latencies_ns = timed_runs_ns(run, duration_s)
        items_per_s[batch] = batch * len(latencies_ns) / (sum(latencies_ns) / 1e9)
        if batch == 1:
            batch1_ns = latencies_ns
    feed = random_inputs(model, 1)
    worker_run, worker_engine = worker_session(model)
    idle = interleaved_idle_runs_ns(
        {
            "default": functools.partial(session.run, None, feed),
            "one thread": functools.partial(one_thread_session(model).run, None, feed),
            "worker": functools.partial(worker_run, feed),
        },
        duration_s * 1.5,
    )
    machine_after_s, own_after_s, wall_after_s = machine_busy_s(), cpu_s(), time.perf_counter()
    other_cores = None
    if machine_before_s is not None and machine_after_s is not None:
        other_s = (machine_after_s - machine_before_s) - (own_after_s - own_before_s)
        other_cores = max(0.0, other_s / (wall_after_s - wall_before_s))
    return RawFigures(
        p50_ms=percentile_ms(batch1_ns, 50),
        p99_ms=percentile_ms(batch1_ns, 99),
        items_per_s_by_batch=items_per_s,
        idle_p50_ms=percentile_ms(idle["default"], 50),
        one_thread_idle_p50_ms=percentile_ms(idle["one thread"], 50),
        worker_idle_p50_ms=percentile_ms(idle["worker"], 50),
        worker_engine=worker_engine,
        other_cores=other_cores,
    )


def interleaved_idle_runs_ns(
    runs: dict[str, Callable[[], object]], duration_s: float, rounds: int = 8
) -> dict[str, list[int]]:
    """Batch 1 after ``IDLE_GAP_S`` on each of ``runs``, in ``rounds`` that alternate them,
    so drift in what else the machine does hits each alike. Two unmeasured runs open
    each turn: the previous session's threads may still spin then."""
    latencies_ns: dict[str, list[int]] = {name: [] for name in runs}
    turn_s = duration_s / rounds / len(runs)
    for _ in range(rounds):
        for name, run in runs.items():
            run()
            run()
            latencies_ns[name] += timed_runs_ns(run, turn_s, IDLE_GAP_S)
    return latencies_ns


def one_thread_session(model: ModelInfo) -> ort.InferenceSession:
    """A one-thread session: no pool threads to wake."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(model.path), sess_options=options, providers=["CPUExecutionProvider"])


def worker_session(model: ModelInfo) -> tuple[Callable[[dict[str, Any]], object], str]:
    """A run of the session a CPU worker of this environment builds (``MESHSERVE_INTRA_OP_*``,
    as ``meshserve up`` passes them on, else the model's config.yaml, else measured as a
    worker measures it), and that setting's label with how it was chosen."""
    spinning = env_default("INTRA_OP_SPINNING", None)  # None, or the variable's text
    flags = (env_default("INTRA_OP_THREADS", 0), None if spinning is None else parse_bool(spinning))
    threads, spin = fixed_setting(*flags, model.engine)
    loaded = LoadedModel(model, device="cpu")
    loaded.warm_up()
    choose_engine(loaded, threads, spin, source="flags" if flags != (0, None) else "config.yaml")
    return loaded.run, f"{loaded.engine.label}, {loaded.engine_source}"
