"""The trust store on a real SQLite file, beside the registry's own tables; and the drill switch."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dgpt.exceptions import ConfigError
from dgpt.head.store import RegistryStore
from dgpt.verify.fault import FAULT_INJECT_ENV, FaultMode, apply, fault_mode, perturb
from dgpt.verify.policy import DEFAULT_TRUST, Outcome, Tolerance, same
from dgpt.verify.trust import DonorOutcome, TrustBook


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def raw(path: Path, sql: str, *params: object) -> list[tuple]:
    """Rows as another process reads them: a connection of its own on the file."""
    db = sqlite3.connect(str(path))
    try:
        return [tuple(r) for r in db.execute(sql, params).fetchall()]
    finally:
        db.close()


def test_outcomes_land_in_the_file_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with TrustBook(path, clock=Clock()) as book:
        records = book.record([
            DonorOutcome("honest", "t1", Outcome.VALID, "agreed", "node-h"),
            DonorOutcome("liar", "t1", Outcome.INVALID, "the trusted node's result differs", "node-l"),
        ])
        assert {r.donor_id for r in records} == {"honest", "liar"}
    rows = raw(path, "SELECT donor_id, valid, invalid, consecutive_valid, trust FROM verify_trust ORDER BY donor_id")
    assert rows == [("honest", 1, 0, 1, pytest.approx(0.525)), ("liar", 0, 1, 0, pytest.approx(0.1))]
    outcomes = raw(path, "SELECT donor_id, task_id, outcome, reason, node_id FROM verify_outcomes ORDER BY id")
    assert outcomes == [("honest", "t1", "valid", "agreed", "node-h"),
                        ("liar", "t1", "invalid", "the trusted node's result differs", "node-l")]
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]
    with TrustBook(path) as again:
        liar = again.summary("liar")
        assert liar is not None and liar.state.invalid == 1 and liar.trust < DEFAULT_TRUST.low
        assert [(e.task_id, e.outcome) for e in liar.recent] == [("t1", Outcome.INVALID)]
        assert again.score("honest") == pytest.approx(0.525)
        assert again.score("never-checked") is None and again.summary("never-checked") is None
        assert again.scores() == {"honest": pytest.approx(0.525), "liar": pytest.approx(0.1)}
        assert [r.donor_id for r in again.all()] == ["honest", "liar"]
        assert again.all()[0].recent == () and len(again.all(with_recent=True)[0].recent) == 1


def test_one_batch_applies_in_order(tmp_path: Path) -> None:
    with TrustBook(tmp_path / "t.sqlite") as book:
        book.record([DonorOutcome("d", f"t{i}", Outcome.VALID) for i in range(3)] +
                    [DonorOutcome("d", "t3", Outcome.INVALID), DonorOutcome("d", "t4", Outcome.VALID)])
        rec = book.summary("d")
        assert rec is not None
        assert (rec.state.valid, rec.state.invalid, rec.state.consecutive_valid) == (4, 1, 1)
        assert [e.task_id for e in rec.recent] == ["t4", "t3", "t2", "t1", "t0"]  # newest first


def test_only_the_latest_outcomes_are_kept_per_donor(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with TrustBook(path, keep_recent=3) as book:
        for i in range(10):
            book.record([DonorOutcome("d", f"t{i}", Outcome.VALID), DonorOutcome("e", f"t{i}", Outcome.VALID)])
        rec = book.summary("d")
        assert rec is not None and rec.state.valid == 10
    assert raw(path, "SELECT task_id FROM verify_outcomes WHERE donor_id = 'd' ORDER BY id") == [("t7",), ("t8",), ("t9",)]
    assert raw(path, "SELECT COUNT(*) FROM verify_outcomes") == [(6,)]


def test_it_shares_the_registry_database_and_waits_for_its_writers(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    store = RegistryStore(path)
    book = TrustBook(path)
    try:
        tables = {r[0] for r in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"donors", "sessions", "credit_ledger", "verify_trust", "verify_outcomes"} <= tables
        # Another connection holds the write lock for a moment (the registry flushing).
        other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        released = threading.Event()

        def release() -> None:
            time.sleep(0.5)
            other.execute("COMMIT")
            released.set()

        threading.Thread(target=release).start()
        book.record([DonorOutcome("d", "t", Outcome.VALID)])  # waits for the lock, then writes
        assert released.is_set()
        other.close()
        assert raw(path, "SELECT donor_id, valid FROM verify_trust") == [("d", 1)]
    finally:
        book.close()
        store.close()


def test_outcomes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="donor_id"):
        DonorOutcome("", "t", Outcome.VALID)
    with pytest.raises(ValueError, match="task_id"):
        DonorOutcome("d", "", Outcome.VALID)
    with pytest.raises(ValueError):
        DonorOutcome("d", "t", "so-so")  # type: ignore[arg-type]
    assert DonorOutcome("d", "t", "valid").outcome is Outcome.VALID  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_recent"):
        TrustBook(tmp_path / "t.sqlite", keep_recent=0)


def test_a_long_reason_is_cut(tmp_path: Path) -> None:
    with TrustBook(tmp_path / "t.sqlite") as book:
        book.record([DonorOutcome("d", "t", Outcome.ERROR, "x" * 5000)])
        rec = book.summary("d")
        assert rec is not None and len(rec.recent[0].reason) == 300


def test_as_dict_is_plain_data() -> None:
    from dgpt.verify.policy import TrustState
    from dgpt.verify.trust import OutcomeEntry, TrustRecord

    rec = TrustRecord("d", TrustState(valid=2, consecutive_valid=2, trust=0.55), 5.0,
                      (OutcomeEntry("t", Outcome.VALID, "ok", "n", 4.0),))
    assert rec.as_dict() == {"donor_id": "d", "trust": 0.55, "valid": 2, "invalid": 0, "errors": 0, "inconclusive": 0,
                             "consecutive_valid": 2, "updated_at": 5.0,
                             "recent": [{"task_id": "t", "outcome": "valid", "reason": "ok", "node_id": "n", "at": 4.0}]}


# ----- the drill switch ------------------------------------------------------------------


def test_the_drill_switch_reads_its_variable() -> None:
    assert fault_mode({}) is None
    assert fault_mode({FAULT_INJECT_ENV: ""}) is None
    assert fault_mode({FAULT_INJECT_ENV: "wrong-results"}) is FaultMode.WRONG_RESULTS
    with pytest.raises(ConfigError, match="(?s)DGPT_FAULT_INJECT='sometimes'.*wrong-results"):
        fault_mode({FAULT_INJECT_ENV: "sometimes"})
    assert apply(41, {}) == 41
    assert apply(41, {FAULT_INJECT_ENV: "wrong-results"}) == 42


@pytest.mark.parametrize("value", [
    None, True, 0, 7, 2.5, -0.0, float("inf"), float("nan"), 1j, "", "text", b"", b"\x01", [], [1, 2], (), ("a",),
    {}, {"k": 1.0}, {1, 2}, frozenset(), np.arange(4.0), np.arange(3), np.array([True]), np.float32(1.5),
    np.array(["x"]), torch.ones(3), torch.arange(3), torch.tensor([True]),
])
def test_a_perturbed_result_differs_under_any_comparison(value: object) -> None:
    wrong = perturb(value)
    assert not same(value, wrong)
    assert not same(value, wrong, Tolerance(rtol=0.1, atol=0.1))
