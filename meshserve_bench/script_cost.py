"""Redis's own microseconds per job of the queue's request path, by payload path.

``python -m meshserve_bench.script_cost --sizes 100,12288,110592``: for each payload
size, ``--jobs`` jobs are enqueued on a fresh Redis of its own, claimed in batches of
``--batch`` with their payloads read, then replied to and acked, through the same
:class:`~meshserve.queue.QueueProtocol` calls a gateway and a worker make. Each step's
cost is the sum of ``INFO commandstats`` microseconds over the step (a script's own
commands inside its EVALSHA): Redis's time executing commands, without its socket
reads and writes. Paths: ``lua`` (the payload is a script argument, up to 32 KiB),
``hash`` (over 32 KiB, into the job hash's field ``b``: what a gateway writes while
some worker does not read payload keys) and ``key`` (over 4 KiB, a key of its own).
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


async def command_usec(link: RedisLink) -> int:
    """Microseconds Redis has spent in commands since its last reset (INFO excluded)."""
    info = (await link.execute("INFO", "commandstats")).decode()
    total = 0
    for line in info.splitlines():
        if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info", "cmdstat_config")):
            total += int(line.split("usec=", 1)[1].split(",", 1)[0])
    return total


async def measure(url: str, size: int, path: str, jobs: int, batch: int) -> dict[str, float]:
    """Redis µs per job of each step, for ``jobs`` jobs of ``size`` bytes through ``path``."""
    link = RedisLink(url)
    queue = QueueProtocol(link)
    try:
        await link.execute("FLUSHALL")
        await queue.load_ack_script()
        payload = bytes(size)
        deadline_ms = int(time.time() * 1000) + 600_000
        steps: dict[str, float] = {}
        await link.execute("CONFIG", "RESETSTAT")
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
        steps["enqueue"] = await command_usec(link) / jobs
        await link.execute("CONFIG", "RESETSTAT")
        leases = []
        while claimed := await queue.fetch_bulk(
            KEYS, await queue.claim(KEYS, max_items=batch, lease_ms=600_000, worker_id="w")
        ):
            if not claimed.jobs:
                break
            leases.append((claimed.token, [job_id for job_id, _ in claimed.jobs]))
        steps["claim and read"] = await command_usec(link) / jobs
        await link.execute("CONFIG", "RESETSTAT")
        for token, ids in leases:
            await link.pipeline(
                [reply_ack_command(KEYS, "replies", [b"r" * 200] * len(ids), [(token, i) for i in ids])]
            )
        steps["reply and ack"] = await command_usec(link) / jobs
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
