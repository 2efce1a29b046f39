"""The head's overlay coordinator: who is on the overlay, at which address, with which key.

Each donor that offers to join (``OverlayOffer``: its public key and its Ray ports) gets an
overlay address and the head's public key and endpoint (``OverlayGrant``); the head's
WireGuard interface gets the donor as a peer that may send from that address only, and the
ACL lets overlay traffic reach that donor on its Ray ports only. Revoking a donor removes
its peer and its ACL elements: from then on the head drops every packet it sends, and
nothing reaches it through the relay.

Donors make their own key pairs and send only the public key: the private key never
leaves the donor, so neither the head's database nor the join exchange (which may cross
the internet before TLS is set up) holds anything that lets someone impersonate a donor.

Grants are stored in their own SQLite file, so a restarted head (or control-plane actor)
gives every donor its old address back and :meth:`OverlayCoordinator.sync` restores the
interface's peers and ACL from it. The interface itself is brought up by the head's
supervisor (``dgpt.overlay.hub``): it outlives a restart of the control-plane actor.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dgpt.config import Settings
from dgpt.exceptions import Conflict, OverlayError
from dgpt.overlay import acl
from dgpt.overlay.addresses import OverlayNetwork
from dgpt.overlay.peers import donor_peer, plan_sync, set_commands
from dgpt.overlay.wireguard import Interface, run
from dgpt.sdk.models import OverlayGrant, OverlayOffer
from dgpt.sqlite import connect as sqlite_connect
from dgpt.sqlite import immediate as sqlite_tx

log = logging.getLogger("dgpt.overlay")

#: Donors send a keepalive this often: home NATs forget idle UDP mappings after 30 s or more.
KEEPALIVE_S = 25
#: Handshake times are read from the interface at most this often (preflights poll them).
HANDSHAKE_CACHE_S = 1.0


@dataclass(frozen=True)
class PeerRow:
    """One donor's grant as stored."""

    donor_id: str
    public_key: str
    address: str
    port_base: int
    worker_ports: str
    granted_at: float

    @property
    def ports(self) -> acl.PortSet:
        return acl.node_port_set(self.port_base, self.worker_ports)


class PeerStore:
    """Grants in one SQLite file (WAL); every method is one transaction."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS peers (
        donor_id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        address TEXT NOT NULL UNIQUE,
        port_base INTEGER NOT NULL,
        worker_ports TEXT NOT NULL,
        granted_at REAL NOT NULL
    );
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite_connect(path)
        self._db.executescript(self._SCHEMA)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_tx(self._db, self._lock)

    def all(self) -> list[PeerRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM peers ORDER BY granted_at, donor_id").fetchall()
        return [_row(r) for r in rows]

    def get(self, donor_id: str) -> PeerRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM peers WHERE donor_id=?", (donor_id,)).fetchone()
        return _row(r) if r is not None else None

    def holder_of(self, public_key: str) -> str | None:
        with self._lock:
            r = self._db.execute("SELECT donor_id FROM peers WHERE public_key=?", (public_key,)).fetchone()
        return str(r["donor_id"]) if r is not None else None

    def addresses(self) -> set[str]:
        with self._lock:
            return {r["address"] for r in self._db.execute("SELECT address FROM peers")}

    def cursor(self) -> int | None:
        with self._lock:
            r = self._db.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()
        return int(r["value"]) if r is not None else None

    def save(self, row: PeerRow, cursor: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO peers VALUES (?,?,?,?,?,?)",
                       (row.donor_id, row.public_key, row.address, row.port_base, row.worker_ports, row.granted_at))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (json.dumps(cursor),))

    def delete(self, donor_id: str) -> PeerRow | None:
        with self._tx() as db:
            r = db.execute("SELECT * FROM peers WHERE donor_id=?", (donor_id,)).fetchone()
            if r is None:
                return None
            db.execute("DELETE FROM peers WHERE donor_id=?", (donor_id,))
        return _row(r)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(r: sqlite3.Row) -> PeerRow:
    return PeerRow(r["donor_id"], r["public_key"], r["address"], int(r["port_base"]), r["worker_ports"],
                   float(r["granted_at"]))


class WgPort(Protocol):
    """What the coordinator needs of the head's interface (``dgpt.overlay.wireguard.Interface``)."""

    name: str

    def wg_set(self, commands: Sequence[Sequence[str]]) -> None: ...

    def peers(self) -> dict[str, tuple[str, ...]]: ...

    def handshakes(self) -> dict[str, float]: ...

    def nft(self, ruleset: str) -> None: ...


