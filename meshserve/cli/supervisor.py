"""``meshserve up``: start the whole mesh as child processes and stop it cleanly.

Order on the way up: Redis (private, unless ``--redis-url``), router, workers,
gateway; then one line when every model has loaded or failed to (naming those that
failed, and why; ``up`` stays up to serve the others). On the way down (Ctrl-C or
SIGTERM) the reverse, each child drained by SIGTERM first: the gateway answers
its in-flight calls, workers finish their batch and ack, then Redis stops.

Each child's command line names its role (``python -m meshserve worker ...``).
A child that dies is restarted, as a process manager would: after 0.5 s, then
twice as long after each quick death (up to 30 s); a child that stayed up for a
minute starts again from 0.5 s.

With ``--tls-ca/--tls-cert/--tls-key`` every child gets the same three flags, so
every hop is mutual TLS with one identity for the whole mesh, and so do the
readiness checks here.

Workers: one per device. With ``--gpu-workers auto`` (the default) NVML is asked
once at start (:func:`meshserve.platform.inventory.discover`) and each GPU, or each MIG
slice of a GPU with MIG on, gets a worker with ``--device <id>`` and
CUDA_VISIBLE_DEVICES set in its environment to that GPU's index or that slice's
UUID, so CUDA in the child initializes on that device only. ``--workers N`` adds
N CPU workers (CUDA_VISIBLE_DEVICES empty: no GPU visible); by default 1 when no
GPU worker starts, else 0. :func:`plan_children` is the whole plan, as data.

``up``'s flags are its own (:class:`UpSettings`) and the services' own declarations
of the knobs it passes on (:func:`add_up_arguments`): a knob given to ``up`` reaches
every child that has it as the same flag; one not given is left to each child, which
reads its ``MESHSERVE_*`` variable from the environment it inherits, or its default.
``up`` is one machine, so its sockets stay on loopback unless told otherwise: every
child gets ``--metrics-host`` (``up``'s own default, 127.0.0.1), the router is dialed
at 127.0.0.1, and the gateway gets ``--host`` only when given, so that without
``--tenants`` (the open development tenant) it keeps to loopback by its own rule.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from meshserve.devkit.redis_server import RedisServer, binary_from_env, free_port
from meshserve.platform.heap import with_huge_pages
from meshserve.platform.inventory import Device, cpu_device, discover, inventory_table, visible_devices
from meshserve.platform.tls import TlsConfig, sync_channel
from meshserve.settings import (
    ANY_HOST,
    LOOPBACK_HOST,
    GatewaySettings,
    LogSettings,
    RouterSettings,
    WorkerSettings,
    add_arguments,
    cli,
    forwarded_flags,
    gateway_host,
    tls_cli,
)

log = logging.getLogger("meshserve.up")

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = (0.5, 30.0)  # first delay, ceiling
STABLE_AFTER_S = 60.0


UP_GATEWAY_OWN = ("host", "port", "drain_grace_s", "tenants_path")
"""The gateway's settings ``up`` reads itself (its address, its stop) and passes on."""
UP_GATEWAY_FORWARDED = (
    "max_message_bytes",
    "default_timeout_ms",
    "lame_duck_s",
    "trace_tenant",
    "strict_readiness",
    "allow_eviction",
    "store_headroom_ratio",
    "max_stream_inflight",
    "response_cache_ttl_s",
    "response_cache_max_bytes",
)
UP_WORKER_FORWARDED = (
    "lease_ms",
    "canary_timeout_ms",
    "compute_slots",
    "max_attempts",
    "lower_tier_share",
    "canary_interval_s",
    "intra_op_threads",
    "intra_op_spinning",
    "price_per_device_hour",
    "health_host",
    "memory_budget_mb",
    "allow_python_models",
)
UP_ROUTER_FORWARDED = (
    "model_control_mode",
    "repository_poll_s",
    "load_model",
    "managed_repository",
    "max_upload_bytes",
    "unload_drain_s",
    "repository_uri",
    "min_residency_s",
)
"""The router's knobs ``up`` passes on only when given."""
UP_SHARED_FORWARDED = ("trace_tenant", "allow_eviction", "max_message_bytes")
"""Knobs ``up`` passes on only when given; the shared ones reach the workers too."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpSettings:
    """``up``'s own flags: what it starts, and where (the rest are the services' own)."""

    model_repository: Path | None = field(
        default=None, metadata=cli("model repository dir (default: generated example models)")
    )
    metrics_port: int = field(
        default=8002,
        metadata=cli("the gateway's /metrics port; worker i takes the port + 1 + i, the router the next (0: off)"),
    )
    metrics_host: str = field(
        default=LOOPBACK_HOST,
        metadata=cli(
            "address every service's /metrics listens on (one machine: loopback, unlike a service run alone)",
            env="METRICS_HOST",
        ),
    )
    redis_url: str | None = field(default=None, metadata=cli("use this Redis instead of starting a private one"))
    workers: int | None = field(
        default=None, metadata=cli("CPU workers (default: 1 when no GPU worker starts, else 0)")
    )
    gpu_workers: str = field(
        default="auto",
        metadata=cli(
            "auto: one worker per GPU, or per MIG slice where MIG is on (found with NVML); none: CPU only",
            choices=("auto", "none"),
        ),
    )
    tls: TlsConfig | None = field(
        default=None, metadata=tls_cli("passed to every service: one identity for the whole mesh")
    )


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """``up``'s flags: its own, the gateway's it reads, and the services' knobs it passes on."""
    add_arguments(parser, LogSettings, given_only=True)
    add_arguments(parser, UpSettings)
    add_arguments(parser, GatewaySettings, only=UP_GATEWAY_OWN)
    add_arguments(parser, GatewaySettings, only=UP_GATEWAY_FORWARDED, given_only=True)
    add_arguments(parser, WorkerSettings, only=UP_WORKER_FORWARDED, given_only=True)
    add_arguments(parser, RouterSettings, only=UP_ROUTER_FORWARDED, given_only=True)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One child to start: ``python -m meshserve <role> <args>``, with ``env`` over ours."""

    role: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    label: str = ""  # for the log: "worker cuda:0"; the role when empty


class Child:
    """One supervised service process."""

    def __init__(self, role: str, args: Sequence[str], env: Mapping[str, str] | None = None, label: str = "") -> None:
        self.role = role
        self.label = label or role
        self.args = [sys.executable, "-m", "meshserve", role, *args]
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at_s = 0.0
        self.restarts = 0
        self.backoff_s = RESTART_BACKOFF_S[0]
        self.restart_at_s: float | None = None

    def start(self) -> None:
        self.started_at_s = time.monotonic()
        # Own process group: a terminal's Ctrl-C reaches only `up`, which then
        # stops the children in order (gateway first, so in-flight calls drain).
        # Huge pages for payload-sized buffers (heap.with_huge_pages says why).
        env = with_huge_pages({**os.environ, **self.env})
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        log.debug("started %s (pid %d)", self.label, self.proc.pid)

    def supervise(self, now_s: float) -> None:
        """Restart a dead child once its backoff has passed; call periodically."""
        if self.alive():
            if now_s - self.started_at_s > STABLE_AFTER_S:
                self.backoff_s = RESTART_BACKOFF_S[0]
            return
        if self.restart_at_s is None:
            code = self.proc.returncode if self.proc else None
            log.error("%s exited with code %s; restarting in %.1fs", self.label, code, self.backoff_s)
            self.restart_at_s = now_s + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, RESTART_BACKOFF_S[1])
        elif now_s >= self.restart_at_s:
            self.restart_at_s = None
            self.restarts += 1
            self.start()
            log.warning(
                "%s restarted (restart #%d, pid %d)", self.label, self.restarts, self.proc.pid if self.proc else -1
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.label, timeout_s)
            self.proc.kill()
            self.proc.wait()


def run_up(args: argparse.Namespace, tls: TlsConfig | None = None) -> int:
    from meshserve.devkit.examples import default_repository_dir, write_example_repository, write_python_examples

    repository = Path(args.model_repository) if args.model_repository else None
    if repository is None:
        repository = write_example_repository(default_repository_dir())
        write_python_examples(repository, bool(getattr(args, "allow_python_models", False)))
        log.info("no --model-repository: serving the example models in %s", repository)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    redis_server: RedisServer | None = None
    redis_url = args.redis_url
    if not redis_url:
        redis_server = RedisServer(binary_from_env()).start()
        redis_url = redis_server.socket_url
        log.info(
            "started a private Redis-compatible server (%s) at %s and %s",
            redis_server.binary.name,
            redis_server.url,
            redis_url,
        )

    router_address = f"127.0.0.1:{free_port()}"
    devices = discover() if args.gpu_workers == "auto" else [cpu_device()]
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None and len(devices) > 1:
        devices = visible_devices(devices, preset)
        log.info(
            "CUDA_VISIBLE_DEVICES=%r was set before up: GPU workers on %s only",
            preset,
            ", ".join(d.id for d in devices if d.kind != "cpu") or "no GPU",
        )
    log.info("devices (--gpu-workers %s):\n%s", args.gpu_workers, inventory_table(devices))
    specs = plan_children(
        args,
        devices,
        repository=repository,
        redis_url=redis_url,
        router_address=router_address,
        tls_args=_tls_args(tls),
    )
    children = [Child(spec.role, spec.args, spec.env, spec.label) for spec in specs]
    router, *workers, gateway = children
    try:
        for child in children:
            child.start()
        host = gateway_host(args.host, args.tenants)
        dial_host = LOOPBACK_HOST if host in (ANY_HOST, "::", "[::]") else host
        explicit = getattr(args, "model_control_mode", "none") == "explicit"  # may start with no model
        settled = _wait_ready(router_address, f"{dial_host}:{args.grpc_port}", children, stop, tls, empty_ok=explicit)
        if settled is not None:
            models, failed = settled
            transport = "gRPC over mutual TLS" if tls else "gRPC"
            metrics = f"{args.metrics_host}:{args.metrics_port}" if args.metrics_port else "off"
            print(
                f"meshserve ready: {len(models)} models ({', '.join(models)}) at {host}:{args.grpc_port}"
                f" ({transport}, KServe v2{_exposure(args)}); metrics on {metrics}; Ctrl-C to stop"
                + (f"; {len(failed)} failed to load: {', '.join(name for name, _ in failed)}" if failed else "")
                + "".join(f"\n  {name}: {reason}" for name, reason in failed),
                flush=True,
            )
            _supervise_until_stop(children, stop)
        return 0 if stop.is_set() else 1
    finally:
        _shutdown(gateway, workers, router, args.drain_grace_s)
        if redis_server is not None:
            redis_server.stop()


def plan_children(
    args: argparse.Namespace,
    devices: Sequence[Device],
    *,
    repository: Path,
    redis_url: str,
    router_address: str,
    tls_args: Sequence[str] = (),
) -> list[ChildSpec]:
    """Router, workers, gateway, in start order, for ``up``'s flags and this host's devices.

    Workers: one per GPU or MIG slice in ``devices`` (``--gpu-workers auto``), then the
    CPU workers (``--workers``). Worker i serves its metrics on the gateway's metrics
    port + 1 + i (8003, 8004, ...) and the router on the port after the last worker's.
    """
    gpus = [d for d in devices if d.kind != "cpu"] if args.gpu_workers == "auto" else []
    cpu_workers = max(args.workers if args.workers is not None else (0 if gpus else 1), 0)
    cpu = next((d for d in devices if d.kind == "cpu"), None) or cpu_device()
    worker_devices = [*gpus, *[cpu] * cpu_workers]

    def metrics_port(offset: int) -> str:
        return str(args.metrics_port + offset if args.metrics_port else 0)

    # How to log, and where /metrics listens, go to every child as flags: up's own are theirs.
    logging_args = ("--log-level", args.log_level, "--log-format", args.log_format)
    metrics_args = ("--metrics-host", args.metrics_host)
    common = ("--redis-url", redis_url, "--router", router_address, *tls_args, *logging_args, *metrics_args)
    router = ChildSpec(
        "router",
        (
            "--model-repository",
            str(repository),
            "--port",
            router_address.rsplit(":", 1)[1],
            "--redis-url",
            redis_url,
            "--metrics-port",
            metrics_port(1 + len(worker_devices)),
            *tls_args,
            *logging_args,
            *metrics_args,
            *forwarded_flags(RouterSettings, args, ("allow_eviction", *UP_ROUTER_FORWARDED)),
        ),
    )
    workers = [
        ChildSpec(
            "worker",
            (
                *common,
                "--model-repository",
                str(repository),
                "--device",
                device.id,
                "--metrics-port",
                metrics_port(1 + i),
                *forwarded_flags(WorkerSettings, args, (*UP_WORKER_FORWARDED, *UP_SHARED_FORWARDED)),
            ),
            _device_env(device),
            f"worker {device.id}" if device.kind != "cpu" else f"worker cpu #{i - len(gpus)}",
        )
        for i, device in enumerate(worker_devices)
    ]
    gateway = ChildSpec(
        "gateway",
        (
            *common,
            *(["--host", args.host] if args.host else []),  # else the gateway's default for its tenancy
            "--grpc-port",
            str(args.grpc_port),
            "--metrics-port",
            str(args.metrics_port),
            "--drain-grace-s",
            str(args.drain_grace_s),
            # One process: the workers run on the same cores, and `top` reads one /metrics port.
            "--processes",
            "1",
            *(["--tenants", str(Path(args.tenants).resolve())] if args.tenants else []),
            *forwarded_flags(GatewaySettings, args, UP_GATEWAY_FORWARDED),
        ),
    )
    return [router, *workers, gateway]


def _exposure(args: argparse.Namespace) -> str:
    """What the ready line says of who can call: loopback only unless chosen otherwise."""
    if args.host or args.tenants:
        return ""
    return "; this machine only: no --tenants file"


def _device_env(device: Device) -> dict[str, str]:
    """A worker's CUDA pinning, set before its Python starts (so before CUDA can initialize)."""
    env = {"CUDA_VISIBLE_DEVICES": device.cuda_visible_devices}
    if device.kind == "gpu":  # the index is NVML's (PCI bus order); make it CUDA's too
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def _tls_args(tls: TlsConfig | None) -> list[str]:
    """The children's --tls-* flags, absolute (a child's working directory may differ)."""
    if tls is None:
        return []
    paths = {"--tls-ca": tls.ca_path, "--tls-cert": tls.cert_path, "--tls-key": tls.key_path}
    return [arg for flag, path in paths.items() for arg in (flag, str(path.resolve()))]


