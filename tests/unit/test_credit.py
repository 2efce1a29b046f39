"""Credit without Ray: metering integration, BOINC weights, RAC decay, the hash chain, and the
ledger on a real SQLite file (edited behind the head's back, WAL included), driven through a
real registry with a fake node table and a fake clock."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.credit import rac
from dgpt.credit.book import CreditBook
from dgpt.credit.chain import GENESIS, Tip, row_hash, verify
from dgpt.credit.meter import Interval, MeterState, Running, Used, flush, step
from dgpt.credit.unit import (
    CREDITS_PER_GFLOPS_DAY,
    ResourceSeconds,
    Weights,
    credit_of,
    weights_for,
)
from dgpt.head.metering import Metering
from dgpt.head.ray_adapter import NodeUsage
from dgpt.head.registry import Registry
from dgpt.head.store import RegistryStore, read_ledger
from dgpt.sdk.models import DeviceProfile, RegisterResponse
from tests.unit.test_registry import GIB, Clock, FakeRay, _activate, _registry, _request

W = Weights(cpu=0.01, gpu=0.5, memory=0.0)
DAY = 86_400.0


def _run(node: str = "n1", donor: str = "d1", session: int = 1, w: Weights = W) -> Running:
    return Running(node, donor, session, w)


# ---------------------------------------------------------------- metering


def test_meter_integrates_held_samples_and_closes_full_intervals() -> None:
    s = MeterState()
    running = {"n1": _run()}
    s, out = step(s, 0.0, running, {"n1": Used(cpus=2)}, interval_s=10, max_gap_s=8)
    assert out == []
    s, out = step(s, 4.0, running, {"n1": Used(cpus=1, memory_bytes=GIB)}, interval_s=10, max_gap_s=8)
    assert out == []
    s, out = step(s, 10.0, running, {"n1": Used()}, interval_s=10, max_gap_s=8)
    # 2 CPUs held 0..4, 1 CPU and 1 GiB 4..10: a zero-order hold of each sample.
    assert out == [Interval("d1", 1, "n1", 0.0, 10.0, ResourceSeconds(2 * 4 + 1 * 6, 0.0, GIB * 6), W)]
    s, out = step(s, 20.0, running, {"n1": Used()}, interval_s=10, max_gap_s=15)
    assert out == [], "an interval in which nothing ran writes no row"


def test_meter_closes_a_session_that_ended_and_opens_the_next() -> None:
    s, _ = step(MeterState(), 0.0, {"n1": _run(session=1)}, {"n1": Used(cpus=1)}, interval_s=60, max_gap_s=5)
    s, out = step(s, 3.0, {"n1": _run(session=2)}, {"n1": Used(gpus=1)}, interval_s=60, max_gap_s=5)
    assert out == [Interval("d1", 1, "n1", 0.0, 3.0, ResourceSeconds(3.0), W)]
    s, out = step(s, 5.0, {}, {}, interval_s=60, max_gap_s=5)
    assert out == [Interval("d1", 2, "n1", 3.0, 5.0, ResourceSeconds(0.0, 2.0), W)]
    assert s.open == {}


def test_a_gap_longer_than_max_gap_is_not_metered_and_flush_drops_nothing() -> None:
    running = {"n1": _run()}
    s, _ = step(MeterState(), 0.0, running, {"n1": Used(cpus=1)}, interval_s=100, max_gap_s=5)
    s, _ = step(s, 2.0, running, {"n1": Used(cpus=1)}, interval_s=100, max_gap_s=5)
    s, _ = step(s, 50.0, running, {"n1": Used(cpus=1)}, interval_s=100, max_gap_s=5)  # 48 s unseen
    s, out = flush(s, 51.0, max_gap_s=5)
    assert out == [Interval("d1", 1, "n1", 0.0, 51.0, ResourceSeconds(2.0 + 1.0), W)]


def test_a_re_profiled_donor_closes_its_interval_at_the_old_weights() -> None:
    s, _ = step(MeterState(), 0.0, {"n1": _run()}, {"n1": Used(cpus=1)}, interval_s=60, max_gap_s=5)
    faster = Weights(cpu=0.02, gpu=0.0)
    s, out = step(s, 2.0, {"n1": _run(w=faster)}, {"n1": Used(cpus=1)}, interval_s=60, max_gap_s=5)
    assert out == [Interval("d1", 1, "n1", 0.0, 2.0, ResourceSeconds(2.0), W)]
    assert s.open["n1"].running.weights == faster


@settings(max_examples=200, deadline=None)
@given(dt=st.floats(0.2, 3.0), phase=st.floats(0, 1), start=st.floats(0, 50), duration=st.floats(0.01, 40),
       cpus=st.sampled_from([0.5, 1.0, 2.0]))
def test_sampling_error_of_one_allocation_is_under_one_interval(dt: float, phase: float, start: float,
                                                                duration: float, cpus: float) -> None:
    """The bound the meter's docstring states: |metered - r*D| < r*dt for one allocation."""
    s = MeterState()
    running = {"n1": _run()}
    t = phase * dt
    while t < start + duration + 3 * dt:
        held = cpus if start <= t < start + duration else 0.0
        s, _ = step(s, t, running, {"n1": Used(cpus=held)}, interval_s=1e9, max_gap_s=10)
        t += dt
    s, out = flush(s, t, max_gap_s=10)
    metered = sum(i.used.cpu_s for i in out)
    assert abs(metered - cpus * duration) < cpus * dt + 1e-9


