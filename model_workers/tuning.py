"""ONNX Runtime's CPU thread settings for one model, chosen by measurement at warm-up.

Whether a session should use one thread or all the worker's CPUs, and whether its
idle threads should spin, depends on the model: a network of many small ops
(MobileNet-style: depthwise convs, squeeze-excite) spends most of a batch-1 run
waking sleeping pool threads op after op, where a few big convs do not care. So
after warm-up a CPU worker times batch 1 (after an idle gap, as a lone request
finds it) and the max batch under a few settings (``candidates``) and keeps the one
``pick`` prefers. What config.yaml's ``engine`` section or the worker's flags fix
is not tried. On a GPU nothing is tried: the CPU threads only feed the device.

Trials rebuild the model's session once per setting (tens of ms for a small model)
and stop early for a model whose batch 1 takes longer than ``HEAVY_BATCH1_S``
(thread wake-ups, a few µs per op, cannot matter there) or once ``TRIALS_BUDGET_S``
has passed.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

from meshserve.models.execution import EngineConfig
from model_workers.engines import (
    SPIN_BOUNDED,
    SPIN_OFF,
    SPIN_ON,
    EngineSetting,
    Trial,
    bounded_spin_supported,
    cpu_budget,
)
from model_workers.session import LoadedModel

log = logging.getLogger(__name__)

BATCH1_RUNS = 11
WARM_RUNS = 2  # unmeasured runs after each rebuild: first runs allocate
MAX_BATCH_RUNS = 3
IDLE_GAP_S = 0.002
"""Sleep before each timed batch-1 run: a worker at low load meets each request
after a gap, when sleeping threads must be woken (back to back they stay awake)."""
HEAVY_BATCH1_S = 0.025
TRIALS_BUDGET_S = 1.0
MARGIN = 0.05
"""A setting that costs the host more CPU (more threads, spinning) must beat a
cheaper one by more than this share of the score to be kept."""

Measure = Callable[[LoadedModel, EngineSetting], Trial]


def fixed_setting(flag_threads: int, flag_spinning: bool | None, config: EngineConfig) -> tuple[int | None, str | None]:
    """(threads, spin) fixed by the worker's flags, else by config.yaml; None: to measure.

    ``flag_threads`` 0 and ``flag_spinning`` None mean the flag was not given."""
    threads = flag_threads or config.intra_op_threads
    if flag_spinning is not None:
        return threads, SPIN_ON if flag_spinning else SPIN_OFF
    return threads, config.spin


def candidates(threads: int | None, spin: str | None, budget: int, bounded: bool) -> list[EngineSetting]:
    """The settings to try, cheapest for the host first; ``threads``/``spin`` None: try both ways.

    Threads: 1 or ``budget`` (the CPUs this worker may use; 0: ONNX Runtime's own
    choice, for a worker that may use the whole machine). Spinning: off, or on
    (bounded when ``bounded``, this ONNX Runtime's spin limit). One thread has no
    pool to spin, so it is tried once."""
    thread_counts = [threads] if threads is not None else [1] if budget == 1 else [1, budget]
    spins = [spin] if spin is not None else [SPIN_OFF, SPIN_BOUNDED if bounded else SPIN_ON]
    found: list[EngineSetting] = []
    for count in thread_counts:
        for mode in spins:
            setting = EngineSetting(count, SPIN_OFF if count == 1 and spin is None else mode)
            if setting not in found:
                found.append(setting)
    return found


def pick(trials: Sequence[Trial], margin: float = MARGIN) -> Trial:
    """The trial to keep: the lowest score, batch 1 and max batch each counted relative
    to the best of all trials; ``trials`` in order of cost, and a costlier one wins only
    by more than ``margin``."""
    best_batch1_s = min(t.batch1_s for t in trials)
    max_batch = [t.max_batch_s for t in trials if t.max_batch_s is not None]
    best_max_s = min(max_batch) if max_batch else None

    def score(trial: Trial) -> float:
        relative = trial.batch1_s / best_batch1_s
        if best_max_s is not None and trial.max_batch_s is not None:
            relative += trial.max_batch_s / best_max_s
        return relative

    best = min(score(t) for t in trials)
    return next(t for t in trials if score(t) <= best * (1 + margin))


def measure_trial(model: LoadedModel, setting: EngineSetting) -> Trial:
    """Rebuild ``model``'s session under ``setting`` and time it (blocking; runs the model)."""
    model.use_engine(setting)
    feed = model.sample_inputs(1)
    for _ in range(WARM_RUNS):
        model.run(feed)
    batch1_s: list[float] = []
    for _ in range(BATCH1_RUNS):
        time.sleep(IDLE_GAP_S)
        started = time.perf_counter()
        model.run(feed)
        batch1_s.append(time.perf_counter() - started)
    max_batch_s = None
    if model.info.max_batch_size > 1:
        big = model.sample_inputs(model.info.max_batch_size)
        model.run(big)
        runs = []
        for _ in range(MAX_BATCH_RUNS):
            started = time.perf_counter()
            model.run(big)
            runs.append(time.perf_counter() - started)
        max_batch_s = min(runs)
    # The first quartile, and the max batch's fastest run: on a shared host other
    # processes only ever add time, and a run they slowed says nothing of the setting.
    # Waking sleeping threads is paid on every run after the gap, so it stays in.
    return Trial(setting, statistics.quantiles(batch1_s, n=4)[0], max_batch_s)


def choose_engine(
    model: LoadedModel,
    threads: int | None,
    spin: str | None,
    *,
    source: str = "config.yaml",
    budget: int | None = None,
    bounded: bool | None = None,
    measure: Measure = measure_trial,
) -> None:
    """Settle ``model.engine`` (after its warm-up, before it is served), and record in
    ``model.engine_source`` and ``model.engine_trials`` how; logs one INFO line.

    ``threads``/``spin`` fixed (``fixed_setting``; ``source`` says by what) are not
    tried. ``budget`` (default: ``cpu_budget()``, or 0 when that is every CPU), ``bounded`` (default: whether this
    ONNX Runtime bounds spinning) and ``measure`` are seams for tests. A trial that
    raises leaves the setting the model warmed up under, with a warning."""
    info = model.info
    started = time.perf_counter()
    if not model.on_cpu:
        model.engine_source = "gpu"  # CPU threads only feed the device: nothing worth trying
        return
    if budget is None:
        budget = cpu_budget()
        if budget >= (os.cpu_count() or 1):
            budget = 0  # the whole machine: ONNX Runtime's own choice (a thread per physical core, pinned)
    bounded = bounded_spin_supported() if bounded is None else bounded
    settings = candidates(threads, spin, budget, bounded)
    if len(settings) == 1:
        if threads is None:  # else fixed: one thread has no pool threads to spin
            source = "a CPU budget of 1"
        model.use_engine(settings[0])
        model.engine_source = source
        log.info("%s version %d: engine %s (fixed by %s)", info.name, info.version, settings[0].label, source)
        return
    warmed_up_under = model.engine
    trials: list[Trial] = []
    try:
        for setting in settings:
            trials.append(measure(model, setting))
            heavy = trials[0].batch1_s > HEAVY_BATCH1_S
            if heavy or time.perf_counter() - started > TRIALS_BUDGET_S:
                break
        chosen = pick(trials)
        model.use_engine(chosen.setting)
    except Exception as exc:
        log.warning(
            "%s version %d: engine trials failed (%s: %s); keeping %s",
            info.name,
            info.version,
            type(exc).__name__,
            exc,
            warmed_up_under.label,
        )
        model.use_engine(warmed_up_under)
        return
    model.engine_source = "measured"
    model.engine_trials = tuple(trials)
    log.info(
        "%s version %d: engine %s, measured in %.0f ms (batch 1 / max batch %d, ms: %s)",
        info.name,
        info.version,
        chosen.setting.label,
        (time.perf_counter() - started) * 1000,
        info.max_batch_size,
        "; ".join(f"{t.setting.label} {_ms(t.batch1_s)}/{_ms(t.max_batch_s)}" for t in trials),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"
