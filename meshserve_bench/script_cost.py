"""Redis's own microseconds per job of the queue's request path, by payload path.

``python -m meshserve_bench.script_cost --sizes 100,12288,110592``: for each payload
size, ``--jobs`` jobs are enqueued on a fresh Redis of its own, claimed in batches of
``--batch`` with their payloads read, then replied to and acked, through the same
:class:`~meshserve.queue.QueueProtocol` calls a gateway and a worker make, one round
trip at a time. Each step's cost is Redis's main-thread CPU over the step (``INFO
cpu``): commands, scripts, and reading and writing the sockets. (``INFO
commandstats`` would count a script's commands twice, inside its EVALSHA and under
their own names, and leave the sockets out.) Paths: ``lua`` (the payload is a script
argument, up to 32 KiB), ``hash`` (over 32 KiB, into the job hash's field ``b``: what a
gateway writes while some worker does not read payload keys) and ``key`` (over 4 KiB,
a key of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve.queue import ModelKeys, QueueProtocol, reply_ack_command
from meshserve.queue.protocol import KEY_PAYLOAD_BYTES, LUA_PAYLOAD_BYTES
from meshserve.store.link import RedisLink

KEYS = ModelKeys.for_model("cost", 1)


async def cpu_us(link: RedisLink) -> float:
    """Redis's main-thread CPU so far, user and system, µs."""
    info = (await link.execute("INFO", "cpu")).decode()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return (float(fields["used_cpu_user_main_thread"]) + float(fields["used_cpu_sys_main_thread"])) * 1e6


async def measure(url: str, size: int, path: str, jobs: int, batch: int) -> dict[str, float]:
    """Redis main-thread CPU µs per job of each step, for ``jobs`` jobs of ``size`` bytes through ``path``."""
    link = RedisLink(url)
    queue = QueueProtocol(link)
    try:
        await link.execute("FLUSHALL")
        await queue.load_ack_script()
        payload = bytes(size)
        deadline_ms = int(time.time() * 1000) + 600_000
        steps: dict[str, float] = {}
        start = await cpu_us(link)
        for n in range(jobs):
            await queue.enqueue(
                KEYS,
                f"j{n}",
                tier=0,
                payload=payload,
                deadline_ms=deadline_ms,
                tenant="t",
                reply_to="replies",
                signature="",
                max_queue_size=0,
                payload_key=path == "key",
            )
        steps["enqueue"] = ((now := await cpu_us(link)) - start) / jobs
        leases = []
        while claimed := await queue.fetch_bulk(
            KEYS, await queue.claim(KEYS, max_items=batch, lease_ms=600_000, worker_id="w")
        ):
            if not claimed.jobs:
                break
            leases.append((claimed.token, [job_id for job_id, _ in claimed.jobs]))
        steps["claim and read"] = ((start := await cpu_us(link)) - now) / jobs
        for token, ids in leases:
            await link.pipeline(
                [reply_ack_command(KEYS, "replies", [b"r" * 200] * len(ids), [(token, i) for i in ids])]
            )
        steps["reply and ack"] = (await cpu_us(link) - start) / jobs
        steps["total"] = sum(steps.values())
        return steps
    finally:
        await link.aclose()


def paths_for(size: int) -> list[str]:
    """The paths a payload of ``size`` bytes can take."""
    old = "hash" if size > LUA_PAYLOAD_BYTES else "lua"
    return [old, "key"] if size > KEY_PAYLOAD_BYTES else [old]


async def run(sizes: Sequence[int], jobs: int, batch: int) -> None:
    with RedisServer(binary_from_env()) as server:
        print(f"| payload | path | enqueue | claim and read | reply and ack | total µs/job (batch {batch}) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for size in sizes:
            for path in paths_for(size):
                steps = await measure(server.socket_url, size, path, jobs, batch)
                cells = " | ".join(
                    f"{steps[step]:.1f}" for step in ("enqueue", "claim and read", "reply and ack", "total")
                )
                print(f"| {size} B | {path} | {cells} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve_bench.script_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,12288,110592", help="payload bytes, comma-separated")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    asyncio.run(run([int(s) for s in args.sizes.split(",")], args.jobs, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
