"""10 000 deterministic malformed requests: the gateway's memory stays flat."""

from __future__ import annotations

import gc
import os
import random
import tracemalloc
from collections.abc import Callable

import pytest

from protos import grpc_service_pb2_grpc as pb_grpc
from tests.fuzz.harness import LiveMesh, check_still_serving
from tests.fuzz.oracle import KSERVE_DATATYPES, RPC_TIMEOUT_S, Request, expected_code
from tests.fuzz.strategies import BROKEN_BYTES, GARBAGE_DATATYPES, SPECIAL_DIMS

MEMORY_REQUESTS = 10_000
MEMORY_WARM_UP = 2_000
MEMORY_GROWTH_LIMIT_BYTES = 2 * 1024 * 1024  # Python heap, traced
RSS_GROWTH_LIMIT_BYTES = 8 * 1024 * 1024  # whole process, grpc's C core included

Spoiler = Callable[[Request, int, random.Random], None]


def _unknown_model(request: Request, i: int, rng: random.Random) -> None:
    request.model_name = f"no-such-model-{i}"


def _unknown_version(request: Request, i: int, rng: random.Random) -> None:
    request.model_version = str(rng.randrange(2, 2**62))


def _wrong_datatype(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].datatype = rng.choice([d for d in KSERVE_DATATYPES if d != "FP32"] + list(GARBAGE_DATATYPES))


def _wrong_shape(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].shape[:] = [rng.choice(SPECIAL_DIMS) for _ in range(rng.randrange(0, 5))]


def _wrong_byte_length(request: Request, i: int, rng: random.Random) -> None:
    request.raw_input_contents[0] = b"\x00" * rng.choice([0, 4, 508, 516, 1024])


def _extra_raw(request: Request, i: int, rng: random.Random) -> None:
    request.raw_input_contents.append(b"\x00" * 8)


def _unknown_input(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].name = f"input-{i}"


def _missing_input(request: Request, i: int, rng: random.Random) -> None:
    request.model_name = "adder_fixed"
    tensor = request.inputs[0]
    tensor.name, tensor.datatype, tensor.shape[:] = "a", "INT64", [1, 4]
    request.raw_input_contents[0] = b"\x00" * 32


def _typed_count(request: Request, i: int, rng: random.Random) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([1.0] * rng.choice([0, 127, 129]))


def _unknown_output(request: Request, i: int, rng: random.Random) -> None:
    request.outputs.add(name=f"output-{i}")


def _broken_bytes(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].datatype = "BYTES"
    request.raw_input_contents[0] = rng.choice(BROKEN_BYTES[:3])


def _odd_parameters_huge_batch(request: Request, i: int, rng: random.Random) -> None:
    request.parameters[f"param-{i}"].string_param = f"value-{i}"
    request.parameters["priority"].int64_param = -rng.randrange(1, 2**62)
    request.inputs[0].shape[0] = 2**40


SPOILERS: tuple[Spoiler, ...] = (
    _unknown_model,
    _unknown_version,
    _wrong_datatype,
    _wrong_shape,
    _wrong_byte_length,
    _extra_raw,
    _unknown_input,
    _missing_input,
    _typed_count,
    _unknown_output,
    _broken_bytes,
    _odd_parameters_huge_batch,
)


def malformed_requests(count: int, seed: int) -> list[Request]:
    """``count`` cheap malformed requests (mlp-sized), deterministic, with unique
    strings wherever a client chooses them: model, input, output and parameter names, ids."""
    rng = random.Random(seed)
    base = Request(model_name="mlp")
    base.inputs.add(name="features", datatype="FP32", shape=[2, 64])
    base.raw_input_contents.append(b"\x00" * 512)
    requests = []
    for i in range(count):
        request = Request()
        request.CopyFrom(base)
        request.id = f"fuzz-{i}"
        SPOILERS[i % len(SPOILERS)](request, i, rng)
        requests.append(request)
    return requests


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def send_all(stub: pb_grpc.GRPCInferenceServiceStub, requests: list[Request], window: int = 32) -> None:
    """Send every request (up to ``window`` in flight); each must be refused as the oracle says."""
    for start in range(0, len(requests), window):
        chunk = requests[start : start + window]
        futures = [stub.ModelInfer.future(request, timeout=RPC_TIMEOUT_S) for request in chunk]
        for request, future in zip(chunk, futures, strict=True):
            error = future.exception()
            assert error is not None, f"a malformed request was answered OK: {request.id}"
            assert error.code() == expected_code(request), f"{request.id}: {error.code().name}: {error.details()}"


@pytest.mark.slow
@pytest.mark.timeout(120)  # 10 000 calls, about 15 s alone; the package's mesh may start in this test's time
def test_memory_stays_flat_over_ten_thousand_malformed_requests(live: LiveMesh) -> None:
    """Warm up untraced, then trace: what is still allocated at the end is growth."""
    requests = malformed_requests(MEMORY_REQUESTS, seed=4)
    send_all(live.stub, requests[:MEMORY_WARM_UP])
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        send_all(live.stub, requests[MEMORY_WARM_UP:])
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0]
        top = tracemalloc.take_snapshot().statistics("lineno")[:5]
    finally:
        tracemalloc.stop()
    rss_after = rss_bytes()

    print(
        f"over requests {MEMORY_WARM_UP}..{MEMORY_REQUESTS}: Python heap +{traced_growth / 1e6:.2f} MB (traced), "
        f"RSS {rss_before / 1e6:.1f} -> {rss_after / 1e6:.1f} MB"
    )
    assert traced_growth < MEMORY_GROWTH_LIMIT_BYTES, "grew most at:\n" + "\n".join(map(str, top))
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_BYTES
    check_still_serving(live)
