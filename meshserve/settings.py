"""One frozen settings object per service, built once in ``main()``.

Every setting has a command-line flag and a ``MESHSERVE_<NAME>`` environment
variable; the flag wins. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshserve.observe.logs import LOG_FORMATS
from meshserve.platform.tls import TlsConfig

TRACE_TENANT_MODES = ("clear", "hash", "off")
"""Values of ``trace_tenant``: how spans name a tenant (see meshserve.observe.tracing)."""


def env_default(name: str, default: Any) -> Any:
    """The value of ``MESHSERVE_<NAME>`` converted to ``default``'s type, or ``default``."""
    raw = os.environ.get(f"MESHSERVE_{name}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if default is None:
        return raw
    return type(default)(raw)


def instance_id(role: str) -> str:
    """A unique, readable id for one process of a role: ``gateway-host-1a2b3c4d``."""
    return f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class RouterSettings:
    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 8003
    metrics_port: int = 0
    report_interval_ms: int = 1000
    worker_ttl_ms: int = 5000
    placement_headroom_ratio: float = 0.1  # share of each device's memory placement keeps free
    tls: TlsConfig | None = None  # mTLS on the router's port
    redis_url: str | None = None  # for queue depths on /metrics; None: none exported


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    redis_url: str
    router_address: str
    host: str = "0.0.0.0"
    port: int = 8001
    metrics_port: int = 0
    gateway_id: str = ""
    max_message_bytes: int = 64 * 1024 * 1024
    default_timeout_ms: int = 30_000
    drain_grace_s: float = 10.0
    lame_duck_s: float = 1.0  # on stop: NOT_SERVING but still answering, before the drain
    tenants_path: Path | None = None  # None: one open development tenant
    tls: TlsConfig | None = None  # mTLS on the public port and the router channel
    trace_tenant: str = "clear"  # tenants on spans: clear | hash | off (meshserve.observe.tracing)
    trace_tenant_secret: str = field(default="", repr=False)  # HMAC key for "hash"; env only


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    redis_url: str
    router_address: str
    model_repository: Path
    device: str = "cpu"
    worker_id: str = ""
    metrics_port: int = 0
    health_host: str = "127.0.0.1"
    health_port: int = 0  # grpc.health.v1; 0 picks a free port
    lease_ms: int = 5_000  # a dead worker's batch is redelivered after this long
    max_attempts: int = 3  # claims of one request before it is answered INTERNAL
    lower_tier_share: float = 0.1  # fraction of claims kept for lower tiers with work (0: strict)
    intra_op_threads: int = 0  # 0: ONNX Runtime's choice (one per physical core)
    intra_op_spinning: bool = False  # idle ORT threads busy-wait: faster hot loops, CPU taken from the rest
    price_per_device_hour: float = 0.0  # cost figures per model and tenant; 0: none
    canary_interval_s: float = 10.0  # each held model runs its sample input this often (0: no canary)
    drain_grace_s: float = 30.0
    tls: TlsConfig | None = None  # mTLS on the router channel and the health port
    trace_tenant: str = "clear"  # tenants on spans: clear | hash | off (meshserve.observe.tracing)
    trace_tenant_secret: str = field(default="", repr=False)  # HMAC key for "hash"; env only


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=env_default("LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=env_default("LOG_FORMAT", "text"),
        help="json: one object per line, with trace ids (MESHSERVE_LOG_FORMAT)",
    )


def add_redis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=env_default("REDIS_URL", None),
        help="redis:// or rediss://user:pass@host:port/db (MESHSERVE_REDIS_URL)",
    )
