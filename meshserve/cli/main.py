"""The ``meshserve`` command: ``up`` runs the whole mesh; each service also runs alone.

    meshserve up        private Redis (unless --redis-url), router, gateway, N workers
    meshserve router    the control plane
    meshserve gateway   KServe v2 gRPC front door
    meshserve worker    one worker process for one device
    meshserve devices   the GPUs, MIG slices and CPU this host can serve on
    meshserve bench     load generator, beside raw ONNX Runtime in-process
    meshserve hash-key  the sha256 form of an API key, for the tenants file
    meshserve top       live view of models, tenants, queues and devices from /metrics

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
from pathlib import Path

from meshserve.observe.logs import configure_logging
from meshserve.platform.heap import freeze_startup_heap
from meshserve.platform.tls import TlsConfig, TlsConfigError
from meshserve.settings import (
    TRACE_TENANT_MODES,
    GatewaySettings,
    RouterSettings,
    WorkerSettings,
    add_common,
    env_default,
)

log = logging.getLogger("meshserve")


async def _serve_until_signal(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """Start a service, wait for SIGINT/SIGTERM, then stop it (draining)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    freeze_startup_heap()
    await stopping.wait()
    log.info("signal received; draining")
    await stop()


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------ services


def cmd_router(args: argparse.Namespace) -> int:
    from router.server import RouterServer

    settings = RouterSettings(
        model_repository=Path(args.model_repository),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        redis_url=args.redis_url,
        tls=tls_from_args(args),
    )

    async def main() -> None:
        server = RouterServer(settings)
        await _serve_until_signal(server.start, server.stop)

    _run(main())
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import GatewayServer
    from meshserve.observe.tracing import make_tracer

    settings = GatewaySettings(
        redis_url=_require_redis(args),
        router_address=args.router,
        host=args.host,
        port=args.grpc_port,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        default_timeout_ms=args.default_timeout_ms,
        drain_grace_s=args.drain_grace_s,
        lame_duck_s=args.lame_duck_s,
        tenants_path=Path(args.tenants) if args.tenants else None,
        tls=tls_from_args(args),
        trace_tenant=args.trace_tenant,
        trace_tenant_secret=_trace_tenant_secret(),
    )

    async def main() -> None:
        server = GatewayServer(settings, make_tracer("meshserve-gateway"))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reload_tenants)
        await _serve_until_signal(server.start, server.stop)

    _run(main())
    return 0


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

    settings = WorkerSettings(
        redis_url=_require_redis(args),
        router_address=args.router,
        model_repository=Path(args.model_repository),
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        intra_op_spinning=args.intra_op_spinning,
        price_per_device_hour=args.price_per_device_hour,
        metrics_port=args.metrics_port,
        health_host=args.health_host,
        health_port=args.health_port,
        lease_ms=args.lease_ms,
        max_attempts=args.max_attempts,
        lower_tier_share=args.lower_tier_share,
        canary_interval_s=args.canary_interval_s,
        tls=tls_from_args(args),
        trace_tenant=args.trace_tenant,
        trace_tenant_secret=_trace_tenant_secret(),
    )

    async def main() -> None:
        server = WorkerServer(settings, make_tracer("meshserve-worker", downstream=True))
        await _serve_until_signal(server.start, server.stop)

    _run(main())
    return 0


def _trace_tenant_secret() -> str:
    """The HMAC key for ``--trace-tenant hash``: a variable only, as a flag would show in ``ps``."""
    return str(env_default("TRACE_TENANT_SECRET", ""))


