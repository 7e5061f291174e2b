"""Optional mutual TLS on every gRPC hop (client → gateway, gateway and workers → router).

One CA signs every certificate. A service given a :class:`TlsConfig` listens only
for TLS clients that present a certificate the CA signed, and presents its own
certificate on its channels, so each hop authenticates both ends. Without one,
every port and channel is plaintext.

A certificate's subject alternative names must cover the address its peers dial
(``router`` for ``--router router:8003``; IP ``127.0.0.1`` for ``meshserve up``).
One certificate may serve as a service's server and client identity, and
``meshserve up`` gives the whole mesh one; in a deployment each service should
have its own, so that one can be revoked alone.

Only the transport is authenticated here: any CA-signed peer may call any method
(no per-service authorization yet), and the gateway's tenants still come from API
keys (meshserve/tenants.py), not from the client certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


class TlsConfigError(Exception):
    """The TLS flags are incomplete, or a file they name is missing or not PEM."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Paths to PEM files: the CA that signs every peer, and this process's identity."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    @classmethod
    def from_paths(cls, ca: str | None, cert: str | None, key: str | None) -> TlsConfig | None:
        """All three paths or none (plaintext); a partial set or an unreadable file is
        a :class:`TlsConfigError` whose message names the flag at fault."""
        if ca and cert and key:
            config = cls(Path(ca), Path(cert), Path(key))
            config._read()  # fail at start-up, naming the flag, not at the first handshake
            return config
        given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
        missing = [flag for flag, value in given.items() if not value]
        if len(missing) == len(given):
            return None
        raise TlsConfigError(f"--tls-ca, --tls-cert and --tls-key go together: {', '.join(missing)} missing")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a listening port that refuses clients without a CA-signed certificate."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a channel that trusts only the CA and presents this certificate."""
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        # Read when a service builds its servers and channels, once at start: a
        # rotated certificate takes effect on restart.
        return (
            _read_pem("--tls-ca", self.ca_path),
            _read_pem("--tls-cert", self.cert_path),
            _read_pem("--tls-key", self.key_path),
        )


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{flag} {path}: not a PEM file")
    return data


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Listen on ``address`` (``host:port``, port 0 picks one), with mTLS when ``tls`` is
    given; returns the bound port."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, tls.server_credentials()))


def channel(address: str, tls: TlsConfig | None, options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: mTLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


def sync_channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    """A blocking channel, for ``meshserve up``'s readiness checks."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials())