def test_used_is_total_minus_available_and_never_negative() -> None:
    assert Used.of({"CPU": 4.0, "GPU": 1.0, "memory": 8.0}, {"CPU": 1.5, "GPU": 1.0, "memory": 2.0}) == Used(2.5, 0, 6)
    assert Used.of({"CPU": 2.0}, {"CPU": 3.0}) == Used(0.0, 0.0, 0.0)
    # Ray's maps omit zero amounts: every CPU busy reads as no CPU entry in ``available``.
    assert Used.of({"CPU": 2.0, "memory": 4.0}, {"memory": 4.0}) == Used(2.0, 0.0, 0.0)


# ---------------------------------------------------------------- weights


def test_a_one_gflops_device_busy_for_a_day_earns_200_credits() -> None:
    w = weights_for(DeviceProfile(cpus=4, memory_bytes=8 * GIB, cpu_gflops=1.0))
    assert credit_of(ResourceSeconds(cpu_s=4 * DAY), w) == pytest.approx(CREDITS_PER_GFLOPS_DAY, rel=1e-12)
    gpu = weights_for(DeviceProfile(cpus=8, memory_bytes=8 * GIB, cpu_gflops=80.0, gpu_gflops=1000.0))
    assert credit_of(ResourceSeconds(gpu_s=DAY), gpu) == pytest.approx(200_000.0, rel=1e-12)
    assert credit_of(ResourceSeconds(memory_byte_s=GIB * DAY), gpu) == 0.0, "memory is metered, not credited"


def test_credit_is_resource_seconds_times_weight_exactly() -> None:
    used = ResourceSeconds(cpu_s=123.25, gpu_s=7.5, memory_byte_s=3.0 * GIB)
    w = weights_for(DeviceProfile(cpus=6, memory_bytes=8 * GIB, cpu_gflops=37.3, gpu_gflops=912.0))
    assert credit_of(used, w) == used.cpu_s * w.cpu + used.gpu_s * w.gpu + used.memory_byte_s * w.memory


# ---------------------------------------------------------------- recent average credit


def test_rac_of_a_steady_rate_tends_to_that_rate_and_halves_each_week() -> None:
    state = rac.Rac()
    per_hour = 10.0  # 240 credits per day
    for hour in range(24 * 7 * 8):  # eight weeks
        state = rac.add(state, per_hour, hour * 3600.0)
    assert rac.read(state, state.at) == pytest.approx(240.0, rel=0.01)
    week_later = rac.read(state, state.at + rac.HALF_LIFE_S)
    assert week_later == pytest.approx(rac.read(state, state.at) / 2, rel=1e-12)


def test_rac_does_not_depend_on_the_order_and_a_void_cancels_exactly() -> None:
    grants = [(5.0, 100.0), (2.0, 5000.0), (9.0, 2_000.0)]
    forward = rac.Rac()
    for c, t in grants:
        forward = rac.add(forward, c, t)
    backward = rac.Rac()
    for c, t in reversed(grants):
        backward = rac.add(backward, c, t)
    assert rac.read(forward, 10_000) == pytest.approx(rac.read(backward, 10_000), rel=1e-12)
    voided = rac.add(forward, -2.0, 5000.0)
    only = rac.add(rac.add(rac.Rac(), 5.0, 100.0), 9.0, 2000.0)
    assert rac.read(voided, 9e5) == pytest.approx(rac.read(only, 9e5), rel=1e-12)
    assert math.isclose(rac.read(rac.Rac(), 1e9), 0.0)


