"""The ``generate`` execution mode: the worker runs a decoder step model's loop.

One :class:`Generator` per generating model a worker holds. Its loop runs one step
for every request in hand at once (continuous batching): each request feeds its
next token (a prompt token while it reads its prompt, then the token it sampled
last) and its own state rows; a step's outputs are cut back per request. A request
that ends (end id, ``max_tokens``) leaves the batch at once, and requests claimed
between steps join at the next one, whatever their length: the step's shapes
(``[batch, 1]`` tokens, ``[batch, ...]`` state) do not depend on it.

Each token is answered as soon as it is sampled: a partial reply (REPLY_PARTIAL,
no ack, fenced by the lease) for all but the last, the last with the ack
(REPLY_ACK, as any reply). One pipeline per step carries the step's partials and
a claim of up to the room left, so joining costs no extra round trip. The leases
of the requests in hand are extended for as long as the loop runs
(``Leases.extend_while_computing`` over the live list).

A caller that goes away (its stream cancelled) has its job marked (ABANDON): the
next partial is refused and the job ends at once, acked.

Crash and stop: a job that streamed responses is never restarted (the client
would see them twice). A worker that claims such a job again (a redelivery after
its first worker died) answers it UNAVAILABLE with the count REPLY_PARTIAL kept; a
worker told to stop answers its requests that streamed something UNAVAILABLE with
their counts, and gives back the others at once for another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError, RedisError

from meshserve.errors import Internal, InvalidArgument, MeshError, Unavailable
from meshserve.models.generation import GenerateConfig, GenerateParams, generate_params
from meshserve.queue import load_partial_script, partial_command, streamed_counts
from meshserve.store.link import Command, RedisLink
from meshserve.wire.codec import from_array, to_array, to_plain_tensor
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve.wire.envelope import failed_reply
from model_workers.batches import Job, serialize_reply
from model_workers.leases import Leases
from model_workers.served import Served
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

ClaimMore = Callable[[int], Command]
"""The claim of up to n more jobs of the model, for the step's pipeline."""
Taken = Callable[[Any], Awaitable[list["Job"]]]
"""The jobs a claim's reply holds (payloads fetched, expired ones answered)."""


CALLER_GONE = Unavailable("the caller went away: generation stopped")
"""What ends a job whose caller left (written for the ack; no one reads it)."""


def restart_refused(sent: int) -> Unavailable:
    """The answer to a request whose worker was lost after ``sent`` responses."""
    return Unavailable(
        f"the worker generating this request was lost after {sent} responses were sent; it is not restarted,"
        " so that no response is sent twice: retry the request"
    )


def stopped_while_generating(sent: int) -> Unavailable:
    return Unavailable(
        f"the worker stopped while generating, after {sent} responses were sent; it is not restarted,"
        " so that no response is sent twice: retry the request"
    )


@dataclass(slots=True)
class Generation:
    """One request in the loop."""

    job: Job
    prompt: np.ndarray[Any, Any]  # INT64, 1-D
    params: GenerateParams
    rng: np.random.Generator
    state: dict[str, np.ndarray[Any, Any]]  # state input -> this request's row ([1, ...])
    next_token: int
    fed: int = 1  # prompt tokens fed so far (the first is ``next_token``)
    sent: int = 0  # responses sent


