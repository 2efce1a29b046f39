"""The trust store: each donor's verification record, durable in a SQLite file.

Two tables of their own in whatever SQLite file the caller names (the head keeps them in
its registry database, ``$DGPT_HOME/head/registry.sqlite``, beside the donors and the credit
ledger):

- ``verify_trust``: one row per donor: valid, invalid, error and inconclusive counts, the
  run of consecutive valid results, the trust score and when it last changed;
- ``verify_outcomes``: the donor's latest outcomes (task id, outcome, reason, node, when),
  ``keep_recent`` per donor, older ones pruned in the same transaction.

The file is shared with the registry's own connection, so every write is one short
``BEGIN IMMEDIATE`` transaction over a WAL-mode connection with a busy timeout
(``dgpt.sqlite``), and nothing is held open between calls. The scores follow
``dgpt.verify.policy.advance``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dgpt.sqlite import connect, immediate
from dgpt.verify.policy import DEFAULT_TRUST, Outcome, TrustParams, TrustState, advance

__all__ = ["DonorOutcome", "OutcomeEntry", "TrustBook", "TrustPort", "TrustRecord"]

#: Outcomes kept per donor: enough for a donor's page and an operator's look, bounded.
KEEP_RECENT = 20
#: Longest reason stored (an exception's message can be long).
MAX_REASON = 300

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verify_trust (
    donor_id TEXT PRIMARY KEY,
    valid INTEGER NOT NULL DEFAULT 0,
    invalid INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    inconclusive INTEGER NOT NULL DEFAULT 0,
    consecutive_valid INTEGER NOT NULL DEFAULT 0,
    trust REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verify_outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    donor_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('valid', 'invalid', 'error', 'inconclusive')),
    reason TEXT NOT NULL DEFAULT '',
    node_id TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verify_outcomes_by_donor ON verify_outcomes (donor_id, id);
"""


@dataclass(frozen=True, slots=True)
class DonorOutcome:
    """One donor's outcome on one verified task or shadowed request (what gets recorded)."""

    donor_id: str
    task_id: str
    outcome: Outcome
    reason: str = ""
    node_id: str | None = None
    at: float | None = None  # when it was judged; the store's clock when omitted

    def __post_init__(self) -> None:
        if not self.donor_id:
            raise ValueError("DonorOutcome.donor_id must not be empty")
        if not self.task_id:
            raise ValueError("DonorOutcome.task_id must not be empty")
        object.__setattr__(self, "outcome", Outcome(self.outcome))


@dataclass(frozen=True, slots=True)
class OutcomeEntry:
    """One stored outcome of a donor."""

    task_id: str
    outcome: Outcome
    reason: str
    node_id: str | None
    at: float


@dataclass(frozen=True, slots=True)
class TrustRecord:
    """A donor's verification record: counts, trust score, latest outcomes (newest first)."""

    donor_id: str
    state: TrustState
    updated_at: float
    recent: tuple[OutcomeEntry, ...] = field(default=())

    @property
    def trust(self) -> float:
        return self.state.trust

    def as_dict(self) -> dict[str, object]:
        """Plain data for an API answer or a Ray reply."""
        s = self.state
        return {
            "donor_id": self.donor_id, "trust": round(s.trust, 4), "valid": s.valid, "invalid": s.invalid,
            "errors": s.errors, "inconclusive": s.inconclusive, "consecutive_valid": s.consecutive_valid,
            "updated_at": self.updated_at,
            "recent": [{"task_id": e.task_id, "outcome": e.outcome.value, "reason": e.reason, "node_id": e.node_id,
                        "at": e.at} for e in self.recent],
        }


class TrustPort(Protocol):
    """What the verify runner and Serve's shadow comparison need of a trust store."""

    def records(self, donor_ids: Iterable[str]) -> dict[str, TrustRecord]: ...

    def record(self, outcomes: Iterable[DonorOutcome]) -> list[TrustRecord]: ...


def _state(r: sqlite3.Row) -> TrustState:
    return TrustState(valid=r["valid"], invalid=r["invalid"], errors=r["errors"], inconclusive=r["inconclusive"],
                      consecutive_valid=r["consecutive_valid"], trust=r["trust"])


def _entry(r: sqlite3.Row) -> OutcomeEntry:
    return OutcomeEntry(r["task_id"], Outcome(r["outcome"]), r["reason"], r["node_id"], r["at"])


