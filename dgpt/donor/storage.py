"""The donor's part of the storage tier: its piece server, on its own disk, under its disk cap.

A donor that offers disk (``--disk-gb``) runs a piece server (:mod:`dgpt.storage.piece_server`)
in the agent's own process, apart from its raylet: it serves pieces while the donor is
standby for compute, and stops only when the agent does. It listens on one fixed port
(``storage_port``, default the port after the node's Ray block: see
:func:`dgpt.config.storage_port`), reports ``http://ADDRESS:PORT`` when it registers, and
starts once the head's answer carries its capability key (``K_d``: it trusts no client
without a capability MACed with it). Pieces live in ``STATE_DIR/pieces`` and survive restarts.

A donor leaving for good (``dgpt donor leave``) asks the head to move its pieces first
(:meth:`DonorStorage.leave`) and keeps serving them until the head says they are moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dgpt.exceptions import DgptError
from dgpt.sdk.client import DonorClient
from dgpt.sdk.models import DonorCaps
from dgpt.storage import piece_server
from dgpt.storage.piece_server import PieceServerHandle
from dgpt.storage.piece_store import PieceStore

log = logging.getLogger("dgpt.donor")

#: How long a leaving donor waits for the head to move its pieces: moving copies each piece
#: once at the donor's upload speed; a donor that waits longer is being unreasonable to its owner.
LEAVE_TIMEOUT_S = 600.0


class DonorStorage:
    """This donor's piece server (none when it offers no disk or ``port`` is None)."""

    def __init__(self, caps: DonorCaps, state_dir: Path, port: int | None, bind_host: str = "0.0.0.0") -> None:
        self.capacity_bytes = caps.disk_bytes
        self.root = state_dir / "pieces"
        self.port = port
        self.bind_host = bind_host
        self.handle: PieceServerHandle | None = None
        self._donor_id: str | None = None

    @property
    def offered(self) -> bool:
        return self.capacity_bytes > 0 and self.port is not None

    def url_for(self, address: str | None) -> str | None:
        """What the donor reports at registration: where clients reach its pieces."""
        if not self.offered:
            return None
        return f"http://{address or '127.0.0.1'}:{self.port}"

    def start(self, donor_id: str, key_hex: str | None, address: str | None) -> None:
        """Serve pieces with the key the head sent (no key: the head runs no storage tier)."""
        if not self.offered or key_hex is None:
            return
        if self.handle is not None and self.handle.running and self._donor_id == donor_id:
            return
        self.stop()
        assert self.port is not None
        try:
            self.handle = piece_server.start(PieceStore(self.root, self.capacity_bytes), donor_id, bytes.fromhex(key_hex),
                                             host=self.bind_host, port=self.port, advertise_host=address)
        except DgptError as exc:
            # Compute donation still works; the head sees the donor offline in the tier.
            log.error("the piece server did not start: %s (%s)", exc.message,
                      exc.hint or "free the port or pick another with --storage-port")
            return
        self._donor_id = donor_id
        log.info("serving the storage tier at %s (%.1f GiB cap, %s)", self.handle.url, self.capacity_bytes / 2**30,
                 self.root)

    def leave(self, client: DonorClient, donor_id: str | None, secret: str | None) -> None:
        """Ask the head to move this donor's pieces before it goes; logs what remained."""
        if self.handle is None or donor_id is None or secret is None:
            return
        try:
            resp = client.storage_leave(donor_id, secret, timeout_s=LEAVE_TIMEOUT_S)
        except DgptError as exc:
            log.warning("the head did not move this donor's pieces: %s (it repairs them once this donor is gone)",
                        exc.message)
            return
        log.info("storage: %d piece(s) moved to other donors, %d left%s", resp.moved, resp.remaining,
                 f" ({resp.message})" if resp.message else "")

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()
            self.handle = None
