"""Which addresses a TCP port listens on, read from the kernel's socket tables.

A test of a bind address cannot rely on the machine's other interfaces (a CI box
may have none worth dialing), so it asks Linux instead: /proc/net/tcp and tcp6
list every listening socket of this network namespace with its local address.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LISTEN = "0A"  # TCP_LISTEN in the tables' "st" column


def listening_hosts(port: int) -> set[Address]:
    """The local addresses of the sockets listening on ``port`` (IPv4-mapped IPv6 as IPv4).

    gRPC binds a wildcard as one dual-stack ``::`` socket and a host as a mapped
    address on an IPv6 socket; Python's HTTP servers bind plain IPv4 sockets.
    """
    found: set[Address] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, _, state = row.split()[1:4]
            host_hex, port_hex = local.split(":")
            if state == LISTEN and int(port_hex, 16) == port:
                found.add(_address(bytes.fromhex(host_hex)))
    return found


def _address(raw: bytes) -> Address:
    """The tables print each 32-bit word of an address in host (little-endian) order."""
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(ordered) == 4:
        return ipaddress.IPv4Address(ordered)
    v6 = ipaddress.IPv6Address(ordered)
    return v6.ipv4_mapped or v6


def loopback_only(port: int) -> bool:
    """Something listens on ``port``, and only on loopback addresses."""
    hosts = listening_hosts(port)
    return bool(hosts) and all(host.is_loopback for host in hosts)


def every_interface(port: int) -> bool:
    """Something listens on ``port`` on a wildcard address (0.0.0.0 or ::)."""
    return any(host.is_unspecified for host in listening_hosts(port))
