"""Fleet simulator: 10k-100k churning donors, a mixed AI workload, dgpt's placement vs baselines.

Run ``python -m benchmarks.fleet_sim [--donors N] [--quick] [--seed S]``. A discrete-event
simulation (heapq) of donors whose up and down times follow the Failure Trace Archive
Weibull fits in ``churn-profiles.json`` (``default_mix``), with BOINC-like heterogeneous
speeds. Training gangs, inference replicas and batch tasks arrive and are placed by the
very same functions as a live cluster uses (:mod:`dgpt.placement.policy`), or by the
baselines in :mod:`benchmarks.baselines`, all in one run with the same fleet, churn and
arrivals. Writes ``benchmarks/results/fleet_sim.json``.

What is measured, per policy:
- decision latency (each call of a placement function, wall clock) and decisions/s;
- work lost: CPU-seconds discarded because a donor left (a training gang loses all members'
  work since its last checkpoint, a batch task its whole run) over CPU-seconds of job work;
- mean job completion (submit to finish, for jobs submitted in the first half; jobs still
  running at the end count with their time so far);
- utilisation: allocated CPU-seconds over CPU-seconds of donors that were up.

Donors come with 0..14 days of recorded sessions (the registry's history), and reliability
is refitted from history every simulated hour, as the registry would.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import baselines
from dgpt.fleet import DonorTable
from dgpt.placement.policy import (
    Decision,
    Placement,
    WorkloadKind,
    place_gang,
    place_replicas,
    place_task,
)
from dgpt.reliability.model import DEVICE_CLASS_PRIORS, PRIOR_SOURCES, fit_many
from dgpt.reliability.score import REFERENCE_GFLOPS
from dgpt.resources import Resources

POLICIES = ("dgpt", "random", "pack-spread")
HOUR = 3600.0
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "fleet_sim.json"
_SHIPPED_PROFILES = Path(__file__).resolve().parent / "data" / "churn-profiles.json"

#: Days of history donors bring from the registry (each joined at a random time in it).
HISTORY_DAYS = 14
#: Sessions kept per donor for fitting: older ones say little about today's behaviour.
HISTORY_SESSIONS = 16
#: Training checkpoints every 30 min: a common cadence for preemptible training.
CHECKPOINT_S = 1800.0
#: Pending jobs are retried on this period (a live cluster retries on every release).
RETRY_S = 30.0
#: Share of the fleet's up CPU the workload offers, and how it splits between kinds.
OFFERED_LOAD = 0.5
LOAD_SPLIT = {"training": 0.45, "batch": 0.4, "inference": 0.15}


# --------------------------------------------------------------------------- inputs


def find_churn_profiles() -> Path:
    """Locate churn-profiles.json: $DGPT_CHURN_PROFILES, else shared/data/ found walking up
    from the repository root, else the copy shipped in benchmarks/data/."""
    env = os.environ.get("DGPT_CHURN_PROFILES")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise SystemExit(f"DGPT_CHURN_PROFILES={env} is not a file; unset it or fix the path")
        return path
    for folder in (REPO_ROOT, *REPO_ROOT.parents):
        candidate = folder / "shared" / "data" / "churn-profiles.json"
        if candidate.is_file():
            return candidate
    return _SHIPPED_PROFILES


@dataclasses.dataclass(frozen=True)
class Params:
    """One simulation's knobs (all recorded in the JSON)."""

    donors: int
    horizon_h: float
    seed: int
    offered_load: float = OFFERED_LOAD


@dataclasses.dataclass
class Fleet:
    """The synthetic donors: static profile columns plus churn state at t=0."""

    profile: np.ndarray  # index into profile names
    profile_names: list[str]
    up_shape: np.ndarray
    up_scale: np.ndarray
    down_shape: np.ndarray
    down_scale: np.ndarray
    device_class: list[str]
    cpus: np.ndarray
    gpus: np.ndarray
    gflops: np.ndarray
    owner: np.ndarray
    up_at_0: np.ndarray  # bool
    start: np.ndarray  # session start (if up) or next join time (if down)
    end: np.ndarray  # end of the current up session (if up)
    hist_d: np.ndarray  # (donors, HISTORY_SESSIONS) durations
    hist_n: np.ndarray  # sessions recorded per donor (may exceed HISTORY_SESSIONS)


