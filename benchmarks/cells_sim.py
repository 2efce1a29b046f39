"""Cells simulator: 1M donors in cells, one registry routing donors and work to them.

Run ``python -m benchmarks.cells_sim [--quick] [--donors N] [--cells C] [--max-active A]
[--hours H] [--offered-load L] [--cold]``.
Writes ``benchmarks/results/cells_sim.json``.

One Ray cluster holds a few thousand nodes, so dgpt grows past one head with *cells*: each a
Ray cluster with its own head, its own active set (at most ``max_active`` donors) and its own
standby donors, and one registry in front (:mod:`benchmarks.cell_router`) that gives each
new donor a cell and routes each job to a cell. Inside a cell everything is what one head
runs today, unchanged:

- placement: :func:`benchmarks.fleet_sim.place`, dgpt's placement functions over the cell's
  active donors, with the job's declared horizon;
- the autoscaler: :func:`autoscaler.policies.default_policy` every ``tick_s`` over an
  :class:`~autoscaler.context.AutoscalerContext` whose :class:`~dgpt.fleet.FleetView` comes
  from the head's own :class:`~dgpt.head.fleet_index.FleetIndex` (active and activating
  donors as :class:`~dgpt.fleet.FleetDonor`, the cell's standby donors as a
  :class:`~dgpt.fleet.DonorTable`), and whose demand is the cell's queue of jobs placement
  could not place. Its ``ActivateDonor`` decisions bring a standby donor into the cell's
  active set after the activation lead time; ``DrainDonor`` sends one back to standby.

Donors churn as in :mod:`benchmarks.fleet_sim` (the same fleet, history and reliability
refits); a donor that leaves while active loses its work, one that leaves in standby only
leaves the standby table. Jobs are the same mix, offering ``offered_load`` of the CPUs that
``cells x max_active`` donors hold. Every donor starts in standby, and the run starts warm:
over the first ``WARM_RAMP_S`` the jobs a steady state would have running arrive with the
work they have left (:meth:`~benchmarks.fleet_sim.Workload.backlog`), so each cell's
autoscaler brings its active set up from nothing in minutes (``backlog_placed_*``), then
keeps it working. Apart from the run, :func:`backlog_ticks` times one tick of a cell's
policy with a deep queue of gang bundles, the autoscaler's worst case. Side by side in one
run, on the same cells, churn and arrivals: the ``dgpt`` router and the ``round-robin``
baseline (hash sharding, blind to the cells' state).

What is measured, per router: decision latency (route + place, wall clock and CPU time, for
every job on arrival; re-placements of queued jobs are place only), router latency alone,
autoscaler tick latency per cell (taking the view + the policy: what the head does every
tick; wall clock and CPU time) and the policy alone, queue wait, work lost, completion, utilisation of active CPUs,
activations and drains, peak active donors per cell, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import resource
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np

from autoscaler.bounds import AutoscalerBounds, load_bounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import ActivateDonor, DrainDonor
from autoscaler.policies import PolicyState, default_policy
from benchmarks import cell_router
from benchmarks.fleet_sim import (
    ARRIVE,
    BATCH_DONE,
    CKPT,
    CONDITIONS,
    HISTORY_SESSIONS,
    HOUR,
    JOIN,
    KINDS,
    LEAVE,
    REFIT,
    REPLICAS_PER_DEPLOYMENT,
    TRAIN_DONE,
    Fleet,
    Job,
    JobRunner,
    Pool,
    Tally,
    Workload,
    build_fleet,
    declared_horizon,
    find_churn_profiles,
    fit_rows,
    job_metrics,
    place,
    retry_queue,
)
from dgpt.fleet import DonorTable, FleetDonor
from dgpt.head.fleet_index import FleetIndex, Role
from dgpt.placement.policy import Placement
from dgpt.reliability.model import WeibullParams, log_stay_probability
from dgpt.resources import Demand, Gang, Resources

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "cells_sim.json"
ROUTERS = ("dgpt", "round-robin")
#: The decision latency target (DESIGN.md: placement p99 < 2 ms), here for route + place.
DECISION_P99_TARGET_MS = 2.0

# Event codes after fleet_sim's.
_TICK, _ACTIVATED, _IDLE, _CELL_RETRY, _BACKLOG = range(100, 105)
# Donor roles within its cell.
_OFF, _STANDBY, _ACTIVATING, _ACTIVE = range(4)
#: The simulator's donors carry no labels; one shared, read-only empty mapping for all.
_NO_LABELS: Mapping[str, str] = types.MappingProxyType({})
#: Activation takes the bounds' lead time, give or take a quarter (heartbeat phase, start-up).
_LEAD_SPREAD = 0.25
#: A warm start's backlog arrives over the first ten minutes: cells fill up at ~2 donors/s,
#: well within what one autoscaler tick activates (a deep queue at once is measured apart,
#: by :func:`backlog_ticks`).
WARM_RAMP_S = 600.0
#: Pending gang bundles for the deep-queue tick measurement.
BACKLOG_BUNDLES = (64, 512, 2048)


@dataclasses.dataclass(frozen=True)
class CellsParams:
    """One cells simulation's knobs (all recorded in the JSON)."""

    donors: int = 1_000_000
    cells: int = 10
    max_active: int = 2000
    horizon_h: float = 0.5
    tick_s: float = 5.0
    seed: int = 7
    condition: str = "default"
    #: Offered demand as a share of the CPUs of ``cells * max_active`` average donors.
    offered_load: float = 0.45
    #: Start with the jobs a steady state would have running (see Workload.backlog).
    warm_start: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.donors < self.cells:
            problems.append(f"donors={self.donors} must be at least cells={self.cells}")
        if self.cells < 1:
            problems.append(f"cells={self.cells} must be >= 1")
        if not 1 <= self.max_active <= 100_000:
            problems.append(f"max_active={self.max_active} must be 1..100000")
        if not self.horizon_h > 0:
            problems.append(f"horizon_h={self.horizon_h} must be > 0")
        if not self.tick_s > 0:
            problems.append(f"tick_s={self.tick_s} must be > 0")
        if not 0 < self.offered_load <= 2:
            problems.append(f"offered_load={self.offered_load} must be in (0, 2]")
        if self.condition not in CONDITIONS:
            problems.append(f"condition={self.condition!r}: use one of {', '.join(CONDITIONS)}")
        if problems:
            raise ValueError("; ".join(problems))


