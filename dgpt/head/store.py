"""The registry's SQLite database: donors, sessions and tokens, and the lifecycle rules on them.

Plain Python over one SQLite file in WAL mode; every public method is one transaction, so a
failed request leaves nothing half-written. The registry actor wraps this class; unit tests
use it directly on a real file. Times are passed in (``now``) so tests control the clock.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgpt.exceptions import AuthError, Conflict, NotFound
from dgpt.sdk.models import (
    DeviceProfile,
    DonorCaps,
    DonorView,
    Heartbeat,
    RegisterRequest,
    SessionView,
    TokenView,
)

SCHEMA_VERSION = 1

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

# States in which a donor is expected to run a raylet.
RUNNING_STATES = ("activating", "active", "draining")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class NodeObservation:
    """One Ray node as the registry sees it: which donor it belongs to and whether it lives."""

    node_id: str
    donor_id: str
    alive: bool


@dataclass(frozen=True)
class HeartbeatDecision:
    """What the store decided for one heartbeat; the registry turns it into the answer."""

    action: str  # standby | activate | drain | stop
    reason: str
    drain_deadline_s: float | None = None


class RegistryStore:
    """Donors, sessions and tokens in one SQLite file (WAL)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # executescript commits by itself, so it runs outside _tx.
        self._db.executescript(_SCHEMA)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

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
            TokenView(token_id=r["token_id"], kind=r["kind"], label=r["label"], created_at=r["created_at"], revoked_at=r["revoked_at"])
            for r in rows
        ]

    def revoke_token(self, token_id: str, now: float) -> None:
        with self._tx() as db:
            cur = db.execute("UPDATE tokens SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL", (now, token_id))
            if cur.rowcount == 0:
                raise NotFound(f"no active token {token_id!r}", 404, hint="list tokens with `dgpt token list`")

    # ---------------------------------------------------------------- donors

    def register(self, req: RegisterRequest, join_token: str | None, now: float) -> tuple[str, str, bool]:
        """Register a donor (or re-register a known one, keeping its id).

        Returns:
            (donor_id, donor_secret, reused)
        Raises:
            AuthError: the join token is not valid. Nothing is stored.
            Conflict: the donor id is known but the secret does not match.
        """
        token_id = self.check_token("join", join_token)
        with self._tx() as db:
            if req.donor_id is not None:
                row = db.execute("SELECT secret_hash FROM donors WHERE donor_id=?", (req.donor_id,)).fetchone()
                if row is not None:
                    if req.donor_secret is None or hash_secret(req.donor_secret) != row["secret_hash"]:
                        raise Conflict(
                            f"donor_id {req.donor_id!r} is registered with another secret",
                            409,
                            hint="remove the donor's state folder to join as a new donor",
                        )
                    db.execute(
                        """UPDATE donors SET name=?, device_class=?, owner=?, profile_json=?, caps_json=?,
                           labels_json=?, token_id=?, last_heartbeat_at=?,
                           state=CASE WHEN state IN ('gone','registered') THEN 'standby' ELSE state END
                           WHERE donor_id=?""",
                        (
                            req.name, req.device_class, req.owner, req.profile.model_dump_json(),
                            req.caps.model_dump_json(), json.dumps(req.labels), token_id, now, req.donor_id,
                        ),
                    )
                    return req.donor_id, req.donor_secret, True
            donor_id = req.donor_id or f"d-{uuid.uuid4().hex[:10]}"
            secret = req.donor_secret or secrets.token_urlsafe(32)
            db.execute(
                # New donors wait in standby until the autoscaler activates them.
                """INSERT INTO donors(donor_id, secret_hash, name, device_class, owner, profile_json, caps_json,
                   labels_json, state, target, registered_at, last_heartbeat_at, token_id)
                   VALUES (?,?,?,?,?,?,?,?, 'standby', 'standby', ?, ?, ?)""",
                (
                    donor_id, hash_secret(secret), req.name, req.device_class, req.owner,
                    req.profile.model_dump_json(), req.caps.model_dump_json(), json.dumps(req.labels), now, now, token_id,
                ),
            )
            return donor_id, secret, req.donor_id is not None

    def _row(self, db: sqlite3.Connection, donor_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM donors WHERE donor_id=?", (donor_id,)).fetchone()
        if row is None:
            raise NotFound(f"no donor {donor_id!r}", 404, hint="list donors with `dgpt status`")
        return row

    def authenticate_donor(self, donor_id: str, secret: str | None) -> None:
        """Raises NotFound for an unknown donor, AuthError for a wrong secret."""
        with self._lock:
            row = self._row(self._db, donor_id)
        if not secret or hash_secret(secret) != row["secret_hash"]:
            raise AuthError(f"wrong or missing secret for donor {donor_id!r}", 401, hint="re-join with `dgpt donor join`")

    def heartbeat(self, donor_id: str, hb: Heartbeat, now: float, drain_deadline_s: float) -> HeartbeatDecision:
        """Record a heartbeat and decide what the donor does next.

        Rules (``target`` is the autoscaler's choice, 'standby' until it activates the donor):
        - a donor the head is draining is told to drain;
        - a donor whose owner is active, or that is draining by itself, stays out;
        - a standby donor whose target is active is told to activate;
        - a running donor whose target is standby is told to drain.
        """
        with self._tx() as db:
            row = self._row(db, donor_id)
            state = row["state"]
            node_id = hb.node_id or row["node_id"]
            db.execute(
                "UPDATE donors SET last_heartbeat_at=?, owner_active=? WHERE donor_id=?",
                (now, int(hb.owner_active), donor_id),
            )
            if hb.state == "active" and hb.node_id:
                if state in ("standby", "activating", "gone", "registered"):
                    state = "active"
                db.execute("UPDATE donors SET state=?, node_id=? WHERE donor_id=?", (state, node_id, donor_id))
                self._open_session(db, donor_id, hb.node_id, now)
            elif hb.state in ("active", "starting") and state in ("standby", "gone", "registered"):
                # The raylet runs but the monitor has not matched its node yet.
                state = "activating"
                db.execute("UPDATE donors SET state='activating' WHERE donor_id=?", (donor_id,))
            elif hb.state == "standby":
                if state in RUNNING_STATES:
                    # The agent says its raylet is gone: close what was open.
                    how = "drained" if state == "draining" else "lost"
                    why = row["drain_reason"] if how == "drained" else "agent reported its raylet stopped"
                    self._close_session(db, donor_id, now, how, why or "drained")
                    state = "standby"
                elif state in ("gone", "registered"):
                    state = "standby"
                db.execute("UPDATE donors SET state=?, node_id=NULL, drain_reason=NULL WHERE donor_id=?", (state, donor_id))
            elif hb.state == "draining" and state != "draining":
                state = "draining"
                db.execute("UPDATE donors SET state='draining' WHERE donor_id=?", (donor_id,))

            if state == "draining" and hb.state in ("active", "starting"):
                deadline = row["drain_deadline_at"]
                left = max(1.0, deadline - now) if deadline else drain_deadline_s
                return HeartbeatDecision("drain", row["drain_reason"] or "drain requested by the head", left)
            if hb.owner_active or hb.state == "draining":
                return HeartbeatDecision("standby", hb.owner_reason or "owner active")
            if hb.state == "standby" and row["target"] == "active":
                db.execute("UPDATE donors SET state='activating' WHERE donor_id=?", (donor_id,))
                return HeartbeatDecision("activate", "idle donor activated")
            if hb.state in ("active", "starting") and row["target"] == "standby":
                self._begin_drain(db, donor_id, "autoscaler", now, drain_deadline_s)
                return HeartbeatDecision("drain", "autoscaler scaled down", drain_deadline_s)
            return HeartbeatDecision("standby" if hb.state == "standby" else "activate", "no change")

    def _begin_drain(self, db: sqlite3.Connection, donor_id: str, reason: str, now: float, deadline_s: float) -> None:
        db.execute(
            "UPDATE donors SET state='draining', drain_reason=?, drain_deadline_at=? WHERE donor_id=?",
            (reason, now + deadline_s, donor_id),
        )

    def begin_leave(self, donor_id: str, reason: str, now: float, deadline_s: float) -> tuple[str, str | None]:
        """Mark a donor as draining (it is leaving). Returns (state, node_id to drain or None)."""
        with self._tx() as db:
            row = self._row(db, donor_id)
            if row["state"] in RUNNING_STATES:
                self._begin_drain(db, donor_id, reason, now, deadline_s)
                return "draining", row["node_id"]
            # Not running: nothing to drain; it simply stays out.
            return row["state"], None

    def set_target(self, donor_id: str, target: str) -> None:
        if target not in ("active", "standby"):
            raise ValueError(f"target must be 'active' or 'standby', got {target!r}")
        with self._tx() as db:
            self._row(db, donor_id)
            db.execute("UPDATE donors SET target=? WHERE donor_id=?", (target, donor_id))

    def _open_session(self, db: sqlite3.Connection, donor_id: str, node_id: str, now: float) -> None:
        open_row = db.execute(
            "SELECT session_id, node_id FROM sessions WHERE donor_id=? AND ended_at IS NULL", (donor_id,)
        ).fetchone()
        if open_row is not None:
            if open_row["node_id"] == node_id:
                return
            # A new raylet while the old session is open: the old one died unseen.
            self._close_session(db, donor_id, now, "lost", "replaced by a new Ray node")
        db.execute("INSERT INTO sessions(donor_id, node_id, started_at) VALUES (?,?,?)", (donor_id, node_id, now))

    def _close_session(self, db: sqlite3.Connection, donor_id: str, now: float, how: str, why: str) -> None:
        db.execute(
            "UPDATE sessions SET ended_at=?, ended_as=?, end_reason=? WHERE donor_id=? AND ended_at IS NULL",
            (now, how, why, donor_id),
        )

    def reconcile(self, nodes: list[NodeObservation], now: float, heartbeat_timeout_s: float) -> list[tuple[str, str]]:
        """Align donors with Ray's node table and heartbeat silence.

        - a dead Ray node of a running donor ends its session: ``drained`` if the donor was
          draining, else ``lost``;
        - an alive node of a donor opens its session if none is open;
        - an active donor silent past the timeout ends ``lost`` and goes ``gone``.

        Returns:
            (donor_id, what happened) for every change, for the log.
        """
        changes: list[tuple[str, str]] = []
        by_donor: dict[str, list[NodeObservation]] = {}
        for node in nodes:
            by_donor.setdefault(node.donor_id, []).append(node)
        with self._tx() as db:
            for row in db.execute("SELECT * FROM donors").fetchall():
                donor_id, state = row["donor_id"], row["state"]
                observed = by_donor.get(donor_id, [])
                alive = [n for n in observed if n.alive]
                silent = row["last_heartbeat_at"] is None or now - row["last_heartbeat_at"] > heartbeat_timeout_s
                if state in RUNNING_STATES and silent:
                    self._close_session(db, donor_id, now, "lost", f"no heartbeat for {heartbeat_timeout_s:g}s")
                    db.execute("UPDATE donors SET state='gone', node_id=NULL, drain_reason=NULL WHERE donor_id=?", (donor_id,))
                    changes.append((donor_id, "lost: heartbeat timeout"))
                    continue
                if state not in RUNNING_STATES and state != "gone" and silent:
                    db.execute("UPDATE donors SET state='gone' WHERE donor_id=?", (donor_id,))
                    changes.append((donor_id, "gone: heartbeat timeout"))
                    continue
                node_id = row["node_id"]
                if node_id and any(n.node_id == node_id and not n.alive for n in observed):
                    how = "drained" if state == "draining" else "lost"
                    why = "Ray node died" if how == "lost" else (row["drain_reason"] or "drained")
                    self._close_session(db, donor_id, now, how, why)
                    db.execute(
                        "UPDATE donors SET state='standby', node_id=NULL, drain_reason=NULL WHERE donor_id=?",
                        (donor_id,),
                    )
                    changes.append((donor_id, f"{how}: node {node_id[:8]} dead"))
                    continue
                if alive and state in ("activating", "active", "draining"):
                    newest = alive[-1]
                    if state == "activating":
                        db.execute("UPDATE donors SET state='active', node_id=? WHERE donor_id=?", (newest.node_id, donor_id))
                        changes.append((donor_id, "active"))
                    self._open_session(db, donor_id, node_id or newest.node_id, now)
        return changes

    # ---------------------------------------------------------------- views

    def get_donor(self, donor_id: str, max_sessions: int = 50) -> DonorView:
        with self._lock:
            row = self._row(self._db, donor_id)
            sessions = self._db.execute(
                "SELECT * FROM sessions WHERE donor_id=? ORDER BY session_id DESC LIMIT ?", (donor_id, max_sessions)
            ).fetchall()
            stats = self._db.execute(
                """SELECT COUNT(*) AS n,
                          SUM(CASE WHEN ended_as='lost' THEN 1 ELSE 0 END) AS lost,
                          SUM(COALESCE(ended_at, ?) - started_at) AS up_s
                   FROM sessions WHERE donor_id=?""",
                (time.time(), donor_id),
            ).fetchone()
        return self._view(row, list(reversed(sessions)), stats)

    def list_donors(self, max_sessions: int = 20) -> list[DonorView]:
        with self._lock:
            ids = [r["donor_id"] for r in self._db.execute("SELECT donor_id FROM donors ORDER BY registered_at").fetchall()]
        return [self.get_donor(d, max_sessions) for d in ids]

    def sessions(self, donor_id: str | None = None) -> list[tuple[str, SessionView]]:
        """Every session (optionally of one donor): the data behind reliability and credit."""
        query = "SELECT * FROM sessions" + (" WHERE donor_id=?" if donor_id else "") + " ORDER BY session_id"
        with self._lock:
            rows = self._db.execute(query, (donor_id,) if donor_id else ()).fetchall()
        return [(r["donor_id"], _session(r)) for r in rows]

    def record_session(self, donor_id: str, started_at: float, ended_at: float, ended_as: str, node_id: str | None = None) -> None:
        """Insert a finished session (imports of history; tests seed reliability with it)."""
        if ended_as not in ("drained", "lost"):
            raise ValueError(f"ended_as must be 'drained' or 'lost', got {ended_as!r}")
        if ended_at < started_at:
            raise ValueError(f"ended_at {ended_at} is before started_at {started_at}")
        with self._tx() as db:
            self._row(db, donor_id)
            db.execute(
                "INSERT INTO sessions(donor_id, node_id, started_at, ended_at, ended_as, end_reason) VALUES (?,?,?,?,?,?)",
                (donor_id, node_id, started_at, ended_at, ended_as, "imported"),
            )

    def node_states(self) -> dict[str, dict[str, Any]]:
        """node_id -> {donor_id, state} for donors that run a raylet (routers read this)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT donor_id, node_id, state FROM donors WHERE node_id IS NOT NULL"
            ).fetchall()
        return {r["node_id"]: {"donor_id": r["donor_id"], "state": r["state"]} for r in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM donors GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def _view(self, row: sqlite3.Row, sessions: list[sqlite3.Row], stats: sqlite3.Row) -> DonorView:
        caps = DonorCaps.model_validate_json(row["caps_json"])
        profile = DeviceProfile.model_validate_json(row["profile_json"])
        labels = json.loads(row["labels_json"])
        return DonorView(
            donor_id=row["donor_id"],
            name=row["name"],
            state=row["state"],
            device_class=row["device_class"],
            owner=row["owner"],
            node_id=row["node_id"],
            profile=profile,
            caps=caps,
            resources=donor_resources(caps),
            labels={**labels, **donor_labels(row["donor_id"], row["device_class"], row["owner"], profile, caps)},
            registered_at=row["registered_at"],
            last_heartbeat_at=row["last_heartbeat_at"],
            owner_active=bool(row["owner_active"]),
            sessions=[_session(s) for s in sessions],
            stats={
                "sessions": stats["n"] or 0,
                "sessions_lost": stats["lost"] or 0,
                "uptime_s": round(stats["up_s"] or 0.0, 1),
                "target": row["target"],
                "drain_reason": row["drain_reason"],
            },
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


def donor_resources(caps: DonorCaps) -> dict[str, float]:
    """The Ray resources a donor's caps grant (DESIGN: `donor` plus CPU, GPU, memory)."""
    res = {"CPU": float(caps.cpus), "memory": float(caps.memory_bytes), "donor": 1.0}
    if caps.gpus:
        res["GPU"] = float(caps.gpus)
    return res


def donor_labels(donor_id: str, device_class: str, owner: str, profile: DeviceProfile, caps: DonorCaps) -> dict[str, str]:
    """The dgpt.io/* node labels of a donor (DESIGN's naming contract)."""
    gpu = "none"
    if caps.gpus and profile.gpus:
        gpu = _label_safe(profile.gpus[0].name)
    return {
        "dgpt.io/donor-id": donor_id,
        "dgpt.io/device-class": device_class,
        "dgpt.io/role": "donor",
        "dgpt.io/owner": owner,
        "dgpt.io/gpu": gpu,
    }


def _label_safe(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-_.")
    return out[:63] or "unknown"
