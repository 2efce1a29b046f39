"""The registry's SQLite database: donors, sessions, tokens and the credit ledger. Storage only.

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
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgpt.contract import DonorState, PausedBy, SessionEnd, Target
from dgpt.credit.chain import Tip, row_hash
from dgpt.exceptions import AuthError, NotFound
from dgpt.head.lifecycle import Closed, Lifecycle
from dgpt.sdk.models import DeviceProfile, DonorCaps, SessionView, TokenView
from dgpt.sqlite import connect as sqlite_connect
from dgpt.sqlite import immediate as sqlite_tx

SCHEMA_VERSION = 3

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
CREATE TABLE IF NOT EXISTS serve_config (
    key TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
-- Append-only, hash-chained (dgpt.credit.chain): rows are never updated or deleted.
CREATE TABLE IF NOT EXISTS credit_ledger (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('credit', 'void')),
    donor_id TEXT NOT NULL,
    session_id INTEGER,
    node_id TEXT,
    start_at REAL NOT NULL,
    end_at REAL NOT NULL,
    cpu_s REAL NOT NULL,
    gpu_s REAL NOT NULL,
    memory_byte_s REAL NOT NULL,
    w_cpu REAL NOT NULL,
    w_gpu REAL NOT NULL,
    w_memory REAL NOT NULL,
    credit REAL NOT NULL,
    voids_seq INTEGER,
    reason TEXT,
    recorded_at REAL NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_by_donor ON credit_ledger(donor_id, seq);
-- The fleet by state over time (the operator page's plot): one row per sampling interval.
CREATE TABLE IF NOT EXISTS fleet_samples (
    bucket INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    counts TEXT NOT NULL
);
-- Voids still in force (dgpt.credit.book): credit rows that close later, inside a window,
-- are voided as they are written. Not part of the chain: each void row it causes is.
CREATE TABLE IF NOT EXISTS credit_void_windows (
    id INTEGER PRIMARY KEY,
    donor_id TEXT NOT NULL,
    start_at REAL NOT NULL,
    end_at REAL NOT NULL,
    reason TEXT NOT NULL,
    held_until REAL NOT NULL
);
-- Credit over time (the operator page's plot) reads a recent window of the ledger.
CREATE INDEX IF NOT EXISTS credit_by_end ON credit_ledger(end_at);
CREATE INDEX IF NOT EXISTS sessions_by_donor ON sessions(donor_id, session_id);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_session ON sessions(donor_id) WHERE ended_at IS NULL;
"""

