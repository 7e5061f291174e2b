"""Where each service listens, as its command line builds it: the gateway's public
port on loopback while the open development tenant is in force, every other socket
on the address its host flag names. Sockets are read from the kernel's tables
(tests/listening.py), so no test depends on this machine's other interfaces."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import GatewayServer
from meshserve.cli.main import build_parser
from meshserve.devkit.redis_server import free_port
from meshserve.settings import ENV_PREFIX, GatewaySettings, RouterSettings, WorkerSettings, from_args
from meshserve.tenancy.tenants import hash_key
from model_workers.server import WorkerServer
from router.server import RouterServer
from tests.listening import every_interface, listening_hosts, loopback_only


@pytest.fixture(autouse=True)
def no_meshserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
async def router(model_repository: Path) -> AsyncIterator[RouterServer]:
    server = RouterServer(RouterSettings(model_repository=model_repository, port=0))
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(f'tenants:\n  - name: a\n    api_keys: ["{hash_key("k")}"]\n    models: ["*"]\n')
    return path


async def answers_health_on_loopback(port: int) -> bool:
    """A grpc.health.v1 Check through 127.0.0.1 gets an answer (whatever the status)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return True


def gateway_from_cli(flags: list[str], redis_url: str, router: RouterServer) -> GatewayServer:
    argv = ["gateway", "--redis-url", redis_url, "--router", router.address, "--grpc-port", "0", "--lame-duck-s", "0"]
    return GatewayServer(from_args(GatewaySettings, build_parser().parse_args([*argv, *flags])))


@pytest.mark.parametrize(
    ("flags", "with_tenants", "public_on_loopback", "metrics_on_loopback"),
    [
        pytest.param([], False, True, False, id="open-tenant"),
        pytest.param(["--host", "0.0.0.0", "--metrics-host", "127.0.0.1"], False, False, True, id="open-tenant-host"),
        pytest.param([], True, False, False, id="tenants-file"),
        pytest.param(["--host", "127.0.0.1"], True, True, False, id="tenants-file-loopback"),
    ],
)
async def test_gateway_listens_where_its_tenancy_and_flags_say(
    flags: list[str],
    with_tenants: bool,
    public_on_loopback: bool,
    metrics_on_loopback: bool,
    redis_url: str,
    router: RouterServer,
    tenants_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics_port = free_port()
    tenants = ["--tenants", str(tenants_file)] if with_tenants else []
    gateway = gateway_from_cli([*flags, *tenants, "--metrics-port", str(metrics_port)], redis_url, router)
    caplog.set_level(logging.INFO, logger="gateway.server")
    await gateway.start()
    try:
        assert loopback_only(gateway.port) is public_on_loopback, listening_hosts(gateway.port)
        assert every_interface(gateway.port) is not public_on_loopback, listening_hosts(gateway.port)
        assert await answers_health_on_loopback(gateway.port)
        assert loopback_only(metrics_port) is metrics_on_loopback, listening_hosts(metrics_port)
        assert every_interface(metrics_port) is not metrics_on_loopback, listening_hosts(metrics_port)
    finally:
        await gateway.stop(grace_s=0)
    started = next(r.getMessage() for r in caplog.records if "listening on" in r.getMessage())
    host = "127.0.0.1" if public_on_loopback else "0.0.0.0"
    assert f"listening on {host}:{gateway.port}" in started
    # the log says why only when the open tenant chose loopback, not the operator
    assert ("loopback only, as there is no tenants file" in started) is (not flags and not with_tenants)
    assert f"/metrics on {'127.0.0.1' if metrics_on_loopback else '0.0.0.0'}:{metrics_port}" in started


@pytest.mark.parametrize(
    ("flags", "grpc_on_loopback", "metrics_on_loopback"),
    [
        # /metrics on every interface by default: a standalone service's scraper is elsewhere
        pytest.param([], True, False, id="defaults"),
        pytest.param(["--host", "0.0.0.0", "--metrics-host", "127.0.0.1"], False, True, id="host-flags"),
    ],
)
async def test_router_grpc_and_metrics_follow_their_host_flags(
    flags: list[str], grpc_on_loopback: bool, metrics_on_loopback: bool, model_repository: Path
) -> None:
    metrics_port = free_port()
    argv = ["router", "--model-repository", str(model_repository), "--port", "0", "--metrics-port", str(metrics_port)]
    router = RouterServer(from_args(RouterSettings, build_parser().parse_args([*argv, *flags])))
    await router.start()
    try:
        assert loopback_only(router.port) is grpc_on_loopback, listening_hosts(router.port)
        assert every_interface(router.port) is not grpc_on_loopback, listening_hosts(router.port)
        assert await answers_health_on_loopback(router.port)
        assert loopback_only(metrics_port) is metrics_on_loopback, listening_hosts(metrics_port)
        assert every_interface(metrics_port) is not metrics_on_loopback, listening_hosts(metrics_port)
    finally:
        await router.stop(0)


@pytest.mark.parametrize(
    ("flags", "health_on_loopback", "metrics_on_loopback"),
    [
        pytest.param([], True, False, id="defaults"),
        pytest.param(["--health-host", "0.0.0.0", "--metrics-host", "127.0.0.1"], False, True, id="host-flags"),
    ],
)
async def test_worker_health_and_metrics_follow_their_host_flags(
    flags: list[str],
    health_on_loopback: bool,
    metrics_on_loopback: bool,
    redis_url: str,
    router: RouterServer,
    model_repository: Path,
) -> None:
    metrics_port = free_port()
    argv = [
        *("worker", "--redis-url", redis_url, "--router", router.address),
        *("--model-repository", str(model_repository), "--canary-interval-s", "0", "--metrics-port", str(metrics_port)),
    ]
    worker = WorkerServer(from_args(WorkerSettings, build_parser().parse_args([*argv, *flags])))
    await worker.start()
    try:
        assert loopback_only(worker.health_port) is health_on_loopback, listening_hosts(worker.health_port)
        assert every_interface(worker.health_port) is not health_on_loopback, listening_hosts(worker.health_port)
        assert await answers_health_on_loopback(worker.health_port)
        assert loopback_only(metrics_port) is metrics_on_loopback, listening_hosts(metrics_port)
        assert every_interface(metrics_port) is not metrics_on_loopback, listening_hosts(metrics_port)
    finally:
        await worker.stop()
