"""Baseline placement policies the fleet simulator compares dgpt's against.

Both see exactly the candidates dgpt's policy sees (:func:`feasible_candidates`) and obey
the same hard rules (capacity, GPU only on GPU donors, gangs whole on distinct donors), so
the comparison isolates the *choice* among candidates:

- ``random``: a uniformly random candidate.
- ``pack-spread``: Ray's default hybrid policy, which ignores reliability and speed: pack
  onto the busiest node that stays under 50% CPU utilisation, else spread onto the least
  utilised one. Replicas use Serve's default, spread (least utilised first).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from dgpt.fleet import DonorTable, IntArray
from dgpt.placement.policy import (
    DEFAULT_SAMPLE,
    MAX_GANG_SAMPLE,
    Decision,
    Placement,
    Unplaced,
    WorkloadKind,
    feasible_candidates,
)
from dgpt.resources import Resources

#: Ray's hybrid scheduling threshold (RAY_scheduler_spread_threshold defaults to 0.5).
SPREAD_THRESHOLD = 0.5


def _decision(
    table: DonorTable, kind: WorkloadKind, nodes: Sequence[int], requests: Sequence[Resources]
) -> Placement:
    return Placement(
        kind=kind,
        nodes=tuple(nodes),
        node_ids=tuple(table.node_ids[n] for n in nodes),
        donor_ids=tuple(table.donor_ids[n] for n in nodes),
        requests=tuple(requests),
        p_stay=float("nan"),
        horizon_s=0.0,
    )


def _hybrid_order(table: DonorTable, idx: IntArray, request: Resources) -> IntArray:
    total = np.maximum(table.cpu_total[idx], 1e-9)
    util_after = 1.0 - (table.cpu_free[idx] - request.cpus) / total
    below = util_after <= SPREAD_THRESHOLD
    # Busiest-under-threshold first (pack), then least utilised (spread).
    key = np.where(below, -util_after, 10.0 + util_after)
    return idx[np.argsort(key, kind="stable")]


def _spread_order(table: DonorTable, idx: IntArray) -> IntArray:
    util = 1.0 - table.cpu_free[idx] / np.maximum(table.cpu_total[idx], 1e-9)
    return idx[np.argsort(util, kind="stable")]


def task(
    name: str,
    table: DonorTable,
    request: Resources,
    rng: np.random.Generator,
    kind: WorkloadKind,
) -> Decision:
    """One task or actor, by baseline ``name`` (``random`` or ``pack-spread``)."""
    idx, _ = feasible_candidates(table, request, 1, DEFAULT_SAMPLE, rng)
    if idx.size == 0:
        return Unplaced(kind, "no donor fits")
    node = (
        int(idx[rng.integers(idx.size)])
        if name == "random"
        else int(_hybrid_order(table, idx, request)[0])
    )
    return _decision(table, kind, [node], [request])


def gang(
    name: str, table: DonorTable, bundles: Sequence[Resources], rng: np.random.Generator
) -> Decision:
    """k identical bundles on k distinct donors, whole or nothing."""
    k = len(bundles)
    request = bundles[0]
    idx, _ = feasible_candidates(
        table, request, k, min(max(DEFAULT_SAMPLE, 8 * k), MAX_GANG_SAMPLE), rng
    )
    if idx.size < k:
        return Unplaced(WorkloadKind.TRAINING, "gang does not fit")
    if name == "random":
        nodes = rng.choice(idx, size=k, replace=False)
    else:
        nodes = _hybrid_order(table, idx, request)[:k]
    return _decision(table, WorkloadKind.TRAINING, [int(n) for n in nodes], bundles)


def replicas(
    name: str,
    table: DonorTable,
    request: Resources,
    count: int,
    rng: np.random.Generator,
    existing_owners: Collection[str] = (),
) -> Decision:
    """``count`` replicas on distinct donors (owners ignored, as Serve's default does)."""
    idx, _ = feasible_candidates(table, request, count, DEFAULT_SAMPLE, rng)
    if idx.size == 0:
        return Unplaced(WorkloadKind.INFERENCE, "no donor fits")
    if name == "random":
        nodes = rng.choice(idx, size=min(count, idx.size), replace=False)
    else:
        nodes = _spread_order(table, idx)[:count]
    return _decision(table, WorkloadKind.INFERENCE, [int(n) for n in nodes], [request] * len(nodes))
