"""The generation half of ``--scenario stream``: tokens per second and time to first
token on the example generator (a decoupled model in the ``generate`` mode), at
concurrency 1 and 16.

One ModelStreamInfer stream keeps ``concurrency`` generations in flight (a new one
sent as each ends, while the window lasts): each a prompt of ``PROMPT_TOKENS`` tokens
and ``max_tokens`` ``GENERATED_TOKENS``, greedy. Tokens per second counts the tokens
received inside the window; time to first token is send to first response, per
request; the gap between tokens is a request's time from first to last response over
its tokens but one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import grpc
import numpy as np

from meshserve_bench.load import Window
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

GENERATOR = "generator"
GENERATION_CONCURRENCIES = (1, 16)
PROMPT_TOKENS = 4
GENERATED_TOKENS = 64
CALL_TIMEOUT_S = 30.0
FINAL = "triton_final_response"


@dataclass(frozen=True, slots=True)
class GenerationPoint:
    """Generations at one concurrency, inside the window."""

    concurrency: int
    tokens_per_s: float
    requests: int  # generations that ended inside the window
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    token_gap_p50_ms: float  # a request's mean time between tokens, median over requests


def prompt(index: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=GENERATOR, id=str(index))
    tokens = (np.arange(PROMPT_TOKENS, dtype=np.int64) + index) % 32
    request.inputs.add(name="token_id", datatype="INT64", shape=[PROMPT_TOKENS])
    request.raw_input_contents.append(tokens.tobytes())
    request.parameters["max_tokens"].int64_param = GENERATED_TOKENS
    return request


async def generation_point(stub: pb_grpc.GRPCInferenceServiceStub, concurrency: int, window: Window) -> GenerationPoint:
    call = stub.ModelStreamInfer(timeout=CALL_TIMEOUT_S + window.duration_s() + 60)
    ids = itertools.count()
    sent_ns: dict[str, int] = {}
    first_ns: dict[str, int] = {}
    ttft_ms: list[float] = []
    gaps_ms: list[float] = []
    tokens = requests = errors = 0

    async def send() -> None:
        one = prompt(next(ids))
        sent_ns[one.id] = time.perf_counter_ns()
        await call.write(one)

    for _ in range(concurrency):
        await send()
    while sent_ns:
        response = await call.read()
        if response is grpc.aio.EOF:
            break
        now_ns = time.perf_counter_ns()
        request_id = response.infer_response.id
        inside = window.start_ns <= now_ns <= window.end_ns
        if response.error_message:
            errors += 1
            final = True
        else:
            final = response.infer_response.parameters[FINAL].bool_param
            tokens += inside and bool(response.infer_response.outputs)
            if request_id not in first_ns:
                first_ns[request_id] = now_ns
                if inside:
                    ttft_ms.append((now_ns - sent_ns[request_id]) / 1e6)
        if not final:
            continue
        sent_ns.pop(request_id)
        first = first_ns.pop(request_id, now_ns)
        if inside and not response.error_message:
            requests += 1
            gaps_ms.append((now_ns - first) / 1e6 / max(1, GENERATED_TOKENS - 1))
        if now_ns < window.end_ns:
            await send()
    await call.done_writing()
    return GenerationPoint(
        concurrency,
        tokens / window.duration_s(),
        requests,
        errors,
        _percentile(ttft_ms, 50),
        _percentile(ttft_ms, 99),
        _percentile(gaps_ms, 50),
    )


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