def partition(n: int, cells: int, capacity: int | None = None) -> np.ndarray:
    """Each donor's cell, assigning donors 0..n-1 in order with :func:`cell_router.assign_donor`.

    Raises:
        ValueError: every cell is full (``capacity``) before all donors have one.
    """
    sizes = [0] * cells
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        c = cell_router.assign_donor(sizes, capacity)
        if c is None:
            raise ValueError(f"{n} donors do not fit in {cells} cells of {capacity}: add cells")
        out[i] = c
        sizes[c] += 1
    return out


class Cell:
    """One cell: its donors (a table of local rows), its active pool, its head's fleet index,
    autoscaler state and queue, and the timings of its ticks."""

    def __init__(self, c: int, members: np.ndarray, sim: CellsSimulation) -> None:
        f = sim.fleet
        self.c = c
        self.sim = sim
        self.members = members  # local row -> global donor index
        n = members.size
        mem = f.cpus[members] * 2**31
        ids = sim.donor_ids[members]
        self.table = DonorTable(
            node_ids=cast(Sequence[str], ids),
            donor_ids=cast(Sequence[str], ids),
            owner_codes=f.owner[members].astype(np.int64),
            cpu_total=f.cpus[members].copy(),
            cpu_free=f.cpus[members].copy(),
            gpu_total=f.gpus[members].copy(),
            gpu_free=f.gpus[members].copy(),
            mem_total=mem.copy(),
            mem_free=mem.copy(),
            load=np.zeros(n),
            gflops=f.gflops[members].copy(),
            shape=sim.shape[members].copy(),
            scale_s=sim.scale[members].copy(),
            start_s=sim.start[members].copy(),
            usable=np.zeros(0, dtype=np.int64),
            gpu_usable=np.zeros(0, dtype=np.int64),
        )
        self.pool = Pool(self.table)
        self.runner = JobRunner(self.table, sim.push, sim.tally, self._usage_changed)
        self.index = FleetIndex()
        self.state: PolicyState | None = None
        self.role = np.zeros(n, dtype=np.int8)
        self.idle_since = np.zeros(n)
        self.idle_epoch = np.zeros(n, dtype=np.int64)
        self.dirty: set[int] = set()
        self.queue: list[int] = []
        self.retry_armed = False
        self.standby = 0
        self.standby_cpus = 0.0
        self.standby_gpus = 0.0
        self.activating = 0
        self.active_cpus = 0.0
        self.peak_active = 0
        self.active_integral = 0.0
        self.activations = 0
        self.drains = 0
        self.busy_drains = 0
        self.routed = 0
        self.tick_ns: list[int] = []
        self.tick_cpu_ns: list[int] = []
        self.policy_ns: list[int] = []
        self.claims = 0.0
        self.summary = self._summarise(0.0)

    # ---- the head's fleet index, as the registry would keep it
    def _donor(self, j: int, now: float, running: bool) -> FleetDonor:
        t = self.table
        g = int(self.members[j])
        caps = Resources(float(t.cpu_total[j]), float(t.gpu_total[j]), float(t.mem_total[j]))
        available = idle_s = None
        load = 0.0
        if running:
            available = Resources(float(t.cpu_free[j]), float(t.gpu_free[j]), float(t.mem_free[j]))
            load = 1.0 - float(t.cpu_free[j]) / max(float(t.cpu_total[j]), 1e-9)
            idle_s = 0.0 if self.runner.busy(j) else now - float(self.idle_since[j])
        return FleetDonor(
            donor_id=str(t.donor_ids[j]),
            owner=str(int(t.owner_codes[j])),
            device_class=self.sim.fleet.device_class[g],
            caps=caps,
            available=available,
            gflops=float(t.gflops[j]),
            labels=_NO_LABELS,
            reliability=WeibullParams(float(t.shape[j]), float(t.scale_s[j])),
            since_s=float(self.sim.start[g]),
            node_id=str(t.node_ids[j]) if running else None,
            idle_s=idle_s or 0.0,
            load=load,
        )

    def _usage_changed(self, j: int) -> None:
        self.dirty.add(j)
        if not self.runner.busy(j):
            self.idle_since[j] = self.sim.now
            self.idle_epoch[j] += 1
            # The policy only asks whether idle_s passed idle_timeout_s: refresh it then.
            self.sim.push(self.sim.now + self.sim.bounds.idle_timeout_s + 1e-3, _IDLE,
                          self.c * self.sim.stride + j, int(self.idle_epoch[j]))
        else:
            self.idle_epoch[j] += 1

    def idle_check(self, j: int, epoch: int) -> None:
        if self.role[j] == _ACTIVE and self.idle_epoch[j] == epoch:
            self.dirty.add(j)

    def to_standby(self, j: int, now: float) -> None:
        self.role[j] = _STANDBY
        self.standby += 1
        self.standby_cpus += float(self.table.cpu_total[j])
        self.standby_gpus += float(self.table.gpu_total[j])
        self.index.put(self._donor(j, now, False), Role.STANDBY, math.inf)

    def _leave_standby(self, j: int) -> None:
        self.standby -= 1
        self.standby_cpus -= float(self.table.cpu_total[j])
        self.standby_gpus -= float(self.table.gpu_total[j])

    def refresh(self, j: int, now: float) -> None:
        """New reliability for donor ``j`` (a refit): what the index holds changes too."""
        if self.role[j] == _STANDBY:
            self.index.put(self._donor(j, now, False), Role.STANDBY, math.inf)
        elif self.role[j] == _ACTIVE:
            self.dirty.add(j)

    # ---- donors coming and going
    def donor_left(self, j: int, now: float) -> None:
        role = self.role[j]
        if role == _STANDBY:
            self._leave_standby(j)
        elif role == _ACTIVATING:
            self.activating -= 1
        elif role == _ACTIVE:
            self._deactivate(j)
            self._fail_all(j, now)
        self.role[j] = _OFF
        self.dirty.discard(j)
        self.index.remove(str(self.table.donor_ids[j]))

    def _fail_all(self, j: int, now: float) -> None:
        for jid in self.runner.jobs_on(j):
            self.runner.fail(self.sim.jobs[jid], now)
            self.queue.append(jid)
        self._arm_retry(now)

    def _deactivate(self, j: int) -> None:
        self.pool.remove(j)
        self.active_cpus -= float(self.table.cpu_total[j])

    def activate(self, j: int, now: float) -> None:
        if self.role[j] != _STANDBY:
            return  # it left since the view was taken
        self._leave_standby(j)
        self.role[j] = _ACTIVATING
        self.activating += 1
        self.activations += 1
        self.index.put(self._donor(j, now, False), Role.ACTIVATING, math.inf)
        lead = self.sim.bounds.activation_lead_time_s * (1 + _LEAD_SPREAD * (2 * self.sim.rng.random() - 1))
        g = int(self.members[j])
        self.sim.push(now + lead, _ACTIVATED, self.c * self.sim.stride + j, int(self.sim.epoch[g]))

    def activated(self, j: int, epoch: int, now: float) -> None:
        g = int(self.members[j])
        if self.role[j] != _ACTIVATING or not self.sim.up[g] or self.sim.epoch[g] != epoch:
            return
        self.activating -= 1
        self.role[j] = _ACTIVE
        t = self.table
        t.cpu_free[j], t.gpu_free[j], t.mem_free[j] = t.cpu_total[j], t.gpu_total[j], t.mem_total[j]
        self.pool.add(j)
        self.active_cpus += float(t.cpu_total[j])
        self.peak_active = max(self.peak_active, len(self.pool))
        self._usage_changed(j)
        self._arm_retry(now)

    def drain(self, j: int, now: float) -> None:
        if self.role[j] != _ACTIVE:
            return
        if self.runner.busy(j):
            # The policy drains busy donors only over max_active; their work moves (lost here).
            self.busy_drains += 1
            self._fail_all(j, now)
        self._deactivate(j)
        self.drains += 1
        self.dirty.discard(j)
        self.to_standby(j, now)

    # ---- jobs
    def place(self, job: Job, now: float) -> bool:
        others: list[str] = []
        if job.kind == "inference":
            jobs = self.sim.jobs
            others = [
                jobs[r].owner
                for r in self.sim.deployments[job.deployment]
                if r != job.id and jobs[r].nodes
            ]
        d = place("dgpt", self.pool.view(), job, now, self.sim.place_rng, others)
        if isinstance(d, Placement):
            self.runner.start(job, d, now)
            return True
        return False

    def _arm_retry(self, now: float) -> None:
        # Ray places pending work as soon as a node joins or frees up: one retry pass per
        # instant, however many donors changed at it.
        if self.queue and not self.retry_armed:
            self.retry_armed = True
            self.sim.push(now, _CELL_RETRY, self.c)

    def retry(self, now: float) -> None:
        self.retry_armed = False
        self.queue = retry_queue(self.queue, self.sim.jobs, lambda job: self.sim.timed_place(self, job, now))

    def demand(self) -> Demand:
        pending: list[Resources] = []
        gangs: list[Gang] = []
        for jid in self.queue:
            job = self.sim.jobs[jid]
            if job.kind == "training":
                gangs.append(Gang((job.request,) * job.k, "STRICT_SPREAD"))
            else:
                pending.append(job.request)
        return Demand.of(pending, gangs)

    # ---- the autoscaler tick
    def tick(self, now: float) -> None:
        for j in self.dirty:
            if self.role[j] == _ACTIVE:
                self.index.put(self._donor(j, now, True), Role.ACTIVE, math.inf)
        self.dirty.clear()
        demand = self.demand()
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        view = self.index.view(now)
        ctx = AutoscalerContext(self.sim.bounds, demand, view)
        t1 = time.perf_counter_ns()
        decisions, self.state = default_policy(ctx, self.state)
        t2 = time.perf_counter_ns()
        self.tick_cpu_ns.append(time.thread_time_ns() - c0)
        self.tick_ns.append(t2 - t0)
        self.policy_ns.append(t2 - t1)
        local = self.sim.local_of
        for dec in decisions:
            j = int(local[int(dec.donor_id[1:])])
            if isinstance(dec, ActivateDonor):
                self.activate(j, now)
            elif isinstance(dec, DrainDonor):
                self.drain(j, now)
        self.summary = self._summarise(now)
        self.claims = 0.0

    def _summarise(self, now: float) -> cell_router.CellSummary:
        t = self.table
        idx = self.pool.members
        free = t.cpu_free[idx]
        counts = tuple(int((free >= step - 1e-9).sum()) for step in cell_router.FREE_CPU_STEPS)
        total_free = float(free.sum())
        if total_free > 0:
            up = now - t.start_s[idx]
            log_p = tuple(
                float((free * log_stay_probability(t.shape[idx], t.scale_s[idx], up, h)).sum() / total_free)
                for h in cell_router.ROUTE_HORIZONS_S
            )
        else:
            log_p = (0.0,) * len(cell_router.ROUTE_HORIZONS_S)
        pending = sum(self.sim.jobs[jid].cpus * self.sim.jobs[jid].k for jid in self.queue)
        return cell_router.CellSummary(
            cell=self.c,
            donors=int(self.members.size),
            active=len(self.pool),
            room=max(self.sim.bounds.max_active - len(self.pool) - self.activating, 0),
            capacity_cpus=self.active_cpus,
            free_cpus=total_free,
            free_gpus=float(t.gpu_free[idx].sum()),
            donors_with_free=counts,
            standby=self.standby,
            standby_cpus=self.standby_cpus,
            standby_gpus=self.standby_gpus,
            log_p_stay=log_p,
            pending_cpus=float(pending),
        )


