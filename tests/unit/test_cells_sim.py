"""Cells: the pure cell router, the partition of the fleet, and a quick run of the cells
simulator (its JSON, and that each cell's head really ran dgpt's autoscaler)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cell_router, cells_sim, fleet_sim
from benchmarks.cell_router import CellSummary, assign_donor, route_job
from dgpt.resources import Resources

HOUR = 3600.0
STEPS = len(cell_router.FREE_CPU_STEPS)
HORIZONS = len(cell_router.ROUTE_HORIZONS_S)


def summary(
    cell: int,
    *,
    free: float = 0.0,
    donors_free: int = 0,
    room: int = 0,
    standby_cpus: float = 0.0,
    log_p: float = -0.1,
    free_gpus: float = 0.0,
    standby_gpus: float = 0.0,
    pending: float = 0.0,
) -> CellSummary:
    return CellSummary(
        cell=cell, donors=1000, active=100, room=room, capacity_cpus=800.0, free_cpus=free,
        free_gpus=free_gpus, donors_with_free=(donors_free,) * STEPS, standby=500,
        standby_cpus=standby_cpus, standby_gpus=standby_gpus, log_p_stay=(log_p,) * HORIZONS,
        pending_cpus=pending,
    )


# ---------------------------------------------------------------- donors to cells


def test_new_donors_join_the_smallest_cell_until_all_are_full() -> None:
    assert assign_donor([3, 1, 2]) == 1
    assert assign_donor([2, 2, 2]) == 0
    assert assign_donor([5, 4], capacity=5) == 1
    assert assign_donor([5, 5], capacity=5) is None


def test_cells_partition_the_fleet() -> None:
    cell_of = cells_sim.partition(10_003, 10, capacity=1001)
    sizes = np.bincount(cell_of, minlength=10)
    assert sizes.sum() == 10_003 and sizes.max() - sizes.min() <= 1
    assert set(np.unique(cell_of)) == set(range(10))
    with pytest.raises(ValueError, match="add cells"):
        cells_sim.partition(101, 10, capacity=10)


# ---------------------------------------------------------------- jobs to cells


def test_a_cell_that_fits_now_beats_one_that_could_grow() -> None:
    cells = [summary(0, room=500, standby_cpus=4000), summary(1, free=40, donors_free=10)]
    assert route_job(cells, [0, 0], Resources(2), 4, HOUR, distinct=True) == 1


def test_among_cells_that_fit_the_reliable_one_wins() -> None:
    cells = [summary(0, free=100, donors_free=50, log_p=-0.9), summary(1, free=100, donors_free=50, log_p=-0.05)]
    assert route_job(cells, [0, 0], Resources(2), 1, 4 * HOUR) == 1


def test_a_gang_needs_enough_distinct_donors_with_room() -> None:
    # Cell 0 has the CPUs but on too few donors for 8 distinct members.
    cells = [summary(0, free=64, donors_free=4, log_p=-0.01), summary(1, free=20, donors_free=10, log_p=-0.5)]
    assert route_job(cells, [0, 0], Resources(2), 8, HOUR, distinct=True) == 1
    assert route_job(cells, [0, 0], Resources(2), 8, HOUR, distinct=False) == 0


def test_claims_since_the_last_report_spread_a_burst() -> None:
    cells = [summary(c, free=100, donors_free=50) for c in range(3)]
    claims = [0.0, 0.0, 0.0]
    chosen = []
    for _ in range(30):
        c = route_job(cells, claims, Resources(4), 1, HOUR)
        claims[c] += 4
        chosen.append(c)
    assert np.bincount(chosen, minlength=3).tolist() == [10, 10, 10]


def test_gpu_work_goes_where_gpus_are() -> None:
    cells = [summary(0, free=100, donors_free=50), summary(1, free=10, donors_free=5, free_gpus=1)]
    assert route_job(cells, [0, 0], Resources(2, 1), 1, HOUR) == 1
    grow = [summary(0, room=10, standby_cpus=1000), summary(1, room=10, standby_cpus=100, standby_gpus=3)]
    assert route_job(grow, [0, 0], Resources(2, 1), 1, HOUR) == 1


def test_when_nothing_fits_or_grows_the_least_backlogged_cell_queues_it() -> None:
    cells = [summary(0, pending=500), summary(1, pending=50), summary(2, pending=300)]
    assert route_job(cells, [0, 0, 0], Resources(2), 1, HOUR) == 1
    assert route_job(cells, [0, 600, 0], Resources(2), 1, HOUR) == 2


def test_router_refuses_mismatched_input() -> None:
    with pytest.raises(ValueError, match="at least one cell"):
        route_job([], [], Resources(1), 1, HOUR)
    with pytest.raises(ValueError, match="claims_cpus has 1 entries for 2 cells"):
        route_job([summary(0), summary(1)], [0.0], Resources(1), 1, HOUR)


def test_round_robin_ignores_state() -> None:
    assert [cell_router.round_robin(n, 3) for n in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_params_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="max_active=0"):
        cells_sim.CellsParams(donors=100, cells=2, max_active=0)
    with pytest.raises(ValueError, match="donors=1 must be at least cells=2"):
        cells_sim.CellsParams(donors=1, cells=2)


# ---------------------------------------------------------------- the simulation


@pytest.fixture(scope="module")
def ran() -> cells_sim.CellsSimulation:
    profiles = json.loads(fleet_sim.find_churn_profiles().read_text())
    params = cells_sim.CellsParams(donors=6000, cells=3, max_active=60, horizon_h=0.75, seed=4)
    fleet = fleet_sim.build_fleet(params.donors, profiles, np.random.default_rng(params.seed))
    cell_of = cells_sim.partition(params.donors, params.cells)
    sim = cells_sim.CellsSimulation("dgpt", fleet, cell_of, params)
    sim.metrics = sim.run()  # type: ignore[attr-defined]
    return sim


def test_every_donor_is_in_exactly_one_cell_and_its_head_sees_it_in_its_role(
    ran: cells_sim.CellsSimulation,
) -> None:
    seen = np.concatenate([cell.members for cell in ran.cells])
    assert np.sort(seen).tolist() == list(range(ran.n))
    now = ran.now
    for cell in ran.cells:
        view = cell.index.view(now)
        ids = cell.table.donor_ids
        by_role = {r: {str(ids[int(j)]) for j in np.flatnonzero(cell.role == r)} for r in range(4)}
        assert {str(d) for d in view.standby.donor_ids} == by_role[cells_sim._STANDBY]
        assert {d.donor_id for d in view.active} == by_role[cells_sim._ACTIVE]
        assert {d.donor_id for d in view.activating} == by_role[cells_sim._ACTIVATING]
        # Active in the head's index means usable by placement, and nothing else is.
        assert set(cell.pool.members.tolist()) == set(np.flatnonzero(cell.role == cells_sim._ACTIVE).tolist())
        # Offline donors are in no part of the view; online ones in exactly one.
        online = ran.up[cell.members]
        assert ((cell.role != cells_sim._OFF) == online).all()


def test_the_autoscaler_activated_every_active_donor_within_bounds(ran: cells_sim.CellsSimulation) -> None:
    m = ran.metrics  # type: ignore[attr-defined]
    assert m["activations"] > 0 and m["decisions"] > 0
    for cell, per in zip(ran.cells, m["cells"], strict=True):
        assert per["ticks"] >= int(0.75 * HOUR / ran.p.tick_s) - 1
        assert 0 < per["peak_active"] <= ran.p.max_active
        # No donor became active but through an ActivateDonor from the policy.
        assert len(cell.pool) + cell.activating <= cell.activations - cell.drains
    assert m["work_lost_fraction"] >= 0 and math.isfinite(m["tick_p99_ms"])


def test_quick_run_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "cells_sim.json"
    assert cells_sim.main(["--quick", "--hours", "0.25", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] and data["params"]["cells"] == 4
    assert set(data["routers"]) == set(cells_sim.ROUTERS)
    for name, m in data["routers"].items():
        assert len(m["cells"]) == 4, name
        assert sum(c["donors"] for c in m["cells"]) == data["params"]["donors"]
        for key in ("decision_p99_ms", "route_p99_ms", "tick_p99_ms", "tick_cpu_p99_ms", "tick_p99_ms_worst_cell"):
            assert math.isfinite(m[key]) and m[key] > 0, (name, key)
        assert m["peak_active_max_cell"] <= data["params"]["max_active"]
    assert {t["what"].split(" (")[0] for t in data["targets"]} >= {"decision p99"}
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    assert set(data["dgpt_vs"]["round-robin"]) >= {"work_lost_fraction", "queue_wait_mean_s"}
    assert data["peak_rss_bytes"] > 0
    deep = data["routers"]["dgpt"]["deep_queue_tick"]
    assert set(deep["tick_ms"]) == {str(n) for n in cells_sim.BACKLOG_BUNDLES}
    assert all(ms > 0 for ms in deep["tick_ms"].values()) and deep["standby"] > 0


def test_warm_start_backlog_follows_littles_law_and_is_length_biased() -> None:
    workload = fleet_sim.Workload(cpus=50_000)
    rng = np.random.default_rng(0)
    backlog = workload.backlog(100, rng)
    assert [j.id for j in backlog] == list(range(100, 100 + len(backlog)))
    assert all(j.backlog for j in backlog)
    for kind, rate in workload.rates.items():
        jobs = [j for j in backlog if j.kind == kind]
        fresh = [workload.draw(0, kind, 0.0, rng) for _ in range(4000)]
        mean_s = float(np.mean([j.work for j in fresh]))
        expected = rate * mean_s  # Little's law: running = arrival rate x mean length
        assert len(jobs) == pytest.approx(expected, rel=5 / math.sqrt(expected))
        # What is left of a running job: half a length-biased draw, on average. Longer jobs
        # are likelier to be running, so that exceeds half a fresh job's mean.
        assert np.mean([j.work for j in jobs]) > 0.55 * mean_s
        declared = [j for j in jobs if not math.isnan(j.declared)]
        assert declared and all(j.declared > 0 for j in declared)
