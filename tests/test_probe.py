"""The exec probe for mutual-TLS ports (meshserve/cli/probe.py) against a real router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshserve.cli.probe import check
from meshserve.platform.tls import TlsConfig
from meshserve.settings import RouterSettings
from router.server import RouterServer
from tests.pki import Authority


@pytest.fixture
def identity(tmp_path: Path) -> TlsConfig:
    """A certificate for the router's Service name only, as cert-manager would issue it."""
    return Authority.create(tmp_path, "mesh").issue("meshserve-router", hosts=["meshserve-router"])


@pytest.fixture
async def router(model_repository: Path, identity: TlsConfig) -> AsyncIterator[RouterServer]:
    server = RouterServer(RouterSettings(model_repository=model_repository, port=0, tls=identity))
    await server.start()
    yield server
    await server.stop()


def tls_environ(tls: TlsConfig) -> dict[str, str]:
    return {
        "MESHSERVE_TLS_CA": str(tls.ca_path),
        "MESHSERVE_TLS_CERT": str(tls.cert_path),
        "MESHSERVE_TLS_KEY": str(tls.key_path),
    }


async def test_a_serving_router_passes_with_the_pods_certificate(router: RouterServer, identity: TlsConfig) -> None:
    assert await asyncio.to_thread(check, router.port, "", "meshserve-router", tls_environ(identity)) is None


@pytest.mark.parametrize(
    ("service", "server_name", "plaintext", "why"),
    [
        ("", "", False, "UNAVAILABLE"),  # 127.0.0.1 is not a name the certificate carries
        ("", "meshserve-router", True, "UNAVAILABLE"),  # the port refuses a plaintext channel
        ("nope/1", "meshserve-router", False, "NOT_FOUND"),  # no such health entry
    ],
)
async def test_a_failing_check_says_why(
    router: RouterServer, identity: TlsConfig, service: str, server_name: str, plaintext: bool, why: str
) -> None:
    environ = {} if plaintext else tls_environ(identity)
    problem = await asyncio.to_thread(check, router.port, service, server_name, environ)
    assert problem is not None
    assert why in problem


def test_incomplete_tls_variables_are_named() -> None:
    problem = check(1, "", "", {"MESHSERVE_TLS_CA": "/nonexistent/ca.pem"})
    assert problem is not None
    assert "--tls-cert" in problem