class CellsSimulation:
    """Every cell of one fleet under one router; call :meth:`run`."""

    def __init__(
        self,
        router: str,
        fleet: Fleet,
        cell_of: np.ndarray,
        params: CellsParams,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}: use one of {', '.join(ROUTERS)}")
        self.router = router
        self.fleet = fleet
        self.p = params
        self.on_progress = on_progress
        n = len(fleet)
        self.n = n
        self.rng = np.random.default_rng(params.seed + 1)  # identical churn/arrivals per router
        self.place_rng = np.random.default_rng(params.seed + 2)
        self.bounds: AutoscalerBounds = load_bounds(max_active=params.max_active)
        self.start = np.where(fleet.up_at_0, fleet.start, 0.0)
        self.up = fleet.up_at_0.copy()
        self.hist_d = fleet.hist_d.copy()
        self.hist_n = fleet.hist_n.copy()
        self.shape, self.scale = fit_rows(fleet, self.hist_d, self.hist_n, self.up, self.start, np.arange(n), 0.0)
        self.epoch = np.zeros(n, dtype=np.int64)
        self.donor_ids = np.array([f"d{i}" for i in range(n)], dtype=object)
        self.cell_of = cell_of
        self.local_of = np.empty(n, dtype=np.int64)
        members = [np.flatnonzero(cell_of == c) for c in range(params.cells)]
        for m in members:
            self.local_of[m] = np.arange(m.size)
        self.stride = max(m.size for m in members)
        self.tally = Tally()
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.jobs: dict[int, Job] = {}
        self.deployments: dict[int, list[int]] = {}
        self.deployment_cell: dict[int, int] = {}
        self.dirty: set[int] = set()
        self.cells = [Cell(c, m, self) for c, m in enumerate(members)]
        mean_cpus = float(fleet.cpus.mean())
        self.workload = Workload(params.offered_load * params.cells * params.max_active * mean_cpus)
        self.rate = self.workload.rates
        self.routed = 0
        self.decide_ns: list[int] = []
        self.decide_cpu_ns: list[int] = []
        self.route_ns: list[int] = []
        self.wait_s: list[float] = []
        self.backlog_wait_s: list[float] = []
        self.busy = self.active_cap = self.job_busy = 0.0

    # ---- plumbing
    def push(self, t: float, code: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, code, a, b))

    def _advance(self, t: float) -> None:
        dt = t - self.now
        if dt > 0:
            self.busy += self.tally.alloc * dt
            self.job_busy += self.tally.job_alloc * dt
            for cell in self.cells:
                self.active_cap += cell.active_cpus * dt
                cell.active_integral += len(cell.pool) * dt
            self.now = t

    # ---- donors
    def _join(self, g: int, t: float) -> None:
        self.up[g] = True
        self.start[g] = t
        self.epoch[g] += 1
        cell = self.cells[int(self.cell_of[g])]
        j = int(self.local_of[g])
        cell.table.start_s[j] = t
        cell.to_standby(j, t)
        self.push(t + self.fleet.session_s(g, t, self.rng), LEAVE, g, int(self.epoch[g]))

    def _leave(self, g: int, t: float) -> None:
        self.up[g] = False
        self.hist_d[g, self.hist_n[g] % HISTORY_SESSIONS] = t - self.start[g]
        self.hist_n[g] += 1
        self.dirty.add(g)
        self.cells[int(self.cell_of[g])].donor_left(int(self.local_of[g]), t)
        self.push(t + self.fleet.downtime_s(g, t, self.rng), JOIN, g)

    def _refit(self, t: float) -> None:
        rows = np.array(sorted(self.dirty), dtype=np.int64)
        self.dirty.clear()
        if not rows.size:
            return
        shape, scale = fit_rows(self.fleet, self.hist_d, self.hist_n, self.up, self.start, rows, t)
        for g, k, lam in zip(rows.tolist(), shape.tolist(), scale.tolist(), strict=True):
            cell = self.cells[int(self.cell_of[g])]
            j = int(self.local_of[g])
            cell.table.shape[j] = k
            cell.table.scale_s[j] = lam
            cell.refresh(j, t)

    # ---- jobs
    def timed_place(self, cell: Cell, job: Job, now: float, route_ns: tuple[int, int] = (0, 0)) -> bool:
        """Place ``job`` in ``cell`` and time it; ``route_ns`` (wall, CPU) is the routing that
        came before, for a job on arrival."""
        first = math.isnan(job.first_horizon)
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        placed = cell.place(job, now)
        self.decide_ns.append(time.perf_counter_ns() - t0 + route_ns[0])
        self.decide_cpu_ns.append(time.thread_time_ns() - c0 + route_ns[1])
        if placed and first:
            (self.backlog_wait_s if job.backlog else self.wait_s).append(now - job.submit)
        return placed

    def _route(self, job: Job) -> Cell:
        cells = self.cells
        if job.kind == "inference" and job.deployment in self.deployment_cell:
            return cells[self.deployment_cell[job.deployment]]
        if self.router == "round-robin":
            c = cell_router.round_robin(self.routed, len(cells))
        else:
            count = REPLICAS_PER_DEPLOYMENT if job.kind == "inference" else job.k
            c = cell_router.route_job(
                [cell.summary for cell in cells],
                [cell.claims for cell in cells],
                job.request,
                count,
                declared_horizon(job),
                distinct=job.kind == "training",
            )
        self.routed += 1
        cell = cells[c]
        cell.routed += 1
        cell.claims += job.cpus * (REPLICAS_PER_DEPLOYMENT if job.kind == "inference" else job.k)
        if job.kind == "inference":
            self.deployment_cell[job.deployment] = c
        return cell

    def _submit(self, job: Job) -> None:
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        cell = self._route(job)
        route_ns = (time.perf_counter_ns() - t0, time.thread_time_ns() - c0)
        self.route_ns.append(route_ns[0])
        job.cell = cell.c
        if not self.timed_place(cell, job, self.now, route_ns):
            cell.queue.append(job.id)

    def _workload(self) -> None:
        for r in range(self.workload.replicas):
            job = self.workload.replica(len(self.jobs), r, self.now)
            self.jobs[job.id] = job
            self.deployments.setdefault(job.deployment, []).append(job.id)
            self._submit(job)
        if self.p.warm_start:
            for job in self.workload.backlog(len(self.jobs), self.rng):
                job.submit = float(self.rng.random()) * WARM_RAMP_S
                self.jobs[job.id] = job
                self.push(job.submit, _BACKLOG, job.id)
        for kind in ("training", "batch"):
            self.push(self.rng.exponential(1.0 / self.rate[kind]), ARRIVE, KINDS.index(kind))

    def _arrive(self, kind_code: int) -> None:
        kind = KINDS[kind_code]
        job = self.workload.draw(len(self.jobs), kind, self.now, self.rng)
        self.jobs[job.id] = job
        self._submit(job)
        self.push(self.now + self.rng.exponential(1.0 / self.rate[kind]), ARRIVE, kind_code)

    # ---- the loop
    def run(self) -> dict[str, Any]:
        f = self.fleet
        horizon = self.p.horizon_h * HOUR
        for g in range(self.n):
            if f.up_at_0[g]:
                self.up[g] = True
                cell = self.cells[int(self.cell_of[g])]
                cell.to_standby(int(self.local_of[g]), 0.0)
                self.push(f.end[g], LEAVE, g, 0)
            else:
                self.up[g] = False
                self.push(f.start[g], JOIN, g)
        for cell in self.cells:
            cell.summary = cell._summarise(0.0)
            # Heads tick independently: stagger them over one period.
            self.push(self.p.tick_s * cell.c / len(self.cells), _TICK, cell.c)
        self._workload()
        self.push(HOUR, REFIT)
        next_report = 0.0
        stride = self.stride
        while self.events:
            t, _, code, a, b = heapq.heappop(self.events)
            if t > horizon:
                break
            self._advance(t)
            if code == LEAVE:
                if self.up[a] and self.epoch[a] == b:
                    self._leave(a, t)
            elif code == JOIN:
                self._join(a, t)
            elif code == ARRIVE:
                self._arrive(a)
            elif code in (BATCH_DONE, TRAIN_DONE):
                job = self.jobs[a]
                if job.epoch == b:
                    cell = self.cells[job.cell]
                    cell.runner.release(job)
                    job.done = t
                    cell._arm_retry(t)
            elif code == CKPT:
                job = self.jobs[a]
                if job.epoch == b:
                    self.cells[job.cell].runner.checkpoint(job, t)
            elif code == _TICK:
                self.cells[a].tick(t)
                self.push(t + self.p.tick_s, _TICK, a)
            elif code == _ACTIVATED:
                self.cells[a // stride].activated(a % stride, b, t)
            elif code == _IDLE:
                self.cells[a // stride].idle_check(a % stride, b)
            elif code == _CELL_RETRY:
                self.cells[a].retry(t)
            elif code == _BACKLOG:
                self._submit(self.jobs[a])
            elif code == REFIT:
                self._refit(t)
                self.push(t + HOUR, REFIT)
            if self.on_progress and t >= next_report:
                self.on_progress(t / horizon)
                next_report = t + horizon / 200
        self._advance(horizon)
        return self._metrics(horizon)

    def _metrics(self, horizon: float) -> dict[str, Any]:
        base = job_metrics(
            self.decide_ns, self.decide_cpu_ns, self.jobs.values(), horizon, lost=self.tally.lost,
            job_busy=self.job_busy, busy=self.busy, cap=self.active_cap,
        )
        route = np.array(self.route_ns, dtype=np.float64) / 1e6
        wait = np.array(self.wait_s)
        backlog = np.array(self.backlog_wait_s)
        per_cell = []
        for cell in self.cells:
            tick = np.array(cell.tick_ns, dtype=np.float64) / 1e6
            pol = np.array(cell.policy_ns, dtype=np.float64) / 1e6
            cpu = np.array(cell.tick_cpu_ns, dtype=np.float64) / 1e6
            per_cell.append({
                "cell": cell.c,
                "donors": int(cell.members.size),
                "jobs_routed": cell.routed,
                "mean_active": cell.active_integral / horizon,
                "peak_active": cell.peak_active,
                "standby_at_end": cell.standby,
                "activations": cell.activations,
                "drains": cell.drains,
                "busy_drains": cell.busy_drains,
                "queued_at_end": len(cell.queue),
                "ticks": int(tick.size),
                "tick_p50_ms": float(np.percentile(tick, 50)) if tick.size else math.nan,
                "tick_p99_ms": float(np.percentile(tick, 99)) if tick.size else math.nan,
                "policy_p99_ms": float(np.percentile(pol, 99)) if pol.size else math.nan,
                "tick_cpu_p99_ms": float(np.percentile(cpu, 99)) if cpu.size else math.nan,
            })
        ticks = np.concatenate([np.array(c.tick_ns, dtype=np.float64) for c in self.cells]) / 1e6
        tick_cpu = np.concatenate([np.array(c.tick_cpu_ns, dtype=np.float64) for c in self.cells]) / 1e6
        base.update({
            "utilization": base.pop("utilization"),  # of active CPUs (not of every up donor)
            "route_p50_ms": float(np.percentile(route, 50)) if route.size else math.nan,
            "route_p99_ms": float(np.percentile(route, 99)) if route.size else math.nan,
            "queue_wait_mean_s": float(wait.mean()) if wait.size else math.nan,
            "queue_wait_p99_s": float(np.percentile(wait, 99)) if wait.size else math.nan,
            "backlog_jobs": sum(1 for j in self.jobs.values() if j.backlog),
            "backlog_placed_p50_s": float(np.percentile(backlog, 50)) if backlog.size else math.nan,
            "backlog_placed_p99_s": float(np.percentile(backlog, 99)) if backlog.size else math.nan,
            "tick_p50_ms": float(np.percentile(ticks, 50)) if ticks.size else math.nan,
            "tick_p99_ms": float(np.percentile(ticks, 99)) if ticks.size else math.nan,
            "tick_p99_ms_worst_cell": max(c["tick_p99_ms"] for c in per_cell),
            "tick_cpu_p50_ms": float(np.percentile(tick_cpu, 50)) if tick_cpu.size else math.nan,
            "tick_cpu_p99_ms": float(np.percentile(tick_cpu, 99)) if tick_cpu.size else math.nan,
            "training_restarts": self.tally.restarts,
            "replica_losses": self.tally.replica_losses,
            "queued_at_end": sum(len(c.queue) for c in self.cells),
            "activations": sum(c.activations for c in self.cells),
            "drains": sum(c.drains for c in self.cells),
            "peak_active_max_cell": max(c.peak_active for c in self.cells),
            "mean_active_total": sum(c["mean_active"] for c in per_cell),
            "cells": per_cell,
        })
        return base


def backlog_ticks(cell: Cell, now: float, sizes: Sequence[int] = BACKLOG_BUNDLES) -> dict[str, Any]:
    """One tick of ``cell``'s autoscaler (view + policy) with a deep queue: ``n`` pending
    bundles, as 8-member 2-CPU STRICT_SPREAD gangs, for each ``n`` in ``sizes``.

    The policy fits each distinct bundle onto the free room of every active donor in turn,
    so its cost grows with pending bundles x active donors; this measures it at the cell's
    state now (its active and standby donors as they are).
    """
    out: dict[str, Any] = {"active": 0, "standby": 0, "tick_ms": {}, "tick_cpu_ms": {}}
    member = Resources(2, 0, 2 * 2**30)
    for n in sizes:
        gangs = [Gang((member,) * 8, "STRICT_SPREAD")] * max(n // 8, 1)
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        view = cell.index.view(now)
        default_policy(AutoscalerContext(cell.sim.bounds, Demand.of((), gangs), view), cell.state)
        out["tick_ms"][str(n)] = (time.perf_counter_ns() - t0) / 1e6
        out["tick_cpu_ms"][str(n)] = (time.thread_time_ns() - c0) / 1e6
        out["active"], out["standby"] = len(view.active), len(view.standby)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def simulate(params: CellsParams, profiles: Mapping[str, Any], progress: Any | None = None) -> dict[str, Any]:
    """Both routers over the same cells, churn and arrivals; metrics and ratios."""
    t0 = time.perf_counter()
    fleet = build_fleet(params.donors, profiles, np.random.default_rng(params.seed), params.condition)
    cell_of = partition(params.donors, params.cells, capacity=-(-params.donors // params.cells))
    setup_s = time.perf_counter() - t0
    out: dict[str, Any] = {}
    for router in ROUTERS:
        task_id = None
        if progress is not None:
            task_id = progress.add_task(f"{params.donors:>9,} donors  {params.cells} cells  {router:<11}", total=1.0)

        def report(frac: float, _task: Any = task_id) -> None:
            if progress is not None:
                progress.update(_task, completed=min(frac, 1.0))

        t1 = time.perf_counter()
        sim = CellsSimulation(router, fleet, cell_of, params, report)
        built = time.perf_counter() - t1
        out[router] = sim.run()
        out[router]["setup_s"] = built
        out[router]["wall_s"] = time.perf_counter() - t1
        if router == "dgpt":
            busiest = max(sim.cells, key=lambda cell: len(cell.pool))
            out[router]["deep_queue_tick"] = {"cell": busiest.c, **backlog_ticks(busiest, sim.now)}
        report(1.0)
        del sim
    keys = ("work_lost_fraction", "mean_job_completion_s", "utilization", "completed_work_ref_cpu_s",
            "queue_wait_mean_s", "decision_p99_ms")
    ratio = {
        key: (out["dgpt"][key] / out["round-robin"][key]) if out["round-robin"][key] else math.nan
        for key in keys
    }
    dgpt = out["dgpt"]
    targets = [
        {"what": f"decision p99 (route + place) at {params.donors:,} donors", "value": dgpt["decision_p99_ms"],
         "unit": "ms", "target": f"< {DECISION_P99_TARGET_MS:g}",
         "met": bool(dgpt["decision_p99_ms"] < DECISION_P99_TARGET_MS)},
        {"what": f"active donors per cell never above max_active={params.max_active}",
         "value": max(out[r]["peak_active_max_cell"] for r in ROUTERS), "unit": "donors",
         "target": f"<= {params.max_active}",
         "met": bool(max(out[r]["peak_active_max_cell"] for r in ROUTERS) <= params.max_active)},
    ]
    return {
        "params": dataclasses.asdict(params),
        "fleet_setup_s": setup_s,
        "routers": out,
        "dgpt_vs": {"round-robin": ratio},
        "targets": targets,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _print(results: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    p = results["params"]
    table = Table(
        title=f"cells_sim: {p['donors']:,} donors in {p['cells']} cells (max {p['max_active']:,} active each), "
        f"{p['horizon_h']:g} h, tick {p['tick_s']:g} s, seed {p['seed']}"
    )
    for col in ("router", "decision p50 ms", "decision p99 ms", "cpu p99 ms", "route p99 ms", "tick p50 ms",
                "tick p99 ms", "tick cpu p99 ms", "worst cell tick p99", "work lost", "mean completion h", "queue wait s",
                "util (active)", "activations", "drains", "mean active"):
        table.add_column(col, justify="right")
    for name, m in results["routers"].items():
        table.add_row(
            name, f"{m['decision_p50_ms']:.3f}", f"{m['decision_p99_ms']:.3f}", f"{m['decision_cpu_p99_ms']:.3f}",
            f"{m['route_p99_ms']:.3f}", f"{m['tick_p50_ms']:.1f}", f"{m['tick_p99_ms']:.1f}",
            f"{m['tick_cpu_p99_ms']:.1f}",
            f"{m['tick_p99_ms_worst_cell']:.1f}", f"{m['work_lost_fraction']:.4f}",
            f"{m['mean_job_completion_s'] / HOUR:.2f}", f"{m['queue_wait_mean_s']:.1f}", f"{m['utilization']:.3f}",
            f"{m['activations']:,}", f"{m['drains']:,}", f"{m['mean_active_total']:,.0f}",
        )
    console.print(table)
    r = results["dgpt_vs"]["round-robin"]
    console.print(
        f"  dgpt router / round-robin: work lost x{r['work_lost_fraction']:.2f}, completion "
        f"x{r['mean_job_completion_s']:.2f}, queue wait x{r['queue_wait_mean_s']:.2f}, "
        f"utilization x{r['utilization']:.2f}"
    )
    deep = results["routers"]["dgpt"].get("deep_queue_tick")
    if deep:
        ticks = ", ".join(f"{n} bundles {ms:,.0f} ms (cpu {deep['tick_cpu_ms'][n]:,.0f} ms)"
                          for n, ms in deep["tick_ms"].items())
        console.print(f"  one tick with a deep queue (cell {deep['cell']}, {deep['active']:,} active, "
                      f"{deep['standby']:,} standby): {ticks}")
    for t in results["targets"]:
        console.print(f"  target {t['what']}: {t['value']:.3g} {t['unit']} (target {t['target']}) "
                      + ("met" if t["met"] else "MISSED"))
    console.print(f"  peak memory {results['peak_rss_bytes'] / 2**30:.2f} GiB, wall {results['wall_s']:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cells_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k donors in 4 cells, 30 min: seconds, for CI")
    parser.add_argument("--donors", type=int, help="fleet size (default 1,000,000; quick 20,000)")
    parser.add_argument("--cells", type=int, help="cells (default 10; quick 4)")
    parser.add_argument("--max-active", type=int, help="most active donors per cell (default 2000; quick 200)")
    parser.add_argument("--hours", type=float, help="simulated hours (default 0.5, quick 0.5)")
    parser.add_argument("--tick-s", type=float, default=5.0, help="autoscaler tick period per cell (default 5)")
    parser.add_argument("--condition", choices=list(CONDITIONS), default="default", help="churn condition")
    parser.add_argument("--offered-load", type=float, default=0.45,
                        help="demand as a share of the CPUs of cells x max-active donors (default 0.45)")
    parser.add_argument("--cold", action="store_true", help="start with no running work (no backlog)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    q = args.quick
    try:
        params = CellsParams(
            donors=args.donors or (20_000 if q else 1_000_000),
            cells=args.cells or (4 if q else 10),
            max_active=args.max_active or (200 if q else 2000),
            horizon_h=args.hours or 0.5,
            tick_s=args.tick_s,
            seed=args.seed,
            condition=args.condition,
            offered_load=args.offered_load,
            warm_start=not args.cold,
        )
    except ValueError as exc:
        parser.error(str(exc))
    profiles = json.loads(find_churn_profiles().read_text())

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  disable=not sys.stderr.isatty() and not sys.stdout.isatty()) as progress:
        run = simulate(params, profiles, progress)
    results = {
        "benchmark": "cells_sim",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(q),
        "wall_s": time.perf_counter() - started,
        **run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    _print(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
