"""The ``scale-out`` scenario: one model on a Redis Cluster, with 1 queue partition and with 3.

The bench starts a loopback cluster of three masters (no replicas: a replica's
replication would add CPU that is not the request path's), then for each partition
count a mesh (``meshserve up --redis-url redis+cluster://...``) serving a copy of the
model whose config.yaml says ``queue_partitions: P``, and runs a closed loop at the
largest ``--concurrency``. Each point reports calls/s and, for each master, the CPU
it used (``used_cpu_sys`` + ``used_cpu_user`` of ``INFO cpu``, the whole process) and
the commands it ran, per call, read at the start and the end of the measured window.

With P = 1 every call costs one master; with P = 3 the cost spreads over three, so on
a host with cores to spare for three Redis servers (and the gateways and workers to
feed them) the calls/s should approach three times P = 1's when one master's core is
the ceiling. On a host where the mesh itself takes every core, P = 3 cannot go faster:
the report says how busy the machine was.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.devkit.redis_server import binary_from_env
from meshserve.models.repository import CONFIG_FILENAME, ModelInfo
from meshserve.queue import partition_keys
from meshserve.store.cluster import slot_of
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import MAX_DEFAULT_CHANNELS, Window, build_request, measure_point, sleep_until
from meshserve_bench.mesh import find_model, model_json, own_mesh, progress, require_ready

PARTITION_COUNTS = (1, 3)
MASTERS = 3


def partitioned_copy(model: ModelInfo, repository: Path, partitions: int, into: Path) -> Path:
    """A repository holding only ``model``'s directory, its config.yaml with ``queue_partitions``."""
    source = repository / model.name
    target = into / f"p{partitions}" / model.name
    shutil.copytree(source, target, dirs_exist_ok=True)
    config_path = target / CONFIG_FILENAME
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    config["queue_partitions"] = partitions
    config_path.write_text(yaml.safe_dump(config))
    return target.parent


async def node_counters(client: Redis) -> tuple[float, int]:
    """One master's CPU seconds (sys + user, the whole process) and commands so far."""
    cpu = await client.info("cpu")
    stats = await client.info("stats")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), int(stats["total_commands_processed"])


async def shard_usage(window: Window, ports: list[int]) -> list[tuple[float, int]]:
    """Each master's CPU seconds and commands inside ``window``, on one connection per
    master opened before it (so the count holds only this reading's own two INFOs)."""
    clients = [Redis(host="127.0.0.1", port=port) for port in ports]
    try:
        for client in clients:
            await client.ping()
        await sleep_until(window.start_ns)
        before = [await node_counters(client) for client in clients]
        await sleep_until(window.end_ns)
        after = [await node_counters(client) for client in clients]
    finally:
        for client in clients:
            await client.aclose()
    return [(a[0] - b[0], a[1] - b[1] - 2) for a, b in zip(after, before, strict=True)]  # our INFO cpu and stats


async def measure(
    target: str, model: ModelInfo, config: BenchConfig, concurrency: int, ports: list[int]
) -> dict[str, Any]:
    await require_ready(target, model)
    window = Window.after(config.warmup_s, config.duration_s)
    channels = config.channels or min(concurrency, MAX_DEFAULT_CHANNELS)
    usage = asyncio.ensure_future(shard_usage(window, ports))
    started = time.process_time()
    point = await measure_point(target, build_request(model), window, channels=channels, concurrency=concurrency)
    shards = await usage
    calls = max(point.calls.ok, 1)
    return {
        "point": asdict(point),
        "calls_per_s": point.ok_per_s(),
        "bench_cpu_s": time.process_time() - started,
        "shards": [
            {
                "port": port,
                "cpu_s": cpu_s,
                "cpu_us_per_call": cpu_s / calls * 1e6,
                "commands_per_call": commands / calls,
                "busy_share": cpu_s / window.duration_s(),
            }
            for port, (cpu_s, commands) in zip(ports, shards, strict=True)
        ],
    }


def run_scale_out(config: BenchConfig) -> dict[str, Any]:
    """P = 1 then P = 3 on one loopback cluster (flushed between); the figures for ``--json``."""
    if config.target:
        raise SystemExit("bench: scale-out starts its own cluster and meshes: --target does not apply")
    model = find_model(config.repository, config.model)
    concurrency = max(config.concurrencies)
    points = []
    with tempfile.TemporaryDirectory(prefix="meshserve-scale-out-") as scratch:
        progress(f"starting a loopback Redis Cluster of {MASTERS} masters")
        with RedisCluster(binary_from_env(), masters=MASTERS, replicas=0) as cluster:
            ports = [node.port for node in cluster.masters]
            for partitions in PARTITION_COUNTS:
                for node in cluster.masters:
                    cluster.client(node).flushall()
                repository = partitioned_copy(model, config.repository, partitions, Path(scratch))
                homes = sorted(
                    {
                        cluster.master_of_slot(slot_of(k.ready)).port
                        for k in partition_keys(model.name, model.version, partitions)
                    }
                )
                progress(f"P = {partitions}: partitions on masters {homes}; {concurrency} clients")
                with own_mesh(repository, ["--redis-url", cluster.url]) as target:
                    figures = asyncio.run(measure(target, model, config, concurrency, ports))
                points.append({"partitions": partitions, "masters_holding_partitions": homes, **figures})
    base = points[0]["calls_per_s"]
    return {
        "model": model_json(model),
        "settings": {**asdict(config), "concurrency": concurrency, "masters": MASTERS},
        "scale_out": points,
        "speedup": points[-1]["calls_per_s"] / base if base else None,
    }
