"""The router's model repository while the mesh runs: what is loaded, and its state.

Control modes, Triton's names (``--model-control-mode``):

- ``none``: every model of the repository at start; the repository API refuses to
  load or unload (UNAVAILABLE), as Triton does.
- ``poll``: likewise at start, then the repository is read again every
  ``--repository-poll-s``: a new version directory, a changed config.yaml, a
  deleted version or model take effect without a restart. Load/Unload refused.
- ``explicit``: only the ``--load-model`` models at start (none given: nothing), then
  only ``RepositoryModelLoad``/``RepositoryModelUnload`` change what is served.

Each version is READY (a live worker serves it), LOADING (in the routing table, not
ready on a worker yet), UNLOADING (draining) or UNAVAILABLE with a reason (its load
error, or "unloaded"); see :meth:`router.core.TableSnapshot.state`.

An unload drains: the version goes UNLOADING (still placed, so workers go on
claiming, but never ready in the table, so gateways refuse new requests naming the
state), then, once its queue holds nothing waiting or leased (read from Redis,
bounded by ``--unload-drain-s``), it leaves the table; its workers finish the batch
in hand and let the session go. A version whose files or config changed is
reloaded the same way: drained, its workers let it go, then loaded afresh.

A load with a ``config`` override or with files sent in the request writes the model
whole into the managed directory (``--managed-repository``; default ``.managed``
inside the repository, which scans skip), validated before it replaces what was
there (router/managed.py); workers load it from the path the routing table gives them.

Ensembles (meshserve/models/ensemble.py) are checked against the servable versions
after every change: one naming a model, version or tensor there is not is UNAVAILABLE
with the reason, and comes back by itself once the model does. Unloading a model with
``unload_dependents`` unloads the ensembles that name it too (else they go UNAVAILABLE).

One change at a time (a lock): an RPC waits for a poll's rescan and vice versa.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshserve.errors import InvalidArgument, NotFound, Unavailable
from meshserve.models.ensemble import Ensemble, EnsembleDir, check_ensembles, ensemble_info, read_ensemble_dir
from meshserve.models.remote import sync_repository
from meshserve.models.repository import (
    ModelInfo,
    RepositoryError,
    RepositoryScan,
    model_names,
    scan_model_dir,
    unservable_info,
)
from router.core import LOADING, UNAVAILABLE, RouterCore
from router.managed import ManagedRepository
from router.placement import ModelKey

log = logging.getLogger(__name__)

NONE, POLL, EXPLICIT = "none", "poll", "explicit"
UNLOADED = "unloaded"
NOT_LOADED = "not loaded"
DRAIN_CHECK_S = 0.05
"""How often a drain reads the queue depth: an unload is rare and bounded, and the
depth lives in Redis, which has no "queue empty" event to wait on."""
LOAD_WAIT_S = 300.0
"""A load without a deadline answers within this long: READY, failed, or still loading."""
RELEASE_TIMEOUT_S = 10.0
"""A reload waits this long at most for workers to let the old version go."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PendingJobs(Protocol):
    """Jobs queued or in flight per model version (router/depths.py); None: unknown."""

    def pending(self, models: Collection[ModelKey]) -> dict[ModelKey, int] | None: ...


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of ``RepositoryIndex``: a version (None: a model never loaded)."""

    name: str
    version: int | None
    state: str
    reason: str


class RepositoryManager:
    """Owns the model set the router serves; :meth:`bind` hands it the core."""

    def __init__(
        self,
        repository: Path,
        *,
        mode: str = NONE,
        load: Collection[str] = (),
        managed: Path | None = None,
        depths: PendingJobs | None = None,
        drain_s: float = 30.0,
        max_upload_bytes: int = 256 * 1024 * 1024,
        remote: str = "",
    ) -> None:
        """Reads the repository (all of it, or in explicit mode the ``load`` models);
        ``remote``: an object store URI mirrored into ``repository`` before each read
        (meshserve/models/remote.py)."""
        self.repository = repository
        self.remote = remote
        self.mode = mode
        self.managed = ManagedRepository(
            repository,
            managed if managed is not None else repository / ".managed",
            max_upload_bytes=max_upload_bytes,
        )
        self._depths = depths
        self._drain_s = drain_s
        self._core: RouterCore | None = None
        self._infos: dict[ModelKey, ModelInfo] = {}
        self._unservable: dict[ModelKey, str] = {}
        self._stand_ins: dict[ModelKey, ModelInfo] = {}
        self._unloading: set[ModelKey] = set()
        self._unloaded: dict[ModelKey, str] = {}
        self._problems: set[str] = set()
        self._ensemble_dirs: dict[str, EnsembleDir] = {}
        self._ensembles: dict[ModelKey, Ensemble] = {}  # the valid ones
        self._ensemble_failures: dict[ModelKey, str] = {}
        self._lock = asyncio.Lock()
        if remote:
            self._sync()
        names = model_names(repository) if mode != EXPLICIT else sorted(set(load))
        for name in names:
            model_dir = repository / name
            if not model_dir.is_dir():
                log.error("--load-model %s: no such model directory in %s", name, repository)
                continue
            self._take(name, self._scan(model_dir), model_dir)
        self._check_ensembles()

    def bind(self, core: RouterCore) -> None:
        """The core built from :meth:`table_models`; the changes go there from now on."""
        self._core = core

    def table_models(self) -> list[ModelInfo]:
        """Every version in the table: the servable ones and stand-ins for the rest."""
        ensembles = [
            ensemble_info(found.name, version, found.path, self._ensembles.get((found.name, version)))
            for found in self._ensemble_dirs.values()
            for version in found.versions
        ]
        return [*self._infos.values(), *self._stand_ins.values(), *ensembles]

    def unservable(self) -> dict[ModelKey, str]:
        return {**self._unservable, **self._ensemble_failures}

    def ensembles(self) -> dict[ModelKey, Ensemble]:
        """The valid ensembles' versions (for the core's readiness and routing table)."""
        return dict(self._ensembles)

    def _check_ensembles(self) -> None:
        """Every ensemble against the servable versions now; a new reason logged once."""
        before = self._ensemble_failures
        self._ensembles, self._ensemble_failures = check_ensembles(self._ensemble_dirs.values(), self._infos)
        for key, why in sorted(self._ensemble_failures.items()):
            if before.get(key) != why:
                log.error("ensemble %s version %d is UNAVAILABLE: %s", *key, why)

    # ------------------------------------------------------------ the index

    async def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model and version the router knows, with its state and reason."""
        core = self._bound()
        snap = core.snapshot()
        placed = {key: device for device, keys in core.placement.assignments for key in keys}
        entries = [
            IndexEntry(
                m.name,
                m.version,
                state,
                snap.failed.get(key, "") or snap.reasons.get(key, "") or _loading_reason(state, placed.get(key)),
            )
            for m in snap.models
            for key in [(m.name, m.version)]
            for state in [snap.state(key)]
        ]
        entries += [IndexEntry(name, version, UNAVAILABLE, why) for (name, version), why in self._unloaded.items()]
        if self.mode == EXPLICIT:
            known = {entry.name for entry in entries}
            names = await asyncio.to_thread(model_names, self.repository)
            entries += [IndexEntry(name, None, UNAVAILABLE, NOT_LOADED) for name in names if name not in known]
        entries.sort(key=lambda e: (e.name, e.version or 0))
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    # ------------------------------------------------------------ load / unload

    async def load(
        self,
        name: str,
        *,
        config: str | None = None,
        files: Mapping[str, bytes] | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Load or reload ``name``: from the repository, or (with a ``config`` override
        or ``files``) from what the managed directory is given. Returns, as Triton's
        load does, once every version is READY (or raises when one failed): the table
        generation that says so, for gateways to wait for.

        Raises Unavailable outside explicit mode, when a version failed to load (the
        reason), or when none settled within ``timeout_s`` (default ``LOAD_WAIT_S``);
        NotFound for a model the repository lacks; InvalidArgument for a bad name,
        config or file; ResourceExhausted for files over the limit."""
        self._explicit_only("load")
        _check_name(name)
        async with self._lock:
            if self.remote and not files:
                await asyncio.to_thread(self._sync, name)
            model_dir = await asyncio.to_thread(self.managed.materialize, name, config, dict(files or {}))
            scan = await asyncio.to_thread(self._scan, model_dir)
            await self._apply(name, scan, model_dir)
        log.info("model %s loaded from %s: %d version(s)", name, model_dir, len(scan.models))
        keys = [(m.name, m.version) for m in scan.models]
        found = self._ensemble_dirs.get(name)
        keys += [(name, version) for version in (found.versions if found else ())]
        wait_s = LOAD_WAIT_S if timeout_s is None else timeout_s
        snap = await self._bound().wait_settled([*keys, *scan.unservable], wait_s)
        if snap is None:
            raise Unavailable(f"model '{name}' is still LOADING after {wait_s:.0f} s (RepositoryIndex shows its state)")
        failed = [
            f"version {key[1]}: {snap.failed[key]}" for key in sorted([*keys, *scan.unservable]) if key in snap.failed
        ]
        if failed or not keys:
            raise Unavailable(f"load failed for model '{name}': " + ("; ".join(failed) or "no version to serve"))
        return snap.generation

    async def unload(self, name: str, *, dependents: bool = False) -> int:
        """Drain every version of ``name``, then take it out of the table (UNAVAILABLE
        "unloaded"); ``dependents``: the ensembles naming it too. A model known but not
        loaded: nothing to do. Raises Unavailable outside explicit mode, NotFound for a
        model the router never knew."""
        self._explicit_only("unload")
        async with self._lock:
            known = {key for key in [*self._infos, *self._unservable, *self._unloaded] if key[0] == name}
            if not known and name not in self._ensemble_dirs and not (self.repository / name).is_dir():
                raise NotFound(f"unknown model '{name}'")
            names = [name]
            if dependents:
                names += sorted(
                    found.name
                    for found in self._ensemble_dirs.values()
                    if found.config is not None and any(step.model == name for step in found.config.steps)
                )
            for each in names:
                self._drop_ensemble(each)
                await self._apply(each, RepositoryScan([], [], {}), self.repository / each)
        log.info("model %s unloaded", name)
        return self._bound().snapshot().generation

    async def run_poll(self, interval_s: float) -> None:
        """Owned by the router's server in poll mode: rescan every ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.rescan()
            except (RepositoryError, OSError, Unavailable) as exc:  # unreadable, changing under the scan, store away
                log.error("repository poll: %s; trying again in %.0f s", exc, interval_s)

    async def rescan(self) -> None:
        """Read the whole repository again and apply what changed, model by model."""
        async with self._lock:
            if self.remote:
                await asyncio.to_thread(self._sync)
            names = await asyncio.to_thread(model_names, self.repository)
            for gone in set(self._ensemble_dirs) - set(names):
                self._drop_ensemble(gone)
            loaded = {key[0] for key in [*self._infos, *self._unservable]}
            for name in sorted(set(names) | loaded):
                model_dir = self.repository / name
                scan = await asyncio.to_thread(self._scan, model_dir) if name in names else RepositoryScan([], [], {})
                await self._apply(name, scan, model_dir)

    # ------------------------------------------------------------ applying a change

    async def _apply(self, name: str, scan: RepositoryScan, model_dir: Path) -> None:
        """Make ``name``'s versions in the table those of ``scan``: versions gone or
        changed drain first; changed ones load afresh once workers let them go."""
        old = {key: info for key, info in self._infos.items() if key[0] == name}
        kept = {key: old[key] for key in old if key in scan.unservable}
        if kept:  # a failed reload leaves the old version serving, as Triton's (the problem is logged)
            unservable = {key: why for key, why in scan.unservable.items() if key not in kept}
            scan = RepositoryScan([*scan.models, *kept.values()], scan.problems, unservable)
        new = {(m.name, m.version): m for m in scan.models}
        changed = {key for key, info in old.items() if key in new and new[key] != info}
        gone = set(old) - set(new)
        if changed | gone:
            await self._drain(changed | gone)
        for key in gone:
            self._unloaded[key] = UNLOADED
        for key in [k for k in self._unservable if k[0] == name and k not in scan.unservable]:
            del self._unservable[key], self._stand_ins[key]
            if key not in new:
                self._unloaded[key] = UNLOADED
        if changed:
            await self._publish()
            await self._released(changed)
        self._take(name, scan, model_dir)
        await self._publish()

    def _take(self, name: str, scan: RepositoryScan, model_dir: Path) -> None:
        """Record ``scan`` as ``name``'s versions (nothing published)."""
        for key in [k for k in self._infos if k[0] == name]:
            del self._infos[key]
        for model in scan.models:
            key = (model.name, model.version)
            self._infos[key] = model
            self._unloaded.pop(key, None)
        for key, why in scan.unservable.items():
            self._unservable[key] = why
            self._stand_ins[key] = unservable_info(model_dir.parent, *key)
            self._unloaded.pop(key, None)

    async def _drain(self, keys: set[ModelKey]) -> None:
        """UNLOADING until nothing of ``keys`` waits or runs (bounded), then out of the table."""
        self._unloading |= keys
        await self._publish()
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self._drain_s
        while True:
            # first a pause: a gateway that took a request before it saw UNLOADING enqueues it now
            await asyncio.sleep(DRAIN_CHECK_S)
            pending = await asyncio.to_thread(self._depths.pending, keys) if self._depths else None
            if pending is None or not any(pending.values()):
                break
            if loop.time() >= deadline_s:
                log.warning(
                    "unload: %s still have %d request(s) after %.0f s; unloading anyway",
                    sorted(keys),
                    sum(pending.values()),
                    self._drain_s,
                )
                break
        self._unloading -= keys
        for key in keys:
            self._infos.pop(key, None)

    async def _released(self, keys: set[ModelKey]) -> None:
        """Until no worker holds ``keys`` (so that it loads the new files afresh), bounded."""
        if not await self._bound().wait_released(keys, RELEASE_TIMEOUT_S):
            log.warning(
                "reload: a worker still holds %s after %.0f s; loading the new files anyway",
                sorted(keys),
                RELEASE_TIMEOUT_S,
            )

    async def _publish(self) -> None:
        self._check_ensembles()
        await self._bound().set_models(
            self.table_models(),
            unservable=self.unservable(),
            unloading=frozenset(self._unloading),
            ensembles=self.ensembles(),
        )

    def _drop_ensemble(self, name: str) -> None:
        """``name``'s ensemble (if it is one) leaves the table: "unloaded"."""
        found = self._ensemble_dirs.pop(name, None)
        for version in found.versions if found else ():
            self._unloaded[name, version] = UNLOADED

    # ------------------------------------------------------------ files

    def _sync(self, prefix: str = "") -> None:
        """Mirror the object store (or one model of it) into the repository directory."""
        try:
            result = sync_repository(self.remote, self.repository, prefix=prefix)
        # the store's client raises its own errors (botocore's, google's, fsspec's)
        except Exception as exc:
            raise Unavailable(f"object store {self.remote}: {type(exc).__name__}: {exc}") from exc
        if result.fetched or result.removed:
            log.info(
                "object store %s%s: %d file(s) fetched, %d kept, %d removed",
                self.remote,
                f" ({prefix})" if prefix else "",
                result.fetched,
                result.kept,
                result.removed,
            )

    def _scan(self, model_dir: Path) -> RepositoryScan:
        """One model directory, its new problems logged once."""
        scan = scan_model_dir(model_dir)
        found = read_ensemble_dir(model_dir) if model_dir.is_dir() else None
        if found is not None:
            self._ensemble_dirs[model_dir.name] = found
            for version in found.versions:
                self._unloaded.pop((found.name, version), None)
        else:
            self._ensemble_dirs.pop(model_dir.name, None)
        for problem in scan.problems:
            if problem not in self._problems:
                log.error("model repository: %s", problem)
        self._problems = (self._problems - {p for p in self._problems if p.startswith(str(model_dir))}) | set(
            scan.problems
        )
        return scan

    # ------------------------------------------------------------ helpers

    def _explicit_only(self, what: str) -> None:
        if self.mode != EXPLICIT:
            raise Unavailable(
                f"explicit model {what} is not allowed: the router's --model-control-mode is {self.mode}"
                + (" (polling is enabled)" if self.mode == POLL else "")
                + "; run it with --model-control-mode explicit"
            )

    def _bound(self) -> RouterCore:
        assert self._core is not None, "RepositoryManager.bind(core) first"
        return self._core


def _loading_reason(state: str, device: str | None) -> str:
    """Why a LOADING version is not ready yet: no device placed it, or one is loading it."""
    if state != LOADING:
        return ""
    return f"loading on {device}" if device else "waiting for a device"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"model name {name!r}: 1-128 of letters, digits, '.', '_', '-', starting with a letter or digit"
        )
