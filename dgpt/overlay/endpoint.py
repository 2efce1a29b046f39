"""A donor's end of the overlay: its key, its WireGuard interface, its ACL.

The donor makes its key pair once (``overlay.key`` in its state folder, mode 0600) and
offers only the public key when it registers. With the head's grant it brings its interface
up: the head as its only peer (dialled outbound, UDP, kept open by a keepalive, so no
inbound port or NAT rule is needed), its overlay address, and an ACL that lets the overlay
reach its own Ray ports only. ``wireguard-go`` runs as the agent's child: if the agent
dies, the tunnel goes with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dgpt.overlay import acl
from dgpt.overlay.peers import donor_commands
from dgpt.overlay.wireguard import Interface, make_key, missing_tools
from dgpt.sdk.models import OverlayGrant, OverlayOffer

log = logging.getLogger("dgpt.overlay")


class DonorEndpoint:
    """This donor's overlay interface (see the module docstring)."""

    def __init__(self, state_dir: Path, interface: str, port_base: int, worker_ports: str) -> None:
        self.key_path = state_dir / "overlay.key"
        self.log_path = state_dir / "wireguard.log"
        self.interface = Interface(interface)
        self.port_base = port_base
        self.worker_ports = worker_ports
        self.grant: OverlayGrant | None = None

    @classmethod
    def detect(cls, state_dir: Path, interface: str, port_base: int, worker_ports: str) -> tuple[DonorEndpoint | None, str]:
        """An endpoint when this machine can run one, else None; and why not (for the log)."""
        problem = missing_tools()
        if problem:
            return None, problem
        return cls(state_dir, interface, port_base, worker_ports), ""

    def offer(self) -> OverlayOffer:
        """What the donor sends when it registers (its key is made on first use)."""
        return OverlayOffer(public_key=make_key(self.key_path), node_port_base=self.port_base,
                            worker_ports=self.worker_ports)

    @property
    def up_with(self) -> OverlayGrant | None:
        """The grant the interface runs with now, or None while it is down."""
        return self.grant if self.interface.running else None

    def up(self, grant: OverlayGrant) -> None:
        """Bring the interface up with ``grant`` (again, if the grant changed).

        Raises:
            OverlayError: a step failed (the message names it).
        """
        if self.up_with == grant:
            return
        self.down()
        self.interface.start(self.log_path)
        try:
            self.interface.wg_set(donor_commands(self.interface.name, self.key_path, grant))
            self.interface.address(grant.address, grant.prefix_len)
            self.interface.nft(acl.donor_ruleset(self.interface.name,
                                                 acl.node_port_set(self.port_base, self.worker_ports)))
        except BaseException:
            self.down()
            raise
        self.grant = grant
        log.info("overlay up: %s at %s via %s", self.interface.name, grant.address, grant.endpoint)

    def handshake_age_s(self) -> float | None:
        """Seconds since the tunnel's last handshake with the head, or None (never, or down)."""
        if not self.interface.running or self.grant is None:
            return None
        at = self.interface.handshakes().get(self.grant.head_public_key)
        return time.time() - at if at is not None else None

    def down(self) -> None:
        if self.interface.running:
            try:
                self.interface.nft(acl.delete_table(self.interface.name))
            except Exception as exc:  # the interface goes anyway
                log.warning("removing the overlay ACL: %s", exc)
        self.interface.stop()
        self.grant = None
