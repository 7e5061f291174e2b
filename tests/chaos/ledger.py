"""The chaos load and its ledger: closed-loop gRPC clients, one outcome per request.

Request ``i`` carries the id ``chaos-<i>`` and its own input (row ``i`` of seeded
noise); the answer must echo the id and hold that input's logits, as ONNX Runtime
computes them in this process, so a reply delivered to the wrong call is caught.
Clients retry UNAVAILABLE with the gRPC retry policy the README documents, and
every call has a deadline; a call still open well past it is recorded LOST.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.chaos.faults import FaultEvent, sleep_until

MODEL = "cnn"
CALL_TIMEOUT_S = 20.0
LOST_AFTER_S = CALL_TIMEOUT_S + 10.0
"""A call with no outcome this long after it was sent hung past its own deadline: lost."""

RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
CHANNEL_OPTIONS = [("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)), ("grpc.enable_retries", 1)]


def request_id(index: int) -> str:
    """The id request ``index`` carries (and its answer echoes)."""
    return f"chaos-{index}"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """``requests`` calls spread evenly over ``duration_s`` by ``clients`` closed-loop clients."""

    requests: int
    duration_s: float
    clients: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call ended in; times are monotonic seconds."""

    index: int
    gateway: int
    sent_s: float
    done_s: float
    code: str  # "OK", a gRPC status name, "MISMATCH" (someone else's answer) or "LOST"
    detail: str = ""


class Requests:
    """Every request's input, and the logits ONNX Runtime gives for it here."""

    def __init__(self, repository: Path, count: int, seed: int = 4) -> None:
        self.images = np.random.default_rng(seed).standard_normal((count, 1, 3, 32, 32)).astype(np.float32)
        session = ort.InferenceSession(str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        flat = self.images.reshape(count, 3, 32, 32)
        chunks = [session.run(["logits"], {"image": flat[i : i + 64]})[0] for i in range(0, count, 64)]
        self.expected = np.concatenate(chunks)

    def request(self, index: int) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=MODEL, id=request_id(index))
        request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
        request.raw_input_contents.append(self.images[index].tobytes())
        return request

    def answers(self, index: int, response: pb.ModelInferResponse) -> bool:
        """Whether ``response`` is request ``index``'s own answer (id and values)."""
        if response.id != request_id(index) or len(response.raw_output_contents) != 1:
            return False
        logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        return bool(np.allclose(logits, self.expected[index], rtol=1e-4, atol=1e-4))


@dataclass
class Ledger:
    """Every call's outcome by request index (each index is sent once, so it has one).

    A reply delivered twice never reaches a second outcome here: the gateway drops it
    and counts a late reply, which the test checks.
    """

    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def record(self, outcome: Outcome) -> None:
        assert outcome.index not in self.outcomes, f"request {outcome.index} sent twice"  # a harness bug
        self.outcomes[outcome.index] = outcome

    def first(self) -> list[Outcome]:
        return [outcome for _, outcome in sorted(self.outcomes.items())]

    def dump(self, path: Path, t0_s: float) -> None:
        """Every outcome as a JSON line, times in seconds from ``t0_s``."""
        with path.open("w") as out:
            for outcome in self.first():
                row = asdict(outcome) | {"sent_s": outcome.sent_s - t0_s, "done_s": outcome.done_s - t0_s}
                out.write(json.dumps(row) + "\n")


