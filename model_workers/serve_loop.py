"""The serve loop: block on every claimed model's wake list (never poll), then let
the batch runner take each woken model's work.

The wait's key list is rebuilt before each wait, so models added or dropped are
followed without a restart; a change pushes a token to the worker's own wake list
(``wake``), which ends a wait in progress.

A model split into queue partitions has a wake list per partition. The wait names
each model's lists in its ``Served.claim_order``, which starts one partition further
on at each wait: BLPOP pops the first list in its order that holds a token, so
under load (every partition with a token) the partitions are taken in turn, and
none waits behind another. A wake-up names its partition, and its batch is claimed
there; a look at every queue (a rescan, the safety timeout) claims each model's
partitions in turn until one has work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from meshserve.queue import (
    ModelKeys,
    QueueProtocol,
    claim_command,
    parse_claim,
    wait_command,
    woken_key,
    worker_wake_key,
)
from meshserve.store.link import RedisLink
from model_workers.batches import decode
from model_workers.held import HeldModels
from model_workers.leases import Leases
from model_workers.runner import BatchRunner
from model_workers.served import Served

log = logging.getLogger(__name__)

WAKE_SAFETY_TIMEOUT_S = 5.0
"""Blocking waits re-check every queue after this long, in case a wake token was lost."""

Target = tuple[Served, ModelKeys | None]
"""A model to take a batch of, and the queue partition a wake-up named (None: any)."""


def every(models: list[Served]) -> list[Target]:
    """Each model, from whichever of its partitions has work."""
    return [(served, None) for served in models]


class ServeLoop:
    """Owns the wait for work; ``run`` is the loop, ``interrupt`` ends a wait on stop."""

    def __init__(
        self,
        worker_id: str,
        queue: QueueProtocol,
        blocking: RedisLink,
        held: HeldModels,
        runner: BatchRunner,
        leases: Leases,
        stopping: asyncio.Event,
    ) -> None:
        self._worker_id = worker_id
        self._queue = queue
        self._blocking = blocking
        self._held = held
        self._runner = runner
        self._leases = leases
        self._stopping = stopping
        self._wake_self = worker_wake_key(worker_id)
        self._rescan = False  # a model was added: look at every queue before waiting
        self._look_again: dict[int, Served] = {}  # by id: models whose batch ended, to look at again
        self._last_woken: Served | None = None  # the model of the last wake-up: claimed for right after the next
        self._blocked: asyncio.Task[Any] | None = None
        self._wakes: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()  # set while the loop blocks for work

    async def run(self) -> None:
        """Block for work on every claimed model's wake list, take it, run it."""
        if not self._held.wake_keys():
            log.warning("worker %s holds no model; idle until the router assigns one", self._worker_id)
        # First look at every queue: work may be waiting whose wake token another
        # worker consumed (e.g. one that was stopped while blocked).
        targets = every(self._held.claimed())
        backoff_s = 0.1
        while not self._stopping.is_set():
            await self._take_from(targets)
            if self._stopping.is_set():
                break
            if targets := self._pending():  # models added, or batches ended, while we worked
                continue
            # The claim rides behind the blocking pop: Redis runs it the moment the pop
            # returns, so a wake-up and its claim cost one round trip, not two.
            ahead = self._claim_ahead()
            commands, ahead_keys = self._wait_commands(ahead)
            self._blocked = asyncio.ensure_future(self._blocking.pipeline(commands))
            self.idle.set()
            replies: list[Any] = []
            try:
                replies = await self._blocked
                if isinstance(replies[0], RedisError):
                    raise replies[0]
                popped = replies[0]
                backoff_s = 0.1
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    break
                raise
            except RedisError as exc:
                log.warning("redis unavailable while waiting for work (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                popped = None
            finally:
                self._blocked = None
                self.idle.clear()
            targets = await self.woken(popped)
            if ahead is not None and ahead_keys is not None and len(replies) > 1:
                targets = await self._run_claimed_ahead(ahead, ahead_keys, replies[1], targets)

    def _wait_commands(self, ahead: Served | None) -> tuple[list[Any], ModelKeys | None]:
        """The wait for work, and the claim of ``ahead`` behind it; the partition claimed.

        Not the wake lists of models at capacity: their tokens are for other workers
        now (``batch_ended`` makes the loop look again). A model's partitions in turn
        (the module docstring); the claim ahead is for the first: the one popped when
        several hold a token."""
        wake_keys: list[str] = []
        ahead_keys: ModelKeys | None = None
        for served in self._held.claimed():
            if served.at_capacity():
                continue
            order = served.claim_order()
            wake_keys.extend(keys.wake for keys in order)
            if served is ahead:
                ahead_keys = order[0]
        wake_keys.append(self._wake_self)
        commands = [wait_command(wake_keys, WAKE_SAFETY_TIMEOUT_S)]
        if ahead is not None and ahead_keys is not None:
            commands.append(claim_command(ahead_keys, **self._runner.claim_options(ahead, keys=ahead_keys)))
        return commands, ahead_keys

    def interrupt(self) -> None:
        """Stopping: end the wait in progress, if any (``run`` then returns)."""
        if self._blocked is not None:
            self._blocked.cancel()

    def models_added(self) -> None:
        """Models were added: look at every queue before the next wait (jobs may have
        queued while they loaded), and end a wait in progress."""
        self._rescan = True
        self.wake()

    def batch_ended(self, served: Served) -> None:
        """A batch of ``served`` computing on a task of its own was answered: the model
        may have work whose wake token the loop took while it was at capacity, so look
        at its queue before the next wait. Only its queue: with hundreds of models, a
        look at every queue after each batch cost more than the batch."""
        self._look_again[id(served)] = served
        self.wake()

    def _pending(self) -> list[Target]:
        """What to look at before the next wait: every queue after models were added,
        else the queues of the models whose batches ended; clears both."""
        if self._rescan:
            self._rescan = False
            self._look_again.clear()
            return every(self._held.claimed())
        ended = [served for served in self._look_again.values() if self._held.claims(served)]
        self._look_again.clear()
        return every(ended)

    def wake(self) -> None:
        """End the loop's wait, if it is waiting, so it waits on the current models.

        Otherwise nothing is needed: it rebuilds its key list before the next wait.
        A token that lands just as a wait ends for another reason costs one extra
        turn of the loop; ``close`` deletes the list.
        """
        if self._blocked is not None:
            task = asyncio.create_task(self._push_self_wake())
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)

    async def close(self) -> None:
        """After ``run`` has returned: finish wake-ups in flight, delete the worker's wake list."""
        if self._wakes:
            await asyncio.gather(*list(self._wakes), return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._queue.forget_worker(self._worker_id)

    async def _push_self_wake(self) -> None:
        try:
            await self._queue.wake_worker(self._worker_id)
        except RedisError as exc:
            log.warning("could not wake the serve loop (%s); it looks again within %.0f s", exc, WAKE_SAFETY_TIMEOUT_S)

    def _claim_ahead(self) -> Served | None:
        """The model to claim for right after the next wake-up: the only one claimed
        from, or the one woken last (a wrong guess costs one empty claim inside Redis)."""
        if (only := self._held.only_claimed()) is not None:
            return None if only.at_capacity() else only
        last = self._last_woken
        return last if last is not None and self._held.claims(last) and not last.at_capacity() else None

    async def _run_claimed_ahead(
        self, served: Served, keys: ModelKeys, reply: Any, targets: list[Target]
    ) -> list[Target]:
        """Run what the claim behind the wake-up took from partition ``keys``; the
        models (and partitions) still to look at."""
        if isinstance(reply, RedisError):  # e.g. NOSCRIPT after a Redis restart: the plain claim loads it
            log.debug("claim after wake-up for %s failed: %s", keys.ready, reply)
            return targets
        claim = await self._queue.fetch_bulk(keys, parse_claim(reply))
        self._leases.answer_expired(served, claim, keys)
        jobs = decode(claim, served.model.info, keys)
        if not self._held.claims(served):  # dropped while we waited: give them back at once
            await self._leases.release(served, jobs)
            return targets
        if jobs:
            await self._runner.serve_batch(served, jobs)
        # Its queue was looked at after the wake-up; if work remains, the claim left a
        # wake token, so the next wait returns at once.
        looked = (keys, None) if len(served.partitions) == 1 else (keys,)  # None: any; with one, that one
        return [(s, k) for s, k in targets if not (s is served and k in looked)]

    async def _take_from(self, targets: list[Target]) -> None:
        for served, keys in targets:
            # not dropped since it was woken, nor computing all it may (``batch_ended`` looks again)
            if self._held.claims(served) and not served.at_capacity():
                await self._runner.serve_batch(served, keys=keys)

    async def woken(self, popped: Any) -> list[Target]:
        """The models to look at after a wait that popped ``popped`` (a BLPOP answer,
        None on timeout): the one woken, or every one. A token of a model no longer
        claimed from is given back to its other workers."""
        key = woken_key(popped)
        if key is None:  # the safety timeout: a wake token may have been lost
            self._rescan = False
            self._look_again.clear()
            return every(self._held.claimed())
        if key == self._wake_self:
            return self._pending()
        if (served := self._held.by_wake_key(key)) is not None:
            self._last_woken = served
            return [(served, self._held.keys_of(key))]
        # A token of a model dropped while we waited: give it back to its other workers.
        try:
            await self._queue.rewake(self._held.keys_of(key))
        except RedisError as exc:
            log.warning(
                "could not give back the wake token of %s (%s); its workers look within %.0f s",
                key,
                exc,
                WAKE_SAFETY_TIMEOUT_S,
            )
        return []