class OverlayCoordinator:
    """Grants and revokes donors' places on the overlay (see the module docstring). Thread-safe."""

    def __init__(self, network: OverlayNetwork, head_public_key: str, endpoint: str, head_ports: acl.PortSet,
                 store: PeerStore, interface: WgPort, clock: Callable[[], float] = time.time,
                 keepalive_s: int = KEEPALIVE_S) -> None:
        self.network = network
        self.head_public_key = head_public_key
        self.endpoint = endpoint
        self.head_ports = head_ports
        self.store = store
        self.interface = interface
        self.clock = clock
        self.keepalive_s = keepalive_s
        self._lock = threading.RLock()
        self._handshakes: dict[str, float] = {}
        self._handshakes_at = -HANDSHAKE_CACHE_S

    @classmethod
    def open(cls, settings: Settings, db_path: Path) -> OverlayCoordinator:
        """The coordinator of the interface the head's supervisor brought up, synced with its store.

        Raises:
            OverlayError: the interface is not up (the head was started without the overlay).
        """
        interface = Interface(settings.overlay_interface)
        if not interface.exists():
            raise OverlayError(f"the overlay interface {interface.name} is not up",
                               hint="start the head with DGPT_OVERLAY_ENABLED=1 (as root)")
        public_key = run(["wg", "show", interface.name, "public-key"], "reading the head's public key").strip()
        host = settings.overlay_endpoint or settings.node_ip or "127.0.0.1"
        coordinator = cls(OverlayNetwork.parse(settings.overlay_cidr), public_key,
                          f"{host}:{settings.overlay_port}", acl.head_port_set(settings), PeerStore(db_path), interface)
        coordinator.sync()
        return coordinator

    @property
    def head_address(self) -> str:
        return self.network.head_address

    def _grant(self, row: PeerRow) -> OverlayGrant:
        return OverlayGrant(address=row.address, prefix_len=self.network.prefix_len, head_address=self.head_address,
                            head_public_key=self.head_public_key, endpoint=self.endpoint, keepalive_s=self.keepalive_s)

    def grant(self, donor_id: str, offer: OverlayOffer) -> OverlayGrant:
        """Put a donor on the overlay, or confirm its place (same donor: same address).

        Raises:
            Conflict: another donor holds this public key.
            OverlayError: the overlay is full, or the interface could not be configured.
        """
        with self._lock:
            holder = self.store.holder_of(offer.public_key)
            if holder is not None and holder != donor_id:
                raise Conflict(f"overlay public_key is already held by donor {holder}", 409,
                               hint="each donor makes its own key: remove the copied overlay.key and join again")
            old = self.store.get(donor_id)
            if old is not None and self.network.is_donor_address(old.address):
                address, cursor = old.address, self.store.cursor() or OverlayNetwork.after(old.address)
            else:
                address = self.network.allocate(self.store.addresses(), self.store.cursor())
                cursor = OverlayNetwork.after(address)
            row = PeerRow(donor_id, offer.public_key, address, offer.node_port_base, offer.worker_ports,
                          old.granted_at if old is not None and old.public_key == offer.public_key else self.clock())
            self.store.save(row, cursor)
            if old is not None and (old.public_key, old.address, old.ports) != (row.public_key, row.address, row.ports):
                # A new key or new ports: the old peer and ACL elements must go. Rare: sync all.
                self.sync()
            else:
                # Idempotent: the same peer and elements again (a restarted interface lacks them).
                self.interface.wg_set(set_commands(self.interface.name, add=[donor_peer(row.public_key, address)]))
                self.interface.nft(acl.element_command("add", self.interface.name,
                                                       acl.donor_elements(address, row.ports)))
        log.info("overlay: donor %s at %s", donor_id, address)
        return self._grant(row)

    def revoke(self, donor_id: str) -> bool:
        """Take a donor off the overlay: its peer and ACL elements go. False if it had no place."""
        with self._lock:
            row = self.store.delete(donor_id)
            if row is None:
                return False
            self.interface.wg_set(set_commands(self.interface.name, remove=[row.public_key]))
            try:
                self.interface.nft(acl.element_command("delete", self.interface.name,
                                                       acl.donor_elements(row.address, row.ports)))
            except OverlayError:
                self.sync()  # the elements were not there (a restarted interface): rebuild the ACL
        log.info("overlay: donor %s (%s) revoked", donor_id, row.address)
        return True

    def sync(self) -> None:
        """Make the interface's peers and ACL exactly what the store holds."""
        with self._lock:
            rows = self.store.all()
            add, remove = plan_sync(self.interface.peers(), [donor_peer(r.public_key, r.address) for r in rows])
            self.interface.wg_set(set_commands(self.interface.name, add=add, remove=remove))
            self.interface.nft(acl.head_ruleset(self.interface.name, self.head_ports,
                                                {r.address: r.ports for r in rows}))
        if add or remove:
            log.info("overlay: synced %d peer(s): %d set, %d removed", len(rows), len(add), len(remove))

    def address_of(self, donor_id: str) -> str | None:
        row = self.store.get(donor_id)
        return row.address if row is not None else None

    def handshake_at(self, donor_id: str) -> float | None:
        """When the donor's tunnel last completed a handshake (epoch s), or None (never, or not granted)."""
        row = self.store.get(donor_id)
        if row is None:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._handshakes_at >= HANDSHAKE_CACHE_S:
                self._handshakes = self.interface.handshakes()
                self._handshakes_at = now
            return self._handshakes.get(row.public_key)

    def peers(self) -> list[PeerRow]:
        return self.store.all()
