"""Model health: the canary, and counting failed batches.

A model is in service while it is warm, healthy and not being dropped. Failed
batches in a row or a failing canary take it out; only a passing canary brings it
back. Each change calls the worker's ``on_change`` (health entries, a report to the
router).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshserve.settings import WorkerSettings
from model_workers.compute import Compute
from model_workers.held import HeldModels
from model_workers.served import Served
from model_workers.session import SanityCheckFailed

log = logging.getLogger(__name__)

FAILURES_BEFORE_NOT_READY = 3
"""Consecutive failed batches after which a model is reported not ready.

Only a passing canary (``ModelHealth.canary_forever``) brings it back."""


class ModelHealth:
    """What puts each held model in or out of service."""

    def __init__(
        self,
        settings: WorkerSettings,
        held: HeldModels,
        compute: Compute,
        stopping: asyncio.Event,
        on_change: Callable[[], None],
    ) -> None:
        self._canary_interval_s = settings.canary_interval_s
        self._canary_timeout_ms = settings.canary_timeout_ms
        self._held = held
        self._compute = compute
        self._stopping = stopping
        self._on_change = on_change

    async def canary_forever(self) -> None:
        """Run every held model's known sample input each ``canary_interval_s``.

        A canary that raises, runs past its limit (``Served.canary_timeout_s``: a
        multiple of the model's measured time) or answers NaN or Inf takes its model
        out of service; a later one that passes brings it back, which is also the
        only way back for a model taken out by failed batches. Canaries run on the
        worker's ONNX Runtime threads holding one of the model's instances and a
        pool slot, so they queue behind the model's own computing batches: one
        batch-1 run per model per interval. The task is owned by the worker's
        server, which cancels it on stop.
        """
        interval_s = self._canary_interval_s
        if interval_s <= 0:
            return
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            for served in list(self._held.served.values()):
                if self._stopping.is_set():
                    return
                if self._held.claims(served):  # not one being dropped
                    await self._canary(served)

    async def _canary(self, served: Served) -> None:
        info = served.model.info
        try:
            # a canary far slower than the model's own measured time is a sick model
            # (its wait for batches, its own or other models', not counted)
            await self._compute.run_canary(served, served.canary_timeout_s(self._canary_timeout_ms))
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
        self._on_change()

    def batch_failed(self, served: Served) -> None:
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

    @staticmethod
    def batch_succeeded(served: Served) -> None:
        """A batch ran: the count of failures in a row starts again."""
        served.consecutive_failures = 0
