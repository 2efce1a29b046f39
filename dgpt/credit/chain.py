"""The credit ledger's hash chain: every row carries the hash of the row before it and its own.

    hash_n = sha256(hash_{n-1} || canonical_json(row_n without its hash))     hash_0 = 64 zeros

Rows are numbered 1, 2, 3, ... with no gap, and the tip (the last row's number and hash) is
recorded apart from the rows. :func:`verify` walks the rows in order and names the first one
that breaks the chain:

- its content was edited: its hash no longer matches its content;
- a row before it was removed: its number skips one, or its ``prev_hash`` is not the hash of
  the row before it;
- rows were removed from the end: the last row is not the recorded tip.

An edit that recomputes every later hash and the tip is not detected by the chain alone; an
earlier tip kept outside the file (a donor's copy of the tip its credit answer carried, an
operator's log) detects that too: pass it as ``anchor``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64

#: The columns a row's hash covers, in this order (every column but the hash itself).
HASHED = ("seq", "kind", "donor_id", "session_id", "node_id", "start_at", "end_at", "cpu_s", "gpu_s",
          "memory_byte_s", "w_cpu", "w_gpu", "w_memory", "credit", "voids_seq", "reason", "recorded_at", "prev_hash")


#: Columns stored as SQLite REAL: hashed as floats, so ``5`` and ``5.0`` hash alike (SQLite
#: returns a REAL either way).
REAL = frozenset({"start_at", "end_at", "cpu_s", "gpu_s", "memory_byte_s", "w_cpu", "w_gpu", "w_memory", "credit",
                  "recorded_at"})


def _canonical(key: str, value: Any) -> Any:
    if value is None:
        return None
    return float(value) if key in REAL else value


def row_hash(row: Mapping[str, Any]) -> str:
    """The hash of one row (its ``prev_hash`` included, so the chain links through it)."""
    body = json.dumps([_canonical(k, row[k]) for k in HASHED], separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(f"{row['prev_hash']}|{body}".encode()).hexdigest()


@dataclass(frozen=True)
class Tip:
    """The last row of the chain: its number and hash (``seq`` 0 and ``GENESIS`` when empty)."""

    seq: int = 0
    hash: str = GENESIS


@dataclass(frozen=True)
class ChainCheck:
    """What :func:`verify` found: ``ok``, else the first bad row's number and why."""

    ok: bool
    rows: int
    tip: Tip
    first_bad_seq: int | None = None
    problem: str | None = None


def verify(rows: Iterable[Mapping[str, Any]], recorded_tip: Tip | None, anchor: Tip | None = None) -> ChainCheck:
    """Check a ledger's rows, in ``seq`` order, against their hashes and the recorded tip.

    Args:
        rows: every row, in ascending ``seq``.
        recorded_tip: the tip the ledger recorded apart from its rows (None: not recorded).
        anchor: a tip seen earlier and kept elsewhere; it must still be in the chain.
    """
    prev = Tip()
    n = 0
    anchored = anchor is None or anchor.seq == 0

    def bad(seq: int, problem: str) -> ChainCheck:
        return ChainCheck(False, n, prev, seq, problem)

    for row in rows:
        seq = int(row["seq"])
        if seq != prev.seq + 1:
            return bad(prev.seq + 1, f"row {prev.seq + 1} is missing (the next row is {seq})")
        if row["prev_hash"] != prev.hash:
            return bad(seq, f"row {seq} does not follow row {prev.seq}: its prev_hash is not that row's hash")
        if row_hash(row) != row["hash"]:
            return bad(seq, f"row {seq} was edited: its content does not match its hash")
        if anchor is not None and seq == anchor.seq:
            if row["hash"] != anchor.hash:
                return bad(seq, f"row {seq} is not the row the anchor recorded (the chain was rewritten)")
            anchored = True
        prev = Tip(seq, str(row["hash"]))
        n += 1
    if recorded_tip is not None and recorded_tip != prev:
        if recorded_tip.seq > prev.seq:
            return ChainCheck(False, n, prev, prev.seq + 1,
                              f"rows {prev.seq + 1}..{recorded_tip.seq} were removed from the end (the recorded "
                              f"tip is row {recorded_tip.seq})")
        return ChainCheck(False, n, prev, recorded_tip.seq, f"the recorded tip (row {recorded_tip.seq}) does not "
                                                           f"match the last row {prev.seq}")
    if not anchored:
        assert anchor is not None
        return ChainCheck(False, n, prev, prev.seq + 1, f"the anchor's row {anchor.seq} is gone (the chain ends at "
                                                        f"row {prev.seq})")
    return ChainCheck(True, n, prev)
