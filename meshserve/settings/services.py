"""One frozen settings object per service, built once in ``main()`` from its flags.

Each field is declared here once: type, default, and (in ``metadata``) help, flag
and ``MESHSERVE_*`` variable; meshserve.settings.flags makes the command line from it.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from meshserve.observe.logs import LOG_FORMATS
from meshserve.platform.tls import TlsConfig
from meshserve.settings.flags import cli, tls_cli

TRACE_TENANT_MODES = ("clear", "hash", "off")
CONTROL_MODES = ("none", "poll", "explicit")
"""Values of ``model_control_mode``, Triton's names (router/lifecycle.py)."""
"""Values of ``trace_tenant``: how spans name a tenant (see meshserve.observe.tracing)."""


def instance_id(role: str) -> str:
    """A unique, readable id for one process of a role: ``gateway-host-1a2b3c4d``."""
    return f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


REDIS_URL = cli(
    "redis:// or rediss://user:pass@host:port/db, or redis+sentinel://[user:pass@]host:port[,host:port...]/master-name"
    " (docs/reliability.md#redis-sentinel)",
    required_at_parse=False,
)
"""The queues' Redis: the gateway and workers need it, and say so when they start."""
ROUTER_ADDRESS = cli("router host:port", flag="--router", env="ROUTER")
DEFAULT_ROUTER_ADDRESS = "127.0.0.1:8003"
METRICS_HOST = cli("address /metrics listens on, when --metrics-port is set", env="METRICS_HOST")
LOOPBACK_HOST = "127.0.0.1"
ANY_HOST = "0.0.0.0"
TRACE_TENANT = cli(
    "the tenant on spans: its name, a hash (HMAC keyed by MESHSERVE_TRACE_TENANT_SECRET), or none",
    choices=TRACE_TENANT_MODES,
)
TRACE_TENANT_SECRET = cli("HMAC key for --trace-tenant hash; a variable only, as a flag would show in ps", flag=None)
MAX_MESSAGE_BYTES = cli(
    "largest request (gateway) or reply (worker) in bytes: over it, RESOURCE_EXHAUSTED; nothing larger reaches Redis"
)
ALLOW_EVICTION = cli(
    "run against a Redis whose maxmemory-policy may evict keys (queued requests may vanish); logged loudly"
)
SET_IN_CODE = cli("", flag=None, env=None)
"""Neither flag nor variable: set by the server at start, or shortened by tests."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """How every command logs; a flag before or after the subcommand."""

    log_level: str = field(default="INFO", metadata=cli("DEBUG, INFO, WARNING or ERROR"))
    log_format: str = field(
        default="text", metadata=cli("json: one object per line, with trace ids", choices=LOG_FORMATS)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterSettings:
    model_repository: Path = field(metadata=cli("the model repository directory"))
    host: str = field(
        default=LOOPBACK_HOST,
        metadata=cli(
            "address the router listens on; workers and gateways on other hosts need another", env="ROUTER_HOST"
        ),
    )
    port: int = field(default=8003, metadata=cli("the router's gRPC port", env="ROUTER_PORT"))
    metrics_host: str = field(default=ANY_HOST, metadata=METRICS_HOST)
    metrics_port: int = field(default=0, metadata=cli("0: off", env="ROUTER_METRICS_PORT"))
    report_interval_ms: int = field(default=1000, metadata=SET_IN_CODE)
    worker_ttl_ms: int = field(default=5000, metadata=SET_IN_CODE)
    placement_headroom_ratio: float = field(default=0.1, metadata=SET_IN_CODE)  # share of device memory kept free
    min_residency_s: float = field(
        default=10.0,
        metadata=cli("a model placed less than this long ago is not evicted to make room for another (hysteresis)"),
    )
    tls: TlsConfig | None = field(
        default=None, metadata=tls_cli("the port requires client certificates signed by the CA")
    )
    redis_url: str | None = field(
        default=None,
        metadata=cli("the queues' Redis, for queue depths and the autoscaling signal on /metrics; none: not exported"),
    )
    allow_eviction: bool = field(default=False, metadata=ALLOW_EVICTION)
    # The repository API and control modes (router/lifecycle.py, docs/lifecycle.md)
    model_control_mode: str = field(
        default="none",
        metadata=cli(
            "none: serve the repository as read at start; poll: rescan it every --repository-poll-s;"
            " explicit: only --load-model and the RepositoryModelLoad/Unload RPCs change what is served",
            choices=CONTROL_MODES,
        ),
    )
    repository_poll_s: float = field(default=15.0, metadata=cli("poll mode: seconds between rescans of the repository"))
    load_model: tuple[str, ...] = field(
        default=(), metadata=cli("explicit mode: a model to load at start (repeat the flag; none: nothing loads)")
    )
    managed_repository: Path | None = field(
        default=None,
        metadata=cli(
            "where models loaded with a config override or files sent in the request are written;"
            " default: .managed inside the model repository (hidden from its scans)"
        ),
    )
    repository_uri: str = field(
        default="",
        metadata=cli(
            "an object store (s3://, gs://, memory://; fsspec, with s3fs or gcsfs installed) mirrored into"
            " --model-repository before every read, files cached by content hash"
        ),
    )
    max_upload_bytes: int = field(
        default=256 * 1024 * 1024, metadata=cli("RepositoryModelLoad: most bytes of model files in one request")
    )
    unload_drain_s: float = field(
        default=30.0, metadata=cli("RepositoryModelUnload: longest wait for a version's queued requests to finish")
    )
    leader_lease_ms: int = field(
        default=0,
        metadata=cli(
            "with several router replicas: only the holder of this Redis lease leads (health SERVING), the others"
            " wait; a leader that loses it exits (needs --redis-url; 0: no election, this router leads)"
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    redis_url: str = field(metadata=REDIS_URL)
    router_address: str = field(default=DEFAULT_ROUTER_ADDRESS, metadata=ROUTER_ADDRESS)
    host: str | None = field(
        default=None,
        metadata=cli(
            f"address the public port listens on; default {ANY_HOST} with --tenants, else {LOOPBACK_HOST} "
            "(the open development tenant is not for other hosts)"
        ),
    )
    port: int = field(default=8001, metadata=cli("the public KServe v2 gRPC port", flag="--grpc-port", env="GRPC_PORT"))
    processes: int = field(
        default=0,
        metadata=cli(
            "gateway processes sharing the port (SO_REUSEPORT), one event loop each, their /metrics on"
            " --metrics-port + index; 0: one per core the container allows (docs/scale-out.md)",
            env="GATEWAY_PROCESSES",
        ),
    )
    metrics_host: str = field(default=ANY_HOST, metadata=METRICS_HOST)
    metrics_port: int = field(default=0, metadata=cli("0: off"))
    gateway_id: str = field(default="", metadata=SET_IN_CODE)
    max_message_bytes: int = field(default=64 * 1024 * 1024, metadata=MAX_MESSAGE_BYTES)
    default_timeout_ms: int = field(default=30_000, metadata=cli("deadline for a call that sets none"))
    response_cache_ttl_s: float = field(
        default=300.0, metadata=cli("response cache (models with response_cache: true): how long an entry lives")
    )
    response_cache_max_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=cli("response cache: the bytes of responses one model version may hold; the oldest go first"),
    )
    max_stream_inflight: int = field(
        default=64,
        metadata=cli(
            "ModelStreamInfer: requests of one stream read and not yet answered; past it the gateway stops"
            " reading that stream until an answer is written"
        ),
    )
    drain_grace_s: float = field(default=10.0, metadata=cli("on stop: how long in-flight calls may finish"))
    lame_duck_s: float = field(
        default=1.0, metadata=cli("on SIGTERM: seconds NOT_SERVING but still answering, before the drain")
    )
    strict_readiness: bool = field(
        default=False,
        metadata=cli(
            'server ready (ServerReady, health "") only while every model is ready, as Triton\'s default;'
            " off: once every model has loaded or failed to, and one serves (docs/models.md#readiness)"
        ),
    )
    scale_from_zero: bool = field(
        default=False,
        metadata=cli(
            "queue calls for a model no worker serves (its pool scaled to zero by KEDA, docs/deploy.md) until"
            " their deadline, instead of UNAVAILABLE; the server is ready once it knows the models"
        ),
    )
    tenants_path: Path | None = field(
        default=None,
        metadata=cli(
            "tenants YAML (reloaded on SIGHUP); none: one open development tenant", flag="--tenants", env="TENANTS"
        ),
    )
    tls: TlsConfig | None = field(default=None, metadata=tls_cli("clients must present a certificate signed by the CA"))
    trace_tenant: str = field(default="clear", metadata=TRACE_TENANT)
    trace_tenant_secret: str = field(default="", repr=False, metadata=TRACE_TENANT_SECRET)
    allow_eviction: bool = field(default=False, metadata=ALLOW_EVICTION)
    store_headroom_ratio: float = field(
        default=0.05,
        metadata=cli(
            "refuse new requests (RESOURCE_EXHAUSTED, store_full) once less than this share of Redis's"
            " maxmemory is left"
        ),
    )
    store_sample_ms: int = field(
        default=200, metadata=cli("how often the gateway reads Redis's memory use (INFO memory; 0: never)")
    )

    @property
    def listen_host(self) -> str:
        """The address the public port binds: ``host``, or its default for ``tenants_path``."""
        return gateway_host(self.host, self.tenants_path)


def gateway_host(host: str | None, tenants_path: Path | None) -> str:
    """``host`` if given; else every interface with a tenants file, loopback without one.

    Without a tenants file every caller is the open ``dev`` tenant (no key, no limits),
    which only this machine should reach until someone chooses otherwise with ``--host``.
    """
    if host:
        return host
    return LOOPBACK_HOST if tenants_path is None else ANY_HOST


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    redis_url: str = field(metadata=REDIS_URL)
    router_address: str = field(default=DEFAULT_ROUTER_ADDRESS, metadata=ROUTER_ADDRESS)
    model_repository: Path = field(metadata=cli("the model repository directory"))
    device: str = field(
        default="cpu",
        metadata=cli(
            "cpu, cuda:<index> or a MIG slice's UUID (see `meshserve devices`); unless CUDA_VISIBLE_DEVICES "
            "is set, the worker sets it to this device"
        ),
    )
    worker_id: str = field(default="", metadata=SET_IN_CODE)
    metrics_host: str = field(default=ANY_HOST, metadata=METRICS_HOST)
    metrics_port: int = field(default=0, metadata=cli("0: off", env="WORKER_METRICS_PORT"))
    health_host: str = field(default=LOOPBACK_HOST, metadata=cli("address the grpc.health.v1 port listens on"))
    health_port: int = field(default=0, metadata=cli("grpc.health.v1 port (0: a free one, logged at start)"))
    max_message_bytes: int = field(default=64 * 1024 * 1024, metadata=MAX_MESSAGE_BYTES)
    lease_ms: int = field(
        default=5_000,
        metadata=cli(
            "a dead worker's requests are redelivered after this long, or after 3 of the model's recent batch"
            " times if longer (leases of a computing batch are extended)"
        ),
    )
    canary_timeout_ms: int = field(
        default=5_000,
        metadata=cli(
            "a canary may run this long, or 4 times the model's own measured time if longer (at most its"
            " execution timeout); counted once it holds the device"
        ),
    )
    compute_slots: int = field(
        default=0,
        metadata=cli(
            "model runs at once on this worker, across models (each model also at most its config.yaml"
            " instances); 0: the CPU count, within 2 to 8"
        ),
    )
    max_attempts: int = field(default=3, metadata=cli("claims of one request before it is answered INTERNAL"))
    lower_tier_share: float = field(
        default=0.1, metadata=cli("fraction of batches kept for lower tiers while they have work (0: strict tiers)")
    )
    intra_op_threads: int = field(
        default=0,
        metadata=cli(
            "ONNX Runtime threads per CPU session, for every model (0: the model's config.yaml, else measured"
            " at warm-up: 1 or the CPUs this worker may use)"
        ),
    )
    intra_op_spinning: bool | None = field(
        default=None,
        metadata=cli(
            "let idle ONNX Runtime threads busy-wait, for every model (off: they sleep, leaving the CPU to the"
            " rest of the host; unset: the model's config.yaml, else measured at warm-up)"
        ),
    )
    memory_budget_mb: int = field(
        default=0,
        metadata=cli(
            "device memory the router may fill with models on this worker, in MiB (0: measured: a GPU's memory,"
            " the host's RAM); models beyond it are evicted and loaded on demand (docs/lifecycle.md)"
        ),
    )
    allow_python_models: bool = field(
        default=False,
        metadata=cli(
            "serve models whose config.yaml says backend: python: their model.py runs as code in processes this"
            " worker starts, so this trusts whoever can write the model repository (docs/models.md)"
        ),
    )
    price_per_device_hour: float = field(
        default=0.0,
        metadata=cli("what an hour of this worker's device costs: exports cost per 1000 requests (0: off)"),
    )
    canary_interval_s: float = field(
        default=10.0,
        metadata=cli("run each model's sample input this often; failing or NaN answers mark it not ready (0: off)"),
    )
    tls: TlsConfig | None = field(default=None, metadata=tls_cli("for the router channel and the health port"))
    trace_tenant: str = field(default="clear", metadata=TRACE_TENANT)
    trace_tenant_secret: str = field(default="", repr=False, metadata=TRACE_TENANT_SECRET)
    allow_eviction: bool = field(default=False, metadata=ALLOW_EVICTION)