class Generator:
    """The loop of one generating model on this worker; owns its task."""

    def __init__(
        self,
        served: Served,
        config: GenerateConfig,
        leases: Leases,
        redis: RedisLink,
        worker_id: str,
        stopping: asyncio.Event,
        claim_more: ClaimMore,
        taken: Taken,
        on_ended: Callable[[], None],
    ) -> None:
        self.served = served
        self._served = served
        self._config = config
        self._leases = leases
        self._redis = redis
        self._worker_id = worker_id
        self._stopping = stopping
        self._claim_more = claim_more
        self._taken = taken
        self._on_ended = on_ended
        info = served.model.info
        self._max_batch = max(1, info.max_batch_size)
        self._output_names = [t.name for t in info.outputs]
        self._state_rows = {
            t.name: (tuple(1 if d < 0 else d for d in t.shape[1:]), NUMPY_BY_KSERVE[t.datatype])
            for t in info.inputs
            if t.name != config.tokens
        }
        self.active: list[Generation] = []
        self.joining: list[Generation] = []  # admitted while a step ran: they join the next
        self.jobs: list[Job] = []  # the jobs of both: their leases are kept
        self.task: asyncio.Task[None] | None = None
        self.steps = 0

    async def admit(self, jobs: list[Job]) -> None:
        """Take claimed jobs into the loop (started if it is not running); those that
        cannot start are answered at once. Owns the served model's batch in hand
        while the loop runs (``Served.began`` was called by the caller)."""
        await self._join(jobs)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name=f"generate-{self._served.model.info.name}")
        else:
            self._on_ended_once()

    def _on_ended_once(self) -> None:
        self._served.ended()

    async def _join(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            sent = await streamed_counts(self._redis, self._served.keys, [job.job_id for job in jobs])
        except RedisError as exc:  # leases stay: redelivered later
            log.warning("could not read the streamed counts of %d jobs: %s", len(jobs), exc)
            return
        finals: list[tuple[Job, mpb.InferReply]] = []
        for job, count in zip(jobs, sent, strict=True):
            if count:
                finals.append((job, failed_reply(job.job_id, restart_refused(count))))
                continue
            try:
                generation = self._start(job)
            except MeshError as error:
                finals.append((job, failed_reply(job.job_id, error)))
                continue
            if generation.params.max_tokens == 0:  # nothing to generate: only the final response
                finals.append((job, self._reply(job, None, final=True, index=0)))
                continue
            self.joining.append(generation)
            self.jobs.append(job)
        if finals:
            self._leases.reply_and_ack(self._served, finals)

    def _start(self, job: Job) -> Generation:
        config = self._config
        request = job.request
        try:
            params = generate_params(config, request.parameters)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        index = next((i for i, t in enumerate(request.inputs) if t.name == config.tokens), None)
        if index is None:
            raise InvalidArgument(f"input '{config.tokens}' (the prompt) is missing")
        prompt = to_array(request.inputs[index], job.data[index] if job.framed else None).reshape(-1)
        if prompt.size == 0:
            raise InvalidArgument(f"input '{config.tokens}': the prompt needs at least one token")
        state = {name: np.zeros((1, *dims), dtype=dtype) for name, (dims, dtype) in self._state_rows.items()}
        return Generation(job, prompt, params, np.random.default_rng(params.seed), state, int(prompt[0]))

    async def _loop(self) -> None:
        keep_leases = asyncio.create_task(self._leases.extend_while_computing(self._served, self.jobs))
        try:
            while self.active or self.joining:
                self.active.extend(self.joining)
                self.joining.clear()
                if self._stopping.is_set():
                    await self._stop()
                    break
                try:
                    await self._step()
                except RedisError as exc:  # the leases lapse and the jobs are redelivered (then refused)
                    log.warning("redis error while generating with %s: %s", self._served.keys.ready, exc)
                    await asyncio.sleep(0.1)
        except Exception:
            log.exception("generation loop of %s failed", self._served.keys.ready)
            self._finish_all(Internal("the generation loop failed"))
        finally:
            keep_leases.cancel()
            self.active.clear()
            self.joining.clear()
            self.jobs.clear()
            self._served.ended()
            self._on_ended()

    async def _step(self) -> None:
        config = self._config
        active = self.active
        feed: dict[str, np.ndarray[Any, Any]] = {
            config.tokens: np.array([[g.next_token] for g in active], dtype=np.int64)
        }
        for name in self._state_rows:
            feed[name] = np.concatenate([g.state[name] for g in active])
        started_s = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self._served.model.run, feed)
        except Exception as exc:
            log.exception("generation step of %s failed", self._served.keys.ready)
            self._finish_all(Internal(f"model '{self._served.model.info.name}' failed on a generation step: {exc}"))
            return
        self._account(len(active), time.perf_counter() - started_s)
        self.steps += 1
        by_name = dict(zip(self._output_names, outputs, strict=True))
        logits = by_name[config.logits].reshape(len(active), -1)
        partials: list[tuple[Generation, mpb.InferReply]] = []
        finals: list[tuple[Job, mpb.InferReply]] = []
        staying: list[Generation] = []
        for row, g in enumerate(active):
            for state_in, state_out in config.state:
                g.state[state_in] = by_name[state_out][row : row + 1]
            if g.fed < g.prompt.size:  # still reading its prompt
                g.next_token = int(g.prompt[g.fed])
                g.fed += 1
                staying.append(g)
                continue
            token = sample(logits[row], g.params, g.rng)
            final = token == g.params.end_id or g.sent + 1 >= g.params.max_tokens
            reply = self._reply(g.job, token, final=final, index=g.sent)
            g.sent += 1
            g.next_token = token
            if final:
                finals.append((g.job, reply))  # leaves the batch now
            else:
                partials.append((g, reply))
                staying.append(g)
        self.active = staying
        self.jobs[:] = [g.job for g in (*staying, *self.joining)]  # the list the lease keeper reads
        if finals:
            self._leases.reply_and_ack(self._served, finals)
        await self._send(partials)

    async def _send(self, partials: list[tuple[Generation, mpb.InferReply]]) -> None:
        """The step's partials (one script per gateway) and a claim of the room left,
        in one pipeline; drop the requests whose lease moved on, admit what was claimed."""
        lists: dict[str, list[tuple[Generation, mpb.InferReply]]] = defaultdict(list)
        for g, reply in partials:
            lists[g.job.request.reply_to].append((g, reply))
        commands = [
            partial_command(
                self._served.keys, to, [(g.job.token, g.job.job_id, serialize_reply(g.job, r)) for g, r in group]
            )
            for to, group in lists.items()
        ]
        room = self._max_batch - len(self.active) - len(self.joining)
        if room > 0 and not self._stopping.is_set():
            commands.append(self._claim_more(room))
        if not commands:
            return
        results = await self._redis.pipeline(commands)
        if any(isinstance(result, NoScriptError) for result in results[: len(lists)]):
            await load_partial_script(self._redis)
            results[: len(lists)] = await self._redis.pipeline(commands[: len(lists)])
        self._settle(list(lists.values()), results)
        if len(results) > len(lists):
            claimed = results[-1]
            if isinstance(claimed, NoScriptError):
                return  # Redis lost its scripts: the serve loop's plain claim loads them
            if isinstance(claimed, RedisError):
                raise claimed
            await self._join(await self._taken(claimed))

    def _settle(self, groups: list[list[tuple[Generation, mpb.InferReply]]], results: list[Any]) -> None:
        """Read REPLY_PARTIAL's answers: drop the requests another worker holds now (this
        one stalled past its lease), end those whose caller went away (ABANDON)."""
        dropped: set[str] = set()
        gone: list[Generation] = []
        for group, result in zip(groups, results, strict=False):
            if isinstance(result, RedisError):
                raise result
            for (g, _), pushed in zip(group, result, strict=True):
                if pushed == 0:
                    dropped.add(g.job.job_id)
                elif pushed < 0:
                    gone.append(g)
        if gone:
            dropped.update(g.job.job_id for g in gone)
            self._leases.reply_and_ack(self._served, [(g.job, failed_reply(g.job.job_id, CALLER_GONE)) for g in gone])
        if dropped:
            log.info("%d generating requests ended here: their callers left or another worker holds them", len(dropped))
            self.active = [g for g in self.active if g.job.job_id not in dropped]
            self.jobs[:] = [g.job for g in (*self.active, *self.joining)]

    def _reply(self, job: Job, token: int | None, *, final: bool, index: int) -> mpb.InferReply:
        info = self._served.model.info
        reply = mpb.InferReply(
            id=job.job_id,
            model=info.name,
            version=info.version,
            worker_id=self._worker_id,
            more=not final,
            index=index,
        )
        job.reply_data = []
        if token is not None:
            tensor, data = from_array(self._config.output, "INT64", np.array([token], dtype=np.int64))
            if job.framed:
                reply.outputs.append(tensor)
                job.reply_data.append(data)
            else:
                reply.outputs.append(to_plain_tensor(tensor, data))
        return reply

    async def _stop(self) -> None:
        """Stopping: answer the requests that streamed something UNAVAILABLE with their
        counts; give back the others at once (another worker starts them afresh)."""
        streamed = [g for g in self.active if g.sent]
        fresh = [g.job for g in self.active if not g.sent]
        if streamed:
            self._leases.reply_and_ack(
                self._served, [(g.job, failed_reply(g.job.job_id, stopped_while_generating(g.sent))) for g in streamed]
            )
        if fresh:
            try:
                await self._leases.release(self._served, fresh)
            except RedisError as exc:
                log.warning("could not give back %d requests: %s (redelivered after their lease)", len(fresh), exc)
        self.active = []

    def _finish_all(self, error: MeshError) -> None:
        if self.active:
            self._leases.reply_and_ack(self._served, [(g.job, failed_reply(g.job.job_id, error)) for g in self.active])
        self.active = []

    def _account(self, batch: int, step_s: float) -> None:
        stats = self._served.stats
        stats.batches += 1
        stats.items += batch
        stats.largest_batch = max(stats.largest_batch, batch)
        stats.device_seconds += step_s
        self._served.observe_compute(step_s * 1000)


def sample(logits: np.ndarray[Any, Any], params: GenerateParams, rng: np.random.Generator) -> int:
    """The next token: the argmax when greedy, else drawn from the softmax of
    ``logits / temperature`` over the ``top_k`` highest (all when 0)."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        keep = np.argpartition(scaled, -params.top_k)[-params.top_k :]
    else:
        keep = np.arange(scaled.size)
    chosen = scaled[keep]
    weights = np.exp(chosen - chosen.max())
    return int(keep[rng.choice(keep.size, p=weights / weights.sum())])
