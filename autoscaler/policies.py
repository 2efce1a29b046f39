"""Autoscaler policies: pure functions ``(context, state) -> (decisions, state)``, one call a tick.

Like Ray Serve's ``autoscaling_policy.py``, the state a policy needs between ticks is passed
in and handed back (:class:`PolicyState`), never kept on an object, so the loop can persist
it, and a test or the simulator can replay any tick.

:func:`default_policy`, in order:

1. fit pending demand (tasks, and placement groups by strategy) onto free capacity of
   active donors and of donors already activating;
2. activate the best-fitting standby donors for what is left (resources, GPU, labels),
   ranked by P(stay the reliability horizon) and speed, packing several shapes per donor;
3. keep a churn hedge: spare CPU >= the CPU in use expected to vanish during one
   activation lead time (mean + ``hedge_z`` standard deviations over active donors);
4. keep ``min_active`` donors; never exceed ``max_active``;
5. drain donors idle past ``idle_timeout_s``, least useful first, only while spare capacity
   stays above the hedge by ``drain_margin`` (hysteresis), never one activated less than
   ``min_lifetime_s`` ago, and never during a cooldown after any scale-up or drain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from autoscaler.context import AutoscalerContext
from autoscaler.decisions import ActivateDonor, AutoscalerDecision, DrainDonor
from dgpt import contract
from dgpt.contract import selector_matches
from dgpt.fleet import DonorTable, FleetDonor
from dgpt.reliability.score import donor_score
from dgpt.resources import EPS, SPREAD_STRATEGIES, Resources

#: Cost of spending a GPU donor on CPU-only demand (in the donor score's log units): only
#: when no CPU donor fits, since GPU donors are rarer (BOINC: ~0.8 GPU per CPU host, most weak).
_GPU_WASTE = 2.0
#: Worth of a donor whose owner has no donor in the cluster yet: a new failure domain. Large
#: enough to outweigh reliability and speed differences, so replicas that must not share a
#: node (Serve's max_replicas_per_node) spread over owners, not onto one owner's machines.
_NEW_OWNER = 5.0


@dataclass(frozen=True)
class PolicyState:
    """What :func:`default_policy` remembers between ticks.

    ``activated_at`` maps donors activated recently to when, for ``min_lifetime_s``.
    """

    last_scale_up_s: float = -math.inf
    last_scale_down_s: float = -math.inf
    activated_at: Mapping[str, float] = field(default_factory=dict)


@dataclass
class _Bin:
    """Scratch capacity of one donor while demand is fitted (local to one policy call)."""

    donor_id: str
    cpus: float
    gpus: float
    memory_bytes: float
    labels: Mapping[str, str]
    touched: bool = False
    # The `donor` resource: one per donor node (a standby donor's is free).
    donors: float = 1.0
    # Shares taken of Ray's implicit per-node resources (Serve's max_replicas_per_node).
    # A running donor's are unknown (Ray does not report them), so `fresh` is False for
    # it: a request that carries one is pending only because no running donor could take it.
    per_node: dict[str, float] = field(default_factory=dict)
    fresh: bool = False

    @classmethod
    def of(cls, donor_id: str, room: Resources, labels: Mapping[str, str], fresh: bool = False) -> _Bin:
        return cls(donor_id, room.cpus, room.gpus, room.memory_bytes, labels, donors=room.donors, fresh=fresh)

    def count_fits(self, shape: Resources, limit: int) -> int:
        if shape.label_selector and not selector_matches(shape.label_selector, self.labels):
            return 0
        n = limit
        if shape.per_node_key:
            if not self.fresh:
                return 0
            left = 1.0 - self.per_node.get(shape.per_node_key, 0.0)
            n = min(n, int((left + EPS) // shape.per_node_share))
        for need, have in (
            (shape.cpus, self.cpus),
            (shape.gpus, self.gpus),
            (shape.memory_bytes, self.memory_bytes),
            (shape.donors, self.donors),
        ):
            if need > 0:
                n = min(n, int((have + EPS) // need))
        return max(n, 0)

    def take(self, shape: Resources, n: int) -> None:
        self.cpus -= shape.cpus * n
        self.gpus -= shape.gpus * n
        self.memory_bytes -= shape.memory_bytes * n
        self.donors -= shape.donors * n
        if shape.per_node_key:
            self.per_node[shape.per_node_key] = self.per_node.get(shape.per_node_key, 0.0) + shape.per_node_share * n
        self.touched = self.touched or n > 0


@dataclass
class _Need:
    """Unmet demand of one shape: ``count`` copies; ``distinct`` ones must not share a donor."""

    shape: Resources
    count: int
    distinct: bool = False
    used: set[str] = field(default_factory=set)


def _shape_key(shape: Resources) -> tuple[float, float, float, tuple[tuple[str, str], ...], str, float]:
    return (shape.cpus, shape.gpus, shape.memory_bytes, tuple(sorted(shape.label_selector.items())),
            shape.per_node_key, shape.per_node_share)


def _reserve_constraints(
    constraints: Sequence[Resources], active: Sequence[FleetDonor]
) -> tuple[list[Resources], list[FleetDonor]]:
    """``request_resources()`` bundles reserve capacity: each goes onto an active donor's
    total capacity (first fit), which then counts as used (and busy, so it is not drained);
    the bundles that fit nowhere become pending demand."""
    room = {d.donor_id: d.caps for d in active if not d.draining}
    taken: dict[str, Resources] = {}
    missing = []
    for c in sorted(constraints, key=lambda c: -c.cpus):
        for donor_id, r in room.items():
            if c.fits_in(r):
                room[donor_id] = r.minus(c)
                taken[donor_id] = taken.get(donor_id, Resources()).plus(
                    Resources(c.cpus, c.gpus, c.memory_bytes, donors=c.donors))
                break
        else:
            missing.append(c)
    out = [replace(d, idle_s=0.0, available=d.free.minus(taken[d.donor_id])) if d.donor_id in taken else d
           for d in active]
    return missing, out


def _demand(pending: Sequence[Resources], ctx: AutoscalerContext) -> list[_Need]:
    """Pending demand as needs, biggest first (GPU, then CPU, then memory: first-fit decreasing)."""
    plain: dict[tuple[float, float, float, tuple[tuple[str, str], ...], str, float], _Need] = {}

    def add(shape: Resources, n: int = 1) -> None:
        if shape.empty:
            return
        key = _shape_key(shape)
        if key in plain:
            plain[key].count += n
        else:
            plain[key] = _Need(shape, n)

    gangs: list[_Need] = []
    for shape in pending:
        add(shape)
    for gang in ctx.demand.gangs:
        bundles = [b for b in gang.bundles if not b.empty]
        if not bundles:
            continue
        if gang.strategy == "STRICT_PACK":
            total = bundles[0]
            for b in bundles[1:]:
                total = total.plus(b)
            add(total)
        elif gang.strategy in SPREAD_STRATEGIES:
            # One need per bundle, sharing a `used` set so members land on distinct donors.
            used: set[str] = set()
            gangs.extend(_Need(b, 1, distinct=True, used=used) for b in bundles)
        else:
            for b in bundles:
                add(b)
    needs = list(plain.values()) + gangs
    needs.sort(key=lambda n: (n.shape.gpus, n.shape.cpus, n.shape.memory_bytes), reverse=True)
    return needs


def _fit_onto(needs: Sequence[_Need], bins: Sequence[_Bin]) -> None:
    """First fit of every need onto ``bins``, in place (counts go down, bins fill up)."""
    for need in needs:
        for b in bins:
            if need.count <= 0:
                break
            if need.distinct and b.donor_id in need.used:
                continue
            n = b.count_fits(need.shape, 1 if need.distinct else need.count)
            if n:
                b.take(need.shape, n)
                need.count -= n
                if need.distinct:
                    need.used.add(b.donor_id)


_EMPTY_F = np.zeros(0)
_EMPTY_B = np.zeros(0, dtype=bool)


class _Standby:
    """The standby table's donors ranked by the donor score, for picking the best fit fast."""

    def __init__(self, table: DonorTable, now_s: float, horizon_s: float, owners_in: Iterable[str] = ()) -> None:
        self.table = table
        self._args = (now_s, horizon_s, owners_in)
        self._ranked = False
        self.value, self.free, self.owner_in = _EMPTY_F, _EMPTY_B, _EMPTY_B

    def _rank(self) -> None:
        """Score the whole standby table: only once a tick needs an activation (most need none)."""
        table, (now_s, horizon_s, owners_in) = self.table, self._args
        self.value = donor_score(table.shape, table.scale_s, now_s - table.start_s, horizon_s, table.gflops)
        self.free = np.ones(len(table), dtype=bool)
        codes = [table.owner_index[o] for o in owners_in if o in table.owner_index]
        self.owner_in = np.isin(table.owner_codes, np.array(codes, dtype=np.int64))
        self._ranked = True

    def best_for(self, shape: Resources | None) -> int | None:
        """Index of the most valuable free donor that fits ``shape`` (any donor when None)."""
        t = self.table
        if not self._ranked:
            self._rank()
        mask = self.free.copy()
        score = self.value.copy()
        if shape is not None:
            mask &= (t.cpu_total + EPS >= shape.cpus) & (t.mem_total + EPS >= shape.memory_bytes)
            mask &= shape.donors <= 1.0 + EPS  # a donor has one `donor` resource
            if shape.gpus > 0:
                mask &= t.gpu_total + EPS >= shape.gpus
            else:
                score -= _GPU_WASTE * (t.gpu_total > 0)
            # Every standby donor is a donor: that condition (Serve replicas carry it) costs no scan.
            selector = {k: v for k, v in shape.label_selector.items()
                        if (k, v) != (contract.LABEL_ROLE, contract.ROLE_DONOR)}
            if selector:
                for pos in np.flatnonzero(mask):
                    if not selector_matches(selector, t.labels[int(pos)]):
                        mask[pos] = False
        else:
            score -= _GPU_WASTE * (t.gpu_total > 0)
        if not mask.any():
            return None
        score = score + _NEW_OWNER * ~self.owner_in
        best = int(np.argmax(np.where(mask, score, -np.inf)))
        self.free[best] = False
        self.owner_in |= t.owner_codes == t.owner_codes[best]
        return best

    def bin(self, i: int) -> _Bin:
        t = self.table
        return _Bin(str(t.donor_ids[i]), float(t.cpu_total[i]), float(t.gpu_total[i]), float(t.mem_total[i]),
                    t.labels[i], fresh=True)


