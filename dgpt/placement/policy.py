"""Placement policy: pure functions from a node table and a request to a placement decision.

Three workload kinds, three objectives:

- ``training`` gangs (:func:`place_gang`): k bundles on k distinct donors, whole or not at
  all. A gang runs at its slowest member and loses the work since its last checkpoint when
  any member leaves, so it maximises ``log(min speed) + sum(log P(member stays horizon))``
  and avoids wasting donors much faster than the gang's slowest member.
- ``inference`` replicas (:func:`place_replicas`): spread over owners (failure domains), then
  prefer free, lightly loaded, fast donors that are likely to stay the next hour.
- ``batch`` tasks (:func:`place_task`): must likely finish their own (short) run, but leave
  donors that are likely to stay for hours free for long work: short-lived donors first.

Donors reached only through the head's overlay relay (``relayed``) have little bandwidth to
the rest of the cluster: a gang's all-reduce would run at the relay's pace, while a replica's
requests and a batch task's inputs are small. So gangs avoid them and replicas and batch
tasks prefer them, which keeps direct donors free for gangs.

Every kind spreads by free capacity so no donor runs hot while others idle, never puts GPU
work on a GPU-less donor, and never puts more on a donor than it has free.

Scale: at 100k donors a decision must take well under 2 ms, so a decision scores a random
sample of candidates (``sample`` nodes, vectorised) instead of every node, and falls back to
a full vectorised scan only when the sample holds too few nodes that fit (or, for replicas,
no node of an unused owner). With at most ``sample`` usable nodes the scan is exhaustive and
the result deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from dgpt.contract import selector_matches
from dgpt.exceptions import PlacementError
from dgpt.fleet import DonorTable, FloatArray, IntArray
from dgpt.reliability.model import log_stay_probability, stay_probability
from dgpt.reliability.score import REFERENCE_GFLOPS, donor_score
from dgpt.resources import EPS as _EPS
from dgpt.resources import Resources

#: Candidates scored per decision at scale. 256 random nodes contain, in expectation, the
#: top 0.4% of the fleet by any score: close to the best, at ~50 us of numpy work.
DEFAULT_SAMPLE = 256
#: Upper bound on candidates for a gang: it needs k good members of similar speed.
MAX_GANG_SAMPLE = 4096
#: Inference replicas live until scaled down; an hour is roughly how long a replica must
#: survive to repay loading its model and warming up.
INFERENCE_HORIZON_S = 3600.0
#: What "long work" means when a batch task keeps reliable donors free for it: a training
#: job of a few hours between checkpoints-to-completion.
RESERVE_HORIZON_S = 8 * 3600.0
#: Speed floors tried by the gang search; 16 keeps a gang decision well under a millisecond.
_GANG_SPEED_FLOORS = 16


class WorkloadKind(str, Enum):
    """What a request is for; each kind has its own objective."""

    TRAINING = "training"
    INFERENCE = "inference"
    BATCH = "batch"

    @classmethod
    def parse(cls, value: str | WorkloadKind) -> WorkloadKind:
        """The kind named ``value``.

        Raises:
            PlacementError: ``value`` is not one of training, inference, batch.
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise PlacementError(
                f"unknown workload kind {value!r}", hint=f"use one of: {names}"
            ) from None


def request_from_bundle(
    resources: Mapping[str, float], label_selector: Mapping[str, str] | None = None
) -> Resources:
    """A request from a Ray bundle-style mapping (``CPU``, ``GPU``, ``memory`` keys).

    Raises:
        PlacementError: a key is not CPU, GPU or memory, or an amount is not a number >= 0.
    """
    unknown = sorted(set(resources) - {"CPU", "GPU", "memory"})
    if unknown:
        raise PlacementError(
            f"placement understands CPU, GPU and memory, not {', '.join(unknown)}",
            hint="express custom needs as a label selector, e.g. {'dgpt.io/gpu': 'A100'}",
        )
    return checked_request(
        float(resources.get("CPU", 0.0)),
        float(resources.get("GPU", 0.0)),
        float(resources.get("memory", 0.0)),
        label_selector,
    )


def checked_request(
    cpus: float, gpus: float, memory_bytes: float, label_selector: Mapping[str, str] | None = None
) -> Resources:
    """A :class:`Resources` request, with a placement error naming a bad amount.

    Raises:
        PlacementError: an amount is not a finite number >= 0.
    """
    try:
        return Resources(cpus, gpus, memory_bytes, dict(label_selector or {}))
    except ValueError as exc:
        raise PlacementError(
            f"resource request {exc}", hint="pass e.g. num_cpus=1, num_gpus=0, memory=2**30"
        ) from None


