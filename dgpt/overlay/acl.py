"""The overlay's ACLs as nftables rules: only Ray's and dgpt's TCP ports cross the overlay.

On the head (:func:`head_ruleset`), traffic that arrives on the overlay interface may
reach the head's own Ray and dgpt ports (GCS, dashboard, control-plane API, Serve, its
node's fixed ports and worker range), and may be relayed to another overlay address only
on that donor's own Ray ports (its fixed ports and worker range, kept in the set
``donor_ports`` as ``address . ports`` elements, so a grant or a revocation is one element
change, not a new ruleset). Nothing is relayed off the overlay: the head is no router into
its own networks. On a donor (:func:`donor_ruleset`), the overlay reaches its Ray ports only,
and nothing is forwarded.

Replies (``ct state established,related``) and ICMP echo (for diagnosing a tunnel with
``ping``) pass; everything else from the overlay is counted and dropped. Base chains accept
by default and match only the overlay interface, so the machine's other traffic is untouched.
Pure: these functions return text for ``nft -f -``; ``dgpt.overlay.wireguard`` applies it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dgpt.config import NODE_PORTS, Settings, parse_port_range


@dataclass(frozen=True)
class PortSet:
    """TCP ports as single ports and inclusive ranges, in a stable order."""

    ports: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1-65535")
        for lo, hi in self.ranges:
            if not 1 <= lo <= hi <= 65535:
                raise ValueError(f"port range {lo}-{hi} is not START <= END within 1-65535")
        object.__setattr__(self, "ports", tuple(sorted(set(self.ports))))
        object.__setattr__(self, "ranges", tuple(sorted(set(self.ranges))))

    def items(self) -> list[str]:
        """Each port or range as nft writes it (``6379``, ``10002-19999``)."""
        return [str(p) for p in self.ports] + [f"{lo}-{hi}" for lo, hi in self.ranges]

    def nft(self) -> str:
        """The set literal: ``{ 6379, 10002-19999 }``."""
        return "{ " + ", ".join(self.items()) + " }"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and (port in self.ports or any(lo <= port <= hi for lo, hi in self.ranges))

    def __bool__(self) -> bool:
        return bool(self.ports or self.ranges)


def node_port_set(port_base: int, worker_ports: str, storage: bool = True) -> PortSet:
    """A donor's ports: its block of fixed Ray ports from ``port_base``, the storage tier's
    piece server right after it (its default port, :func:`dgpt.config.storage_port`), and
    its worker range. ``storage=False``: a node without a piece server (the head)."""
    lo, hi = parse_port_range(worker_ports)
    return PortSet(ranges=((port_base, port_base + NODE_PORTS - (0 if storage else 1)), (lo, hi)))


def head_port_set(settings: Settings) -> PortSet:
    """The head's ports that overlay peers may reach: Ray's and dgpt's, nothing else."""
    node = node_port_set(settings.ray_node_port_base, settings.ray_worker_ports, storage=False)
    return PortSet(ports=(settings.ray_port, settings.dashboard_port, settings.api_port, settings.http_port),
                   ranges=node.ranges)


def table_name(interface: str) -> str:
    """The nftables table of one overlay interface (``inet dgpt_<interface>``)."""
    return "dgpt_" + "".join(c if c.isalnum() else "_" for c in interface)


def _header(table: str) -> list[str]:
    # Creating the table first makes the delete succeed when it did not exist, so the
    # whole replacement is one atomic nft transaction.
    return [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{"]


def _overlay_input(interface: str, allowed: PortSet) -> list[str]:
    return [
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        f'    iifname "{interface}" jump overlay_input',
        "  }",
        "  chain overlay_input {",
        "    ct state established,related accept",
        "    ct state invalid drop",
        "    icmp type echo-request accept",
        f"    tcp dport {allowed.nft()} accept",
        "    counter drop",
        "  }",
    ]


def donor_elements(address: str, ports: PortSet) -> list[str]:
    """The ``donor_ports`` elements that let overlay traffic reach ``address`` on ``ports``."""
    return [f"{address} . {item}" for item in ports.items()]


def head_ruleset(interface: str, head_ports: PortSet, donors: Mapping[str, PortSet]) -> str:
    """The head's whole overlay ruleset, with every donor (overlay address -> its ports)."""
    table = table_name(interface)
    elements = [e for address, ports in sorted(donors.items()) for e in donor_elements(address, ports)]
    lines = [
        *_header(table),
        "  set donor_ports {",
        "    type ipv4_addr . inet_service",
        "    flags interval",
        *([f"    elements = {{ {', '.join(elements)} }}"] if elements else []),
        "  }",
        *_overlay_input(interface, head_ports),
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
        f'    iifname "{interface}" jump overlay_forward',
        "  }",
        "  chain overlay_forward {",
        f'    oifname != "{interface}" counter drop',
        "    ct state established,related accept",
        "    ct state invalid drop",
        "    icmp type echo-request accept",
        "    ip daddr . tcp dport @donor_ports accept",
        "    counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def element_command(verb: str, interface: str, elements: Iterable[str]) -> str:
    """``add``/``delete element`` of ``donor_ports`` in the head's table, for ``nft -f -``."""
    if verb not in ("add", "delete"):
        raise ValueError(f"verb must be 'add' or 'delete', got {verb!r}")
    items = list(elements)
    if not items:
        return ""
    return f"{verb} element inet {table_name(interface)} donor_ports {{ {', '.join(items)} }}\n"


def donor_ruleset(interface: str, own_ports: PortSet) -> str:
    """A donor's overlay ruleset: the overlay reaches only its own Ray ports; no forwarding."""
    table = table_name(interface)
    lines = [
        *_header(table),
        *_overlay_input(interface, own_ports),
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
        f'    iifname "{interface}" counter drop',
        f'    oifname "{interface}" counter drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def delete_table(interface: str) -> str:
    table = table_name(interface)
    return f"table inet {table} {{}}\ndelete table inet {table}\n"
