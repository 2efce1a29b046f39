"""Which address this machine is reached at, and whether a TCP port answers: for heads and donors.

A head advertises an address other machines can reach (never loopback unless told to); a
donor advertises the address on its route to the head; both check reachability before Ray
is started, so a firewall or NAT problem is reported with its fix instead of surfacing as a
Ray node that dies 30 s after it joined.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

#: A TCP connect that takes longer than this on a LAN or the internet is as good as refused.
CONNECT_TIMEOUT_S = 2.0


def local_ip_towards(host: str) -> str | None:
    """The local address this machine uses to reach ``host`` (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return None


def primary_ip() -> str:
    """This machine's main non-loopback IPv4 address (the default route's), else 127.0.0.1."""
    # A documentation-range address: routed by the default route, never contacted.
    for probe in ("192.0.2.123", "10.255.255.255"):
        ip = local_ip_towards(probe)
        if ip and not ipaddress.ip_address(ip).is_loopback:
            return ip
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except OSError:
        pass
    return "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class Reachability:
    """Whether ``host:port`` accepted a TCP connection, and what went wrong if not."""

    host: str
    port: int
    ok: bool
    error: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port} " + ("reachable" if self.ok else f"unreachable ({self.error})")


def tcp_reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> Reachability:
    """Try one TCP connection to ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return Reachability(host, port, True)
    except TimeoutError:
        return Reachability(host, port, False, f"no answer in {timeout_s:g}s: a firewall drops it, or NAT")
    except ConnectionRefusedError:
        return Reachability(host, port, False, "connection refused: nothing listens there, or a firewall rejects it")
    except OSError as exc:
        return Reachability(host, port, False, exc.strerror or str(exc))
