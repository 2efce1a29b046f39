"""Overlay addresses: the head takes the network's first host address, donors the next free ones.

Allocation walks forward from a cursor (the address after the last one handed out) and
wraps at the end of the network, so a revoked donor's address is handed out again only
after every other free address was: a stale Ray node or route of a removed donor is long
gone by then. Each allocation costs O(1) amortised, not a scan of 100k taken addresses.
Pure: the caller (``dgpt.overlay.coordinator``) keeps the taken set and the cursor.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container
from dataclasses import dataclass

from dgpt.config import parse_overlay_cidr
from dgpt.exceptions import OverlayError


@dataclass(frozen=True)
class OverlayNetwork:
    """The overlay's IPv4 network: the head's address and the range donors get theirs from."""

    network: ipaddress.IPv4Network

    @classmethod
    def parse(cls, cidr: str) -> OverlayNetwork:
        """The network ``cidr`` names.

        Raises:
            OverlayError: not an IPv4 network from /8 to /29.
        """
        try:
            return cls(parse_overlay_cidr(cidr))
        except ValueError as exc:
            raise OverlayError(f"overlay_cidr {exc}", hint="set DGPT_OVERLAY_CIDR to e.g. 100.96.0.0/16") from None

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    @property
    def head_address(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def first_donor(self) -> int:
        """The first address a donor may get, as an integer."""
        return int(self.network.network_address) + 2

    @property
    def last_donor(self) -> int:
        """The last address a donor may get (the broadcast address is never one)."""
        return int(self.network.broadcast_address) - 1

    @property
    def capacity(self) -> int:
        """How many donors fit."""
        return self.last_donor - self.first_donor + 1

    def contains(self, address: str) -> bool:
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False

    def is_donor_address(self, address: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return False
        return self.first_donor <= value <= self.last_donor

    def allocate(self, taken: Container[str], cursor: int | None = None) -> str:
        """The first free donor address from ``cursor`` on (wrapping), as text.

        Args:
            taken: addresses already handed out.
            cursor: where to start, an integer address (default: the first donor address).

        Raises:
            OverlayError: every donor address is taken.
        """
        start = cursor if cursor is not None and self.first_donor <= cursor <= self.last_donor else self.first_donor
        value = start
        for _ in range(self.capacity):
            address = str(ipaddress.IPv4Address(value))
            if address not in taken:
                return address
            value = value + 1 if value < self.last_donor else self.first_donor
        raise OverlayError(f"the overlay {self.network} is full ({self.capacity} donors)",
                           hint="set DGPT_OVERLAY_CIDR to a larger network (a shorter prefix) and restart the head")

    @staticmethod
    def after(address: str) -> int:
        """The cursor that follows ``address``."""
        return int(ipaddress.IPv4Address(address)) + 1
