"""Collecting one tick's frozen context from the registry's donors and Ray's usage and demand.

Pure over its inputs: the loop fetches donors (registry) and usage/demand (the Ray adapter)
and hands them here, so tests build contexts from plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from autoscaler.bounds import AutoscalerBounds
from autoscaler.context import (
    ActiveNode,
    AutoscalerContext,
    DonorProfile,
    GangDemand,
    ResourceShape,
    StandbyDonor,
)
from dgpt.head.ray_adapter import ClusterDemand, DemandShape, NodeUsage
from dgpt.reliability.model import WeibullParams, fit_recorded
from dgpt.sdk.models import DonorView


def donor_profile(d: DonorView) -> DonorProfile:
    """What the autoscaler needs to know of a donor: its caps, speed, class, owner, labels."""
    gpus = float(d.caps.gpus)
    return DonorProfile(
        cpus=float(d.caps.cpus),
        memory_bytes=float(d.caps.memory_bytes),
        gpus=gpus,
        gpu_model=d.labels.get("dgpt.io/gpu") if gpus else None,
        gflops=d.gflops,
        device_class=d.device_class,
        owner=d.owner,
        labels=dict(d.labels),
    )


def reliability(d: DonorView, now_s: float) -> WeibullParams:
    """The donor's uptime model from its recorded sessions and its device-class prior."""
    return fit_recorded(d.sessions, d.device_class, now_s)


def _idle_since(d: DonorView) -> float:
    """When the donor's current availability began: its last session's end, else registration."""
    ended = [s.ended_at for s in d.sessions if s.ended_at is not None]
    return max(ended) if ended else d.registered_at


def _shape(s: DemandShape) -> ResourceShape:
    return ResourceShape.from_mapping(s.resources, s.label_selector)


def _apply_constraints(
    constraints: Sequence[DemandShape], active: list[ActiveNode]
) -> tuple[list[ResourceShape], list[ActiveNode]]:
    """request_resources() bundles reserve capacity: each goes onto an active donor's total
    capacity (first fit), which then counts as used (and busy, so it is not drained); the
    bundles that fit nowhere become pending demand."""
    live = {n.donor_id for n in active if not n.draining}
    room = {n.donor_id: [n.profile.cpus, n.profile.gpus, n.profile.memory_bytes] for n in active if n.donor_id in live}
    taken: dict[str, list[float]] = {}
    missing = []
    for c in sorted(constraints, key=lambda c: -c.resources.get("CPU", 0.0)):
        shape = _shape(c)
        need = [shape.cpus, shape.gpus, shape.memory_bytes]
        for donor_id, r in room.items():
            if all(n <= have + 1e-9 for n, have in zip(need, r, strict=True)):
                room[donor_id] = [have - n for n, have in zip(need, r, strict=True)]
                got = taken.setdefault(donor_id, [0.0, 0.0, 0.0])
                taken[donor_id] = [g + n for g, n in zip(got, need, strict=True)]
                break
        else:
            missing.append(shape)
    out = []
    for n in active:
        if n.donor_id in taken:
            cpus, gpus, mem = taken[n.donor_id]
            free = n.available
            n = replace(n, idle_s=0.0, available=ResourceShape(
                max(0.0, free.cpus - cpus), max(0.0, free.gpus - gpus), max(0.0, free.memory_bytes - mem),
                free.label_selector))
        out.append(n)
    return missing, out


def build_context(
    donors: Iterable[DonorView],
    usage: Iterable[NodeUsage],
    demand: ClusterDemand,
    bounds: AutoscalerBounds,
    now_s: float,
    heartbeat_timeout_s: float,
) -> AutoscalerContext:
    """One tick's frozen context.

    Args:
        donors: every registered donor (registry), with recent sessions.
        usage: Ray's per-node resource state (nodes without a donor, like the head, are ignored).
        demand: Ray's unmet demand: pending tasks/actors (Serve replicas and Train workers
            waiting for a node are pending actors), placement groups, request_resources().
        bounds: the autoscaler's limits.
        now_s: the clock (epoch seconds, the registry's clock).
        heartbeat_timeout_s: donors silent for longer are not counted as available.
    """
    by_node = {u.node_id: u for u in usage}
    active: list[ActiveNode] = []
    activating: list[StandbyDonor] = []
    standby: list[StandbyDonor] = []
    for d in donors:
        fresh = d.last_heartbeat_at is not None and now_s - d.last_heartbeat_at <= heartbeat_timeout_s
        profile = donor_profile(d)
        params = reliability(d, now_s)
        node = by_node.get(d.node_id or "")
        target = d.stats.get("target", "standby")
        if d.state in ("active", "draining") and node is not None and node.status != "DEAD":
            active.append(ActiveNode(
                donor_id=d.donor_id, profile=profile,
                available=ResourceShape.from_mapping(node.available),
                idle_s=node.idle_s, session_start_s=d.session_started_at(now_s), reliability=params,
                draining=d.state == "draining" or node.status == "DRAINING",
            ))
        elif not fresh or d.owner_active or d.state in ("gone", "draining"):
            continue  # not available: silent, owner back, or on its way out
        elif d.state == "activating" or (d.state in ("standby", "active") and target == "active"):
            activating.append(StandbyDonor(d.donor_id, profile, _idle_since(d), params))
        elif d.state in ("standby", "registered"):
            standby.append(StandbyDonor(d.donor_id, profile, _idle_since(d), params))
    unfit, active = _apply_constraints(demand.constraints, active)
    pending = [_shape(s) for s in demand.shapes] + unfit
    gangs = [GangDemand(tuple(_shape(b) for b in g.bundles), g.strategy) for g in demand.gangs]
    return AutoscalerContext(now_s=now_s, bounds=bounds, pending=pending, pending_gangs=gangs,
                             active=active, activating=activating, standby=standby)