# ---------------------------------------------------------------- the chain


def _rows(n: int) -> list[dict]:
    rows, prev = [], Tip()
    for seq in range(1, n + 1):
        row = {"seq": seq, "kind": "credit", "donor_id": "d1", "session_id": 1, "node_id": "n", "start_at": seq,
               "end_at": seq + 1, "cpu_s": 1.0, "gpu_s": 0.0, "memory_byte_s": 0.0, "w_cpu": 0.1, "w_gpu": 0.0,
               "w_memory": 0.0, "credit": 0.1, "voids_seq": None, "reason": None, "recorded_at": seq,
               "prev_hash": prev.hash}
        row["hash"] = row_hash(row)
        prev = Tip(seq, row["hash"])
        rows.append(row)
    return rows


def test_the_chain_names_the_first_edited_removed_or_truncated_row() -> None:
    rows = _rows(5)
    tip = Tip(5, rows[-1]["hash"])
    assert verify(rows, tip).ok and verify([], Tip()).ok and verify([], None).tip.hash == GENESIS
    edited = [dict(r) for r in rows]
    edited[2]["credit"] = 100.0
    assert verify(edited, tip).first_bad_seq == 3 and "edited" in str(verify(edited, tip).problem)
    removed = rows[:1] + rows[2:]
    assert verify(removed, tip).first_bad_seq == 2 and "missing" in str(verify(removed, tip).problem)
    truncated = verify(rows[:3], tip)
    assert not truncated.ok and truncated.first_bad_seq == 4 and "removed from the end" in str(truncated.problem)
    # Rewritten from row 2 on with every hash recomputed: only a tip kept elsewhere shows it.
    forged = [dict(r) for r in rows]
    forged[1]["credit"] = 50.0
    for i in range(1, 5):
        forged[i]["prev_hash"] = forged[i - 1]["hash"]
        forged[i]["hash"] = row_hash(forged[i])
    forged_tip = Tip(5, forged[-1]["hash"])
    assert verify(forged, forged_tip).ok
    caught = verify(forged, forged_tip, anchor=Tip(3, rows[2]["hash"]))
    assert not caught.ok and caught.first_bad_seq == 3 and "rewritten" in str(caught.problem)


def test_hashes_do_not_depend_on_int_or_float() -> None:
    row = _rows(1)[0]
    assert row_hash({**row, "start_at": 1}) == row_hash({**row, "start_at": 1.0})


# ---------------------------------------------------------------- the ledger on a real SQLite file


def _book(path: Path, clock: Clock) -> tuple[RegistryStore, CreditBook]:
    store = RegistryStore(path)
    return store, CreditBook(store, lambda: read_ledger(path), clock)


def _interval(donor: str, session: int, start: float, cpu_s: float, w: Weights = W) -> Interval:
    return Interval(donor, session, "node-" + donor, start, start + 60, ResourceSeconds(cpu_s), w)


