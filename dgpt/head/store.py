"""The registry's SQLite database: donors, sessions and tokens. Storage only.

Plain Python over one SQLite file in WAL mode; every public method is one transaction, so a
failed request leaves nothing half-written. The lifecycle rules live in
``dgpt.head.lifecycle``; the registry (``dgpt.head.registry``) keeps the live fleet in
memory and writes here on every state change, batching only heartbeat times. Times are
passed in (``now``) so tests control the clock.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dgpt.contract import DonorState, SessionEnd, Target
from dgpt.exceptions import AuthError, NotFound
from dgpt.head.lifecycle import Closed, Lifecycle
from dgpt.sdk.models import DeviceProfile, DonorCaps, SessionView, TokenView

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('join', 'api')),
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS donors (
    donor_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    device_class TEXT NOT NULL,
    owner TEXT NOT NULL,
    profile_json TEXT NOT NULL,
    caps_json TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    state TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT 'standby',
    node_id TEXT,
    owner_active INTEGER NOT NULL DEFAULT 0,
    drain_reason TEXT,
    drain_deadline_at REAL,
    registered_at REAL NOT NULL,
    last_heartbeat_at REAL,
    token_id TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id INTEGER PRIMARY KEY AUTOINCREMENT,
    donor_id TEXT NOT NULL REFERENCES donors(donor_id),
    node_id TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    ended_as TEXT CHECK (ended_as IN ('drained', 'lost')),
    end_reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_donor ON sessions(donor_id, session_id);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_session ON sessions(donor_id) WHERE ended_at IS NULL;
"""

#: Columns added after a table was first created: (table, column, definition). Added to an
#: older file on open, so a newer head keeps every record of an older one.
_ADDED_COLUMNS = (
    ("donors", "node_ip", "TEXT"),
    ("donors", "ray_ports_json", "TEXT NOT NULL DEFAULT '[]'"),
)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class DonorRow:
    """One donor as stored: who it is, what it offers, and its lifecycle."""

    donor_id: str
    secret_hash: str
    name: str
    device_class: str
    owner: str
    profile: DeviceProfile
    caps: DonorCaps
    labels: dict[str, str]
    registered_at: float
    last_heartbeat_at: float | None
    token_id: str | None
    lifecycle: Lifecycle
    node_ip: str | None = None
    ray_ports: tuple[int, ...] = ()


