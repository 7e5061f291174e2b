"""Chaos for sequences: ``kill -9`` of a worker while it holds steps of live sequences
(processes, as tests/chaos/harness.py runs them). Every sum must come out exact: the
steps the dead worker held run again on the other worker, on the state from before
them, none lost and none applied twice. ``pytest -s`` shows the figures."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.accumulator import write_accumulator
from meshserve.queue import ModelKeys
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.chaos.harness import Mesh, count_in_logs

SEQUENCES = 40
STEPS = 25
CALL_TIMEOUT_S = 30.0


def step(value: int, sequence_id: int, index: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="accumulator")
    request.inputs.add(name="x", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[value]], np.int64).tobytes())
    request.outputs.add(name="sum")
    request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = index == 0
    request.parameters["sequence_end"].bool_param = index == STEPS - 1
    return request


async def holding(redis: Redis, keys: ModelKeys, worker_id: str) -> bool:
    """Whether ``worker_id`` holds a lease on a step right now."""
    for job_id in await redis.zrange(keys.inflight, 0, -1):
        if await redis.hget(keys.job(job_id.decode()), "w") == worker_id.encode():
            return True
    return False


@pytest.mark.slow
async def test_kill_9_of_a_worker_mid_sequence_changes_no_sum(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_accumulator(repository)
    mesh = Mesh(tmp_path, repository, lease_ms=1000)
    await mesh.start(gateways=1, workers=2)
    rng = random.Random(3)
    values = {seq: [rng.randrange(1, 100) for _ in range(STEPS)] for seq in range(1, SEQUENCES + 1)}
    done = 0
    halfway = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(mesh.gateway_addresses[0]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def run(seq: int) -> list[int]:
                nonlocal done
                sums = []
                for index, value in enumerate(values[seq]):
                    response = await stub.ModelInfer(step(value, seq, index), timeout=CALL_TIMEOUT_S)
                    sums.append(int(np.frombuffer(response.raw_output_contents[0], np.int64)[0]))
                    done += 1
                    if done >= SEQUENCES * STEPS // 3:
                        halfway.set()
                return sums

            clients = asyncio.gather(*(run(seq) for seq in values))
            async with asyncio.timeout(60):
                await halfway.wait()
            victim = mesh.workers[0]
            victim_id = victim.worker_id()
            assert victim_id is not None
            redis = Redis.from_url(mesh.redis.url)
            try:
                keys = ModelKeys.for_model("accumulator", 1)
                async with asyncio.timeout(20):
                    while not await holding(redis, keys, victim_id):  # each look is a round trip
                        pass
                await victim.kill()  # mid-step: it holds a lease
                mesh.workers.remove(victim)
                results = await clients
            finally:
                await redis.aclose()
    finally:
        unclean = await mesh.stop()
    for seq, sums in zip(values, results, strict=True):
        assert sums == list(np.cumsum(values[seq])), f"sequence {seq}"
    redelivered = count_in_logs(mesh.logs("worker"), r"redelivering (\d+) requests")
    print(
        f"\n{SEQUENCES} sequences x {STEPS} steps exact after kill -9 of {victim_id}; redelivery lines: {redelivered}"
    )
    assert not unclean, unclean
