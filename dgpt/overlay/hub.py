"""The head's end of the overlay: its WireGuard interface, brought up by the head's supervisor.

The supervisor (``dgpt.head.process``) brings the interface up before Ray starts and takes
it down when the head stops, so it outlives any restart of the control-plane actor, whose
coordinator (``dgpt.overlay.coordinator``) adds and removes donors as peers. The hub sets
what never changes while the head runs: the head's key (made once, kept in the head's state
folder, mode 0600), its UDP port, its overlay address, forwarding on this interface only
(the relay between donors), and the ACL with no donor yet.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dgpt.config import Settings
from dgpt.exceptions import OverlayError
from dgpt.overlay import acl
from dgpt.overlay.addresses import OverlayNetwork
from dgpt.overlay.wireguard import Interface, make_key, missing_tools, run

log = logging.getLogger("dgpt.overlay")


class OverlayHub:
    """The head's WireGuard interface (see the module docstring)."""

    def __init__(self, settings: Settings, key_path: Path, log_path: Path) -> None:
        self.settings = settings
        self.key_path = key_path
        self.log_path = log_path
        self.network = OverlayNetwork.parse(settings.overlay_cidr)
        self.interface = Interface(settings.overlay_interface)
        self.public_key = ""

    @property
    def pid(self) -> int | None:
        """The pid of the interface's ``wireguard-go`` (None while down)."""
        return self.interface.pid

    def up(self) -> None:
        """Bring the interface up with the head's key, port, address, forwarding and base ACL.

        Raises:
            OverlayError: this machine cannot run it (not root, tools missing), or a step failed.
        """
        problem = missing_tools()
        if problem:
            raise OverlayError(f"cannot run the overlay on the head: {problem}",
                               hint="or start the head without it (DGPT_OVERLAY_ENABLED=0)")
        self.public_key = make_key(self.key_path)
        self.interface.start(self.log_path)
        try:
            self.interface.listen(self.key_path, self.settings.overlay_port)
            self.interface.address(self.network.head_address, self.network.prefix_len)
            self.interface.forward()
            self.interface.nft(acl.head_ruleset(self.interface.name, acl.head_port_set(self.settings), {}))
        except BaseException:
            self.down()
            raise
        log.info("overlay %s up: head at %s, UDP %d", self.interface.name, self.network.head_address,
                 self.settings.overlay_port)

    def down(self) -> None:
        """Remove the ACL and the interface (every donor's tunnel ends with it)."""
        try:
            run(["nft", "-f", "-"], "removing the overlay ACL", input_text=acl.delete_table(self.interface.name))
        except OverlayError as exc:
            log.warning("%s", exc.message)
        self.interface.stop()