def build_fleet(n: int, profiles: Mapping[str, Any], rng: np.random.Generator) -> Fleet:
    """Draw ``n`` donors and run their churn from HISTORY_DAYS ago up to t=0 (vectorised)."""
    mix: Mapping[str, float] = profiles["default_mix"]
    names = list(mix)
    p = np.array([mix[k] for k in names], dtype=np.float64)
    prof = rng.choice(len(names), size=n, p=p / p.sum())
    up_k = np.array([profiles["profiles"][k]["up"]["shape"] for k in names])[prof]
    up_l = np.array([profiles["profiles"][k]["up"]["scale"] for k in names])[prof] * HOUR
    dn_k = np.array([profiles["profiles"][k]["down"]["shape"] for k in names])[prof]
    dn_l = np.array([profiles["profiles"][k]["down"]["scale"] for k in names])[prof] * HOUR

    # A donor's device class usually matches how it behaves (which is what makes a class
    # prior useful), but a quarter are mislabelled so history has to correct the prior.
    by_source = {src: cls for cls, src in PRIOR_SOURCES.items()}
    classes = list(DEVICE_CLASS_PRIORS)
    matched = [by_source.get(names[i], "unknown") for i in prof]
    flip = rng.random(n) < 0.25
    random_cls = rng.integers(0, len(classes), n)
    device_class = [classes[random_cls[i]] if flip[i] else matched[i] for i in range(n)]

    # BOINC hosts average ~5.7 cores (4M cores / 700k hosts); a few big machines.
    cpus = rng.choice([2, 4, 6, 8, 12, 16], size=n, p=[0.15, 0.3, 0.15, 0.25, 0.1, 0.05]).astype(
        float
    )
    gpus = (rng.random(n) < 0.1).astype(float)
    # Per-core GFLOPS: lognormal with mean 16.5 (BOINC); sigma 0.5 spans ~3x either way.
    sigma = 0.5
    gflops = rng.lognormal(math.log(REFERENCE_GFLOPS) - sigma**2 / 2, sigma, n)
    # Owners hold 1-3 devices: ~0.6 owners per device.
    owner = rng.integers(0, max(1, int(n * 0.6)), n)

    # Churn history: each donor joined at a random time in the last HISTORY_DAYS, starts up.
    t = -rng.random(n) * HISTORY_DAYS * 24 * HOUR
    is_up = np.ones(n, dtype=bool)
    hist_d = np.zeros((n, HISTORY_SESSIONS))
    hist_n = np.zeros(n, dtype=np.int64)
    start = np.zeros(n)
    end = np.zeros(n)
    up_at_0 = np.zeros(n, dtype=bool)
    pending = np.ones(n, dtype=bool)
    while pending.any():
        i = np.flatnonzero(pending)
        ups = i[is_up[i]]
        downs = i[~is_up[i]]
        d_up = up_l[ups] * rng.weibull(up_k[ups])
        finished = t[ups] + d_up <= 0
        done_i = ups[finished]
        hist_d[done_i, hist_n[done_i] % HISTORY_SESSIONS] = d_up[finished]
        hist_n[done_i] += 1
        live = ups[~finished]
        up_at_0[live] = True
        start[live] = t[live]
        end[live] = t[live] + d_up[~finished]
        pending[live] = False
        t[done_i] += d_up[finished]
        is_up[done_i] = False
        d_dn = dn_l[downs] * rng.weibull(dn_k[downs])
        back = t[downs] + d_dn
        still_down = back > 0
        off = downs[still_down]
        start[off] = back[still_down]
        pending[off] = False
        t[downs[~still_down]] = back[~still_down]
        is_up[downs[~still_down]] = True
    return Fleet(
        prof,
        names,
        up_k,
        up_l,
        dn_k,
        dn_l,
        device_class,
        cpus,
        gpus,
        gflops,
        owner,
        up_at_0,
        start,
        end,
        hist_d,
        hist_n,
    )


# --------------------------------------------------------------------------- the simulation


