"""The ``meshserve`` command: ``up`` runs the whole mesh; each service also runs alone.

    meshserve up        private Redis (unless --redis-url), router, gateway, N workers
    meshserve router    the control plane
    meshserve gateway   KServe v2 gRPC front door
    meshserve worker    one worker process for one device
    meshserve devices   the GPUs, MIG slices and CPU this host can serve on
    meshserve bench     load generator, beside raw ONNX Runtime in-process
    meshserve hash-key  the sha256 form of an API key, for the tenants file
    meshserve top       live view of models, tenants, queues and devices from /metrics
    meshserve models    list, load and unload models (the repository API); stats: Triton's statistics
    meshserve models split NAME 1=95 2=5   a model's traffic split between its versions

Every flag has a ``MESHSERVE_<NAME>`` environment variable; the flag wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace

from meshserve.observe.logs import configure_logging
from meshserve.platform.heap import freeze_startup_heap, return_large_buffers
from meshserve.settings import (
    GatewaySettings,
    LogSettings,
    RouterSettings,
    WorkerSettings,
    add_arguments,
    env_default,
    from_args,
    tls_from_args,
)

log = logging.getLogger("meshserve")


async def serve_until_signal(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """Start a service, wait for SIGINT/SIGTERM, then stop it (draining)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    freeze_startup_heap()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        return_large_buffers()
    await stopping.wait()
    log.info("signal received; draining")
    await stop()


def _run(coro: Awaitable[None]) -> None:
    # gRPC's asyncio layer polls one global completion queue from a thread of its own,
    # and shuts both down whenever the process holds no gRPC object (a gateway between
    # closing one router channel and opening the next). That shutdown races the poller
    # (grpc/grpc#43364); holding a reference for the process's life keeps one poller.
    import grpc.aio

    grpc.aio.init_grpc_aio()
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------ services


def cmd_router(args: argparse.Namespace) -> int:
    from router.server import RouterServer

    settings = from_args(RouterSettings, args)
    if settings.repository_poll_s <= 0 or settings.unload_drain_s < 0 or settings.max_upload_bytes < 0:
        raise SystemExit("--repository-poll-s must be > 0; --unload-drain-s and --max-upload-bytes >= 0")
    if settings.load_model and settings.model_control_mode != "explicit":
        raise SystemExit("--load-model needs --model-control-mode explicit (the other modes load every model)")

    async def main() -> None:
        server = RouterServer(settings)
        await serve_until_signal(server.start, server.stop)

    _run(main())
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from meshserve.cli.gateway_processes import default_processes, run_processes

    settings = from_args(GatewaySettings, args)
    count = settings.processes or default_processes()
    if count < 0 or (count > 1 and settings.port == 0):
        raise SystemExit("--processes must be >= 0, and more than one needs a fixed --grpc-port")
    settings = replace(settings, processes=count)
    if count == 1:
        serve_gateway(settings)
        return 0
    return run_processes(serve_gateway, settings, count, args.log_level, args.log_format)


def serve_gateway(settings: GatewaySettings) -> None:
    """One gateway in this process until SIGTERM/SIGINT; SIGHUP reloads the tenants."""
    from gateway.server import GatewayServer
    from meshserve.observe.tracing import make_tracer

    async def main() -> None:
        server = GatewayServer(settings, make_tracer("meshserve-gateway"))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reload_tenants)
        await serve_until_signal(server.start, server.stop)

    _run(main())


def cmd_worker(args: argparse.Namespace) -> int:
    from meshserve.platform.inventory import pin_device

    # Before anything can create an ONNX Runtime session: CUDA reads
    # CUDA_VISIBLE_DEVICES once, when the first CUDA or TensorRT session initializes it.
    try:
        pin_device(args.device, os.environ)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    from meshserve.observe.tracing import make_tracer
    from model_workers.server import WorkerServer

    settings = from_args(WorkerSettings, args)

    async def main() -> None:
        server = WorkerServer(settings, make_tracer("meshserve-worker", downstream=True))
        await serve_until_signal(server.start, server.stop)

    _run(main())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from meshserve.cli.supervisor import run_up

    return run_up(args, tls_from_args(args))


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    from meshserve.platform.inventory import as_dict, discover, inventory_table

    devices = discover()
    print(json.dumps([as_dict(d) for d in devices], indent=2) if args.json else inventory_table(devices))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from meshserve.tenancy.tenants import hash_key

    key = sys.stdin.readline().rstrip("\n") if args.key == "-" else args.key
    print(hash_key(key))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from meshserve_bench.cli import run

    return run(args)


def cmd_top(args: argparse.Namespace) -> int:
    from meshserve.cli.top import DEFAULT_ENDPOINTS, run_top

    if args.interval_s <= 0:
        raise SystemExit("--interval-s must be positive")
    return run_top(args.endpoint or DEFAULT_ENDPOINTS, args.interval_s, once=args.once)


def cmd_models(args: argparse.Namespace) -> int:
    from meshserve.cli.models import run_models

    return run_models(args)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's flags; each service's come from its settings class (meshserve.settings)."""
    parser = argparse.ArgumentParser(prog="meshserve", description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser, LogSettings)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run router, gateway and workers (and a private Redis)")
    from meshserve.cli.supervisor import add_up_arguments

    add_up_arguments(up)
    up.set_defaults(func=cmd_up)

    for name, cls, help_text, func in (
        ("router", RouterSettings, "run the control plane", cmd_router),
        ("gateway", GatewaySettings, "run the KServe v2 gRPC gateway", cmd_gateway),
        ("worker", WorkerSettings, "run one model worker", cmd_worker),
    ):
        service = sub.add_parser(name, help=help_text)
        add_arguments(service, LogSettings, given_only=True)  # after the subcommand too, as `up` passes them
        add_arguments(service, cls)
        service.set_defaults(func=func)

    devices = sub.add_parser("devices", help="list the GPUs, MIG slices and CPU found here (NVML; read-only)")
    devices.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    devices.set_defaults(func=cmd_devices)

    hash_key = sub.add_parser("hash-key", help="print the sha256:<hex> form of an API key, for the tenants file")
    hash_key.add_argument("key", help="the API key, or - to read it from standard input")
    hash_key.set_defaults(func=cmd_hash_key)

    bench = sub.add_parser("bench", help="drive a mesh with concurrent gRPC clients, beside raw ONNX Runtime")
    from meshserve_bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    top = sub.add_parser("top", help="live view of models, tenants, queue depths, p99 and devices")
    top.add_argument(
        "--endpoint",
        action="append",
        help="a Prometheus /metrics URL; repeat for each service "
        "(default: `meshserve up` with one worker: :8002 gateway, :8003 worker, :8004 router)",
    )
    top.add_argument("--interval-s", type=float, default=env_default("TOP_INTERVAL_S", 1.0), help="between scrapes")
    top.add_argument("--once", action="store_true", help="print one frame (two scrapes --interval-s apart) and exit")
    top.set_defaults(func=cmd_top)

    models = sub.add_parser("models", help="list, load, unload models (the repository API) and read their statistics")
    from meshserve.cli.models import add_models_arguments

    add_models_arguments(models)
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, service=args.command)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
