"""The credit ledger as the head keeps it: metered intervals in, totals, RAC and voids out.

Storage is the registry's SQLite file (``dgpt.head.store``: table ``credit_ledger``), behind
the small :class:`LedgerStore` port; the book keeps per-donor totals and recent average credit
in memory, rebuilt from the rows when the control plane starts, and appends every change
before it counts it. Nothing is ever updated in place: a void is a new row that names the row
whose credit it takes back, so the chain (``dgpt.credit.chain``) covers voids too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dgpt.credit import rac as rac_
from dgpt.credit.chain import ChainCheck, Tip, verify
from dgpt.credit.meter import Interval
from dgpt.credit.unit import ResourceSeconds, Weights, credit_of
from dgpt.exceptions import NotFound
from dgpt.sdk.models import (
    CreditEntryView,
    CreditSummary,
    CreditVoidResponse,
    CreditWeights,
    DonorCredit,
    LedgerCheck,
    LedgerTip,
    SessionCredit,
)

#: Rows read per query when the book is rebuilt at start (bounded memory per query).
LOAD_PAGE = 10_000


class LedgerStore(Protocol):
    """What the book needs of storage (``dgpt.head.store.RegistryStore``)."""

    path: Path

    def append_credit(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def credit_rows(self, donor_id: str | None = None, after_seq: int = 0, limit: int | None = None,
                    latest: bool = False) -> list[dict[str, Any]]: ...

    def credit_tip(self) -> Tip: ...

    def add_void_window(self, donor_id: str, start_at: float, end_at: float, reason: str,
                        held_until: float, now: float) -> None: ...

    def void_windows(self, now: float) -> list[dict[str, Any]]: ...


LedgerReader = Callable[[], tuple[Iterator[dict[str, Any]], Tip]]


@dataclass
class _Session:
    used: ResourceSeconds = ResourceSeconds()
    credit: float = 0.0
    voided: float = 0.0
    entries: int = 0


@dataclass
class _Donor:
    used: ResourceSeconds = ResourceSeconds()
    credit: float = 0.0
    voided: float = 0.0
    rac: rac_.Rac = rac_.Rac()
    sessions: dict[int, _Session] = field(default_factory=dict)
    # Credit rows of this donor not voided yet: seq -> (session, start, end, credit).
    open_rows: dict[int, tuple[int | None, float, float, float]] = field(default_factory=dict)


def _weights_view(w: Weights) -> CreditWeights:
    return CreditWeights(cpu=w.cpu, gpu=w.gpu, memory=w.memory)


class CreditBook:
    """The ledger with its totals (thread-safe: the meter, the API and Ray callers share it).

    Args:
        store: the ledger's storage.
        reader: reads the ledger from its file through a connection of its own (for :meth:`verify`).
        on_change: called with (credit issued, credit voided) after each append (metrics).
        hold_s: how long a void stays in force past its window's end (or past the void, when
            later): at least the longest a metered interval stays open, so work metered
            inside the window but written after the void is voided too.
    """

    def __init__(self, store: LedgerStore, reader: LedgerReader, clock: Callable[[], float] = time.time,
                 on_change: Callable[[float, float], None] | None = None, hold_s: float = 3600.0) -> None:
        self.store = store
        self.hold_s = hold_s
        self.reader = reader
        self.clock = clock
        self.on_change = on_change or (lambda issued, voided: None)
        self._lock = threading.RLock()
        self._donors: dict[str, _Donor] = {}
        self._voided: set[int] = set()
        # Voids still in force (their rows in the store; read once here, kept up to date).
        self._windows: list[dict[str, Any]] = self.store.void_windows(self.clock())
        self._load()

    def _load(self) -> None:
        after = 0
        while True:
            rows = self.store.credit_rows(after_seq=after, limit=LOAD_PAGE)
            for row in rows:
                self._count(row)
            if len(rows) < LOAD_PAGE:
                break
            after = int(rows[-1]["seq"])
        # Rows written before a crash could void them: the windows still in force apply now.
        with self._lock:
            stored = self._append_voids(self._donors.keys())
        if stored:
            self.on_change(0.0, -sum(r["credit"] for r in stored))

    def _count(self, row: dict[str, Any]) -> None:
        """Reflect one stored row in memory (under the lock, or at load)."""
        d = self._donors.setdefault(row["donor_id"], _Donor())
        sid = row["session_id"]
        s = d.sessions.setdefault(int(sid), _Session()) if sid is not None else None
        credit = float(row["credit"])
        if row["kind"] == "credit":
            used = ResourceSeconds(float(row["cpu_s"]), float(row["gpu_s"]), float(row["memory_byte_s"]))
            d.used += used
            d.credit += credit
            d.rac = rac_.add(d.rac, credit, float(row["end_at"]))
            d.open_rows[int(row["seq"])] = (sid, float(row["start_at"]), float(row["end_at"]), credit)
            if s is not None:
                s.used += used
                s.credit += credit
                s.entries += 1
        else:  # a void: credit is the negative of the voided row's, granted at that row's end
            d.credit += credit
            d.voided -= credit
            d.rac = rac_.add(d.rac, credit, float(row["end_at"]))
            voided = int(row["voids_seq"])
            self._voided.add(voided)
            d.open_rows.pop(voided, None)
            if s is not None:
                s.credit += credit
                s.voided -= credit

    # ------------------------------------------------------------ writing

    def record(self, intervals: Iterable[Interval]) -> list[dict[str, Any]]:
        """Append metered intervals as credit rows; returns the stored rows."""
        now = self.clock()
        rows = [{
            "kind": "credit", "donor_id": i.donor_id, "session_id": i.session_id, "node_id": i.node_id,
            "start_at": i.start_at, "end_at": i.end_at, "cpu_s": i.used.cpu_s, "gpu_s": i.used.gpu_s,
            "memory_byte_s": i.used.memory_byte_s, "w_cpu": i.weights.cpu, "w_gpu": i.weights.gpu,
            "w_memory": i.weights.memory, "credit": credit_of(i.used, i.weights), "voids_seq": None, "reason": None,
            "recorded_at": now,
        } for i in intervals]
        if not rows:
            return []
        with self._lock:
            stored = self.store.append_credit(rows)
            for row in stored:
                self._count(row)
            voids = self._append_voids({r["donor_id"] for r in stored})
        self.on_change(sum(r["credit"] for r in stored), -sum(r["credit"] for r in voids))
        return stored

    def _void_rows(self, donor_id: str, start_at: float, end_at: float, reason: str,
                   now: float) -> list[dict[str, Any]]:
        """Void rows for the donor's unvoided rows overlapping ``[start_at, end_at]`` (under the lock)."""
        d = self._donors.get(donor_id)
        hits = sorted((seq, v) for seq, v in (d.open_rows.items() if d else ())
                      if v[1] <= end_at and v[2] >= start_at)
        return [{
            "kind": "void", "donor_id": donor_id, "session_id": sid, "node_id": None, "start_at": s0,
            "end_at": s1, "cpu_s": 0.0, "gpu_s": 0.0, "memory_byte_s": 0.0, "w_cpu": 0.0, "w_gpu": 0.0,
            "w_memory": 0.0, "credit": -credit, "voids_seq": seq, "reason": reason, "recorded_at": now,
        } for seq, (sid, s0, s1, credit) in hits]

    def _append_voids(self, donor_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Apply the windows still in force to these donors' rows (under the lock); the stored voids."""
        wanted = set(donor_ids)
        now = self.clock()
        self._windows = [w for w in self._windows if w["held_until"] >= now]
        rows: dict[int, dict[str, Any]] = {}  # by the voided row: one void each, the first window's reason
        for w in self._windows:
            if w["donor_id"] in wanted:
                for r in self._void_rows(w["donor_id"], w["start_at"], w["end_at"], w["reason"], now):
                    rows.setdefault(r["voids_seq"], r)
        stored = self.store.append_credit(list(rows.values())) if rows else []
        for row in stored:
            self._count(row)
        return stored

    def void(self, donor_id: str, start_at: float, end_at: float, reason: str) -> CreditVoidResponse:
        """Take back the credit of every row of ``donor_id`` overlapping ``[start_at, end_at]``.

        The void stays in force for ``hold_s`` past the window's end (or past now, when
        later): a row still being metered when the void came, and written later inside the
        window, is voided as it is written. Rows already voided are left as they are, so a
        repeated void changes nothing.
        """
        now = self.clock()
        with self._lock:
            rows = self._void_rows(donor_id, start_at, end_at, reason, now)
            stored = self.store.append_credit(rows) if rows else []
            for row in stored:
                self._count(row)
            held_until = max(end_at, now) + self.hold_s
            self.store.add_void_window(donor_id, start_at, end_at, reason, held_until, now)
            self._windows.append({"donor_id": donor_id, "start_at": start_at, "end_at": end_at, "reason": reason,
                                  "held_until": held_until})
        voided = -sum(r["credit"] for r in stored)
        if stored:
            self.on_change(0.0, voided)
        return CreditVoidResponse(donor_id=donor_id, voided_seqs=[int(r["voids_seq"]) for r in stored],
                                  voided_credit=voided)

    # ------------------------------------------------------------ reading

    def _entry(self, row: dict[str, Any]) -> CreditEntryView:
        return CreditEntryView(
            seq=row["seq"], kind=row["kind"], session_id=row["session_id"], node_id=row["node_id"],
            start_at=row["start_at"], end_at=row["end_at"], cpu_s=row["cpu_s"], gpu_s=row["gpu_s"],
            memory_byte_s=row["memory_byte_s"],
            weights=CreditWeights(cpu=row["w_cpu"], gpu=row["w_gpu"], memory=row["w_memory"]),
            credit=row["credit"], voided=row["seq"] in self._voided, voids_seq=row["voids_seq"],
            reason=row["reason"], recorded_at=row["recorded_at"], hash=row["hash"],
        )

    def donor(self, donor_id: str, weights: Weights | None = None, entries: int = 50,
              known: bool = False) -> DonorCredit:
        """A donor's credit now; ``entries``: how many of its latest rows to include.

        Raises:
            NotFound: the ledger has no row of this donor and ``known`` is false.
        """
        now = self.clock()
        with self._lock:
            d = self._donors.get(donor_id)
            if d is None and not known:
                raise NotFound(f"no credit recorded for donor {donor_id!r}", 404,
                               hint="list donors with `dgpt donor list`; credit appears once its raylet runs work")
            d = d or _Donor()
            rows = self.store.credit_rows(donor_id, limit=entries, latest=True) if entries else []
            tip = self.store.credit_tip()
            return DonorCredit(
                donor_id=donor_id, total_credit=d.credit, recent_average_credit=rac_.read(d.rac, now),
                voided_credit=d.voided, cpu_s=d.used.cpu_s, gpu_s=d.used.gpu_s, memory_byte_s=d.used.memory_byte_s,
                weights=_weights_view(weights) if weights is not None else None,
                sessions=[SessionCredit(session_id=sid, cpu_s=s.used.cpu_s, gpu_s=s.used.gpu_s,
                                        memory_byte_s=s.used.memory_byte_s, credit=s.credit, voided_credit=s.voided,
                                        entries=s.entries) for sid, s in sorted(d.sessions.items())],
                entries=[self._entry(r) for r in rows], tip=LedgerTip(seq=tip.seq, hash=tip.hash), as_of=now,
            )

    def summaries(self) -> list[CreditSummary]:
        """Every donor with credit rows, by donor id."""
        now = self.clock()
        with self._lock:
            return [CreditSummary(donor_id=k, total_credit=d.credit, recent_average_credit=rac_.read(d.rac, now),
                                  voided_credit=d.voided) for k, d in sorted(self._donors.items())]

    def total_issued(self) -> float:
        with self._lock:
            return sum(d.credit for d in self._donors.values())

    def verify(self, anchor: Tip | None = None) -> LedgerCheck:
        """Check the chain as the SQLite file holds it (a fresh read, WAL included)."""
        rows, tip = self.reader()
        check: ChainCheck = verify(rows, tip, anchor)
        return LedgerCheck(ok=check.ok, rows=check.rows, tip=LedgerTip(seq=check.tip.seq, hash=check.tip.hash),
                           first_bad_seq=check.first_bad_seq, problem=check.problem)
