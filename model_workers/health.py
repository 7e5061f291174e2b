"""Model health: readiness, the canary, and counting failed batches.

A model is in service while it is warm, healthy and not being dropped. Failed
batches in a row or a failing canary take it out; only a passing canary brings it
back. Each change updates the worker's health entries and is reported to the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from model_workers.served import Served
from model_workers.session import SanityCheckFailed
from model_workers.state import WorkerState

log = logging.getLogger(__name__)

FAILURES_BEFORE_NOT_READY = 3
"""Consecutive failed batches after which a model is reported not ready.

Only a passing canary (``Worker.canary_forever``) brings it back."""


class Health(WorkerState):
    """Readiness of each held model, and what puts it in or out of service."""

    def readiness(self) -> dict[tuple[str, int], bool]:
        """Each held model version: whether it is in service (warm, healthy, not being dropped)."""
        return {key: s.model.ready and self._claims(s) for key, s in self.served.items()}

    async def canary_forever(self) -> None:
        """Run every held model's known sample input each ``canary_interval_s``.

        A canary that raises, outlasts a lease or answers NaN or Inf takes its model
        out of service; a later one that passes brings it back, which is also the
        only way back for a model taken out by failed batches. Canaries run in the
        worker's ONNX Runtime thread under the device lock that every batch holds,
        so they queue behind a computing batch and never run beside one: one
        batch-1 run per model per interval. The task is owned by the worker's
        server, which cancels it on stop.
        """
        interval_s = self.settings.canary_interval_s
        if interval_s <= 0:
            return
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            for served in list(self.served.values()):
                if self._stopping.is_set():
                    return
                if self._claims(served):  # not one being dropped
                    await self._canary(served)

    async def _canary(self, served: Served) -> None:
        info = served.model.info
        try:
            # a canary slower than a lease is as dead as a batch that slow
            async with asyncio.timeout(self.settings.lease_ms / 1000):
                async with self._device:
                    await asyncio.get_running_loop().run_in_executor(self._executor, served.model.canary)
        except Exception as exc:
            if not served.canary_failing:
                log.error(
                    "canary of model %s version %d failed (%s): reporting it not ready until a canary passes",
                    info.name,
                    info.version,
                    str(exc) or type(exc).__name__,
                    exc_info=not isinstance(exc, SanityCheckFailed | TimeoutError),
                    extra={"model": info.name, "version": info.version},
                )
            served.canary_failing = True
            self._set_ready(served, False)
            return
        if not served.model.ready:
            log.warning(
                "canary of model %s version %d passed: reporting it ready again",
                info.name,
                info.version,
                extra={"model": info.name, "version": info.version},
            )
            # only on the way back: a pass between failing batches must not hide them
            served.consecutive_failures = 0
        served.canary_failing = False
        self._set_ready(served, True)

    def _set_ready(self, served: Served, ready: bool) -> None:
        """Put a model in or out of service: its health entry and the router follow."""
        if served.model.ready == ready:
            return
        served.model.ready = ready
        self.on_readiness_change()
        self._track(asyncio.create_task(self._report_quietly()))

    def _count_failure(self, served: Served) -> None:
        """A model failing batch after batch is taken out of service (not ready)."""
        served.consecutive_failures += 1
        if served.consecutive_failures == FAILURES_BEFORE_NOT_READY and served.model.ready:
            info = served.model.info
            log.error(
                "model %s version %d failed %d batches in a row: reporting it not ready until a canary passes",
                info.name,
                info.version,
                served.consecutive_failures,
                extra={"model": info.name, "version": info.version},
            )
            self._set_ready(served, False)