async def run_load(addresses: Sequence[str], plan: LoadPlan, requests: Requests, ledger: Ledger, t0_s: float) -> None:
    """Send ``plan.requests`` calls, request ``i`` not before ``t0_s + i * interval``.

    Client ``c`` talks to gateway ``c % len(addresses)`` and has one call open at a time.
    """
    interval_s = plan.duration_s / plan.requests
    indices = itertools.count()
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in addresses]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]

        async def client(gateway: int) -> None:
            while (index := next(indices)) < plan.requests:
                await sleep_until(t0_s + index * interval_s)
                ledger.record(await _call(stubs[gateway], requests, index, gateway))

        await asyncio.gather(*(client(c % len(stubs)) for c in range(plan.clients)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def _call(stub: pb_grpc.GRPCInferenceServiceStub, requests: Requests, index: int, gateway: int) -> Outcome:
    sent_s = time.monotonic()
    call = stub.ModelInfer(requests.request(index), timeout=CALL_TIMEOUT_S)
    try:
        async with asyncio.timeout(LOST_AFTER_S):
            response = await call
    except grpc.aio.AioRpcError as exc:
        return Outcome(index, gateway, sent_s, time.monotonic(), exc.code().name, exc.details() or "")
    except TimeoutError:
        call.cancel()
        return Outcome(index, gateway, sent_s, time.monotonic(), "LOST")
    code = "OK" if requests.answers(index, response) else "MISMATCH"
    return Outcome(index, gateway, sent_s, time.monotonic(), code, "" if code == "OK" else response.id)


# ------------------------------------------------------------------ the report


@dataclass(frozen=True, slots=True)
class Report:
    """The run's figures; times in seconds."""

    sent: int
    succeeded: int
    failed: dict[str, int]  # explicit gRPC errors by status
    lost: int
    mismatched: int  # answers that were not the request's own
    load_s: float
    worker_kills: int
    kills_catching_a_lease: int
    requests_caught_by_kills: int
    requests_caught_by_kills_ok: int  # of those, answered with their result (redelivered)
    worst_worker_kill_recovery_s: float  # kill -> the last request its leases held answered
    worst_next_success_after_kill_s: float  # kill -> the next successful answer, any worker
    redis_down_s: float  # kill -9 -> accepting again (AOF replayed)
    redis_jobs_at_kill: int  # jobs queued or leased in Redis when it was killed
    redis_jobs_at_kill_ok: int  # of those, answered with a result (the AOF kept them)
    redis_first_success_s: float  # restart -> the first successful answer
    redis_inflight_answered_s: float  # restart -> the last call open during the outage answered
    gateway_down_s: float  # SIGTERM -> the new process SERVING
    errors_during_gateway_restart: int  # failed calls sent between SIGTERM and SERVING again
    unavailable_answers: int  # attempts the gateways answered UNAVAILABLE (clients retry these)
    redelivered: int  # jobs the reapers put back from expired leases (worker logs)
    late_replies: int  # replies the gateways dropped: nobody waiting (duplicates, given-up calls)
    settle_s: float  # load end -> no job, lease or queue entry left in Redis
    leftover_keys: list[str]
    expiring_reply_lists: int
    unclean_exits: list[str]  # services that did not exit 0 on the final SIGTERM
    faults: list[str]  # what hit when, from the start of the load
    failure_samples: dict[str, str]  # one message per failed status

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def table(self) -> str:
        kills = f"{self.worker_kills}, {self.kills_catching_a_lease} holding leases"
        kills += f" ({self.requests_caught_by_kills} requests, {self.requests_caught_by_kills_ok} answered OK)"
        rows = [
            ("requests sent", self.sent),
            ("succeeded", self.succeeded),
            ("failed, by status", ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"),
            ("lost", self.lost),
            ("answers not the caller's own", self.mismatched),
            ("load duration", f"{self.load_s:.1f} s"),
            ("worker kills", kills),
            ("worst: kill to its leased requests answered", f"{self.worst_worker_kill_recovery_s:.2f} s"),
            ("worst: kill to the next success", f"{self.worst_next_success_after_kill_s:.2f} s"),
            ("Redis down (kill -9 to AOF replayed)", f"{self.redis_down_s:.2f} s"),
            ("jobs in Redis at its kill, answered OK", f"{self.redis_jobs_at_kill}, {self.redis_jobs_at_kill_ok}"),
            ("Redis restart to the first success", f"{self.redis_first_success_s:.2f} s"),
            ("Redis restart to calls open over the outage answered", f"{self.redis_inflight_answered_s:.2f} s"),
            ("gateway down (SIGTERM to SERVING again)", f"{self.gateway_down_s:.2f} s"),
            ("calls failed while the gateway restarted", self.errors_during_gateway_restart),
            ("UNAVAILABLE answers by gateways (retried)", self.unavailable_answers),
            ("jobs redelivered from expired leases", self.redelivered),
            ("late replies dropped by gateways", self.late_replies),
            ("Redis settled after the load", f"{self.settle_s:.2f} s"),
            ("leftover keys", ", ".join(self.leftover_keys) or "none"),
            ("reply lists left to expire", self.expiring_reply_lists),
            ("unclean exits on the final SIGTERM", ", ".join(self.unclean_exits) or "none"),
            *((f"  {code}", detail) for code, detail in sorted(self.failure_samples.items())),
            *(("fault", fault) for fault in self.faults),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def summarize(
    plan: LoadPlan, ledger: Ledger, events: Sequence[FaultEvent], t0_s: float, load_s: float, **from_the_mesh: Any
) -> Report:
    """The figures of one run: outcomes from the ledger, recoveries against the fault times.

    A request a killed worker held is timed from that kill, and left out of the Redis
    figures (its wait is the lease's, not the outage's).
    """
    first = ledger.first()
    by_id = {request_id(o.index): o for o in first}
    codes = Counter(o.code for o in first)
    kills = [e for e in events if e.kind == "worker_kill"]
    redis = next(e for e in events if e.kind == "redis_restart")
    gateway = next(e for e in events if e.kind == "gateway_restart")
    caught = {rid: e for e in kills for rid in e.caught if rid in by_id}
    over_outage = [o for o in first if request_id(o.index) not in caught and o.sent_s <= redis.back_s < o.done_s]
    return Report(
        sent=plan.requests,
        succeeded=codes.pop("OK", 0),
        failed={k: v for k, v in codes.items() if k not in ("LOST", "MISMATCH")},
        lost=plan.requests - len(first) + codes["LOST"],
        mismatched=codes["MISMATCH"],
        load_s=load_s,
        worker_kills=len(kills),
        kills_catching_a_lease=sum(1 for e in kills if e.caught),
        requests_caught_by_kills=len(caught),
        requests_caught_by_kills_ok=sum(1 for rid in caught if by_id[rid].code == "OK"),
        worst_worker_kill_recovery_s=max((by_id[rid].done_s - e.at_s for rid, e in caught.items()), default=0.0),
        worst_next_success_after_kill_s=max((_next_success(first, e.at_s) for e in kills), default=0.0),
        redis_down_s=redis.back_s - redis.at_s,
        redis_jobs_at_kill=len(redis.caught),
        redis_jobs_at_kill_ok=sum(1 for rid in redis.caught if rid in by_id and by_id[rid].code == "OK"),
        redis_first_success_s=_next_success(first, redis.back_s),
        redis_inflight_answered_s=max((o.done_s - redis.back_s for o in over_outage), default=0.0),
        gateway_down_s=gateway.back_s - gateway.at_s,
        errors_during_gateway_restart=sum(
            1 for o in first if o.code != "OK" and gateway.at_s <= o.sent_s <= gateway.back_s
        ),
        faults=[_fault_line(e, by_id, t0_s) for e in sorted(events, key=lambda e: e.at_s)],
        failure_samples={o.code: o.detail for o in reversed(first) if o.code != "OK"},
        **from_the_mesh,
    )


def _next_success(outcomes: Sequence[Outcome], after_s: float) -> float:
    """Seconds from ``after_s`` to the first successful answer after it."""
    return min((o.done_s for o in outcomes if o.code == "OK" and o.done_s > after_s), default=math.inf) - after_s


def _fault_line(event: FaultEvent, by_id: dict[str, Outcome], t0_s: float) -> str:
    line = f"{event.at_s - t0_s:6.2f}s {event.kind} ({event.detail}), back after {event.back_s - event.at_s:.2f}s"
    for rid in event.caught:
        outcome = by_id.get(rid)
        if outcome is not None:
            line += f"; {rid}: {outcome.code} {outcome.done_s - event.at_s:.2f}s after"
    return line