#: Columns added after a table was first created: (table, column, definition). Added to an
#: older file on open, so a newer head keeps every record of an older one.
_ADDED_COLUMNS = (
    ("donors", "node_ip", "TEXT"),
    ("donors", "ray_ports_json", "TEXT NOT NULL DEFAULT '[]'"),
    # Paused on the head: by whom (donor | operator), since when; NULL: not paused.
    ("donors", "paused_by", "TEXT"),
    ("donors", "paused_at", "REAL"),
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
        self._db = sqlite_connect(self.path)
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

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_tx(self._db, self._lock)

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
                       registered_at, last_heartbeat_at, token_id, node_ip, ray_ports_json, paused_by, paused_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(donor_id) DO UPDATE SET
                       name=excluded.name, device_class=excluded.device_class, owner=excluded.owner,
                       profile_json=excluded.profile_json, caps_json=excluded.caps_json,
                       labels_json=excluded.labels_json, state=excluded.state, target=excluded.target,
                       node_id=excluded.node_id, owner_active=excluded.owner_active,
                       drain_reason=excluded.drain_reason, drain_deadline_at=excluded.drain_deadline_at,
                       last_heartbeat_at=excluded.last_heartbeat_at, token_id=excluded.token_id,
                       node_ip=excluded.node_ip, ray_ports_json=excluded.ray_ports_json,
                       paused_by=excluded.paused_by, paused_at=excluded.paused_at""",
                (row.donor_id, row.secret_hash, row.name, row.device_class, row.owner, row.profile.model_dump_json(),
                 row.caps.model_dump_json(), json.dumps(row.labels), lc.state.value, lc.target.value, lc.node_id,
                 int(lc.owner_active), lc.drain_reason, lc.drain_deadline_at, row.registered_at,
                 row.last_heartbeat_at, row.token_id, row.node_ip, json.dumps(list(row.ray_ports)),
                 lc.paused_by.value if lc.paused_by else None, lc.paused_at),
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
                       drain_deadline_at=?, paused_by=?, paused_at=? WHERE donor_id=?""",
                (lc.state.value, lc.target.value, lc.node_id, int(lc.owner_active), lc.drain_reason,
                 lc.drain_deadline_at, lc.paused_by.value if lc.paused_by else None, lc.paused_at, donor_id),
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

    def ended_sessions(self, limit: int) -> list[tuple[str, SessionView]]:
        """The last ``limit`` sessions that ended, of any donor, by session id (loaded once, at start)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions WHERE ended_at IS NOT NULL ORDER BY session_id DESC LIMIT ?",
                                    (limit,)).fetchall()
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

    # ---------------------------------------------------------------- credit ledger

    def append_credit(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append rows to the credit ledger in one transaction, each chained to the one before.

        Each row has every column of ``dgpt.credit.chain.HASHED`` but ``seq`` and ``prev_hash``;
        they are given here, from the recorded tip (not the last row: rows removed from the
        end must not be papered over by the next append). Returns the rows as stored.
        """
        out: list[dict[str, Any]] = []
        with self._tx() as db:
            tip = self._credit_tip(db)
            for row in rows:
                stored = {**row, "seq": tip.seq + 1, "prev_hash": tip.hash}
                stored["hash"] = row_hash(stored)
                db.execute(f"INSERT INTO credit_ledger({', '.join(_LEDGER_COLUMNS)}) "
                           f"VALUES ({', '.join('?' * len(_LEDGER_COLUMNS))})",
                           tuple(stored[c] for c in _LEDGER_COLUMNS))
                tip = Tip(stored["seq"], stored["hash"])
                out.append(stored)
            if out:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('credit_tip', ?)",
                           (json.dumps([tip.seq, tip.hash]),))
        return out

    def save_fleet_samples(self, samples: Iterable[tuple[int, float, dict[str, int]]], keep: int) -> None:
        """Store fleet samples ``(bucket, at, counts by state)``, a later one replacing its
        bucket's; only the newest ``keep`` buckets are kept."""
        rows = [(bucket, at, json.dumps(counts, sort_keys=True)) for bucket, at, counts in samples]
        if not rows:
            return
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO fleet_samples(bucket, at, counts) VALUES (?,?,?)", rows)
            db.execute("DELETE FROM fleet_samples WHERE bucket <= "
                       "(SELECT bucket FROM fleet_samples ORDER BY bucket DESC LIMIT 1 OFFSET ?)", (keep,))

    def fleet_samples(self, limit: int) -> list[tuple[float, dict[str, int]]]:
        """The newest ``limit`` fleet samples, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT at, counts FROM fleet_samples ORDER BY bucket DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [(float(r["at"]), dict(json.loads(r["counts"]))) for r in reversed(rows)]

    def add_void_window(self, donor_id: str, start_at: float, end_at: float, reason: str, held_until: float,
                        now: float) -> None:
        """Keep a void in force until ``held_until`` (rows written later inside it are voided);
        the windows past their time at ``now`` are dropped in the same transaction."""
        with self._tx() as db:
            db.execute("DELETE FROM credit_void_windows WHERE held_until < ?", (now,))
            db.execute("INSERT INTO credit_void_windows(donor_id, start_at, end_at, reason, held_until) "
                       "VALUES (?,?,?,?,?)", (donor_id, start_at, end_at, reason, held_until))

    def void_windows(self, now: float) -> list[dict[str, Any]]:
        """The voids still in force at ``now``; those past their time are dropped."""
        with self._tx() as db:
            db.execute("DELETE FROM credit_void_windows WHERE held_until < ?", (now,))
            return [dict(r) for r in db.execute("SELECT * FROM credit_void_windows ORDER BY id").fetchall()]

    def credit_tip(self) -> Tip:
        """The ledger's recorded tip (row 0 and the genesis hash when empty)."""
        with self._lock:
            return self._credit_tip(self._db)

    @staticmethod
    def _credit_tip(db: sqlite3.Connection) -> Tip:
        row = db.execute("SELECT value FROM meta WHERE key='credit_tip'").fetchone()
        if row is None:
            return Tip()
        seq, digest = json.loads(row["value"] if isinstance(row, sqlite3.Row) else row[0])
        return Tip(int(seq), str(digest))

    def credit_rows(self, donor_id: str | None = None, after_seq: int = 0, limit: int | None = None,
                    latest: bool = False) -> list[dict[str, Any]]:
        """Ledger rows (of one donor, or all) after ``after_seq``, in order: the first ``limit``
        of them, or the last ``limit`` with ``latest``."""
        query = ("SELECT * FROM credit_ledger WHERE seq > ?" + (" AND donor_id = ?" if donor_id else "")
                 + " ORDER BY seq" + (" DESC" if latest else ""))
        args: tuple = (after_seq, donor_id) if donor_id else (after_seq,)
        if limit is not None:
            query += " LIMIT ?"
            args += (limit,)
        with self._lock:
            rows = [dict(r) for r in self._db.execute(query, args).fetchall()]
        return rows[::-1] if latest else rows

    def credit_by_bucket(self, since: float, step_s: float) -> dict[int, float]:
        """Credit (net of voids) of the ledger rows that end at ``since`` or later, summed per
        ``step_s`` bucket: bucket ``i`` covers ``[since + i*step_s, since + (i+1)*step_s)``."""
        if step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {step_s}")
        with self._lock:
            rows = self._db.execute(
                "SELECT CAST((end_at - ?) / ? AS INTEGER) AS b, SUM(credit) AS credit FROM credit_ledger "
                "WHERE end_at >= ? GROUP BY b", (since, step_s, since)).fetchall()
        return {int(r["b"]): float(r["credit"]) for r in rows}

    # ---------------------------------------------------------------- Serve

    def save_serve_apps(self, apps: list[dict[str, Any]], now: float) -> None:
        """Record the config-deployed Serve applications (re-applied after a head restart)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO serve_config(key, config_json, updated_at) VALUES ('apps', ?, ?)",
                       (json.dumps(apps, sort_keys=True), now))

    def serve_apps(self) -> list[dict[str, Any]]:
        """The Serve applications last recorded ([] when none)."""
        with self._lock:
            row = self._db.execute("SELECT config_json FROM serve_config WHERE key='apps'").fetchone()
        return list(json.loads(row["config_json"])) if row else []


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
            paused_by=PausedBy(r["paused_by"]) if r["paused_by"] else None, paused_at=r["paused_at"],
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


def read_ledger(path: Path | str) -> tuple[Iterator[dict[str, Any]], Tip]:
    """The ledger as the file holds it, through a connection of its own (read-only).

    Not the head's connection: a check must see the file (and its WAL: SQLite reads both),
    not what this process cached. Returns (the rows in ``seq`` order, the recorded tip).
    """
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    tip = RegistryStore._credit_tip(db)

    def rows() -> Iterator[dict[str, Any]]:
        try:
            for r in db.execute("SELECT * FROM credit_ledger ORDER BY seq"):
                yield dict(r)
        finally:
            db.close()

    return rows(), tip


_LEDGER_COLUMNS = ("seq", "kind", "donor_id", "session_id", "node_id", "start_at", "end_at", "cpu_s", "gpu_s",
                   "memory_byte_s", "w_cpu", "w_gpu", "w_memory", "credit", "voids_seq", "reason", "recorded_at",
                   "prev_hash", "hash")