class _Job:
    __slots__ = (
        "id",
        "kind",
        "cpus",
        "gpus",
        "k",
        "work",
        "saved",
        "submit",
        "start",
        "nodes",
        "epoch",
        "ckpt_t",
        "rate",
        "done",
        "deployment",
        "owner",
    )

    def __init__(
        self, jid: int, kind: str, cpus: float, gpus: float, k: int, work: float, submit: float
    ) -> None:
        self.id, self.kind, self.cpus, self.gpus, self.k = jid, kind, cpus, gpus, k
        self.work, self.saved, self.submit = work, 0.0, submit
        self.start = self.ckpt_t = self.rate = 0.0
        self.nodes: list[int] = []
        self.epoch = 0
        self.done = math.nan
        self.deployment = -1
        self.owner = ""


# Event codes, in heap tuples (time, seq, code, a, b).
_LEAVE, _JOIN, _ARRIVE, _BATCH_DONE, _CKPT, _TRAIN_DONE, _RETRY, _REFIT = range(8)
_KINDS = ("training", "batch", "inference")


class Simulation:
    """One policy over one fleet; call :meth:`run`."""

    def __init__(
        self,
        policy: str,
        fleet: Fleet,
        params: Params,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.policy = policy
        self.f = fleet
        self.p = params
        self.rng = np.random.default_rng(params.seed + 1)  # identical churn/arrivals per policy
        self.place_rng = np.random.default_rng(params.seed + 2)
        self.on_progress = on_progress
        n = params.donors
        self.n = n
        mem = fleet.cpus * 2**31
        self.start = np.where(fleet.up_at_0, fleet.start, 0.0)
        self.up = fleet.up_at_0.copy()
        self.hist_d = fleet.hist_d.copy()
        self.hist_n = fleet.hist_n.copy()
        shape, scale = self._fit(np.arange(n), 0.0)
        self.up[:] = False  # run() brings the t=0 donors up, pools and all
        self.table = DonorTable(
            node_ids=[f"node-{i}" for i in range(n)],
            donor_ids=[f"donor-{i}" for i in range(n)],
            owner_codes=fleet.owner.astype(np.int64),
            cpu_total=fleet.cpus.copy(),
            cpu_free=fleet.cpus.copy(),
            gpu_total=fleet.gpus.copy(),
            gpu_free=fleet.gpus.copy(),
            mem_total=mem.copy(),
            mem_free=mem.copy(),
            load=np.zeros(n),
            gflops=fleet.gflops.copy(),
            shape=shape,
            scale_s=scale,
            start_s=self.start,
            usable=np.zeros(0, dtype=np.int64),
            gpu_usable=np.zeros(0, dtype=np.int64),
            owner_index={},
        )
        self.owner_names = [str(o) for o in fleet.owner]
        # Usable pools with O(1) add/remove (swap with last).
        self.pool = np.zeros(n, dtype=np.int64)
        self.pos = np.full(n, -1, dtype=np.int64)
        self.size = 0
        self.gpool = np.zeros(n, dtype=np.int64)
        self.gpos = np.full(n, -1, dtype=np.int64)
        self.gsize = 0
        self.epoch = np.zeros(n, dtype=np.int64)
        self.deployments: dict[int, list[int]] = {}
        self.profiles: Mapping[str, Any] = {}
        self.rate: dict[str, float] = {}
        self.dirty: set[int] = set()
        self.running: dict[int, set[int]] = {}
        self.jobs: dict[int, _Job] = {}
        self.queue: list[int] = []
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.up_cpus = 0.0
        self.alloc = 0.0
        self.job_alloc = 0.0
        self.busy = self.cap = self.job_busy = self.lost = 0.0
        self.lat: list[int] = []
        self.replica_losses = 0
        self.restarts = 0

    # ---- reliability (what the registry would do)
    def _fit(self, rows: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        cols = np.arange(HISTORY_SESSIONS)
        valid = cols[None, :] < np.minimum(self.hist_n[rows], HISTORY_SESSIONS)[:, None]
        # The running session is recorded too, censored: it has lasted at least this long.
        running = self.up[rows] & (self.start[rows] < now)
        durations = np.concatenate(
            [self.hist_d[rows], np.where(running, now - self.start[rows], 0.0)[:, None]], axis=1
        )
        ended = np.concatenate([valid, np.zeros((rows.size, 1), dtype=bool)], axis=1)
        valid = np.concatenate([valid, running[:, None]], axis=1)
        priors = [DEVICE_CLASS_PRIORS[self.f.device_class[i]] for i in rows]
        k0 = np.array([q.shape for q in priors])
        l0 = np.array([q.scale_s for q in priors])
        return fit_many(durations, ended, valid, k0, l0)

    # ---- event plumbing
    def _push(self, t: float, code: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, code, a, b))

    def _advance(self, t: float) -> None:
        dt = t - self.now
        if dt > 0:
            self.busy += self.alloc * dt
            self.job_busy += self.job_alloc * dt
            self.cap += self.up_cpus * dt
            self.now = t

    def _pool_add(self, i: int) -> None:
        self.pool[self.size] = i
        self.pos[i] = self.size
        self.size += 1
        if self.f.gpus[i] > 0:
            self.gpool[self.gsize] = i
            self.gpos[i] = self.gsize
            self.gsize += 1

    def _pool_remove(self, i: int) -> None:
        j = self.pos[i]
        last = self.pool[self.size - 1]
        self.pool[j] = last
        self.pos[last] = j
        self.pos[i] = -1
        self.size -= 1
        if self.f.gpus[i] > 0:
            j = self.gpos[i]
            last = self.gpool[self.gsize - 1]
            self.gpool[j] = last
            self.gpos[last] = j
            self.gpos[i] = -1
            self.gsize -= 1

    def _view(self) -> DonorTable:
        return dataclasses.replace(
            self.table, usable=self.pool[: self.size], gpu_usable=self.gpool[: self.gsize]
        )

    # ---- donors
    def _join(self, i: int, t: float, session_s: float) -> None:
        self.up[i] = True
        self.start[i] = t
        self.epoch[i] += 1
        self.up_cpus += self.f.cpus[i]
        self._pool_add(i)
        self._push(t + session_s, _LEAVE, i, int(self.epoch[i]))

    def _leave(self, i: int) -> None:
        self.up[i] = False
        self.up_cpus -= self.f.cpus[i]
        self._pool_remove(i)
        self.hist_d[i, self.hist_n[i] % HISTORY_SESSIONS] = self.now - self.start[i]
        self.hist_n[i] += 1
        self.dirty.add(i)
        for jid in list(self.running.get(i, ())):
            self._fail(self.jobs[jid])
        down = self.f.down_scale[i] * self.rng.weibull(self.f.down_shape[i])
        self._push(self.now + down, _JOIN, i)

    # ---- jobs
    def _release(self, job: _Job) -> None:
        t = self.table
        for node in job.nodes:
            t.cpu_free[node] = min(t.cpu_free[node] + job.cpus, t.cpu_total[node])
            t.mem_free[node] = min(t.mem_free[node] + job.cpus * 2**30, t.mem_total[node])
            t.gpu_free[node] = min(t.gpu_free[node] + job.gpus, t.gpu_total[node])
            self.running[node].discard(job.id)
        used = job.cpus * len(job.nodes)
        self.alloc -= used
        if job.kind != "inference":
            self.job_alloc -= used
        job.nodes = []
        job.epoch += 1

    def _fail(self, job: _Job) -> None:
        if job.kind == "batch":
            self.lost += job.cpus * (self.now - job.start)
        elif job.kind == "training":
            self.lost += job.cpus * job.k * (self.now - job.ckpt_t)
            self.restarts += 1
        else:
            self.replica_losses += 1
        self._release(job)
        self.queue.append(job.id)

    def _decide(self, job: _Job) -> Decision:
        req = Resources(job.cpus, job.gpus, job.cpus * 2**30)
        view = self._view()
        rng = self.place_rng
        if job.kind == "training":
            bundles = [req] * job.k
            horizon = job.work - job.saved
            t0 = time.perf_counter_ns()
            if self.policy == "dgpt":
                d = place_gang(view, bundles, self.now, horizon_s=horizon, rng=rng)
            else:
                d = baselines.gang(self.policy, view, bundles, rng)
        elif job.kind == "batch":
            t0 = time.perf_counter_ns()
            if self.policy == "dgpt":
                d = place_task(
                    view, req, self.now, kind=WorkloadKind.BATCH, horizon_s=job.work, rng=rng
                )
            else:
                d = baselines.task(self.policy, view, req, rng, WorkloadKind.BATCH)
        else:
            others = [
                self.jobs[r].owner
                for r in self.deployments[job.deployment]
                if r != job.id and self.jobs[r].nodes
            ]
            if self.policy == "dgpt":
                view = dataclasses.replace(view, owner_index=self._owner_index(others))
            t0 = time.perf_counter_ns()
            if self.policy == "dgpt":
                d = place_replicas(view, req, 1, self.now, existing_owners=others, rng=rng)
            else:
                d = baselines.replicas(self.policy, view, req, 1, rng, others)
        self.lat.append(time.perf_counter_ns() - t0)
        return d

    def _owner_index(self, owners: Sequence[str]) -> dict[str, int]:
        return {o: int(o) for o in owners}

    def _start(self, job: _Job, d: Placement) -> None:
        t = self.table
        for node in d.nodes:
            t.cpu_free[node] -= job.cpus
            t.mem_free[node] -= job.cpus * 2**30
            t.gpu_free[node] -= job.gpus
            self.running.setdefault(node, set()).add(job.id)
        job.nodes = list(d.nodes)
        job.start = job.ckpt_t = self.now
        used = job.cpus * len(job.nodes)
        self.alloc += used
        if job.kind == "batch":
            self.job_alloc += used
            speed = self.f.gflops[job.nodes[0]] / REFERENCE_GFLOPS
            self._push(self.now + job.work / speed, _BATCH_DONE, job.id, job.epoch)
        elif job.kind == "training":
            self.job_alloc += used
            # A synchronous gang runs at its slowest member's pace.
            job.rate = float(self.f.gflops[job.nodes].min()) / REFERENCE_GFLOPS
            remaining = (job.work - job.saved) / job.rate
            if remaining <= CHECKPOINT_S:
                self._push(self.now + remaining, _TRAIN_DONE, job.id, job.epoch)
            else:
                self._push(self.now + CHECKPOINT_S, _CKPT, job.id, job.epoch)
        else:
            job.owner = self.owner_names[job.nodes[0]]

    def _try(self, job: _Job) -> bool:
        d = self._decide(job)
        if isinstance(d, Placement):
            self._start(job, d)
            return True
        return False

    # ---- workload
    def _workload(self) -> None:
        f, p, rng = self.f, self.p, self.rng
        # Expected up CPUs: each donor's CPUs times its profile's availability.
        availability = np.array(
            [self.profiles["profiles"][name]["availability"] for name in f.profile_names]
        )[f.profile]
        avail = float((f.cpus * availability).sum())
        target = p.offered_load * avail
        # Training: gangs of 2-16 two-CPU members; work lognormal, median 2 h at 16.5 GFLOPS.
        self.train_k = np.array([2, 4, 8, 16])
        self.train_kp = np.array([0.3, 0.3, 0.25, 0.15])
        train_mean_cpus = 2.0 * float((self.train_k * self.train_kp).sum())
        train_mean_s = 2 * HOUR * math.exp(0.6**2 / 2)
        self.rate = {
            "training": LOAD_SPLIT["training"] * target / (train_mean_cpus * train_mean_s),
            # Batch: 1-8 CPU tasks, lognormal median 40 min.
            "batch": LOAD_SPLIT["batch"] * target / (3.0 * 2400 * math.exp(0.8**2 / 2)),
        }
        # Inference: deployments of 4 two-CPU replicas (one in five on a GPU), all at t=0.
        replicas = int(LOAD_SPLIT["inference"] * target / 2.0)
        for r in range(replicas):
            dep = r // 4
            job = self._new_job("inference", 2.0, 1.0 if dep % 5 == 0 else 0.0, 1, math.inf)
            job.deployment = dep
            self.deployments.setdefault(dep, []).append(job.id)
            self.queue.append(job.id)
        for kind in ("training", "batch"):
            self._push(rng.exponential(1.0 / self.rate[kind]), _ARRIVE, _KINDS.index(kind))

    def _new_job(self, kind: str, cpus: float, gpus: float, k: int, work: float) -> _Job:
        jid = len(self.jobs)
        job = _Job(jid, kind, cpus, gpus, k, work, self.now)
        self.jobs[jid] = job
        return job

    def _arrive(self, kind_code: int) -> None:
        rng = self.rng
        kind = _KINDS[kind_code]
        if kind == "training":
            k = int(rng.choice(self.train_k, p=self.train_kp))
            job = self._new_job(kind, 2.0, 0.0, k, 2 * HOUR * rng.lognormal(0.0, 0.6))
        else:
            job = self._new_job(
                kind,
                float(rng.choice([1, 2, 4, 8], p=[0.3, 0.35, 0.25, 0.1])),
                0.0,
                1,
                2400 * rng.lognormal(0.0, 0.8),
            )
        if not self._try(job):
            self.queue.append(job.id)
        self._push(self.now + rng.exponential(1.0 / self.rate[kind]), _ARRIVE, kind_code)

    def _retry(self) -> None:
        queue, self.queue = self.queue, []
        failures = 0
        for jid in queue:
            job = self.jobs[jid]
            # Give up for this tick after a run of failures: the cluster is full.
            if failures >= 64 or not self._try(job):
                self.queue.append(jid)
                failures += 1

    def run(self, profiles: Mapping[str, Any]) -> dict[str, Any]:
        self.profiles = profiles
        f = self.f
        horizon = self.p.horizon_h * HOUR
        for i in range(self.n):
            if f.up_at_0[i]:
                self.up[i] = True
                self.up_cpus += f.cpus[i]
                self._pool_add(i)
                self._push(f.end[i], _LEAVE, i, int(self.epoch[i]))
            else:
                self._push(f.start[i], _JOIN, i)
        self._workload()
        self._push(0.0, _RETRY)
        self._push(HOUR, _REFIT)
        next_report = 0.0
        while self.events:
            t, _, code, a, b = heapq.heappop(self.events)
            if t > horizon:
                break
            self._advance(t)
            if code == _LEAVE:
                if self.up[a] and self.epoch[a] == b:
                    self._leave(a)
            elif code == _JOIN:
                session = f.up_scale[a] * self.rng.weibull(f.up_shape[a])
                self._join(a, t, session)
            elif code == _ARRIVE:
                self._arrive(a)
            elif code == _BATCH_DONE:
                job = self.jobs[a]
                if job.epoch == b:
                    self._release(job)
                    job.done = t
            elif code == _CKPT:
                job = self.jobs[a]
                if job.epoch == b:
                    job.saved += job.rate * (t - job.ckpt_t)
                    job.ckpt_t = t
                    remaining = (job.work - job.saved) / job.rate
                    if remaining <= CHECKPOINT_S:
                        self._push(t + remaining, _TRAIN_DONE, a, b)
                    else:
                        self._push(t + CHECKPOINT_S, _CKPT, a, b)
            elif code == _TRAIN_DONE:
                job = self.jobs[a]
                if job.epoch == b:
                    self._release(job)
                    job.done = t
            elif code == _RETRY:
                self._retry()
                self._push(t + RETRY_S, _RETRY)
            elif code == _REFIT:
                rows = np.array(sorted(self.dirty), dtype=np.int64)
                self.dirty.clear()
                if rows.size:
                    shape, scale = self._fit(rows, t)
                    self.table.shape[rows] = shape
                    self.table.scale_s[rows] = scale
                self._push(t + HOUR, _REFIT)
            if self.on_progress and t >= next_report:
                self.on_progress(t / horizon)
                next_report = t + horizon / 200
        self._advance(horizon)
        return self._metrics(horizon)

    def _metrics(self, horizon: float) -> dict[str, Any]:
        lat = np.array(self.lat, dtype=np.float64) / 1e6
        jobs = [j for j in self.jobs.values() if j.kind != "inference" and j.submit <= horizon / 2]
        completion = [(j.done if not math.isnan(j.done) else horizon) - j.submit for j in jobs]
        finished = sum(1 for j in jobs if not math.isnan(j.done))
        per_kind = {}
        for kind in ("training", "batch"):
            ks = [
                (j.done if not math.isnan(j.done) else horizon) - j.submit
                for j in jobs
                if j.kind == kind
            ]
            per_kind[kind] = float(np.mean(ks)) if ks else math.nan
        # Work finished, in CPU-seconds at reference speed: what the fleet delivered.
        delivered = sum(j.work * j.cpus * j.k for j in self.jobs.values() if not math.isnan(j.done))
        return {
            "decisions": int(lat.size),
            "decision_p50_ms": float(np.percentile(lat, 50)) if lat.size else math.nan,
            "decision_p99_ms": float(np.percentile(lat, 99)) if lat.size else math.nan,
            "decisions_per_s": float(lat.size / (lat.sum() / 1e3)) if lat.size else math.nan,
            "work_lost_fraction": self.lost / self.job_busy if self.job_busy else 0.0,
            "work_lost_cpu_s": self.lost,
            "mean_job_completion_s": float(np.mean(completion)) if completion else math.nan,
            "mean_completion_by_kind_s": per_kind,
            "jobs_finished_fraction": finished / len(jobs) if jobs else math.nan,
            "utilization": self.busy / self.cap if self.cap else 0.0,
            "completed_work_ref_cpu_s": delivered,
            "training_restarts": self.restarts,
            "replica_losses": self.replica_losses,
            "queued_at_end": len(self.queue),
        }


# --------------------------------------------------------------------------- driver


def simulate(
    params: Params, profiles: Mapping[str, Any], progress: Any | None = None
) -> dict[str, Any]:
    """Run every policy on the same fleet; per-policy metrics and dgpt-to-baseline ratios."""
    fleet = build_fleet(params.donors, profiles, np.random.default_rng(params.seed))
    out: dict[str, Any] = {}
    for name in POLICIES:
        task_id = None
        if progress is not None:
            task_id = progress.add_task(f"{params.donors:>7,} donors  {name:<11}", total=1.0)

        def report(frac: float, _task: Any = task_id) -> None:
            if progress is not None:
                progress.update(_task, completed=min(frac, 1.0))

        t0 = time.perf_counter()
        out[name] = Simulation(name, fleet, params, report).run(profiles)
        out[name]["wall_s"] = time.perf_counter() - t0
        report(1.0)
    ratios: dict[str, dict[str, float]] = {}
    for base in POLICIES[1:]:
        ratios[base] = {
            key: (out["dgpt"][key] / out[base][key]) if out[base][key] else math.nan
            for key in (
                "work_lost_fraction",
                "mean_job_completion_s",
                "utilization",
                "completed_work_ref_cpu_s",
            )
        }
    return {"params": dataclasses.asdict(params), "policies": out, "dgpt_vs": ratios}


def _print_table(results: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for run in results["runs"]:
        p = run["params"]
        table = Table(
            title=f"fleet_sim: {p['donors']:,} donors, {p['horizon_h']:g} h, seed {p['seed']}"
        )
        for col in (
            "policy",
            "p50 ms",
            "p99 ms",
            "decisions/s",
            "work lost",
            "mean completion h",
            "utilization",
            "restarts",
            "replica losses",
        ):
            table.add_column(col, justify="right")
        for name, m in run["policies"].items():
            table.add_row(
                name,
                f"{m['decision_p50_ms']:.3f}",
                f"{m['decision_p99_ms']:.3f}",
                f"{m['decisions_per_s']:,.0f}",
                f"{m['work_lost_fraction']:.4f}",
                f"{m['mean_job_completion_s'] / HOUR:.2f}",
                f"{m['utilization']:.3f}",
                str(m["training_restarts"]),
                str(m["replica_losses"]),
            )
        console.print(table)
        for base, r in run["dgpt_vs"].items():
            console.print(
                f"  dgpt / {base}: work lost x{r['work_lost_fraction']:.2f}, "
                f"completion x{r['mean_job_completion_s']:.2f}, utilization x{r['utilization']:.2f}, "
                f"work delivered x{r['completed_work_ref_cpu_s']:.2f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_sim", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--donors",
        type=int,
        action="append",
        help="fleet size (repeatable); default 10000 and 100000",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small fleet, short horizon: seconds, for CI"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hours", type=float, help="simulated hours (default 8, quick 6)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    sizes = args.donors or ([3000] if args.quick else [10_000, 100_000])
    if any(n < 10 for n in sizes):
        parser.error("--donors must be at least 10")
    hours = args.hours or (6.0 if args.quick else 8.0)
    path = find_churn_profiles()
    profiles = json.loads(path.read_text())

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    runs = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        disable=not sys.stderr.isatty() and not sys.stdout.isatty(),
    ) as progress:
        for n in sizes:
            runs.append(
                simulate(Params(donors=n, horizon_h=hours, seed=args.seed), profiles, progress)
            )
    results = {
        "benchmark": "fleet_sim",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "churn_profiles": str(path),
        "quick": bool(args.quick),
        "runs": runs,
        # Headline: the largest fleet, flattened for dashboards.
        "policies": runs[-1]["policies"],
        "dgpt_vs": runs[-1]["dgpt_vs"],
        "params": runs[-1]["params"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    _print_table(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