class RegistryStore:
    """Donors, sessions and tokens in one SQLite file (WAL)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (the WAL is written); only a
        # power cut can lose the last commits, never corrupt the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # executescript commits by itself, so it runs outside _tx.
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # ---------------------------------------------------------------- tokens

    def create_token(self, kind: str, label: str, now: float, secret: str | None = None) -> TokenView:
        """Create a join token or API key; the secret is returned once and stored hashed."""
        if kind not in ("join", "api"):
            raise ValueError(f"token kind must be 'join' or 'api', got {kind!r}")
        secret = secret or f"dgpt_{kind}_{secrets.token_urlsafe(24)}"
        token_id = uuid.uuid4().hex[:12]
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens(token_id, kind, token_hash, label, created_at) VALUES (?,?,?,?,?)",
                (token_id, kind, hash_secret(secret), label, now),
            )
        return TokenView(token_id=token_id, kind=kind, label=label, created_at=now, token=secret)  # type: ignore[arg-type]

    def ensure_token(self, kind: str, secret: str, label: str, now: float) -> None:
        """Record a token whose secret is already known (the head's bootstrap key), once."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM tokens WHERE token_hash=?", (hash_secret(secret),)).fetchone()
        if row is None:
            self.create_token(kind, label, now, secret=secret)

    def check_token(self, kind: str, secret: str | None) -> str:
        """Return the token id of a valid, unrevoked token of this kind.

        Raises:
            AuthError: missing, unknown or revoked.
        """
        what = "join token" if kind == "join" else "API key"
        article = "a" if kind == "join" else "an"
        if not secret:
            raise AuthError(
                f"{article} {what} is required",
                401,
                hint="create one on the head with `dgpt token create" + (" --kind api`" if kind == "api" else "`"),
            )
        with self._lock:
            row = self._db.execute(
                "SELECT token_id, revoked_at FROM tokens WHERE token_hash=? AND kind=?", (hash_secret(secret), kind)
            ).fetchone()
        if row is None or row["revoked_at"] is not None:
            raise AuthError(f"invalid or revoked {what}", 401, hint="ask the operator for a valid one (`dgpt token create`)")
        return str(row["token_id"])

    def list_tokens(self) -> list[TokenView]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tokens ORDER BY created_at").fetchall()
        return [
            TokenView(token_id=r["token_id"], kind=r["kind"], label=r["label"], created_at=r["created_at"],
                      revoked_at=r["revoked_at"])
            for r in rows
        ]

    def revoke_token(self, token_id: str, now: float) -> None:
        with self._tx() as db:
            cur = db.execute("UPDATE tokens SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL", (now, token_id))
            if cur.rowcount == 0:
                raise NotFound(f"no active token {token_id!r}", 404, hint="list tokens with `dgpt token list`")

    # ---------------------------------------------------------------- donors

    def load_donors(self) -> list[DonorRow]:
        """Every donor (the registry loads them once, at start)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM donors ORDER BY registered_at, donor_id").fetchall()
        return [_donor_row(r) for r in rows]

    def save_donor(self, row: DonorRow) -> None:
        """Insert a new donor or update a known one's registration (identity, caps, lifecycle)."""
        lc = row.lifecycle
        with self._tx() as db:
            db.execute(
                """INSERT INTO donors(donor_id, secret_hash, name, device_class, owner, profile_json, caps_json,
                       labels_json, state, target, node_id, owner_active, drain_reason, drain_deadline_at,
                       registered_at, last_heartbeat_at, token_id, node_ip, ray_ports_json)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(donor_id) DO UPDATE SET
                       name=excluded.name, device_class=excluded.device_class, owner=excluded.owner,
                       profile_json=excluded.profile_json, caps_json=excluded.caps_json,
                       labels_json=excluded.labels_json, state=excluded.state, target=excluded.target,
                       node_id=excluded.node_id, owner_active=excluded.owner_active,
                       drain_reason=excluded.drain_reason, drain_deadline_at=excluded.drain_deadline_at,
                       last_heartbeat_at=excluded.last_heartbeat_at, token_id=excluded.token_id,
                       node_ip=excluded.node_ip, ray_ports_json=excluded.ray_ports_json""",
                (row.donor_id, row.secret_hash, row.name, row.device_class, row.owner, row.profile.model_dump_json(),
                 row.caps.model_dump_json(), json.dumps(row.labels), lc.state.value, lc.target.value, lc.node_id,
                 int(lc.owner_active), lc.drain_reason, lc.drain_deadline_at, row.registered_at,
                 row.last_heartbeat_at, row.token_id, row.node_ip, json.dumps(list(row.ray_ports))),
            )

    def apply(self, donor_id: str, lc: Lifecycle, now: float, closed: Closed | None = None,
              opened: str | None = None) -> tuple[SessionView | None, SessionView | None]:
        """Store a lifecycle outcome in one transaction: the new state, then the session ops.

        Returns:
            (the session that closed, the session that opened), as stored.
        Raises:
            NotFound: no such donor.
        """
        with self._tx() as db:
            cur = db.execute(
                """UPDATE donors SET state=?, target=?, node_id=?, owner_active=?, drain_reason=?,
                       drain_deadline_at=? WHERE donor_id=?""",
                (lc.state.value, lc.target.value, lc.node_id, int(lc.owner_active), lc.drain_reason,
                 lc.drain_deadline_at, donor_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no donor {donor_id!r}", 404, hint="list donors with `dgpt donor list`")
            ended = started = None
            if closed is not None:
                open_row = db.execute("SELECT * FROM sessions WHERE donor_id=? AND ended_at IS NULL",
                                      (donor_id,)).fetchone()
                if open_row is not None:
                    db.execute("UPDATE sessions SET ended_at=?, ended_as=?, end_reason=? WHERE session_id=?",
                               (now, closed.how.value, closed.why, open_row["session_id"]))
                    ended = SessionView(session_id=open_row["session_id"], node_id=open_row["node_id"],
                                        started_at=open_row["started_at"], ended_at=now,
                                        ended_as=closed.how, end_reason=closed.why)
            if opened is not None:
                cur = db.execute("INSERT INTO sessions(donor_id, node_id, started_at) VALUES (?,?,?)",
                                 (donor_id, opened, now))
                started = SessionView(session_id=int(cur.lastrowid or 0), node_id=opened, started_at=now)
        return ended, started

    def save_heartbeats(self, beats: Iterable[tuple[str, float]]) -> None:
        """Store the latest heartbeat time of many donors at once (batched, informational)."""
        items = [(at, donor_id) for donor_id, at in beats]
        if not items:
            return
        with self._tx() as db:
            db.executemany("UPDATE donors SET last_heartbeat_at=? WHERE donor_id=?", items)

    # ---------------------------------------------------------------- sessions

    def recent_sessions(self, per_donor: int) -> dict[str, list[SessionView]]:
        """The last ``per_donor`` sessions of every donor, oldest first (loaded once, at start)."""
        with self._lock:
            rows = self._db.execute(
                """SELECT * FROM (SELECT s.*, ROW_NUMBER() OVER (PARTITION BY donor_id ORDER BY session_id DESC)
                                  AS rn FROM sessions s) WHERE rn <= ? ORDER BY donor_id, session_id""",
                (per_donor,),
            ).fetchall()
        out: dict[str, list[SessionView]] = {}
        for r in rows:
            out.setdefault(r["donor_id"], []).append(_session(r))
        return out

    def session_totals(self) -> dict[str, tuple[int, int, float]]:
        """Per donor: (sessions, sessions lost, seconds up in ended sessions); loaded at start."""
        with self._lock:
            rows = self._db.execute(
                """SELECT donor_id, COUNT(*) AS n, SUM(ended_as = 'lost') AS lost,
                          SUM(COALESCE(ended_at - started_at, 0)) AS up_s
                   FROM sessions GROUP BY donor_id"""
            ).fetchall()
        return {r["donor_id"]: (r["n"], r["lost"] or 0, r["up_s"] or 0.0) for r in rows}

    def sessions(self, donor_id: str | None = None, limit: int | None = None) -> list[tuple[str, SessionView]]:
        """Sessions (optionally of one donor, the latest ``limit``), oldest first."""
        query = "SELECT * FROM sessions" + (" WHERE donor_id=?" if donor_id else "") + " ORDER BY session_id DESC"
        args: tuple = (donor_id,) if donor_id else ()
        if limit is not None:
            query += " LIMIT ?"
            args += (limit,)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [(r["donor_id"], _session(r)) for r in reversed(rows)]

    def record_session(self, donor_id: str, started_at: float, ended_at: float, ended_as: SessionEnd,
                       node_id: str | None = None, reason: str = "imported") -> SessionView:
        """Insert a finished session (imports of history; tests seed reliability with it)."""
        if ended_at < started_at:
            raise ValueError(f"ended_at {ended_at} is before started_at {started_at}")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM donors WHERE donor_id=?", (donor_id,)).fetchone() is None:
                raise NotFound(f"no donor {donor_id!r}", 404, hint="list donors with `dgpt donor list`")
            cur = db.execute(
                "INSERT INTO sessions(donor_id, node_id, started_at, ended_at, ended_as, end_reason) VALUES (?,?,?,?,?,?)",
                (donor_id, node_id, started_at, ended_at, SessionEnd(ended_as).value, reason),
            )
        return SessionView(session_id=int(cur.lastrowid or 0), node_id=node_id, started_at=started_at,
                           ended_at=ended_at, ended_as=SessionEnd(ended_as), end_reason=reason)


def _donor_row(r: sqlite3.Row) -> DonorRow:
    return DonorRow(
        donor_id=r["donor_id"], secret_hash=r["secret_hash"], name=r["name"], device_class=r["device_class"],
        owner=r["owner"], profile=DeviceProfile.model_validate_json(r["profile_json"]),
        caps=DonorCaps.model_validate_json(r["caps_json"]), labels=json.loads(r["labels_json"]),
        registered_at=r["registered_at"], last_heartbeat_at=r["last_heartbeat_at"], token_id=r["token_id"],
        lifecycle=Lifecycle(
            state=DonorState(r["state"]), target=Target(r["target"]), node_id=r["node_id"],
            drain_reason=r["drain_reason"], drain_deadline_at=r["drain_deadline_at"],
            owner_active=bool(r["owner_active"]),
        ),
        node_ip=r["node_ip"], ray_ports=tuple(json.loads(r["ray_ports_json"] or "[]")),
    )


def _session(r: sqlite3.Row) -> SessionView:
    return SessionView(
        session_id=r["session_id"],
        node_id=r["node_id"],
        started_at=r["started_at"],
        ended_at=r["ended_at"],
        ended_as=r["ended_as"],
        end_reason=r["end_reason"],
    )