def _wait_ready(
    router_address: str,
    gateway_address: str,
    children: list[Child],
    stop: threading.Event,
    tls: TlsConfig | None = None,
    *,
    empty_ok: bool = False,
) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Block until the router says every model has loaded or failed to (workers
    retry the failed ones) and the gateway serves those that loaded; their names, and each
    failed "<model> version <v>" with its reason. None when a child died first or
    the mesh did not settle within ``READY_TIMEOUT_S``. ``empty_ok``: a table with no
    model is settled (explicit control mode, where models come with the repository API)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos import meshserve_pb2 as mpb
    from protos import meshserve_pb2_grpc as mpb_grpc

    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        if not all(c.alive() for c in children):
            dead = [f"{c.label} (code {c.proc.returncode if c.proc else None})" for c in children if not c.alive()]
            log.error("%s exited during start-up", ", ".join(dead))
            return None
        try:
            with sync_channel(router_address, tls) as channel:
                stub = mpb_grpc.RouterStub(channel)
                for table in stub.WatchRoutingTable(mpb.WatchRequest(gateway_id="up"), timeout=2):
                    ready = [m for m in table.models if m.ready]
                    if (table.models or empty_ok) and all(m.ready or m.load_error or m.evicted for m in table.models):
                        break
                else:
                    continue
            with sync_channel(gateway_address, tls) as channel:
                # each served model's own entry: SERVING once the gateway's table has it
                # ready, whatever its server readiness means (--strict-readiness)
                health = health_pb2_grpc.HealthStub(channel)
                for model in ready:
                    request = health_pb2.HealthCheckRequest(service=f"{model.name}/{model.version}")
                    for status in health.Watch(request, timeout=5):
                        if status.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                failed = [
                    (f"{m.name} version {m.version}", m.load_error)
                    for m in table.models
                    if m.load_error and not m.ready
                ]
                return sorted({m.name for m in ready}), failed
        except grpc.RpcError:
            time.sleep(0.1)  # start-up only: the child is not listening yet
    log.error("the mesh did not become ready within %.0fs", READY_TIMEOUT_S)
    return None


def _supervise_until_stop(children: list[Child], stop: threading.Event) -> None:
    """Restart dead children with backoff until Ctrl-C or SIGTERM."""
    while not stop.wait(0.2):
        now_s = time.monotonic()
        for child in children:
            child.supervise(now_s)


def _shutdown(gateway: Child, workers: list[Child], router: Child, grace_s: float) -> None:
    """Gateway first (drains calls), then workers (finish batches), then the router."""
    gateway.terminate()
    gateway.wait(grace_s + STOP_TIMEOUT_S)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(STOP_TIMEOUT_S)
    router.terminate()
    router.wait(STOP_TIMEOUT_S)
