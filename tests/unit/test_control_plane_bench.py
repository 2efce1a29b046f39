"""The pure parts of benchmarks/control_plane.py, without Ray.

Rate and headroom maths, the seeding SQL against a fresh store (what the head then loads
and authenticates), the load generator against the real API on a real SQLite file, and the
shape of the JSON it writes with targets met or missed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from benchmarks import control_plane as cp
from dgpt.contract import DonorState
from dgpt.head.paths import head_paths
from dgpt.head.store import RegistryStore, hash_secret
from tests.unit.conftest import ApiServer


def test_needed_rate_active_share_and_headroom() -> None:
    # 2,000 active every 5 s and 98,000 standby every 196 s (98,000 / 500 beats/s).
    assert cp.needed_beats_per_s(2000, 98_000, 5.0, 196.0) == pytest.approx(900.0)
    assert cp.active_fraction(2000, 98_000, 5.0, 196.0) == pytest.approx(400 / 900)
    # The baseline gave every donor the same interval: 100k donors every 5 s.
    assert cp.needed_beats_per_s(2000, 98_000, 5.0, 5.0) == pytest.approx(20_000.0)
    assert cp.headroom(1800.0, 900.0) == 2.0
    assert cp.headroom(450.0, 900.0) == 0.5
    assert cp.headroom(100.0, 0.0) is None
    with pytest.raises(ValueError, match="intervals"):
        cp.needed_beats_per_s(1, 1, 0.0, 5.0)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert cp.percentile(values, 0.5) == 50.0 and cp.percentile(values, 0.99) == 99.0
    assert cp.percentile([7.0], 0.99) == 7.0 and cp.percentile([], 0.5) is None
    s = cp.summarize_ms([0.001, 0.002, 0.100])
    assert s == {"n": 3, "p50_ms": 2.0, "p99_ms": 100.0, "max_ms": 100.0}


def _seed(home: Path, n: int, active: int) -> dict[str, int]:
    db = head_paths(home)["db"]
    RegistryStore(db).close()  # the head's own schema, as a fresh head leaves it
    return cp.seed_fleet(db, 0, n, active, time.time())


def test_seeded_fleet_is_what_the_head_loads_and_authenticates(tmp_path: Path) -> None:
    rows = _seed(tmp_path, 40, 10)
    assert rows == {"donors": 40, "active": 10, "sessions": 10 * 2 + 10}  # every 4th: 2 ended; active: 1 open
    assert cp.fleet_counts(head_paths(tmp_path)["db"]) == {"active": 10, "standby": 30}
    with sqlite3.connect(head_paths(tmp_path)["db"]) as db:
        (h,) = db.execute("SELECT secret_hash FROM donors WHERE donor_id=?", (cp.donor_id(7),)).fetchone()
        open_sessions = db.execute("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL").fetchone()[0]
    assert h == hash_secret(cp.donor_secret(cp.donor_id(7))) and open_sessions == 10

    server = ApiServer(tmp_path)  # a real registry loads the file
    try:
        reg = server.registry
        assert len(reg) == 40 and reg.counts() == {"active": 10, "standby": 30}
        view = reg.fleet_view()
        assert sorted(d.node_id for d in view.active) == sorted(cp.node_id_of(cp.donor_id(i)) for i in range(10))
        first = reg.donor_view(cp.donor_id(0))
        assert first.sessions_total == 3 and first.sessions_lost == 1 and first.sessions[-1].ended_at is None
        assert first.reliability < 1.0 and first.profile.cpus == 4

        def beat(i: int, state: str, secret: str | None = None) -> httpx.Response:
            d = cp.donor_id(i)
            return httpx.post(f"{server.api}/donors/{d}/heartbeat", json={"state": state},
                              headers={"Authorization": f"Bearer {secret or cp.donor_secret(d)}"})

        assert beat(3, "active").json()["action"] == "activate"
        r = beat(30, "standby")
        assert r.status_code == 200 and r.json()["action"] == "standby"
        assert beat(30, "standby", secret="x" * 40).status_code == 401
        assert reg.counts() == {"active": 10, "standby": 30}, "a heartbeat of a seeded donor changes no state"
        reg.flush_heartbeats()  # batched heartbeat times reach the file (written outside the registry lock)
        with sqlite3.connect(head_paths(tmp_path)["db"]) as db:
            (stored,) = db.execute("SELECT last_heartbeat_at FROM donors WHERE donor_id=?", (cp.donor_id(30),)).fetchone()
        assert stored == reg.donor_view(cp.donor_id(30)).last_heartbeat_at
    finally:
        server.stop()


def test_seeding_refuses_a_bad_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed range"):
        cp.seed_fleet(tmp_path / "x.sqlite", 5, 2, 0, time.time())


def test_heartbeats_mix_active_and_standby_donors_in_the_fleets_proportion() -> None:
    make = cp.request_maker({"mode": "heartbeat", "host": "127.0.0.1", "port": 1, "active": [0, 5],
                             "standby": [5, 20], "active_fraction": 0.3})
    reqs = [make() for _ in range(1000)]
    active = [r for r in reqs if r.endswith(b'{"state":"active"}')]
    assert len(active) == 300
    ids = {r.split(b" ")[1].split(b"/")[4].decode() for r in reqs}
    assert ids == {cp.donor_id(i) for i in range(20)}, "every seeded donor takes its turn"
    first = reqs[0].decode()
    assert first.startswith("POST /api/v1/donors/bench-0000") and "Authorization: Bearer " in first
    with pytest.raises(ValueError, match="load mode"):
        cp.request_maker({"mode": "dance", "host": "h", "port": 1})


def test_load_generator_drives_the_real_api(tmp_path: Path) -> None:
    _seed(tmp_path, 30, 6)
    server = ApiServer(tmp_path)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        before = {e: server.registry.donor_view(cp.donor_id(e)).last_heartbeat_at for e in range(30)}
        fig = cp.run_load({"mode": "heartbeat", "host": "127.0.0.1", "port": port, "concurrency": 8,
                           "duration_s": 1.5, "warmup_s": 0.2, "active": [0, 6], "standby": [6, 30],
                           "active_fraction": 0.5})
        assert fig["failed"] == 0 and fig["ok"] > 30 and fig["statuses"] == {"200": fig["requests"]}
        assert fig["throughput_rps"] > 0 and fig["p50_ms"] <= fig["p99_ms"]
        after = {e: server.registry.donor_view(cp.donor_id(e)).last_heartbeat_at for e in range(30)}
        assert all(after[e] > before[e] for e in range(30)), "every donor's heartbeat reached the registry"

        paced = cp.run_load({"mode": "heartbeat", "host": "127.0.0.1", "port": port, "concurrency": 16,
                             "duration_s": 1.2, "warmup_s": 0.2, "rate_per_s": 100.0, "active": [0, 6],
                             "standby": [6, 30], "active_fraction": 0.5})
        # Open loop: as many requests as were due in the window (100/s for 1 s), not as many as fit.
        # (Never more than was due; how many of them fit depends on the host's load, not asserted.)
        assert paced["offered_rps"] == 100.0 and 0 < paced["requests"] <= 102 and paced["failed"] == 0
        assert paced["sent"] <= paced["due"] and 0 < paced["sent_fraction"] <= 1.0 and paced["throughput_rps"] <= 102

        with httpx.Client(headers={"Authorization": f"Bearer {server.api_key}"}) as c:
            token = c.post(f"{server.api}/tokens", json={"kind": "join", "label": "bench"}).json()["token"]
        reg = cp.run_load({"mode": "register", "host": "127.0.0.1", "port": port, "concurrency": 4,
                           "duration_s": 60, "max_requests": 25, "join_token": token, "expect": 201})
        assert reg["ok"] == 25 and reg["failed"] == 0
        assert server.registry.counts() == {"active": 6, "standby": 24, DonorState.REGISTERED.value: 25}
        wrong = cp.run_load({"mode": "register", "host": "127.0.0.1", "port": port, "concurrency": 2,
                             "duration_s": 60, "max_requests": 4, "join_token": "nope", "expect": 201})
        assert wrong["ok"] == 0 and wrong["statuses"] == {"401": 4}, "a refused request is a failure, not a success"
        assert len(server.registry) == 55
    finally:
        server.stop()


def test_a_dead_port_counts_failures_not_successes() -> None:
    from dgpt.processes import free_port

    fig = cp.run_load({"mode": "get", "host": "127.0.0.1", "port": free_port(), "path": "/", "concurrency": 2,
                       "duration_s": 0.3, "timeout_s": 1.0})
    assert fig["ok"] == 0 and fig["failed"] == fig["requests"] > 0 and "0" in fig["statuses"]


def _fleet(capacity: float, needed: float, loaded_p99: float, snap_p99: float, tick_p99: float) -> dict:
    loops = {str(c): {"throughput_rps": capacity, "p99_ms": 5.0} for c in cp.HEARTBEAT_CONCURRENCY}
    return {"restart_s": 10.0, "heartbeat": loops, "heartbeat_capacity_rps": capacity,
            "needed_beats_per_s": needed, "headroom": cp.headroom(capacity, needed),
            "heartbeat_with_inference": {str(c): {"throughput_rps": capacity / 2, "p99_ms": 10 * loaded_p99}
                                         for c in cp.HEARTBEAT_CONCURRENCY},
            "heartbeat_paced": {"p99_ms": loaded_p99 / 2}, "heartbeat_paced_with_inference": {"p99_ms": loaded_p99},
            "placement": {"placement_view_ms": {"p99_ms": snap_p99 / 2}, "driver_placement_view": {"p99_ms": snap_p99}},
            "autoscaler": {"tick_p99_ms": 10 * tick_p99}, "autoscaler_paced": {"p99_ms": tick_p99 / 2},
            "autoscaler_paced_with_inference": {"p99_ms": tick_p99}, "donors_list": {"p50_ms": 20.0}}


def test_result_has_ratios_and_targets_met_or_missed(tmp_path: Path) -> None:
    new = {"registration": {"throughput_rps": 400.0},
           "fleets": {"10000": _fleet(3000, 600, 40, 10, 12), "100000": _fleet(2000, 900, 150, 20, 80)}}
    old = {"registration": {"throughput_rps": 100.0},
           "fleets": {"10000": _fleet(300, 2000, 900, 4000, 9000), "100000": {"error": "the head did not start"}}}
    result = {"params": {"fleets": [10000, 100000]}, "heads": {"new": new, "baseline": old}}
    r = cp.ratios(new, old)
    assert r["registration_rps"] == 4.0 and r["10000"]["heartbeat_capacity_rps"] == 10.0
    assert r["100000"]["headroom"] is None, "a side that failed gives no ratio, not a wrong one"
    targets = {t["what"].split(" at ")[0].split(" while")[0]: t for t in cp.evaluate_targets(result, "100000")}
    assert targets["heartbeat headroom"]["status"] == "met" and targets["heartbeat headroom"]["value"] == 2.222
    assert targets["heartbeat p99"]["status"] == "missed" and targets["heartbeat p99"]["value"] == 150
    assert targets["placement snapshot p99"]["met"] is True
    tick = targets["autoscaler tick (collect + decide) p99"]
    assert tick["status"] == "missed" and tick["value"] == 80, "the worst tick p99 at the needed heartbeat rate"
    result["targets"] = cp.evaluate_targets(result, "100000")
    json.dumps(result)  # the shape is plain JSON
    table = cp._table(result)
    assert "headroom" in table and "missed" in table and "10.000" in table
    empty = cp.evaluate_targets({"heads": {}}, "100000")
    assert {t["status"] for t in empty} == {"not measured"}


def test_fleet_view_reuses_standby_columns_only_while_no_standby_donor_changes(tmp_path: Path) -> None:
    from dgpt.config import load_settings
    from dgpt.contract import Target
    from dgpt.head.registry import Registry

    _seed(tmp_path, 30, 5)
    clock = [time.time()]
    reg = Registry(load_settings({"home": tmp_path}, env={}), RegistryStore(head_paths(tmp_path)["db"]), None,
                   "127.0.0.1:1", clock=lambda: clock[0])
    first = reg.fleet_view()
    assert len(first.active) == 5 and len(first.standby) == 25
    clock[0] += 0.5
    again = reg.fleet_view()
    assert again.standby is first.standby and again.now_s == clock[0], "nothing changed: the columns are reused"
    reg.set_target(cp.donor_id(7), Target.ACTIVE)  # a standby donor the autoscaler activates
    moved = reg.fleet_view()
    assert cp.donor_id(7) not in list(moved.standby.donor_ids) and len(moved.standby) == 24
    assert [d.donor_id for d in moved.activating] == [cp.donor_id(7)]
    clock[0] += 3.0  # older than STANDBY_VIEW_MAX_AGE_S: copied again even without a change
    assert reg.fleet_view().standby is not moved.standby
