"""The worker's device: one model run at a time, a batch or a canary, never both.

Runs go to the ONNX Runtime thread, except a quick model's batches, which run on the
event loop's own thread (``Served.runs_inline``): the hand-off there and back would
cost more than the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from model_workers.served import Served


class Compute:
    """The device lock and the ONNX Runtime thread; ``close`` ends the thread."""

    def __init__(self) -> None:
        self._device = asyncio.Lock()  # held by every model run: a batch or a canary, never both at once
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")

    async def run_batch(
        self,
        served: Served,
        feed: dict[str, Any],
        keep_leases: Callable[[], Coroutine[Any, Any, None]],
    ) -> tuple[list[Any], int]:
        """Run one batch: on this thread if the model is quick, else on the ONNX Runtime
        thread with ``keep_leases()`` running beside it (cancelled when the run ends).
        Returns the outputs and the run's time in µs, timed once the device lock is
        held: a canary in progress finishes first, and its time is not the batch's."""
        async with self._device:
            started_ns = time.time_ns()
            if served.runs_inline():
                outputs = served.model.run(feed)
            else:
                heartbeat = asyncio.create_task(keep_leases())
                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._executor, served.model.run, feed)
                finally:
                    heartbeat.cancel()
            return outputs, (time.time_ns() - started_ns) // 1000

    async def run_canary(self, served: Served, timeout_s: float) -> None:
        """Run the model's canary on the ONNX Runtime thread, after the batch in hand.

        TimeoutError if the run outlasts ``timeout_s``, counted once the device lock is
        held: waiting for a batch longer than that (a slow model, its lease extended)
        says nothing about the model's health."""
        async with self._device:
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().run_in_executor(self._executor, served.model.canary)

    def close(self) -> None:
        """Wait for the run in progress, then end the thread."""
        self._executor.shutdown(wait=True)
