"""WireGuard peer configuration as data: what the head's and a donor's interfaces are told.

The overlay is hub and spoke. The head's interface has one peer per donor whose allowed IP
is that donor's overlay address alone (``/32``): WireGuard's cryptokey routing then drops
any packet a donor sends from another address. It has no endpoint for them: donors dial
out, and the head answers wherever their NAT puts them. A donor's interface has one peer,
the head, with the head's UDP endpoint, the whole overlay as allowed IPs (traffic to other
donors goes through the head's relay) and a keepalive that holds its NAT mapping open.

Pure: these functions build ``wg set`` argument lists and read ``wg show`` output;
``dgpt.overlay.wireguard`` runs them. No function here ever sees a private key; the
interface reads it from a file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dgpt.sdk.models import OverlayGrant

#: Peers per `wg set` call: keeps a sync of 100k peers within any command-line limit.
PEERS_PER_CALL = 256


@dataclass(frozen=True)
class Peer:
    """One WireGuard peer: its public key, the addresses it may send from, where it is."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    keepalive_s: int | None = None

    def args(self) -> list[str]:
        """This peer as ``wg set`` arguments."""
        out = ["peer", self.public_key, "allowed-ips", ",".join(self.allowed_ips)]
        if self.endpoint:
            out += ["endpoint", self.endpoint]
        if self.keepalive_s:
            out += ["persistent-keepalive", str(self.keepalive_s)]
        return out


def donor_peer(public_key: str, address: str) -> Peer:
    """A donor as the head's peer: it may send from its overlay address only."""
    return Peer(public_key, (f"{address}/32",))


def head_peer(grant: OverlayGrant) -> Peer:
    """The head as a donor's only peer: the whole overlay goes through it."""
    return Peer(grant.head_public_key, (str(overlay_network(grant)),), grant.endpoint, grant.keepalive_s)


def overlay_network(grant: OverlayGrant) -> ipaddress.IPv4Network:
    """The overlay network a grant's address lies in."""
    return ipaddress.IPv4Interface(f"{grant.address}/{grant.prefix_len}").network


def set_commands(interface: str, add: Sequence[Peer] = (), remove: Sequence[str] = ()) -> list[list[str]]:
    """``wg set`` argument lists that add (or update) ``add`` and remove the keys ``remove``."""
    clauses = [p.args() for p in add] + [["peer", key, "remove"] for key in remove]
    commands = []
    for i in range(0, len(clauses), PEERS_PER_CALL):
        argv = ["wg", "set", interface]
        for clause in clauses[i:i + PEERS_PER_CALL]:
            argv += clause
        commands.append(argv)
    return commands


def donor_commands(interface: str, private_key_file: Path, grant: OverlayGrant) -> list[list[str]]:
    """``wg set`` for a donor's interface: its private key (from the file) and the head as its peer."""
    return [["wg", "set", interface, "private-key", str(private_key_file), *head_peer(grant).args()]]


def plan_sync(current: Mapping[str, tuple[str, ...]], wanted: Sequence[Peer]) -> tuple[list[Peer], list[str]]:
    """What to add or update and which keys to remove so the interface holds exactly ``wanted``.

    Args:
        current: public key -> allowed IPs, as the interface has them (:func:`parse_key_table`).
    """
    want = {p.public_key: p for p in wanted}
    add = [p for key, p in want.items() if tuple(sorted(current.get(key, ()))) != tuple(sorted(p.allowed_ips))]
    remove = sorted(key for key in current if key not in want)
    return add, remove


def parse_key_table(text: str) -> dict[str, str]:
    """``wg show IFACE allowed-ips|latest-handshakes|endpoints`` output: public key -> the rest."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition("\t")
        if key:
            out[key] = value.strip()
    return out


def allowed_ips(text: str) -> dict[str, tuple[str, ...]]:
    """``wg show IFACE allowed-ips`` output: public key -> its allowed IPs."""
    return {key: tuple(v for v in value.split() if v != "(none)") for key, value in parse_key_table(text).items()}


def handshakes(text: str) -> dict[str, float]:
    """``wg show IFACE latest-handshakes`` output: public key -> last handshake (epoch s; peers never
    heard from are left out)."""
    out = {}
    for key, value in parse_key_table(text).items():
        try:
            at = float(value)
        except ValueError:
            continue
        if at > 0:
            out[key] = at
    return out
