"""A grpc.health.v1 check for Kubernetes exec probes on a mutual-TLS port.

The kubelet's own ``grpc:`` probe speaks plaintext only, so a port that requires
client certificates (``--tls-ca/--tls-cert/--tls-key``) is probed from inside the
pod instead (deploy/kubernetes/components/mtls)::

    python -m meshserve.cli.probe 8003 --server-name meshserve-router

It dials 127.0.0.1:<port> with the pod's own certificate (the ``MESHSERVE_TLS_*``
variables the service reads, or plaintext without them), checks ``--service``
(default "", the process), and exits 0 when SERVING, 1 otherwise with the reason
on stderr (the kubelet records it in the pod's events). ``--server-name`` is the
name the service's certificate carries, checked instead of 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.platform.tls import TlsConfig, TlsConfigError

PROBE_TIMEOUT_S = 2.0
"""Within the kubelet's default timeoutSeconds plus Python's start."""


def check(port: int, service: str, server_name: str, environ: Mapping[str, str]) -> str | None:
    """None when ``service`` is SERVING on 127.0.0.1:``port``; else why not."""
    try:
        tls = TlsConfig.from_paths(
            environ.get("MESHSERVE_TLS_CA"), environ.get("MESHSERVE_TLS_CERT"), environ.get("MESHSERVE_TLS_KEY")
        )
    except TlsConfigError as exc:
        return str(exc)
    address = f"127.0.0.1:{port}"
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address} service {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve.cli.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the gRPC port whose grpc.health.v1 to check")
    parser.add_argument("--service", default="", help='the health entry (default "": the process)')
    parser.add_argument("--server-name", default="", help="the name the service's certificate carries")
    args = parser.parse_args(argv)
    problem = check(args.port, args.service, args.server_name, os.environ)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