def test_the_ledger_counts_voids_and_rebuilds_the_same_totals_from_the_file(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "registry.sqlite"
    store, book = _book(path, clock)
    stored = book.record([_interval("d1", 1, 0, 30.0), _interval("d1", 1, 60, 45.0), _interval("d2", 7, 0, 10.0)])
    assert [r["seq"] for r in stored] == [1, 2, 3]
    for r in stored:
        assert r["credit"] == r["cpu_s"] * r["w_cpu"] + r["gpu_s"] * r["w_gpu"] + r["memory_byte_s"] * r["w_memory"]
    clock.now += 3600
    voided = book.void("d1", 70, 80, "verification failed: task t-9")
    assert voided.voided_seqs == [2] and voided.voided_credit == pytest.approx(45.0 * W.cpu)
    assert book.void("d1", 70, 80, "again").voided_seqs == [], "a voided row is voided once"
    d1 = book.donor("d1", entries=10)
    assert d1.total_credit == pytest.approx(30.0 * W.cpu) and d1.voided_credit == pytest.approx(45.0 * W.cpu)
    assert d1.cpu_s == 75.0, "metered work stays metered; only its credit is taken back"
    assert [(e.seq, e.kind, e.voided) for e in d1.entries] == [(1, "credit", False), (2, "credit", True),
                                                                (4, "void", False)]
    assert d1.sessions[0].credit == pytest.approx(30.0 * W.cpu) and d1.tip.seq == 4
    store.close()
    again_store, again = _book(path, clock)
    again_d1 = again.donor("d1")
    assert (again_d1.total_credit, again_d1.recent_average_credit, again_d1.voided_credit) == pytest.approx(
        (d1.total_credit, d1.recent_average_credit, d1.voided_credit), rel=1e-12)
    assert [s.donor_id for s in again.summaries()] == ["d1", "d2"]
    assert again.verify().ok and again.verify().rows == 4
    again_store.close()


def test_a_void_reaches_work_still_being_metered_when_it_came_even_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    clock.now = 100.0
    path = tmp_path / "registry.sqlite"
    store, book = _book(path, clock)
    # A wrong result at t=90: the interval [60, 120] that holds it is still open (not written).
    assert book.void("d1", 85, 95, "verification failed: task t-1").voided_seqs == []
    clock.now = 121.0
    (row,) = book.record([_interval("d1", 1, 60, 40.0)])
    d1 = book.donor("d1", entries=10)
    assert d1.total_credit == pytest.approx(0.0) and d1.voided_credit == pytest.approx(40.0 * W.cpu)
    assert [(e.kind, e.voids_seq, e.reason) for e in d1.entries] == [
        ("credit", None, None), ("void", row["seq"], "verification failed: task t-1")]
    # Work outside the window keeps its credit; the window lasts past its end only hold_s (3600 s).
    book.record([_interval("d1", 1, 120, 5.0)])
    assert book.donor("d1").total_credit == pytest.approx(5.0 * W.cpu)
    # The void outlives the control plane: a book opened on the same file still applies it.
    assert book.void("d2", 0, 200, "verification failed: task t-2").voided_seqs == []
    store.close()
    again_store, again = _book(path, clock)
    again.record([_interval("d2", 3, 150, 10.0)])
    assert again.donor("d2").total_credit == pytest.approx(0.0), "voided after the restart too"
    assert again.verify().ok
    clock.now = 200 + 3600 + 1
    again.record([_interval("d2", 3, 190, 10.0)])  # overlaps the window, but the hold is over
    assert again.donor("d2").total_credit == pytest.approx(10.0 * W.cpu)
    again_store.close()
    # Past its time the window is gone from the file as well (dropped at the next void).
    from dgpt.head.store import RegistryStore as _Store

    last = _Store(path)
    try:
        last.add_void_window("d3", 0, 1, "x", held_until=clock.now + 10, now=clock.now)
        assert [w["donor_id"] for w in last.void_windows(clock.now)] == ["d3"]
    finally:
        last.close()


def test_an_edit_of_the_real_sqlite_file_is_found_by_row(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "registry.sqlite"
    store, book = _book(path, clock)
    book.record([_interval("d1", 1, 60.0 * i, 10.0 + i) for i in range(6)])
    # The head's writes sit in the WAL until a checkpoint; a check reads the file and its WAL.
    assert Path(f"{path}-wal").stat().st_size > 0
    assert book.verify().ok and book.verify().rows == 6
    # Someone with the file edits one row's credit with the sqlite3 tool (the head keeps running).
    with sqlite3.connect(path) as other:
        other.execute("UPDATE credit_ledger SET credit = credit * 10 WHERE seq = 4")
    check = book.verify()
    assert not check.ok and check.first_bad_seq == 4 and check.rows == 3 and "edited" in str(check.problem)
    with sqlite3.connect(path) as other:
        other.execute("UPDATE credit_ledger SET credit = credit / 10 WHERE seq = 4")
        other.execute("DELETE FROM credit_ledger WHERE seq = 2")
    assert book.verify().first_bad_seq == 2 and "missing" in str(book.verify().problem)
    store.close()


def test_a_byte_edited_in_the_checkpointed_file_is_found(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "registry.sqlite"
    store, book = _book(path, clock)
    book.record([_interval(f"donor-{c}", 1, 0.0, 10.0) for c in "abcde"])
    store.close()
    # Checkpoint: the rows move from the WAL into the main file, which we then edit byte-wise.
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    raw = path.read_bytes()
    at = raw.index(b"node-donor-c")
    assert raw.count(b"node-donor-c") == 1
    path.write_bytes(raw[:at] + b"node-donor-x" + raw[at + len(b"node-donor-c"):])
    _, reader_tip = read_ledger(path)
    check = CreditBook(RegistryStore(path), lambda: read_ledger(path), clock).verify()
    assert not check.ok and check.first_bad_seq == 3, check
    assert reader_tip.seq == 5


def test_rows_removed_from_the_end_are_found_and_not_papered_over(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "registry.sqlite"
    store, book = _book(path, clock)
    book.record([_interval("d1", 1, 60.0 * i, 5.0) for i in range(4)])
    with sqlite3.connect(path) as other:
        other.execute("DELETE FROM credit_ledger WHERE seq >= 3")
    assert book.verify().first_bad_seq == 3
    book.record([_interval("d1", 1, 600.0, 5.0)])  # the next append chains from the recorded tip
    check = book.verify()
    assert not check.ok and check.first_bad_seq == 3 and "missing" in str(check.problem)
    store.close()


# ---------------------------------------------------------------- metering through a real registry


def _running_donor(tmp_path: Path) -> tuple[Registry, FakeRay, Clock, RegisterResponse, CreditBook]:
    """A registry with donor "a" running on node-a, and a credit book over its SQLite file."""
    ray, clock = FakeRay(), Clock()
    reg = _registry(tmp_path, ray, clock)
    token = reg.create_token("join", "t").token
    assert token
    a = reg.register(_request("a"), token)
    _activate(reg, ray, clock, a.donor_id, a.donor_secret, "node-a")
    return reg, ray, clock, a, CreditBook(reg.store, lambda: read_ledger(reg.store.path), clock)


def test_metering_through_the_registry_credits_each_session_at_its_profiles_weight(tmp_path: Path) -> None:
    reg, ray, clock, a, book = _running_donor(tmp_path)
    metered: list[ResourceSeconds] = []
    meter = Metering(reg, book, interval_s=30.0, sample_s=1.0, clock=clock, on_metered=metered.append)

    def usage(cpus_free: float) -> list[NodeUsage]:
        return [NodeUsage("node-a", {"CPU": cpus_free, "memory": 2.0 * GIB}, {"CPU": 2.0, "memory": 2.0 * GIB}, 0.0,
                          "RUNNING"),
                NodeUsage("head-node", {"CPU": 0.0}, {"CPU": 4.0}, 0.0, "RUNNING")]  # not a donor: not metered

    for _ in range(40):  # 1.5 CPUs busy for 40 s, sampled each second
        meter.sample(usage(0.5))
        clock.now += 1.0
    ray.die("node-a")
    reg.tick()  # the session ends as lost
    meter.sample(usage(0.5))
    rows = reg.store.credit_rows()
    assert len(rows) == 2 and {r["session_id"] for r in rows} == {1}
    assert sum(r["cpu_s"] for r in rows) == pytest.approx(1.5 * 40)
    w = weights_for(_request("a").profile)
    assert rows[0]["w_cpu"] == w.cpu == pytest.approx(50.0 / 8 * CREDITS_PER_GFLOPS_DAY / DAY, rel=1e-15)
    session = book.donor(a.donor_id).sessions[0]
    assert session.credit == pytest.approx(session.cpu_s * w.cpu, rel=1e-12)
    assert sum(m.cpu_s for m in metered) == pytest.approx(60.0)


def test_a_failing_sample_never_raises(tmp_path: Path) -> None:
    class Broken:
        def running_sessions(self) -> list:
            raise RuntimeError("registry hiccup")

    store, book = _book(tmp_path / "r.sqlite", Clock())
    assert Metering(Broken(), book, 60, 1).sample([]) == []  # type: ignore[arg-type]
    store.close()


def test_an_offered_sample_is_integrated_at_its_own_time_and_a_stop_writes_it(tmp_path: Path) -> None:
    reg, ray, clock, a, book = _running_donor(tmp_path)
    meter = Metering(reg, book, interval_s=3600.0, sample_s=1.0, clock=clock)
    busy = [NodeUsage("node-a", {"CPU": 1.0}, {"CPU": 2.0}, 0.0, "RUNNING")]  # 1 CPU held
    for _ in range(10):
        meter.offer(busy)  # stamped now: the tick decides and applies before it is integrated
        clock.now += 0.5
        meter.take_offered()
        clock.now += 0.5
    assert meter.take_offered() == [], "a sample is integrated once"
    assert reg.store.credit_rows() == [], "the hour-long interval is still open"
    meter.close()  # the control plane's clean stop
    rows = reg.store.credit_rows()
    assert len(rows) == 1 and rows[0]["cpu_s"] == pytest.approx(10.0), "held from each sample to the stop"