@dataclass(frozen=True, slots=True)
class Weights:
    """How a kind trades the terms of a donor's score (all terms are O(1) in size).

    reliability: times log P(stay horizon). speed: times log(gflops / 16.5). free: times
    the CPU fraction left free after placing. load: times the donor's load. reserve: times
    P(stay RESERVE_HORIZON_S), a cost for using a donor long work would want.
    gpu_waste: cost of putting CPU-only work on a GPU donor. relayed: cost of a donor
    reached only through the head's relay (negative: a preference for it).
    """

    reliability: float = 1.0
    speed: float = 0.5
    free: float = 1.0
    load: float = 1.0
    reserve: float = 0.0
    gpu_waste: float = 1.0
    relayed: float = 0.0


DEFAULT_WEIGHTS: Mapping[WorkloadKind, Weights] = {
    # Gang members: reliability and speed dominate (the gang objective adds min speed). A
    # relayed member costs as much as a 7x (e^2) lower P(stay): the relay's bandwidth, not its
    # FLOPS, would set the gang's pace, so one joins only when too few direct donors fit.
    WorkloadKind.TRAINING: Weights(reliability=1.0, speed=1.0, free=0.2, load=0.2, relayed=2.0),
    # Replicas: latency (load, speed) matters as much as staying; relayed donors are preferred
    # a little (small requests), less than an idle donor's free capacity is worth.
    WorkloadKind.INFERENCE: Weights(reliability=1.0, speed=0.5, free=1.0, load=1.0, relayed=-0.25),
    # Batch: finish this task (x2), but prefer donors that long work would not want.
    WorkloadKind.BATCH: Weights(reliability=2.0, speed=0.3, free=0.5, load=0.5, reserve=0.3, relayed=-0.25),
}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request goes: ``nodes[i]`` (a table index) takes ``requests[i]``.

    ``p_stay`` is the model's probability that every chosen donor stays for ``horizon_s``.
    ``alternates`` are donor ids of the next-best candidates, usable as fallbacks.
    """

    kind: WorkloadKind
    nodes: tuple[int, ...]
    node_ids: tuple[str, ...]
    donor_ids: tuple[str, ...]
    requests: tuple[Resources, ...]
    p_stay: float
    horizon_s: float
    alternates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unplaced:
    """No donor (or set of donors) can take the request now; ``reason`` says why."""

    kind: WorkloadKind
    reason: str


Decision = Placement | Unplaced


def _rng_for(rng: np.random.Generator | None, now_s: float) -> np.random.Generator:
    # Deterministic per clock tick when the caller does not inject a generator.
    return rng if rng is not None else np.random.default_rng(int(now_s * 1000) & 0xFFFFFFFF)


def _base(table: DonorTable, request: Resources) -> IntArray:
    return table.gpu_usable if request.gpus > 0 else table.usable


def _fit_mask(
    table: DonorTable,
    idx: IntArray,
    request: Resources,
    taken: Mapping[int, Resources] | None = None,
) -> np.ndarray:
    mask = (table.cpu_free[idx] >= request.cpus - _EPS) & (
        table.mem_free[idx] >= request.memory_bytes - _EPS
    )
    if request.gpus > 0:
        mask &= table.gpu_free[idx] >= request.gpus - _EPS
    if taken:
        # Nodes this same decision already used have less left than the table says.
        for pos in np.flatnonzero(np.isin(idx, np.fromiter(taken, dtype=np.int64))):
            node = int(idx[pos])
            used = taken[node]
            mask[pos] = (
                table.cpu_free[node] - used.cpus >= request.cpus - _EPS
                and table.mem_free[node] - used.memory_bytes >= request.memory_bytes - _EPS
                and (request.gpus <= 0 or table.gpu_free[node] - used.gpus >= request.gpus - _EPS)
            )
    if request.label_selector and mask.any():
        labels = table.labels
        for pos in np.flatnonzero(mask):
            node_labels = labels[int(idx[pos])] if labels else {}
            if not selector_matches(request.label_selector, node_labels):
                mask[pos] = False
    return mask


def feasible_candidates(
    table: DonorTable,
    request: Resources,
    need: int,
    sample: int,
    rng: np.random.Generator,
    taken: Mapping[int, Resources] | None = None,
) -> tuple[IntArray, bool]:
    """Distinct candidate nodes that fit ``request``, and True when the scan was exhaustive.

    Samples ``sample`` usable nodes (GPU nodes for GPU work); if fewer than ``need`` of them
    fit, scans every usable node instead. ``taken`` holds what this same decision already
    put on some nodes. Baselines in ``benchmarks/`` use it too, so all policies see the
    same candidates.
    """
    base = _base(table, request)
    if base.size > sample:
        idx = base[rng.integers(0, base.size, sample)]
        if need > 1 or taken:
            # Repeats are harmless when one node is picked, so only pay for unique here.
            idx = np.unique(idx)
        idx = idx[_fit_mask(table, idx, request, taken)]
        if idx.size >= need:
            return idx, False
    return base[_fit_mask(table, base, request, taken)], True


def _scores(
    table: DonorTable,
    idx: IntArray,
    request: Resources,
    now_s: float,
    horizon_s: float,
    weights: Weights,
) -> tuple[FloatArray, FloatArray]:
    """(score, log P(stay horizon)) for each candidate in ``idx``."""
    shape, scale = table.shape[idx], table.scale_s[idx]
    up = np.maximum(now_s - table.start_s[idx], 0.0)
    log_p = log_stay_probability(shape, scale, up, horizon_s)
    score = donor_score(shape, scale, up, horizon_s, table.gflops[idx],
                        reliability_weight=weights.reliability, speed_weight=weights.speed)
    if weights.reserve:
        score -= weights.reserve * stay_probability(shape, scale, up, RESERVE_HORIZON_S)
    total = table.cpu_total[idx]
    # Free CPU fraction left after placing; 0 for CPU-less nodes (GPU-only caps).
    free_after = (table.cpu_free[idx] - request.cpus) / np.maximum(total, _EPS)
    score += weights.free * np.where(total > 0, free_after, 0.0) - weights.load * table.load[idx]
    if request.gpus <= 0 and weights.gpu_waste:
        score -= weights.gpu_waste * (table.gpu_total[idx] > 0)
    if weights.relayed and table.relayed is not None:
        score -= weights.relayed * table.relayed[idx]
    return score, log_p


def _top_alternates(
    table: DonorTable, idx: IntArray, score: FloatArray, skip: int, n: int = 3
) -> tuple[str, ...]:
    if idx.size <= 1:
        return ()
    m = min(n + 1, idx.size)
    top = np.argpartition(-score, m - 1)[:m] if idx.size > m else np.arange(idx.size)
    top = top[np.argsort(-score[top])]
    seen: list[str] = []
    for j in top:
        donor = table.donor_ids[int(idx[j])]
        if int(idx[j]) != skip and donor not in seen and np.isfinite(score[j]):
            seen.append(donor)
    return tuple(seen[:n])


def _unfit_reason(request: Resources, what: str) -> str:
    parts = [f"{request.cpus:g} CPU"]
    if request.gpus:
        parts.append(f"{request.gpus:g} GPU")
    if request.memory_bytes:
        parts.append(f"{request.memory_bytes / 2**30:.2f} GiB memory")
    if request.label_selector:
        parts.append(f"labels {dict(request.label_selector)}")
    return f"no {what} has {', '.join(parts)} free"


def place_task(
    table: DonorTable,
    request: Resources,
    now_s: float,
    *,
    kind: WorkloadKind = WorkloadKind.BATCH,
    horizon_s: float = 600.0,
    weights: Weights | None = None,
    sample: int = DEFAULT_SAMPLE,
    rng: np.random.Generator | None = None,
) -> Decision:
    """Choose one donor for a single task or actor.

    Args:
        table: the cluster's node columns (``FleetView.table``).
        request: what the task needs.
        now_s: the snapshot's clock, for each donor's current uptime.
        kind: whose weights to use (batch: short-lived donors first).
        horizon_s: how long the task is expected to run.
        weights: override the kind's default score weights.
        sample: candidates scored at scale (see module docstring).
        rng: source of the candidate sample; seeded from ``now_s`` when omitted.

    Returns:
        A :class:`Placement` on one node, or :class:`Unplaced` when nothing fits.
    """
    w = weights or DEFAULT_WEIGHTS[kind]
    idx, _ = feasible_candidates(table, request, 1, sample, _rng_for(rng, now_s))
    if idx.size == 0:
        return Unplaced(kind, _unfit_reason(request, "donor"))
    score, log_p = _scores(table, idx, request, now_s, horizon_s, w)
    j = int(np.argmax(score))
    node = int(idx[j])
    return Placement(
        kind=kind,
        nodes=(node,),
        node_ids=(table.node_ids[node],),
        donor_ids=(table.donor_ids[node],),
        requests=(request,),
        p_stay=float(math.exp(log_p[j])),
        horizon_s=horizon_s,
        alternates=_top_alternates(table, idx, score, node),
    )


def place_replicas(
    table: DonorTable,
    request: Resources,
    count: int,
    now_s: float,
    *,
    existing_owners: Collection[str] = (),
    horizon_s: float = INFERENCE_HORIZON_S,
    weights: Weights | None = None,
    sample: int = DEFAULT_SAMPLE,
    rng: np.random.Generator | None = None,
) -> Decision:
    """Choose donors for ``count`` replicas of one deployment, spread over owners.

    A replica shares an owner with another replica of the deployment (``existing_owners``
    or one placed by this call) only when no node of an unused owner has room. Best effort:
    the placement may hold fewer than ``count`` nodes when the cluster is short.

    Args:
        existing_owners: owners that already run a replica of this deployment.
        Others as for :func:`place_task`.

    Returns:
        A :class:`Placement` with 1..count nodes, or :class:`Unplaced` when none fits.

    Raises:
        PlacementError: ``count`` < 1.
    """
    if count < 1:
        raise PlacementError(
            f"replica count must be >= 1, got {count}", hint="ask for at least one replica"
        )
    w = weights or DEFAULT_WEIGHTS[WorkloadKind.INFERENCE]
    gen = _rng_for(rng, now_s)
    used: set[int] = {table.owner_index[o] for o in existing_owners if o in table.owner_index}
    taken: dict[int, Resources] = {}
    chosen: list[int] = []
    log_p_total = 0.0
    alternates: tuple[str, ...] = ()
    for _ in range(count):
        idx, exhaustive = feasible_candidates(table, request, 1, sample, gen, taken)
        if idx.size == 0:
            break
        fresh = ~np.isin(table.owner_codes[idx], np.fromiter(used, dtype=np.int64))
        if not fresh.any() and not exhaustive:
            # The sample only held owners we already use: look at every node before sharing.
            idx, _ = feasible_candidates(table, request, 1, 0, gen, taken)
            fresh = ~np.isin(table.owner_codes[idx], np.fromiter(used, dtype=np.int64))
        score, log_p = _scores(table, idx, request, now_s, horizon_s, w)
        if fresh.any():
            score = np.where(fresh, score, -np.inf)
        elif taken:
            # Sharing an owner is forced; at least avoid stacking on the same donor.
            score = score - 10.0 * np.isin(idx, np.fromiter(taken, dtype=np.int64))
        j = int(np.argmax(score))
        node = int(idx[j])
        chosen.append(node)
        used.add(int(table.owner_codes[node]))
        prev = taken.get(node)
        taken[node] = (
            request
            if prev is None
            else Resources(
                prev.cpus + request.cpus,
                prev.gpus + request.gpus,
                prev.memory_bytes + request.memory_bytes,
            )
        )
        log_p_total += float(log_p[j])
        if not alternates:
            alternates = _top_alternates(table, idx, score, node)
    if not chosen:
        return Unplaced(WorkloadKind.INFERENCE, _unfit_reason(request, "donor"))
    return Placement(
        kind=WorkloadKind.INFERENCE,
        nodes=tuple(chosen),
        node_ids=tuple(table.node_ids[n] for n in chosen),
        donor_ids=tuple(table.donor_ids[n] for n in chosen),
        requests=(request,) * len(chosen),
        p_stay=math.exp(log_p_total),
        horizon_s=horizon_s,
        alternates=alternates,
    )


def place_gang(
    table: DonorTable,
    bundles: Sequence[Resources],
    now_s: float,
    *,
    horizon_s: float,
    kind: WorkloadKind = WorkloadKind.TRAINING,
    weights: Weights | None = None,
    sample: int = DEFAULT_SAMPLE,
    rng: np.random.Generator | None = None,
) -> Decision:
    """Choose k distinct donors for a k-bundle training gang, whole or not at all.

    Identical bundles (the usual data-parallel gang) get the speed-floor search: for a few
    speed floors f, take the k best members among donors at least as fast as f, score
    ``speed * log(min speed) + sum(member score)``, and keep the best floor. Mixed bundles
    are placed greedily, biggest first, on distinct donors.

    Args:
        bundles: one request per gang member.
        horizon_s: how long the gang must hold together (time to its end or next restart).
        kind: whose weights to use for members (training by default).
        Others as for :func:`place_task`.

    Returns:
        A :class:`Placement` with exactly ``len(bundles)`` distinct nodes, or :class:`Unplaced`.

    Raises:
        PlacementError: ``bundles`` is empty.
    """
    k = len(bundles)
    if k == 0:
        raise PlacementError(
            "a gang needs at least one bundle", hint="pass bundles=[{'CPU': 1}, ...]"
        )
    w = weights or DEFAULT_WEIGHTS[kind]
    gen = _rng_for(rng, now_s)
    if any(b != bundles[0] for b in bundles[1:]):
        return _place_mixed_gang(table, bundles, now_s, horizon_s, kind, w, sample, gen)
    request = bundles[0]
    want = min(max(sample, 8 * k), MAX_GANG_SAMPLE)
    idx, _ = feasible_candidates(table, request, k, want, gen)
    if idx.size < k:
        return Unplaced(
            kind,
            f"gang needs {k} donors but only {idx.size} can hold its bundle: "
            + _unfit_reason(request, "other donor"),
        )
    member, log_p = _scores(
        table,
        idx,
        request,
        now_s,
        horizon_s,
        Weights(w.reliability, 0.0, w.free, w.load, w.reserve, w.gpu_waste, w.relayed),
    )
    speed = table.gflops[idx]
    order = np.argsort(-speed, kind="stable")
    # Floor positions: the k fastest only, ..., every candidate; evenly spaced in between.
    floors = np.unique(
        np.linspace(k - 1, idx.size - 1, min(_GANG_SPEED_FLOORS, idx.size - k + 1)).astype(np.int64)
    )
    best_obj, best_sel = -math.inf, order[:k]
    for pos in floors:
        subset = order[: pos + 1]
        floor = speed[subset[-1]]
        # Members much faster than the floor would idle at the gang's pace: charge for it.
        waste = 1.0 - floor / speed[subset]
        s = member[subset] - w.speed * waste
        top = subset[np.argpartition(-s, k - 1)[:k]] if subset.size > k else subset
        obj = w.speed * math.log(float(speed[top].min()) / REFERENCE_GFLOPS) + float(
            (member[top] - w.speed * (1.0 - speed[top].min() / speed[top])).sum()
        )
        if obj > best_obj:
            best_obj, best_sel = obj, top
    nodes = tuple(int(idx[j]) for j in best_sel)
    return Placement(
        kind=kind,
        nodes=nodes,
        node_ids=tuple(table.node_ids[n] for n in nodes),
        donor_ids=tuple(table.donor_ids[n] for n in nodes),
        requests=tuple(bundles),
        p_stay=math.exp(float(log_p[best_sel].sum())),
        horizon_s=horizon_s,
    )


def _place_mixed_gang(
    table: DonorTable,
    bundles: Sequence[Resources],
    now_s: float,
    horizon_s: float,
    kind: WorkloadKind,
    w: Weights,
    sample: int,
    gen: np.random.Generator,
) -> Decision:
    order = sorted(
        range(len(bundles)),
        key=lambda i: (bundles[i].gpus, bundles[i].cpus, bundles[i].memory_bytes),
        reverse=True,
    )
    chosen: dict[int, int] = {}
    log_p_total = 0.0
    want = min(max(sample, 8 * len(bundles)), MAX_GANG_SAMPLE)
    for i in order:
        request = bundles[i]
        idx, _ = feasible_candidates(table, request, len(bundles), want, gen)
        idx = idx[~np.isin(idx, np.fromiter(chosen.values(), dtype=np.int64))]
        if idx.size == 0:
            return Unplaced(
                kind,
                f"gang of {len(bundles)} bundles does not fit on distinct donors: "
                + _unfit_reason(request, "further donor"),
            )
        score, log_p = _scores(table, idx, request, now_s, horizon_s, w)
        j = int(np.argmax(score))
        chosen[i] = int(idx[j])
        log_p_total += float(log_p[j])
    nodes = tuple(chosen[i] for i in range(len(bundles)))
    return Placement(
        kind=kind,
        nodes=nodes,
        node_ids=tuple(table.node_ids[n] for n in nodes),
        donor_ids=tuple(table.donor_ids[n] for n in nodes),
        requests=tuple(bundles),
        p_stay=math.exp(log_p_total),
        horizon_s=horizon_s,
    )
