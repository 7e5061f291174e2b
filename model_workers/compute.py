"""The worker's device: a bounded pool of model runs, each stopped at its time limit.

Up to ``slots`` runs at once on the ONNX Runtime threads, across models, and at most
``info.instances`` of one model (a batch or its canary): a slow model holds its own
instances, never the whole device. A quick model's batches run on the event loop's
own thread instead (``Served.runs_inline``; the hand-off there and back would cost
more than the run), unless its inputs pass ``OFF_LOOP_BYTES``, stopped after
``INLINE_LIMIT_MS`` if the model turned slow (the runner then runs the batch again
on a task and thread of its own). Every run on a thread is stopped (ONNX Runtime's
``RunOptions.terminate``) at the model's execution timeout, or when every request of
its batch has passed its deadline.

A decoupled Python model's stream (``run_batch``'s ``run``) takes no pool slot: it
may last minutes, its work is done in the model's own process, and its thread only
waits on a pipe and on Redis; it runs on a thread of the stream pool instead, bounded
by the model's instances. Holding a slot for a stream would starve every other model
of the worker while it lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshserve.errors import DeadlineExceeded, Unavailable
from meshserve.wire.envelope import OFF_LOOP_BYTES
from model_workers.served import INLINE_LIMIT_MS, Served
from model_workers.stops import Stop, Watchdog

EXECUTION_TIMEOUT = "execution timeout"
DEADLINE = "deadline"
INLINE_LIMIT = "inline limit"
CANARY_TIMEOUT = "canary timeout"


STREAM_THREADS = 64
"""Streams at once on a worker (each waits on its Python process; the models'
``instances`` bound them first)."""


class TurnedSlow(Exception):
    """A quick model's run on the event loop's thread was stopped at ``INLINE_LIMIT_MS``:
    run the batch again off the loop (it is no longer counted as quick)."""


def default_slots() -> int:
    """Runs at once on a worker when its settings say 0: enough that a few slow models
    leave room for the rest, few enough not to drown the host's cores."""
    return max(2, min(8, os.cpu_count() or 2))


class Compute:
    """The run pool, its ONNX Runtime threads and the watchdog; ``close`` ends them."""

    def __init__(self, slots: int = 0) -> None:
        slots = slots or default_slots()
        self._slots = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="ort")
        self._streams = ThreadPoolExecutor(max_workers=STREAM_THREADS, thread_name_prefix="stream")
        self._watchdog = Watchdog()

    async def run_batch(
        self,
        served: Served,
        feed: dict[str, Any],
        keep_leases: Callable[[], Coroutine[Any, Any, None]],
        deadline_ms: int,
        run: Callable[[dict[str, Any], Any, Callable[[], None]], Any] | None = None,
    ) -> tuple[Any, int]:
        """Run one batch whose last request is due at ``deadline_ms`` (Unix ms).

        Inline if the model is quick (TurnedSlow if stopped there), else on an ONNX Runtime thread with
        ``keep_leases()`` running beside it (cancelled when the run ends). Returns the
        outputs and the run's time in µs, timed once the model's instance and a pool
        slot are held (a canary in progress finishes first; its time is not the batch's).
        Raises DeadlineExceeded when every request's deadline passed mid-run, and
        Unavailable when the run outlasted the model's execution timeout. ``run``: what
        runs in place of ``served.model.run`` (a decoupled Python model's stream, never
        inline), given a third argument to call at each response: the execution
        timeout bounds the time to the first response and between two, not the stream."""
        async with served.instances:
            # a large batch never runs on the loop, however quick its model (OFF_LOOP_BYTES)
            if run is None and served.runs_inline() and sum(array.nbytes for array in feed.values()) <= OFF_LOOP_BYTES:
                started_ns = time.time_ns()
                stop = Stop()
                self._watchdog.arm(stop, time.monotonic() + INLINE_LIMIT_MS / 1000, INLINE_LIMIT)
                try:
                    return served.model.run(feed, stop.options), (time.time_ns() - started_ns) // 1000
                except Exception as exc:
                    if stop.reason != INLINE_LIMIT:
                        raise
                    served.observe_compute(INLINE_LIMIT_MS)  # at least: its next runs go to a thread
                    raise TurnedSlow(
                        f"model '{served.model.info.name}' ran past {INLINE_LIMIT_MS:.0f} ms inline"
                    ) from exc
                finally:
                    self._watchdog.disarm(stop)
            async with self._slots if run is None else contextlib.nullcontext():
                started_ns = time.time_ns()
                heartbeat = asyncio.create_task(keep_leases())
                try:
                    if run is None:
                        outputs = await self._run_limited(served, feed, deadline_ms, served.model.run, self._executor)
                    else:
                        outputs = await self._run_limited(served, feed, deadline_ms, run, self._streams, streams=True)
                finally:
                    heartbeat.cancel()
                return outputs, (time.time_ns() - started_ns) // 1000

    async def _run_limited(
        self,
        served: Served,
        feed: dict[str, Any],
        deadline_ms: int,
        run: Callable[..., Any],
        executor: ThreadPoolExecutor,
        *,
        streams: bool = False,
    ) -> Any:
        """One run on a thread, stopped at the execution timeout or ``deadline_ms``."""
        stop = Stop()
        now_s = time.monotonic()
        limit_ms = served.execution_timeout_ms()
        self._watchdog.arm(stop, now_s + limit_ms / 1000, EXECUTION_TIMEOUT)
        self._watchdog.arm(stop, now_s + (deadline_ms - time.time() * 1000) / 1000, DEADLINE)
        arguments: tuple[Any, ...] = (feed, stop.options)
        if streams:  # each response gives the stream its execution timeout again

            def responded() -> None:
                self._watchdog.postpone(stop, time.monotonic() + limit_ms / 1000, EXECUTION_TIMEOUT)

            arguments = (*arguments, responded)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, run, *arguments)
        except Exception as exc:
            name = served.model.info.name
            if stop.reason == EXECUTION_TIMEOUT:
                raise Unavailable(
                    f"model '{name}' stopped at its execution timeout of {limit_ms} ms"
                    " (config.yaml execution_timeout_ms)"
                ) from exc
            if stop.reason == DEADLINE:
                raise DeadlineExceeded(
                    f"model '{name}' stopped: every request of the batch passed its deadline"
                ) from exc
            raise
        finally:
            self._watchdog.disarm(stop)

    async def run_canary(self, served: Served, timeout_s: float) -> None:
        """Run the model's canary on an ONNX Runtime thread, stopped after ``timeout_s``.

        TimeoutError if it was stopped, counted once one of the model's instances and
        a pool slot are held: waiting for batches (its own or other models') says
        nothing about the model's health."""
        async with served.instances, self._slots:
            stop = Stop()
            self._watchdog.arm(stop, time.monotonic() + timeout_s, CANARY_TIMEOUT)
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, served.model.canary, stop.options)
            except asyncio.CancelledError:  # the worker is stopping: its thread need not finish the canary
                stop.options.terminate = True
                raise
            except Exception as exc:
                if stop.reason == CANARY_TIMEOUT:
                    raise TimeoutError(f"stopped after {timeout_s:.1f} s") from exc
                raise
            finally:
                self._watchdog.disarm(stop)

    def close(self) -> None:
        """Wait for the runs in progress, then end the threads."""
        self._executor.shutdown(wait=True)
        self._streams.shutdown(wait=True)
        self._watchdog.close()
