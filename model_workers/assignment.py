"""Following the router's assignment: load what it adds, drain what it takes away.

A newly assigned model loads and warms up in a loader thread of its own (serving
the others goes on meanwhile) and is claimed from, and reported ready, only once
warm. A model no longer assigned is drained: it is claimed from no more at once
(its health entry and report say not ready), the batch in hand finishes and its
replies are written, then the session goes. A model that fails to load is logged,
reported to the router with its reason (``failures``), and tried again while it
stays assigned after a delay that doubles with each failure, from
``LOAD_RETRY_FIRST_S`` up to ``LOAD_RETRY_MAX_S`` (:func:`retry_delay_s`); at once
when the router assigns it afresh after taking it away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from meshserve.models.python_backend import PYTHON
from meshserve.models.repository import ModelInfo, load_model
from meshserve.queue import ModelKeys
from meshserve.settings import WorkerSettings
from meshserve.store.cluster import is_cluster_url
from model_workers.engines import SPIN_OFF, EngineSetting
from model_workers.held import HeldModels, ModelKey
from model_workers.leases import Leases
from model_workers.memory import PeakMemoryProbe, warm_up_measured
from model_workers.python_runner import PythonModel, refuse_unless_allowed
from model_workers.runners import ModelRunner
from model_workers.serve_loop import ServeLoop
from model_workers.served import Served
from model_workers.session import LoadedModel
from model_workers.tuning import choose_engine, fixed_setting
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

LOAD_RETRY_FIRST_S = 15.0
LOAD_RETRY_MAX_S = 600.0
"""A model that failed to load is tried again, while still assigned, after
``LOAD_RETRY_FIRST_S``, then twice as long after each failure up to
``LOAD_RETRY_MAX_S``: not at every heartbeat (a broken model file would load in a
loop, taking the loader thread and the CPU), never given up for good (a failure can
be passing: memory taken by another process, a file being copied)."""

MAX_REASON_CHARS = 500
"""A failure's reason is cut to this length: it travels in every report and shows
in the router's log, its metrics and ``meshserve top``."""


class SequencesNeedOneRedis(Exception):
    """A stateful model assigned to a worker whose Redis is a cluster."""


def retry_delay_s(failures: int) -> float:
    """How long after its ``failures``-th failure in a row a model is tried again."""
    return min(LOAD_RETRY_FIRST_S * 2.0 ** max(0, failures - 1), LOAD_RETRY_MAX_S)


def failure_reason(exc: BaseException) -> str:
    """One line for a load failure: the exception's type and its first line, cut."""
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """The last failed load of an assigned model, until a load succeeds or it is unassigned."""

    reason: str
    failures: int  # in a row
    retry_at_s: float  # monotonic clock