def _hedge_cpus(
    active: Iterable[FleetDonor], now_s: float, lead_s: float, z: float
) -> tuple[float, float]:
    """(hedge, expected loss): CPU in use expected to vanish within one activation lead time."""
    mean = var = 0.0
    for node in active:
        used = node.used_cpus
        if used <= 0:
            continue
        p = node.p_stay(now_s, lead_s)
        mean += (1.0 - p) * used
        var += p * (1.0 - p) * used * used
    return mean + z * math.sqrt(var), mean


def _just_joined(donor: FleetDonor, now_s: float, grace_s: float) -> bool:
    """A donor that joined within ``grace_s`` and runs nothing yet: its per-node shares are free.

    Ray places work on a new node a moment after it joins, and reports pending demand a
    moment later still; in between, demand that the new node is about to take still looks
    pending. Counting the node as fresh keeps that demand from activating one more donor.
    Once the grace has passed, an untouched node that demand still skips is taken at its
    word (not fresh), so a zero-CPU replica cannot hide a real shortage for long."""
    if donor.available is None or now_s - donor.since_s >= grace_s:
        return False
    return donor.used_cpus <= EPS and donor.available.gpus + EPS >= donor.caps.gpus


def default_policy(
    ctx: AutoscalerContext, state: PolicyState | None = None
) -> tuple[tuple[AutoscalerDecision, ...], PolicyState]:
    """Decide which standby donors to activate and which active donors to drain this tick.

    Args:
        ctx: the frozen view of demand and of the fleet.
        state: what the previous tick handed back (None on the first tick).

    Returns:
        The decisions (activations first) and the state for the next tick.
    """
    state = state or PolicyState()
    b = ctx.bounds
    now = ctx.now_s
    fleet = ctx.fleet
    unfit, active = _reserve_constraints(ctx.demand.constraints, fleet.active)
    live = [n for n in active if not n.draining]
    bins = [_Bin.of(n.donor_id, n.free, n.labels, fresh=_just_joined(n, now, b.activation_lead_time_s)) for n in live] + [
        _Bin.of(d.donor_id, d.caps, d.labels, fresh=True) for d in fleet.activating
    ]
    needs = _demand(list(ctx.demand.pending) + unfit, ctx)
    _fit_onto(needs, bins)

    decisions: list[AutoscalerDecision] = []
    size = len(live) + len(fleet.activating)
    room = min(b.max_active - size, b.max_activations_per_tick)
    cooling = now - state.last_scale_up_s < b.scale_up_cooldown_s
    owners_in = {d.owner for d in live} | {d.owner for d in fleet.activating}
    standby = _Standby(fleet.standby, now, b.reliability_horizon_s, owners_in) if len(fleet.standby) else None
    new_bins: list[_Bin] = []

    def activate(i: int, reason: str) -> _Bin:
        assert standby is not None
        nb = standby.bin(i)
        decisions.append(ActivateDonor(nb.donor_id, reason))
        new_bins.append(nb)
        return nb

    # 2. Unmet demand -> the best-fitting standby donors.
    unmet = [n for n in needs if n.count > 0]
    for need in unmet:
        _fit_onto([need], new_bins)
        while need.count > 0 and standby is not None and not cooling and len(new_bins) < room:
            i = standby.best_for(need.shape)
            if i is None:
                break
            nb = activate(i, f"pending demand: {need.count} x {need.shape.describe()}")
            _fit_onto([need], [nb])
    unmet_left = sum(n.count for n in needs)

    # 3. Churn hedge: spare CPU to absorb the work of donors likely to leave before a
    #    replacement could be activated.
    hedge, expected_loss = _hedge_cpus(live, now, b.activation_lead_time_s, b.hedge_z)
    if hedge < b.hedge_min_cpus:
        hedge = 0.0
    spare = sum(max(x.cpus, 0.0) for x in bins) + sum(max(x.cpus, 0.0) for x in new_bins)
    while spare + EPS < hedge and standby is not None and not cooling and len(new_bins) < room:
        i = standby.best_for(None)
        if i is None:
            break
        nb = activate(
            i,
            f"churn hedge: {expected_loss:.1f} CPU expected lost in {b.activation_lead_time_s:g} s, "
            f"spare {spare:.1f} < hedge {hedge:.1f}",
        )
        spare += nb.cpus

    # 4. Keep min_active.
    while size + len(new_bins) < b.min_active and standby is not None and len(new_bins) < room:
        i = standby.best_for(None)
        if i is None:
            break
        activate(i, f"min_active={b.min_active}")

    activated = [d.donor_id for d in decisions if isinstance(d, ActivateDonor)]
    activated_at = {k: v for k, v in state.activated_at.items() if now - v < b.min_lifetime_s}
    activated_at.update({d: now for d in activated})
    last_up = now if activated else state.last_scale_up_s

    # 5. Scale down: over max_active first, then idle donors, least useful first.
    drains: list[DrainDonor] = []
    free_bins = {x.donor_id: x for x in bins}

    def usefulness(n: FleetDonor) -> float:
        params = n.params
        return float(donor_score(params.shape, params.scale_s, now - n.since_s, b.reliability_horizon_s, n.gflops))

    excess = size - b.max_active
    if excess > 0:
        # Idle donors go first, then the least useful; activating ones are left to join.
        for n in sorted(live, key=lambda n: (n.idle_s < b.idle_timeout_s, usefulness(n)))[:excess]:
            drains.append(DrainDonor(n.donor_id, f"over max_active={b.max_active}"))
    elif (
        not activated
        and unmet_left == 0
        and now - last_up >= b.scale_down_cooldown_s
        and now - state.last_scale_down_s >= b.scale_down_cooldown_s
    ):
        floor = hedge * (1.0 + b.drain_margin)
        count = size
        idle = [
            n
            for n in live
            if n.idle_s >= b.idle_timeout_s
            and now - activated_at.get(n.donor_id, -math.inf) >= b.min_lifetime_s
            and not free_bins[n.donor_id].touched
        ]
        for n in sorted(idle, key=usefulness):
            if count <= b.min_active or len(drains) >= b.max_drains_per_tick:
                break
            free_cpus = max(free_bins[n.donor_id].cpus, 0.0)
            if spare - free_cpus + EPS < floor:
                continue
            drains.append(
                DrainDonor(
                    n.donor_id, f"idle {n.idle_s:.0f} s >= idle_timeout_s={b.idle_timeout_s:g}"
                )
            )
            spare -= free_cpus
            count -= 1

    new_state = PolicyState(
        last_scale_up_s=last_up,
        last_scale_down_s=now if drains else state.last_scale_down_s,
        activated_at=activated_at,
    )
    return tuple(decisions) + tuple(drains), new_state
