"""The cell router: which cell a new donor joins, and which cell takes a job (pure, O(cells)).

Past one head and Ray's envelope of a few thousand nodes, dgpt runs *cells*: each a Ray
cluster with its own head, its own active set (at most ``max_active`` donors) and its own
standby donors; one registry in front assigns donors to cells and routes work to them. The
registry knows a cell only by the :class:`CellSummary` its head reports every autoscaler
tick, less what the registry itself routed there since (``claims_cpus``), so a burst of
jobs between two reports does not all land on the cell that looked emptiest.

Donors (:func:`assign_donor`): a new donor joins the cell with the fewest donors, so cells
stay within one donor of each other; it keeps that cell for good (its sessions, reliability
and credit live with that head).

Jobs (:func:`route_job`): a job is one Ray unit of a cell (a placement group, a task, a Serve
deployment: none can span two Ray clusters). Cells fall in three tiers, and the first tier
that holds any cell wins:

1. *fits now*: the cell's active donors have the job's CPU and GPU free, and enough donors
   with a bundle's CPUs free (k distinct ones for a gang);
2. *can grow*: the cell may activate more donors (room under ``max_active``) and its standby
   donors hold the job's CPU and GPU;
3. otherwise the cell with the least backlog (pending demand per CPU of capacity).

Within tier 1 a cell scores ``log P(stay horizon)`` of its free capacity (the mean over its
free CPUs, in the units of the donor score) plus the share of its capacity left free after
the job: reliable and roomy first, as placement does inside a cell. Within tier 2 it scores
the CPUs it could still activate less those already claimed. Ties go to the lowest index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dgpt.resources import EPS, Resources

#: Horizons at which cells report the reliability of their free capacity; a job is judged at
#: the nearest one in log time (10 min batch, 1 h replica, 4 h and 12 h training).
ROUTE_HORIZONS_S = (600.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
#: CPU sizes at which cells count donors with that much free (a bundle of c CPUs is judged
#: at the smallest size >= c).
FREE_CPU_STEPS = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True, slots=True)
class CellSummary:
    """What a cell's head reports to the registry each tick.

    ``free_cpus`` / ``free_gpus``: free on active, non-draining donors. ``donors_with_free``:
    how many active donors have at least ``FREE_CPU_STEPS[i]`` CPUs free. ``capacity_cpus``:
    CPUs of its active donors. ``room``: donors it may still activate (``max_active`` less
    active and activating). ``standby``, ``standby_cpus``, ``standby_gpus``: its standby
    donors and what they offer. ``log_p_stay[i]``: the free-CPU-weighted mean log P(stay ``ROUTE_HORIZONS_S[i]``)
    of its active donors (0 when none is free). ``pending_cpus``: demand waiting in the cell.
    """

    cell: int
    donors: int
    active: int
    room: int
    capacity_cpus: float
    free_cpus: float
    free_gpus: float
    donors_with_free: tuple[int, ...]
    standby: int
    standby_cpus: float
    standby_gpus: float
    log_p_stay: tuple[float, ...]
    pending_cpus: float = 0.0


def assign_donor(sizes: Sequence[int], capacity: int | None = None) -> int | None:
    """The cell a new donor joins: the one with the fewest donors (lowest index on ties).

    Returns None when every cell holds ``capacity`` donors already (open a new cell).
    """
    best: int | None = None
    for c, n in enumerate(sizes):
        if (capacity is None or n < capacity) and (best is None or n < sizes[best]):
            best = c
    return best


def _horizon_index(horizon_s: float) -> int:
    h = math.log(max(horizon_s, 1.0))
    return min(range(len(ROUTE_HORIZONS_S)), key=lambda i: abs(math.log(ROUTE_HORIZONS_S[i]) - h))


def _step_index(cpus: float) -> int:
    for i, step in enumerate(FREE_CPU_STEPS):
        if cpus <= step + EPS:
            return i
    return len(FREE_CPU_STEPS) - 1


def route_job(
    cells: Sequence[CellSummary],
    claims_cpus: Sequence[float],
    request: Resources,
    count: int,
    horizon_s: float,
    *,
    distinct: bool = False,
) -> int:
    """The cell that takes ``count`` bundles of ``request`` for about ``horizon_s`` seconds.

    Args:
        cells: the latest summary of every cell (at least one).
        claims_cpus: CPUs routed to each cell since its summary (same order as ``cells``).
        request: one bundle (a task, a replica, a gang member).
        count: bundles in the job (a gang's size, a deployment's replicas).
        horizon_s: how long the job must hold (what it declared, or its kind's default).
        distinct: the bundles need distinct donors (a STRICT_SPREAD gang).

    Returns:
        The index into ``cells`` of the chosen cell.

    Raises:
        ValueError: no cells, or ``claims_cpus`` does not match them.
    """
    if not cells:
        raise ValueError("route_job needs at least one cell")
    if len(claims_cpus) != len(cells):
        raise ValueError(f"claims_cpus has {len(claims_cpus)} entries for {len(cells)} cells")
    need_cpus = request.cpus * count
    need_gpus = request.gpus * count
    need_donors = count if distinct else 1
    h = _horizon_index(horizon_s)
    step = _step_index(request.cpus)
    best, best_key = 0, (-1, -math.inf)
    for c, s in enumerate(cells):
        claimed = claims_cpus[c]
        free = s.free_cpus - claimed
        # Claims since the report took whole donors' worth of this step, at worst.
        donors_free = s.donors_with_free[step] - claimed / max(FREE_CPU_STEPS[step], request.cpus, EPS)
        cap = max(s.capacity_cpus, 1.0)
        if free + EPS >= need_cpus and s.free_gpus + EPS >= need_gpus and donors_free >= need_donors:
            key = (2, s.log_p_stay[h] + (free - need_cpus) / cap)
        elif s.room > 0 and s.standby_cpus + EPS >= need_cpus and s.standby_gpus + EPS >= need_gpus:
            # CPUs it could still bring in (room x its standby donors' mean size), less claims.
            room_cpus = min(s.room, s.standby) * s.standby_cpus / max(s.standby, 1)
            key = (1, room_cpus - claimed)
        else:
            key = (0, -(s.pending_cpus + claimed) / cap)
        if key > best_key:
            best, best_key = c, key
    return best


def round_robin(job_number: int, cells: int) -> int:
    """The baseline: the n-th job goes to cell n mod cells (hash sharding, blind to state)."""
    return job_number % cells