class AssignmentFollower:
    """Owns the load and drop tasks an assignment starts, and the loader thread."""

    def __init__(
        self,
        settings: WorkerSettings,
        held: HeldModels,
        memory_probe: PeakMemoryProbe,
        serve_loop: ServeLoop,
        leases: Leases,
        stopping: asyncio.Event,
        on_change: Callable[[], None],
        report: Callable[[], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._held = held
        self._memory_probe = memory_probe
        self._serve_loop = serve_loop
        self._leases = leases
        self._stopping = stopping
        self._on_change = on_change  # readiness changed: the health entries follow
        self._report = report  # report to the router, errors swallowed
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")  # loads never wait on batches
        self._assigned: frozenset[ModelKey] = frozenset()
        self._paths: dict[ModelKey, str] = {}  # model file as the router gave it, relative to the repository
        self._loading: dict[ModelKey, asyncio.Task[None]] = {}
        self._dropping: dict[ModelKey, asyncio.Task[None]] = {}
        self._failed: dict[ModelKey, LoadFailure] = {}  # kept while a retry loads: still failed until it succeeds
        self._activation_bytes: dict[ModelKey, int] = {}  # measured at warm-up, until the model is held
        self._warmup_ms: dict[ModelKey, float] = {}  # likewise: the served model's time limits derive from it
        self.load_ms: dict[ModelKey, float] = {}  # the last load's reading and warm-up, kept: reported to the router

    def follow(self, assignment: mpb.WorkerAssignment) -> None:
        """Start loading what is newly assigned and draining what is no longer.

        Only starts tasks (this object owns them; ``close`` ends them)."""
        assigned = frozenset((spec.name, spec.version) for spec in assignment.models)
        # where the router read each: a model loaded with an override or files sent in
        # the request lives in the router's managed directory, not <repository>/<name>
        self._paths = {(spec.name, spec.version): spec.path for spec in assignment.models if spec.path}
        for key in self._assigned - assigned:
            self._failed.pop(key, None)  # assigned afresh later: tried at once
        self._assigned = assigned
        now_s = time.monotonic()
        for key in sorted(assigned):
            failed = self._failed.get(key)
            if key in self._held.served or key in self._loading:
                continue
            if failed is not None and now_s < failed.retry_at_s:
                continue
            self._loading[key] = asyncio.create_task(self._load_and_serve(key), name=f"load {key[0]}/{key[1]}")
        dropped = [(key, s) for key, s in self._held.served.items() if key not in assigned and self._held.claims(s)]
        for key, served in dropped:
            self._held.stop_claiming(served)  # no claim of it from now on
            self._dropping[key] = asyncio.create_task(self._drop(key, served), name=f"drop {key[0]}/{key[1]}")
        if dropped:
            self._serve_loop.wake()
            self._on_change()

    def failures(self) -> dict[ModelKey, str]:
        """Assigned models whose last load failed, with the reason (what the report says)."""
        return {key: failed.reason for key, failed in self._failed.items() if key in self._assigned}

    async def loaded(self) -> None:
        """Return once every load started so far has ended (served or failed)."""
        while self._loading:
            await asyncio.gather(*self._loading.values())

    async def close(self) -> None:
        """End loads and drops in progress; a load already in the loader thread ends on its own."""
        changes = [*self._loading.values(), *self._dropping.values()]
        for task in changes:
            task.cancel()
        await asyncio.gather(*changes, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def load(self, name: str, version: int) -> ModelRunner:
        """Read, load and warm up one model version; runs in the loader thread."""
        started_s = time.perf_counter()
        path = self._paths.get((name, version))
        repository = self._settings.model_repository
        model_dir = (repository / path).parent.parent if path else repository / name
        info = load_model(model_dir, version)
        if info.sequence is not None and is_cluster_url(self._settings.redis_url):
            # a step's state, reply and ack are one script; on a cluster the reply list
            # and the model's keys are two slots, which no script may touch together
            raise SequencesNeedOneRedis(
                f"model '{name}' keeps sequence state, which needs one Redis (or Sentinel): "
                "Redis Cluster is not supported for sequences yet (docs/models.md#sequences)"
            )
        if info.backend == PYTHON:
            return self._load_python(info, started_s)
        flags = (self._settings.intra_op_threads, self._settings.intra_op_spinning)
        threads, spin = fixed_setting(*flags, info.engine)
        model = LoadedModel(info, device=self._settings.device, engine=EngineSetting(threads or 0, spin or SPIN_OFF))
        took_s, activation_bytes = warm_up_measured(model, self._memory_probe)
        source = "flags" if flags != (0, None) else "config.yaml"
        choose_engine(model, threads, spin, source=source)
        self._activation_bytes[(info.name, info.version)] = activation_bytes
        self._warmup_ms[(info.name, info.version)] = took_s * 1000
        self.load_ms[(info.name, info.version)] = (time.perf_counter() - started_s) * 1000
        log.info("loaded %s version %d, warm-up %.0f ms", info.name, info.version, took_s * 1000)
        return model

    def _load_python(self, info: ModelInfo, started_s: float) -> ModelRunner:
        """Start a Python model's processes (only when the operator allowed it) and warm it up."""
        refuse_unless_allowed(info, self._settings.allow_python_models)
        model = PythonModel(info)
        try:
            took_s = model.warm_up()
        except BaseException:
            model.close()  # instances already started
            raise
        self._warmup_ms[(info.name, info.version)] = took_s * 1000
        self.load_ms[(info.name, info.version)] = (time.perf_counter() - started_s) * 1000
        log.info("loaded Python model %s version %d, warm-up %.0f ms", info.name, info.version, took_s * 1000)
        return model

    async def _load_and_serve(self, key: ModelKey) -> None:
        """Load and warm ``key`` up in the loader thread, then serve it and report it ready."""
        name, version = key
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, self.load, name, version)
        except Exception as exc:
            self._loading.pop(key, None)
            self._record_failure(key, exc)
            await self._report()
            return
        self._loading.pop(key, None)
        self._failed.pop(key, None)
        activation_bytes = self._activation_bytes.pop(key, 0)
        warmup_ms = self._warmup_ms.pop(key, 0.0)
        if self._stopping.is_set() or key not in self._assigned:
            log.info("model %s version %d loaded but no longer assigned; not serving it", name, version)
            await asyncio.to_thread(model.close)
            return
        keys = ModelKeys.for_model(name, version)
        served = Served(
            model, keys, weights_bytes=model.info.weights_bytes, activation_bytes=activation_bytes, warmup_ms=warmup_ms
        )
        self._held.add(key, served)
        self._serve_loop.models_added()  # jobs may have queued while it loaded
        self._on_change()
        await self._report()

    def _record_failure(self, key: ModelKey, exc: Exception) -> None:
        """Remember why ``key`` failed and when to try again; report it to the router."""
        before = self._failed.get(key)
        reason = failure_reason(exc)
        failures = 1 if before is None else before.failures + 1
        delay_s = retry_delay_s(failures)
        self._failed[key] = LoadFailure(reason, failures, time.monotonic() + delay_s)
        message = (
            "model %s version %d failed to load (%d in a row); not serving it, tried again in %.0f s if still assigned"
        )
        if before is None or before.reason != reason:  # the traceback once per reason
            log.error(message, *key, failures, delay_s, exc_info=exc)
        else:
            log.warning(message + ": %s", *key, failures, delay_s, reason)

    async def _drop(self, key: ModelKey, served: Served) -> None:
        """Drain a model no longer assigned (already claimed from no more): let the batch
        in hand finish and its replies be written, then let the session go and report."""
        try:
            await served.idle.wait()
            await self._leases.flushed()
            self._held.remove(key)
            await asyncio.to_thread(served.model.close)  # a Python model's processes end here (finalize)
        finally:
            self._dropping.pop(key, None)
        log.info("dropped model %s version %d: the router placed it elsewhere, or evicted it for room", *key)
        self._on_change()
        await self._report()
