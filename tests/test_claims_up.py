"""What the README promises of ``meshserve up`` on Ctrl-C: the gateway stops taking
calls and answers the ones in flight, then the workers finish their batch and ack,
then the router and Redis stop. Checked with calls computing and queued on the
"slow" model (tests/slow_model.py) when SIGINT reaches up's process group."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from meshserve.devkit.redis_server import free_port
from meshserve.queue import ModelKeys
from tests.slow_model import NAME, iterations_for, slow_request_inputs, write_slow
from tests.support import infer_request, infer_stub, output_arrays, queue_leftovers

SLOW = ModelKeys.for_model(NAME, 1)
CALLS = 3
READY_TIMEOUT_S = 40


def start_up(repository: Path, redis_url: str, port: int, log_path: Path) -> subprocess.Popen[str]:
    """``meshserve up`` on the session's Redis (so the test sees its queues), one CPU worker."""
    args = ["--model-repository", str(repository), "--redis-url", redis_url, "--grpc-port", str(port)]
    args += ["--metrics-port", "0", "--host", "127.0.0.1", "--workers", "1", "--gpu-workers", "none"]
    args += ["--intra-op-threads", "1", "--canary-interval-s", "0"]
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "meshserve", "up", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # a process group of its own, like a terminal's foreground job
        )


@pytest.mark.timeout(60)
async def test_ctrl_c_answers_every_call_in_flight(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_slow(tmp_path / "models", "max_batch_size: 0\n")  # one call per batch: some wait queued
    iterations = iterations_for(1.0, repository)
    port = free_port()
    log_path = tmp_path / "up.log"
    up = start_up(repository, redis_url, port, log_path)
    try:
        assert up.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            line = ""
            while "meshserve ready" not in line:
                line = await asyncio.to_thread(up.stdout.readline)
                assert line, f"meshserve up exited before it was ready:\n{log_path.read_text()}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = infer_stub(channel)
            calls = [
                asyncio.ensure_future(
                    stub.ModelInfer(infer_request(NAME, slow_request_inputs(iterations + i)), timeout=30)
                )
                for i in range(CALLS)
            ]
            async with asyncio.timeout(10):  # every call enqueued, the first one computing
                while await redis.zcard(SLOW.ready) + await redis.zcard(SLOW.inflight) < CALLS:  # noqa: ASYNC110 (bounded poll)
                    await asyncio.sleep(0.02)
            assert not any(call.done() for call in calls)
            os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does: every process in the group
            async with asyncio.timeout(30):
                responses = await asyncio.gather(*calls)
        code = await asyncio.to_thread(up.wait, 30)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        if up.stdout is not None:
            up.stdout.close()

    for i, response in enumerate(responses):
        assert output_arrays(response)["done"].tolist() == [[float(iterations + i)]]
    assert code == 0, log_path.read_text()
    assert await queue_leftovers(redis) == []  # every lease acked on the way down
