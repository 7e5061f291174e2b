"""Fuzzed requests against the live gateway: the right status, never a crash or a hang."""

from __future__ import annotations

import struct
from collections import Counter

from hypothesis import HealthCheck, event, example, given, settings

from tests.fuzz.harness import LiveMesh, check_call, check_still_serving
from tests.fuzz.oracle import MAX_MESSAGE_BYTES, Request
from tests.fuzz.strategies import Case, infer_requests

FUZZ_EXAMPLES = 300


def adder_with_stray_bool_contents() -> Case:
    """Regression: values in a field other than the datatype's were ignored (answered OK)."""
    request = Request(model_name="adder_fixed")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([-(2**63)] * 4)
    request.inputs[0].contents.bool_contents.extend([False] * 4)
    return Case(request)


def very_long_model_name() -> Case:
    """Regression: the NOT_FOUND details quoted all 20 000 characters, and clients
    (grpc's 8 KiB soft, 16 KiB hard metadata limit) saw RESOURCE_EXHAUSTED instead."""
    request = Request(model_name="m" * 20_000)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 256)
    return Case(request)


def mixed_case_strings() -> Case:
    """Regression (issue 16): the worker fed bytes to ONNX Runtime, which answered "b'hello'"."""
    request = Request(model_name="lowercase")
    request.inputs.add(name="text", datatype="BYTES", shape=[2])
    words = [b"HeLLo", "WORLD Été".encode()]
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(word)) + word for word in words))
    return Case(request)


def oversized_request() -> Case:
    request = Request(model_name="mlp")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    return Case(request)


def test_fuzzed_requests_get_the_right_status_never_a_crash_or_a_hang(live: LiveMesh) -> None:
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(case=infer_requests())
    @example(case=adder_with_stray_bool_contents())
    @example(case=very_long_model_name())
    @example(case=oversized_request())
    @example(case=mixed_case_strings())
    def one_call(case: Case) -> None:
        outcome = check_call(live.stub, case.request, case.deadline_s)
        event(outcome)
        outcomes[outcome] += 1

    outcomes: Counter[str] = Counter()
    one_call()
    print("outcomes:", dict(outcomes.most_common()))
    expected = Counter[str]()
    for outcome, n in outcomes.items():
        expected[outcome.split(",")[0].removeprefix("expected ")] += n
    assert min(expected["OK"], expected["NOT_FOUND"], expected["INVALID_ARGUMENT"]) >= 20, expected  # a real mix
    assert expected["RESOURCE_EXHAUSTED"] >= 1, expected
    check_still_serving(live)