class TrustBook:
    """Per-donor trust records in the SQLite file at ``path`` (thread-safe; one connection).

    Args:
        path: the SQLite file (created with its tables if missing).
        params: how scores move.
        clock: Unix seconds (tests pass a fake).
        keep_recent: outcomes kept per donor.
    """

    def __init__(self, path: Path | str, params: TrustParams = DEFAULT_TRUST,
                 clock: Callable[[], float] = time.time, keep_recent: int = KEEP_RECENT) -> None:
        if keep_recent < 1:
            raise ValueError(f"keep_recent must be >= 1, got {keep_recent!r}")
        self.path = Path(path)
        self.params = params
        self.clock = clock
        self.keep_recent = keep_recent
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(self.path)
        with immediate(self._db, self._lock) as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TrustBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ writing

    def record(self, outcomes: Iterable[DonorOutcome]) -> list[TrustRecord]:
        """Fold ``outcomes`` into their donors' records, in one transaction; returns them.

        Outcomes apply in the order given, so a donor's run of valid results counts right
        when one batch holds several of its outcomes.
        """
        batch = list(outcomes)
        if not batch:
            return []
        now = self.clock()
        with immediate(self._db, self._lock) as db:
            states: dict[str, TrustState | None] = {}
            for o in batch:
                if o.donor_id not in states:
                    row = db.execute("SELECT * FROM verify_trust WHERE donor_id = ?", (o.donor_id,)).fetchone()
                    states[o.donor_id] = _state(row) if row is not None else None
                states[o.donor_id] = advance(states[o.donor_id], o.outcome, self.params)
                db.execute(
                    "INSERT INTO verify_outcomes (donor_id, task_id, outcome, reason, node_id, at) VALUES (?, ?, ?, ?, ?, ?)",
                    (o.donor_id, o.task_id, o.outcome.value, o.reason[:MAX_REASON], o.node_id,
                     o.at if o.at is not None else now))
            for donor_id, s in states.items():
                assert s is not None  # every donor in the batch advanced at least once
                db.execute(
                    "INSERT INTO verify_trust (donor_id, valid, invalid, errors, inconclusive, consecutive_valid, trust,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(donor_id) DO UPDATE SET"
                    " valid = excluded.valid, invalid = excluded.invalid, errors = excluded.errors,"
                    " inconclusive = excluded.inconclusive, consecutive_valid = excluded.consecutive_valid,"
                    " trust = excluded.trust, updated_at = excluded.updated_at",
                    (donor_id, s.valid, s.invalid, s.errors, s.inconclusive, s.consecutive_valid, s.trust, now))
                db.execute(
                    "DELETE FROM verify_outcomes WHERE donor_id = ? AND id NOT IN"
                    " (SELECT id FROM verify_outcomes WHERE donor_id = ? ORDER BY id DESC LIMIT ?)",
                    (donor_id, donor_id, self.keep_recent))
        return list(self.records(states).values())

    # ------------------------------------------------------------ reading

    def _recent(self, donor_ids: Sequence[str] | None) -> dict[str, list[OutcomeEntry]]:
        """Latest outcomes, newest first, of ``donor_ids`` (at most 500), or of every donor."""
        if donor_ids is None:
            rows = self._db.execute("SELECT * FROM verify_outcomes ORDER BY id DESC").fetchall()
        else:
            marks = ",".join("?" * len(donor_ids))
            rows = self._db.execute(f"SELECT * FROM verify_outcomes WHERE donor_id IN ({marks}) ORDER BY id DESC",
                                    tuple(donor_ids)).fetchall()
        out: dict[str, list[OutcomeEntry]] = {}
        for r in rows:
            out.setdefault(r["donor_id"], []).append(_entry(r))
        return out

    def records(self, donor_ids: Iterable[str]) -> dict[str, TrustRecord]:
        """The records of those of ``donor_ids`` that have one (donors never checked are absent)."""
        ids = sorted(set(donor_ids))
        out: dict[str, TrustRecord] = {}
        with self._lock:
            for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT * FROM verify_trust WHERE donor_id IN ({marks})", chunk).fetchall()
                recent = self._recent([r["donor_id"] for r in rows]) if rows else {}
                for r in rows:
                    out[r["donor_id"]] = TrustRecord(r["donor_id"], _state(r), r["updated_at"],
                                                     tuple(recent.get(r["donor_id"], ())))
        return out

    def summary(self, donor_id: str) -> TrustRecord | None:
        """One donor's record with its latest outcomes; None if it was never checked."""
        return self.records([donor_id]).get(donor_id)

    def score(self, donor_id: str) -> float | None:
        """A donor's trust score; None if it was never checked (callers treat it as unknown)."""
        with self._lock:
            row = self._db.execute("SELECT trust FROM verify_trust WHERE donor_id = ?", (donor_id,)).fetchone()
        return float(row["trust"]) if row is not None else None

    def scores(self) -> dict[str, float]:
        """Every checked donor's trust score, in one query (for ``node_states`` each second)."""
        with self._lock:
            rows = self._db.execute("SELECT donor_id, trust FROM verify_trust").fetchall()
        return {r["donor_id"]: float(r["trust"]) for r in rows}

    def all(self, with_recent: bool = False) -> list[TrustRecord]:
        """Every donor's record, by donor id; their latest outcomes only with ``with_recent``."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM verify_trust ORDER BY donor_id").fetchall()
            recent = self._recent(None) if with_recent and rows else {}
        return [TrustRecord(r["donor_id"], _state(r), r["updated_at"], tuple(recent.get(r["donor_id"], ())))
                for r in rows]