def _require_redis(args: argparse.Namespace) -> str:
    if not args.redis_url:
        raise SystemExit("--redis-url (or MESHSERVE_REDIS_URL) is required")
    return str(args.redis_url)


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The --tls-* flags as a config (all three or none), or exit with the reason."""
    try:
        return TlsConfig.from_paths(args.tls_ca, args.tls_cert, args.tls_key)
    except TlsConfigError as exc:
        raise SystemExit(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    from meshserve.cli.supervisor import run_up

    # The services `up` starts inherit its environment, and with it how to log.
    os.environ["MESHSERVE_LOG_LEVEL"] = args.log_level
    os.environ["MESHSERVE_LOG_FORMAT"] = args.log_format
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


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description=__doc__.splitlines()[0] if __doc__ else None)
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run router, gateway and workers (and a private Redis)")
    up.add_argument(
        "--model-repository",
        default=env_default("MODEL_REPOSITORY", None),
        help="model repository dir (default: generated example models)",
    )
    up.add_argument("--grpc-port", type=int, default=env_default("GRPC_PORT", 8001))
    up.add_argument("--metrics-port", type=int, default=env_default("METRICS_PORT", 8002))
    up.add_argument("--host", default=env_default("HOST", "0.0.0.0"))
    up.add_argument(
        "--redis-url", default=env_default("REDIS_URL", None), help="use this Redis instead of starting a private one"
    )
    up.add_argument(
        "--workers",
        type=int,
        default=env_default("WORKERS", None),
        help="CPU workers (default: 1 when no GPU worker starts, else 0)",
    )
    up.add_argument(
        "--gpu-workers",
        choices=("auto", "none"),
        default=env_default("GPU_WORKERS", "auto"),
        help="auto: one worker per GPU, or per MIG slice where MIG is on (found with NVML); none: CPU only",
    )
    up.add_argument("--drain-grace-s", type=float, default=env_default("DRAIN_GRACE_S", 10.0))
    up.add_argument(
        "--tenants",
        default=env_default("TENANTS", None),
        help="tenants YAML for the gateway; none: one open development tenant",
    )
    _add_tls(up, "passed to every service: one identity for the whole mesh")
    up.set_defaults(func=cmd_up)

    router = sub.add_parser("router", help="run the control plane")
    router.add_argument(
        "--model-repository",
        required=env_default("MODEL_REPOSITORY", None) is None,
        default=env_default("MODEL_REPOSITORY", None),
    )
    router.add_argument("--host", default=env_default("ROUTER_HOST", "127.0.0.1"))
    router.add_argument("--port", type=int, default=env_default("ROUTER_PORT", 8003))
    router.add_argument("--metrics-port", type=int, default=env_default("ROUTER_METRICS_PORT", 0), help="0: off")
    router.add_argument(
        "--redis-url",
        default=env_default("REDIS_URL", None),
        help="the queues' Redis, for queue depths and the autoscaling signal on /metrics (MESHSERVE_REDIS_URL)",
    )
    _add_tls(router, "the port requires client certificates signed by the CA")
    router.set_defaults(func=cmd_router)

    gateway = sub.add_parser("gateway", help="run the KServe v2 gRPC gateway")
    _add_data_plane(gateway)
    gateway.add_argument("--host", default=env_default("HOST", "0.0.0.0"))
    gateway.add_argument("--grpc-port", type=int, default=env_default("GRPC_PORT", 8001))
    gateway.add_argument("--metrics-port", type=int, default=env_default("METRICS_PORT", 0))
    gateway.add_argument("--max-message-bytes", type=int, default=env_default("MAX_MESSAGE_BYTES", 64 * 1024 * 1024))
    gateway.add_argument("--default-timeout-ms", type=int, default=env_default("DEFAULT_TIMEOUT_MS", 30_000))
    gateway.add_argument("--drain-grace-s", type=float, default=env_default("DRAIN_GRACE_S", 10.0))
    gateway.add_argument(
        "--lame-duck-s",
        type=float,
        default=env_default("LAME_DUCK_S", 1.0),
        help="on SIGTERM: seconds NOT_SERVING but still answering, before the drain",
    )
    gateway.add_argument(
        "--tenants",
        default=env_default("TENANTS", None),
        help="tenants YAML (reloaded on SIGHUP); none: one open development tenant",
    )
    _add_trace_tenant(gateway)
    _add_tls(gateway, "clients must present a certificate signed by the CA")
    gateway.set_defaults(func=cmd_gateway)

    worker = sub.add_parser("worker", help="run one model worker")
    _add_data_plane(worker)
    worker.add_argument(
        "--model-repository",
        required=env_default("MODEL_REPOSITORY", None) is None,
        default=env_default("MODEL_REPOSITORY", None),
    )
    worker.add_argument(
        "--device",
        default=env_default("DEVICE", "cpu"),
        help="cpu, cuda:<index> or a MIG slice's UUID (see `meshserve devices`); unless CUDA_VISIBLE_DEVICES "
        "is set, the worker sets it to this device",
    )
    worker.add_argument("--health-host", default=env_default("HEALTH_HOST", "0.0.0.0"))
    worker.add_argument(
        "--health-port",
        type=int,
        default=env_default("HEALTH_PORT", 0),
        help="grpc.health.v1 port (0: a free one, logged at start)",
    )
    worker.add_argument(
        "--lease-ms",
        type=int,
        default=env_default("LEASE_MS", 5000),
        help="a dead worker's requests are redelivered after this long",
    )
    worker.add_argument(
        "--max-attempts",
        type=int,
        default=env_default("MAX_ATTEMPTS", 3),
        help="claims of one request before it is answered INTERNAL",
    )
    worker.add_argument(
        "--lower-tier-share",
        type=float,
        default=env_default("LOWER_TIER_SHARE", 0.1),
        help="fraction of batches kept for lower tiers while they have work (0: strict tiers)",
    )
    worker.add_argument(
        "--canary-interval-s",
        type=float,
        default=env_default("CANARY_INTERVAL_S", 10.0),
        help="run each model's sample input this often; failing or NaN answers mark it not ready (0: off)",
    )
    worker.add_argument("--metrics-port", type=int, default=env_default("WORKER_METRICS_PORT", 0), help="0: off")
    worker.add_argument("--intra-op-threads", type=int, default=env_default("INTRA_OP_THREADS", 0))
    worker.add_argument(
        "--price-per-device-hour",
        type=float,
        default=env_default("PRICE_PER_DEVICE_HOUR", 0.0),
        help="what an hour of this worker's device costs: exports cost per 1000 requests (0: off)",
    )
    worker.add_argument(
        "--intra-op-spinning",
        action=argparse.BooleanOptionalAction,
        default=env_default("INTRA_OP_SPINNING", False),
        help="let idle ONNX Runtime threads busy-wait (off: they sleep, leaving the CPU to the rest of the host)",
    )
    _add_trace_tenant(worker)
    _add_tls(worker, "for the router channel and the health port")
    worker.set_defaults(func=cmd_worker)

    devices = sub.add_parser("devices", help="list the GPUs, MIG slices and CPU found here (NVML; read-only)")
    devices.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    devices.set_defaults(func=cmd_devices)

    hash_key = sub.add_parser("hash-key", help="print the sha256:<hex> form of an API key, for the tenants file")
    hash_key.add_argument("key", help="the API key, or - to read it from standard input")
    hash_key.set_defaults(func=cmd_hash_key)

    bench = sub.add_parser("bench", help="drive a mesh with concurrent gRPC clients, beside raw ONNX Runtime")
    from meshserve_bench.cli import add_arguments

    add_arguments(bench)
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
    return parser


def _add_data_plane(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=env_default("REDIS_URL", None),
        help="redis:// or rediss://user:pass@host:port/db (MESHSERVE_REDIS_URL)",
    )
    parser.add_argument("--router", default=env_default("ROUTER", "127.0.0.1:8003"), help="router host:port")


def _add_trace_tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace-tenant",
        choices=TRACE_TENANT_MODES,
        default=env_default("TRACE_TENANT", "clear"),
        help="the tenant on spans: its name, a hash (HMAC keyed by MESHSERVE_TRACE_TENANT_SECRET), or none",
    )


def _add_tls(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("mutual TLS", f"all three or none (plaintext); {what}")
    group.add_argument("--tls-ca", default=env_default("TLS_CA", None), help="CA certificate, PEM (MESHSERVE_TLS_CA)")
    group.add_argument(
        "--tls-cert", default=env_default("TLS_CERT", None), help="this service's certificate, PEM (MESHSERVE_TLS_CERT)"
    )
    group.add_argument(
        "--tls-key", default=env_default("TLS_KEY", None), help="this service's private key, PEM (MESHSERVE_TLS_KEY)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, service=args.command)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
