"""Mutual TLS on every hop: the whole path over mTLS with certificates made here, the
callers it must refuse (no certificate, a stranger's CA, a plaintext channel), and a
client certificate as a tenant's credential."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.cli.main import build_parser, tls_from_args
from meshserve.devkit.examples import write_example_repository
from meshserve.platform.tls import TlsConfig, TlsConfigError
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from tests.pki import Authority
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

RPC_TIMEOUT_S = 5
# A refused handshake surfaces as a connection failure, not as an answer from the mesh.
CONNECT_FAILED = "failed to connect to all addresses"


# ------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Pki:
    mesh: TlsConfig  # the one identity every service of the mesh uses
    client: TlsConfig  # a client certificate from the mesh's CA
    stranger: TlsConfig  # a certificate from an unrelated CA
    ours: Authority  # the mesh's CA, for certificates a test needs


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ours = Authority.create(tmp_path, "mesh")
    theirs = Authority.create(tmp_path, "stranger")
    return Pki(mesh=ours.issue("meshserve"), client=ours.issue("client"), stranger=theirs.issue("client"), ours=ours)


@pytest.fixture
async def tls_mesh(redis: Redis, redis_url: str, tmp_path: Path, pki: Pki) -> AsyncIterator[Mesh]:
    repository = write_example_repository(tmp_path / "models", ["adder_fixed"])
    mesh = await start_mesh(redis_url, repository, tls=pki.mesh)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


def adder_request() -> pb.ModelInferRequest:
    return infer_request(
        "adder_fixed", {"a": np.array([[1, 2, 3, 4]], np.int64), "b": np.array([[10, 20, 30, 40]], np.int64)}
    )


async def refused_infer(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await infer_stub(channel).ModelInfer(adder_request(), timeout=RPC_TIMEOUT_S)
    return failed.value


# ------------------------------------------------------------ the path over mTLS


async def test_an_inference_travels_every_hop_over_mutual_tls(tls_mesh: Mesh, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_mesh.address, pki.client.channel_credentials()) as channel:
        response = await infer_stub(channel).ModelInfer(adder_request(), timeout=RPC_TIMEOUT_S)
    outputs = output_arrays(response)
    assert outputs["sum"].tolist() == [[11, 22, 33, 44]]
    assert outputs["diff"].tolist() == [[-9, -18, -27, -36]]
    # the worker's health port speaks mTLS as well
    async with grpc.aio.secure_channel(tls_mesh.workers[0].health_address, pki.client.channel_credentials()) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_without_a_certificate_is_refused(tls_mesh: Mesh, pki: Pki) -> None:
    ca_only = grpc.ssl_channel_credentials(root_certificates=pki.client.ca_path.read_bytes())
    failed = await refused_infer(tls_mesh.address, ca_only)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert CONNECT_FAILED in (failed.details() or "")


async def test_a_client_certificate_from_another_ca_is_refused(tls_mesh: Mesh, pki: Pki) -> None:
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.client.ca_path.read_bytes(),  # it trusts the mesh ...
        private_key=pki.stranger.key_path.read_bytes(),  # ... but the mesh does not trust it
        certificate_chain=pki.stranger.cert_path.read_bytes(),
    )
    failed = await refused_infer(tls_mesh.address, stranger)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert CONNECT_FAILED in (failed.details() or "")


async def test_a_client_that_trusts_another_ca_refuses_the_gateway(tls_mesh: Mesh, pki: Pki) -> None:
    failed = await refused_infer(tls_mesh.address, pki.stranger.channel_credentials())
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake failed" in (failed.details() or "").lower()


async def test_the_router_and_the_gateway_refuse_a_plaintext_channel(tls_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(tls_mesh.router.address) as channel:
        watch = mpb_grpc.RouterStub(channel).WatchRoutingTable(
            mpb.WatchRequest(gateway_id="plain"), timeout=RPC_TIMEOUT_S
        )
        with pytest.raises(grpc.aio.AioRpcError) as to_router:
            await watch.read()
    async with grpc.aio.insecure_channel(tls_mesh.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as to_gateway:
            await infer_stub(channel).ModelInfer(adder_request(), timeout=RPC_TIMEOUT_S)
    for failed in (to_router.value, to_gateway.value):
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert CONNECT_FAILED in (failed.details() or "")


# ------------------------------------------------------------ a certificate as a credential

REPORTS_KEY = "reports-key-0123456789abcdef"


async def test_a_client_certificate_names_its_tenant_when_no_key_is_sent(
    redis: Redis, redis_url: str, tmp_path: Path, pki: Pki
) -> None:
    """A call without an API key is the tenant one of its certificate's names belongs
    to; a certificate naming no tenant is refused; a key, when sent, decides alone."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        textwrap.dedent(
            f"""\
            tenants:
              - name: orders
                mtls_identities: ["orders.internal"]
                models: ["adder_fixed"]
              - name: reports
                api_keys: ["{hash_key(REPORTS_KEY)}"]
                models: ["mlp"]
            """
        )
    )
    orders = pki.ours.issue("orders", hosts=["orders.internal"])
    repository = write_example_repository(tmp_path / "models", ["adder_fixed"])
    mesh = await start_mesh(redis_url, repository, tls=pki.mesh, tenants_path=tenants)
    try:
        async with grpc.aio.secure_channel(mesh.address, orders.channel_credentials()) as channel:
            stub = infer_stub(channel)
            response = await stub.ModelInfer(adder_request(), timeout=RPC_TIMEOUT_S)
            metadata = (("authorization", f"Bearer {REPORTS_KEY}"),)
            with pytest.raises(grpc.aio.AioRpcError) as with_key:
                await stub.ModelInfer(adder_request(), metadata=metadata, timeout=RPC_TIMEOUT_S)
        async with grpc.aio.secure_channel(mesh.address, pki.client.channel_credentials()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as nameless:
                await infer_stub(channel).ModelInfer(adder_request(), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)
    assert output_arrays(response)["sum"].tolist() == [[11, 22, 33, 44]]
    assert with_key.value.code() == grpc.StatusCode.PERMISSION_DENIED  # reports' key: adder_fixed is not its model
    assert nameless.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no verified client certificate names a tenant" in (nameless.value.details() or "")


# ------------------------------------------------------------ flags


def test_tls_flags_come_all_three_or_none(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert tls_from_args(parser.parse_args(["router", "--model-repository", "/m"])) is None
    with pytest.raises(SystemExit, match="--tls-key missing"):
        tls_from_args(
            parser.parse_args(["gateway", "--tls-ca", str(pki.mesh.ca_path), "--tls-cert", str(pki.mesh.cert_path)])
        )
    monkeypatch.setenv("MESHSERVE_TLS_CA", str(pki.mesh.ca_path))
    monkeypatch.setenv("MESHSERVE_TLS_CERT", str(pki.mesh.cert_path))
    monkeypatch.setenv("MESHSERVE_TLS_KEY", str(pki.mesh.key_path))
    args = build_parser().parse_args(["worker", "--model-repository", "/m"])
    assert tls_from_args(args) == pki.mesh


def test_a_missing_or_non_pem_file_is_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"--tls-cert .*nope\.pem: cannot read"):
        TlsConfig.from_paths(str(pki.mesh.ca_path), str(tmp_path / "nope.pem"), str(pki.mesh.key_path))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    with pytest.raises(TlsConfigError, match=r"--tls-key .*garbage\.key: not a PEM file"):
        TlsConfig.from_paths(str(pki.mesh.ca_path), str(pki.mesh.cert_path), str(garbage))
