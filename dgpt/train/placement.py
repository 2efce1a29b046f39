"""Which donors a training run's workers may use: likely to stay for the horizon, of similar speed.

Pure, over the fleet's donors as ``dgpt.fleet.FleetDonor`` (the live fleet view comes
from the head through ``dgpt.train.live``). Steps:

1. drop donors that cannot host one worker (too few CPUs, GPUs or memory; GPU work only
   on GPU donors), that are draining, or whose owner is back;
2. pick the *gang*: ``max_workers`` distinct donors chosen by dgpt's gang policy
   (``dgpt.placement.place_gang``: maximise ``log(min speed) + sum log P(member stays)``),
   standby donors included as if activated now (their uptime starts at zero);
3. extend the gang with *spares*: donors at least as likely to stay as the gang's weakest
   member and no slower than ``SPEED_TOLERANCE`` below its slowest, so an elastic run can
   replace a departed worker, or grow, without dragging the gang's pace down;
4. emit a Ray label selector naming them all (``dgpt.io/donor-id in (...)``, donors only),
   which Ray Train applies to every worker and its ``request_resources`` demand, so
   dgpt's autoscaler activates exactly these standby donors.

A worker per donor (``one_per_donor``) is the default: a donor is both a failure domain and
a unit of churn, so two workers on one donor double what its departure costs and gain
nothing torch threads could not use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dgpt import contract
from dgpt.fleet import FleetDonor, build_table
from dgpt.placement.policy import Placement, WorkloadKind, place_gang
from dgpt.resources import Resources

#: Spares may be this much slower than the gang's slowest member: a data-parallel gang
#: runs at its slowest worker, and 20% is about the run-to-run noise of donor benchmarks.
SPEED_TOLERANCE = 0.2
#: At most this many spares per gang member: enough to replace every worker a few times
#: over, and a selector that stays short however large the fleet.
MAX_SPARES_PER_WORKER = 3


@dataclass(frozen=True)
class WorkerShape:
    """What one training worker needs on its donor."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: float = 0.0

    @property
    def resources(self) -> Resources:
        return Resources(self.cpus, self.gpus, self.memory_bytes)

    def fits(self, d: FleetDonor) -> bool:
        """Room for one worker in what the donor has free (its caps when not running)."""
        return self.resources.fits_in(d.free)

    def slots(self, d: FleetDonor, one_per_donor: bool) -> int:
        if not self.fits(d):
            return 0
        if one_per_donor:
            return 1
        room = d.free
        n = [math.floor(room.cpus / self.cpus)] if self.cpus > 0 else []
        if self.gpus > 0:
            n.append(math.floor(room.gpus / self.gpus))
        if self.memory_bytes > 0:
            n.append(math.floor(room.memory_bytes / self.memory_bytes))
        return max(1, min(n)) if n else 1


@dataclass(frozen=True)
class WorkerPlacement:
    """The donors a run may use, best first, and why the others were left out."""

    donor_ids: tuple[str, ...]
    gang: tuple[str, ...]
    slots: int
    gang_p_stay: float
    speed_floor_gflops: float
    min_member_p_stay: float
    excluded: Mapping[str, str]

    @property
    def label_selector(self) -> dict[str, str]:
        """The Ray label selector for every worker (donors only, when nothing could be chosen)."""
        if not self.donor_ids:
            return {contract.LABEL_ROLE: contract.ROLE_DONOR}
        # No spaces after the commas: Ray 2.60's placement groups compare "in(a, b)" values
        # with the space kept, so " b" matches no node (its Python validation allows it).
        return {contract.LABEL_ROLE: contract.ROLE_DONOR, contract.LABEL_DONOR_ID: f"in({','.join(self.donor_ids)})"}

    def describe(self) -> str:
        return (f"{len(self.gang)} gang donors (P(all stay)={self.gang_p_stay:.2f}, slowest "
                f"{self.speed_floor_gflops:.1f} GFLOPS) + {len(self.donor_ids) - len(self.gang)} spares; "
                f"{len(self.excluded)} excluded")


def _exclusion(d: FleetDonor, shape: WorkerShape) -> str | None:
    if not d.is_donor:
        return "the head runs no user work"
    if d.draining:
        return "draining"
    if not contract.is_valid_label_value(d.donor_id):
        return "donor id cannot be used in a label selector"
    if shape.gpus > 0 and d.caps.gpus <= 0:
        return "no GPU"
    if not shape.fits(d):
        free = d.free
        return (f"too small for a worker ({free.cpus:g} CPU, {free.gpus:g} GPU, {free.memory_bytes / 2**30:.1f} GiB "
                f"free < {shape.cpus:g} CPU, {shape.gpus:g} GPU, {shape.memory_bytes / 2**30:.1f} GiB)")
    return None


def choose_donors(
    candidates: Sequence[FleetDonor],
    shape: WorkerShape,
    max_workers: int,
    horizon_s: float,
    now_s: float,
    *,
    one_per_donor: bool = True,
) -> WorkerPlacement:
    """The donors a run of up to ``max_workers`` workers may use (see the module docstring).

    Args:
        candidates: every donor the fleet knows (running, activating and standby).
        shape: one worker's needs.
        max_workers: the run's upper bound.
        horizon_s: how long the run should hold together (its expected remaining length).
        now_s: the clock of the candidates' ``since_s``.
        one_per_donor: at most one worker per donor (the default; see the module docstring).

    Returns:
        The placement; with no usable donor, an empty one (``slots == 0``) listing why.
    """
    excluded: dict[str, str] = {}
    usable = []
    for d in candidates:
        why = _exclusion(d, shape)
        if why:
            excluded[d.donor_id] = why
        else:
            usable.append(d)
    if not usable:
        return WorkerPlacement((), (), 0, 0.0, 0.0, 0.0, excluded)
    # The gang: as many distinct donors as workers (one per donor), or fewer when short.
    k = min(max_workers, len(usable))
    decision = place_gang(build_table(usable), [shape.resources] * k, now_s, horizon_s=horizon_s,
                          kind=WorkloadKind.TRAINING)
    assert isinstance(decision, Placement), "every usable donor fits one worker"
    by_id = {d.donor_id: d for d in usable}
    gang = [by_id[i] for i in decision.donor_ids]
    floor = min(d.gflops for d in gang)
    weakest = min(d.p_stay(now_s, horizon_s) for d in gang)
    spares = [d for d in usable if d.donor_id not in decision.donor_ids]
    ok = [d for d in spares if d.gflops >= floor * (1.0 - SPEED_TOLERANCE) and d.p_stay(now_s, horizon_s) >= weakest]
    ok.sort(key=lambda d: (-d.p_stay(now_s, horizon_s), -d.gflops, d.donor_id))
    ok = ok[: MAX_SPARES_PER_WORKER * k]
    for d in spares:
        if d not in ok:
            excluded[d.donor_id] = ("slower than the gang" if d.gflops < floor * (1.0 - SPEED_TOLERANCE)
                                    else "less likely to stay than the gang's members"
                                    if d.p_stay(now_s, horizon_s) < weakest else "enough spares already")
    gang.sort(key=lambda d: (-d.p_stay(now_s, horizon_s), -d.gflops, d.donor_id))
    chosen = gang + ok
    return WorkerPlacement(
        donor_ids=tuple(d.donor_id for d in chosen),
        gang=tuple(d.donor_id for d in gang),
        slots=sum(shape.slots(d, one_per_donor) for d in chosen),
        gang_p_stay=decision.p_stay,
        speed_floor_gflops=floor,
        min_member_p_stay=weakest,
        excluded=excluded,
    )
