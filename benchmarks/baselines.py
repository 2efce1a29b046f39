"""Baseline placement policies the fleet simulator compares dgpt's against.

All see exactly the candidates dgpt's policy sees (:func:`feasible_candidates`) and obey
the same hard rules (capacity, GPU only on GPU donors, a gang whole or not at all), so the
comparison isolates the *choice* among candidates. None looks at reliability or speed.

- ``random``: a uniformly random candidate; gangs on k distinct random candidates.
- ``pack-spread``: Ray's defaults without dgpt. Tasks and actors: Ray's hybrid policy, pack
  onto the busiest node that stays under 50% CPU utilisation, else spread onto the least
  utilised one. Replicas: Serve's default, spread (least utilised first). Gangs: a
  ``STRICT_SPREAD`` placement group, each bundle on the distinct node Ray's
  ``LeastResourceScorer`` rates best (``bundle_scheduling_policy.cc``).
- ``ray-pack``: as ``pack-spread``, but gangs are a ``PACK`` placement group, Ray's default
  strategy: the best-scored node takes the first bundle and then every further bundle that
  still fits on it, then the next node, and so on; members may share a donor.

Ray's ``LeastResourceScorer`` scores a node by the sum, over the resources a bundle asks
for, of ``(available - requested) / available``: the node with the most room left after
the bundle, relative to what it has free, wins.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from dgpt.fleet import DonorTable, FloatArray, IntArray
from dgpt.placement.policy import (
    DEFAULT_SAMPLE,
    MAX_GANG_SAMPLE,
    Decision,
    Placement,
    Unplaced,
    WorkloadKind,
    feasible_candidates,
)
from dgpt.resources import EPS, Resources

#: Ray's hybrid scheduling threshold (RAY_scheduler_spread_threshold defaults to 0.5).
SPREAD_THRESHOLD = 0.5
#: The baselines, by name.
NAMES = ("random", "pack-spread", "ray-pack")


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


def least_resource_score(
    cpu_free: FloatArray, gpu_free: FloatArray, mem_free: FloatArray, request: Resources
) -> FloatArray:
    """Ray's ``LeastResourceScorer``: sum of ``(free - asked) / free`` over asked resources;
    -1 where the request does not fit."""
    score = np.zeros(cpu_free.shape)
    fits = np.ones(cpu_free.shape, dtype=bool)
    for asked, free in ((request.cpus, cpu_free), (request.gpus, gpu_free), (request.memory_bytes, mem_free)):
        if asked > 0:
            fits &= free >= asked - EPS
            score += np.where(free > 0, (free - asked) / np.maximum(free, EPS), 0.0)
    return np.where(fits, score, -1.0)


def task(
    name: str,
    table: DonorTable,
    request: Resources,
    rng: np.random.Generator,
    kind: WorkloadKind,
) -> Decision:
    """One task or actor, by baseline ``name`` (random, or Ray's hybrid policy)."""
    idx, _ = feasible_candidates(table, request, 1, DEFAULT_SAMPLE, rng)
    if idx.size == 0:
        return Unplaced(kind, "no donor fits")
    node = (
        int(idx[rng.integers(idx.size)])
        if name == "random"
        else int(_hybrid_order(table, idx, request)[0])
    )
    return _decision(table, kind, [node], [request])


def _pack(table: DonorTable, idx: IntArray, request: Resources, k: int) -> list[int] | None:
    """Ray's PACK for k identical bundles over candidates ``idx``; None when they do not fit."""
    if idx.size == 0:
        return None
    cpu, gpu, mem = table.cpu_free[idx].copy(), table.gpu_free[idx].copy(), table.mem_free[idx].copy()
    open_ = np.ones(idx.size, dtype=bool)
    nodes: list[int] = []
    while len(nodes) < k:
        score = np.where(open_, least_resource_score(cpu, gpu, mem, request), -1.0)
        j = int(np.argmax(score))
        if score[j] < 0:
            return None
        # The best node takes this bundle and then every further one that still fits.
        n = k - len(nodes)
        for asked, have in ((request.cpus, cpu[j]), (request.gpus, gpu[j]), (request.memory_bytes, mem[j])):
            if asked > 0:
                n = min(n, int((have + EPS) // asked))
        cpu[j] -= n * request.cpus
        gpu[j] -= n * request.gpus
        mem[j] -= n * request.memory_bytes
        nodes.extend([int(idx[j])] * n)
        open_[j] = False
    return nodes


def _strict_spread(table: DonorTable, idx: IntArray, request: Resources, k: int) -> list[int] | None:
    """Ray's STRICT_SPREAD for k identical bundles: the k best-scored distinct candidates."""
    score = least_resource_score(table.cpu_free[idx], table.gpu_free[idx], table.mem_free[idx], request)
    order = np.argsort(-score, kind="stable")[:k]
    if order.size < k or score[order[-1]] < 0:
        return None
    return [int(idx[j]) for j in order]


def gang(
    name: str, table: DonorTable, bundles: Sequence[Resources], rng: np.random.Generator
) -> Decision:
    """k identical bundles, whole or nothing: distinct donors, except for ``ray-pack``."""
    k = len(bundles)
    request = bundles[0]
    idx, _ = feasible_candidates(
        table, request, k, min(max(DEFAULT_SAMPLE, 8 * k), MAX_GANG_SAMPLE), rng
    )
    nodes: list[int] | None
    if name == "ray-pack":
        nodes = _pack(table, idx, request, k)
    elif idx.size < k:
        nodes = None
    elif name == "random":
        nodes = [int(n) for n in rng.choice(idx, size=k, replace=False)]
    else:
        nodes = _strict_spread(table, idx, request, k)
    if nodes is None:
        return Unplaced(WorkloadKind.TRAINING, "gang does not fit")
    return _decision(table, WorkloadKind.TRAINING, nodes, bundles)


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
