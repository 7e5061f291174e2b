"""The gateway process: gRPC server, health, reflection, the routing watch, and the core's tasks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from gateway.admin import AdminServicer
from gateway.core import Gateway
from gateway.refusal import RefusalInterceptor
from gateway.routing import RoutingView, RoutingWatch
from gateway.servicer import InferenceServicer, add_to_server
from meshserve.observe.metrics import GatewayMetrics, MetricsServer
from meshserve.platform.balancing import ROUTER_CHANNEL_OPTIONS
from meshserve.platform.tls import add_port, channel
from meshserve.settings import ANY_HOST, LOOPBACK_HOST, GatewaySettings, instance_id
from meshserve.store.clients import blocking_link, command_link
from meshserve.store.memory import policy_check
from meshserve.tenancy.tenants import TenantRegistry, dev_registry, load_tenants, reload_tenants
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC's message size options are C ints."""

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class GatewayServer:
    """Owns the gateway's gRPC server, Redis clients and router channel."""

    def __init__(self, settings: GatewaySettings, tracer: trace.Tracer | None = None) -> None:
        if not settings.gateway_id:
            settings = replace(settings, gateway_id=instance_id("gateway"))
        self.settings = settings
        check = policy_check(allow_eviction=settings.allow_eviction, service="gateway")
        self.redis = command_link(settings.redis_url, name="meshserve-gateway", check=check)
        # replies laid out as the client's response are read into the bytes gRPC sends (wire/envelope.py)
        self.blocking = blocking_link(settings.redis_url, name="meshserve-gateway-wait", check=check, headed=True)
        self.router_channel = channel(settings.router_address, settings.tls, ROUTER_CHANNEL_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.routing = RoutingWatch(
            mpb_grpc.RouterStub(self.router_channel), settings.gateway_id, on_change=self._update_health
        )
        self.gateway = Gateway(settings, self.redis, self.blocking, self.routing, tracer, _registry(settings))
        self.metrics = GatewayMetrics.create(
            late_replies=lambda: self.gateway.late_replies,
            lost_requests=lambda: self.gateway.lost_jobs,
            shadow=self.gateway.shadow_counts,
            cold_requests=lambda: self.gateway.demands.cold_requests,
        )
        self.gateway.demands.on_wait = lambda model, seconds: self.metrics.cold_start.labels(model).observe(seconds)
        servicer = InferenceServicer(self.gateway, tracer, self.metrics)
        self.cache = servicer.cache  # the response cache, whose background stores tests settle
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            # ModelInfer refuses unknown keys and tenants over their rate before it reads the message
            interceptors=[RefusalInterceptor(self.gateway, servicer)],
            options=[
                # Over the limit, the core refuses a request naming the flag; gRPC's own
                # refusal (its text names no setting) only past twice the limit.
                ("grpc.max_receive_message_length", min(2 * limit, GRPC_MAX_MESSAGE_BYTES)),
                ("grpc.max_send_message_length", min(2 * limit, GRPC_MAX_MESSAGE_BYTES)),  # outputs: the workers' limit
                # Shared only by --processes' own processes: otherwise a second gateway
                # started on a port in use fails instead of silently taking half the calls.
                ("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
            ],
        )
        add_to_server(servicer, self.server)
        mpb_grpc.add_AdminServicer_to_server(AdminServicer(servicer), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                mpb.DESCRIPTOR.services_by_name["Admin"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self._metrics_server: MetricsServer | None = None
        self.port = add_port(self.server, f"{settings.listen_host}:{settings.port}", settings.tls)

    def reload_tenants(self) -> bool:
        """Re-read the tenants file (SIGHUP); a bad file is logged and the old one stays."""
        path = self.settings.tenants_path
        if path is None:
            log.warning("no --tenants file to reload: the open development tenant stays in force")
            return False
        registry, error = reload_tenants(path, self.gateway.tenants)
        if error is not None:
            log.error("tenants file rejected, keeping the previous one: %s", error)
            return False
        self.gateway.tenants = registry
        self.gateway.throttle.clear()  # a limit may have been raised: ask Redis again
        log.info("tenants reloaded from %s: %d tenants", path, len(registry))
        return True

    @property
    def address(self) -> str:
        """Where a client on this machine dials the public port (loopback for a wildcard)."""
        host = self.settings.listen_host
        return f"{LOOPBACK_HOST if host in (ANY_HOST, '::', '[::]') else host}:{self.port}"

    def _update_health(self, view: RoutingView) -> None:
        """The overall entries follow server readiness (a model that failed to load
        does not take them down unless ``strict_readiness``); one entry per model
        version, "<model>/<version>", follows the routing table (as on the workers)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        status = serving if self.gateway.server_ready() else not_serving
        entries = {name: status for name in ("", SERVICE_NAME)}
        for name, version in view.models:
            entries[f"{name}/{version}"] = serving if (name, version) in view.ready else not_serving
        for name, entry in entries.items():
            # set() is a coroutine on the aio servicer; it only updates a dict
            asyncio.get_running_loop().create_task(self.health.set(name, entry))

    async def start(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.gateway.start()
        self.routing.start()
        await self.server.start()
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_port, self.settings.metrics_host
            )
        log.info(
            "gateway %s listening on %s:%d%s%s%s",
            self.settings.gateway_id,
            self.settings.listen_host,
            self.port,
            " (mutual TLS)" if self.settings.tls else "",
            _why_loopback(self.settings),
            f"; /metrics on {self.settings.metrics_host}:{self.settings.metrics_port}" if self._metrics_server else "",
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Leave the load balancer, refuse new calls, answer the in-flight ones, close.

        First a lame-duck period: health says NOT_SERVING while calls are still
        answered, so balancers and clients move away before the drain begins
        (grpcio cancels calls that arrive once the drain has started, and
        CANCELLED is not a status clients retry).
        """
        await self.health.enter_graceful_shutdown()
        if self.settings.lame_duck_s > 0:
            await asyncio.sleep(self.settings.lame_duck_s)
        await self.server.stop(self.settings.drain_grace_s if grace_s is None else grace_s)
        await self.gateway.stop()
        await self.routing.stop()
        await self.router_channel.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        if self._metrics_server is not None:
            self._metrics_server.stop()


def _why_loopback(settings: GatewaySettings) -> str:
    """Why the public port is on loopback, when the operator did not choose it."""
    if settings.host or settings.tenants_path is not None:
        return ""
    return f" (loopback only, as there is no tenants file: --host {ANY_HOST} to serve other hosts)"


def _registry(settings: GatewaySettings) -> TenantRegistry:
    """The tenants file's registry, or (loudly) one open development tenant."""
    if settings.tenants_path is not None:
        registry = load_tenants(settings.tenants_path)
        log.info("loaded %d tenants from %s", len(registry), settings.tenants_path)
        return registry
    log.warning(
        "NO TENANTS FILE: every caller is the open development tenant 'dev' (no API key, no limits). "
        "Pass --tenants FILE (MESHSERVE_TENANTS) before exposing this gateway."
    )
    return dev_registry()
