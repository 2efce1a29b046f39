"""Autoscaler policy: demand -> activations, churn hedge, drains, bounds, no flapping."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.bounds import AutoscalerBounds, load_bounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import ActivateDonor, DrainDonor
from autoscaler.policies import PolicyState, default_policy
from dgpt.exceptions import ConfigError
from dgpt.fleet import FleetDonor, FleetView, build_table
from dgpt.reliability import WeibullParams
from dgpt.resources import Demand, Gang, Resources

HOUR = 3600.0
NOW = 1000 * HOUR
GIB = 2.0**30
STEADY = WeibullParams(0.55, 200 * HOUR)
FLAKY = WeibullParams(0.85, 0.2 * HOUR)


def donor(donor_id: str, *, cpus: float = 4, gpus: float = 0, gflops: float = 16.5, labels: dict | None = None,
          rel: WeibullParams = STEADY, since_s: float = NOW - 5 * HOUR, **kw: object) -> FleetDonor:
    return FleetDonor(donor_id, owner="o", device_class="desktop", caps=Resources(cpus, gpus, cpus * GIB),
                      gflops=gflops, labels=labels or {}, reliability=rel, since_s=since_s, **kw)  # type: ignore[arg-type]


def standby(i: int, rel: WeibullParams = STEADY, **kw: object) -> FleetDonor:
    return donor(f"s{i}", rel=rel, **kw)  # type: ignore[arg-type]


def active(
    i: int,
    *,
    cpus: float = 4,
    free: float | None = None,
    idle_s: float = 0,
    rel: WeibullParams = STEADY,
    up_s: float = 5 * HOUR,
) -> FleetDonor:
    free = cpus if free is None else free
    return donor(f"a{i}", cpus=cpus, rel=rel, since_s=NOW - up_s, available=Resources(free, 0, free * GIB),
                 idle_s=idle_s, node_id=f"n{i}")


def ctx(**kw: object) -> AutoscalerContext:
    bounds = kw.pop("bounds", AutoscalerBounds())
    demand = Demand.of(kw.pop("pending", ()), kw.pop("pending_gangs", ()))  # type: ignore[arg-type]
    fleet = FleetView(now_s=kw.pop("now_s", NOW), active=kw.pop("active", ()),  # type: ignore[arg-type]
                      activating=kw.pop("activating", ()), standby=build_table(kw.pop("standby", ())))  # type: ignore[arg-type]
    assert not kw, kw
    return AutoscalerContext(bounds, demand, fleet)


def activated(decisions: tuple) -> list[str]:
    return [d.donor_id for d in decisions if isinstance(d, ActivateDonor)]


def drained(decisions: tuple) -> list[str]:
    return [d.donor_id for d in decisions if isinstance(d, DrainDonor)]


def test_unmet_demand_activates_the_most_reliable_fitting_donor() -> None:
    c = ctx(
        pending=[Resources(2)],
        standby=[standby(1, rel=FLAKY), standby(2), standby(3, cpus=1)],
    )
    decisions, state = default_policy(c, None)
    assert activated(decisions) == ["s2"]
    assert "pending demand" in decisions[0].reason
    assert state.last_scale_up_s == NOW


def test_demand_that_fits_on_active_nodes_activates_nothing() -> None:
    c = ctx(pending=[Resources(1)] * 3, active=[active(1)], standby=[standby(1)])
    decisions, _ = default_policy(c)
    assert activated(decisions) == []


def test_activating_donors_count_so_the_next_tick_does_not_double_up() -> None:
    pool = [standby(1), standby(2)]
    c = ctx(pending=[Resources(4)], standby=pool)
    decisions, state = default_policy(c)
    assert len(activated(decisions)) == 1
    joining = [s for s in pool if s.donor_id in activated(decisions)]
    rest = [s for s in pool if s.donor_id not in activated(decisions)]
    again, _ = default_policy(
        ctx(pending=[Resources(4)], activating=joining, standby=rest), state
    )
    assert activated(again) == []


def test_several_shapes_pack_onto_one_new_donor() -> None:
    c = ctx(pending=[Resources(1)] * 8, standby=[standby(i, cpus=8) for i in range(5)])
    decisions, _ = default_policy(c)
    assert len(activated(decisions)) == 1


def test_gpu_and_label_demand_picks_a_matching_donor() -> None:
    c = ctx(
        pending=[Resources(1, 1, label_selector={"dgpt.io/gpu": "A100"})],
        standby=[
            standby(1),
            standby(2, gpus=1),
            donor("s3", gpus=1, labels={"dgpt.io/gpu": "A100"}, since_s=NOW - HOUR, rel=FLAKY),
        ],
    )
    decisions, _ = default_policy(c)
    assert activated(decisions) == ["s3"]


def test_spread_gang_needs_distinct_donors() -> None:
    gang = Gang((Resources(1),) * 3, "STRICT_SPREAD")
    c = ctx(pending_gangs=[gang], standby=[standby(i, cpus=8) for i in range(5)])
    assert len(activated(default_policy(c)[0])) == 3
    packed = Gang((Resources(1),) * 3, "PACK")
    c = ctx(pending_gangs=[packed], standby=[standby(i, cpus=8) for i in range(5)])
    assert len(activated(default_policy(c)[0])) == 1
    with pytest.raises(ValueError, match="strategy"):
        Gang((Resources(1),), "SIDEWAYS")


def test_churn_hedge_adds_spare_capacity_for_flaky_busy_nodes() -> None:
    busy = [active(i, free=0, rel=FLAKY, up_s=60) for i in range(4)]
    c = ctx(active=busy, standby=[standby(1), standby(2), standby(3)])
    decisions, _ = default_policy(c)
    assert activated(decisions)
    assert "churn hedge" in decisions[0].reason
    # Busy but rock-steady nodes need no hedge.
    steady = [active(i, free=0, up_s=100 * HOUR) for i in range(4)]
    assert activated(default_policy(ctx(active=steady, standby=[standby(1)]))[0]) == []


def test_idle_nodes_drain_least_useful_first_down_to_min_active() -> None:
    nodes = [active(1, idle_s=900), active(2, idle_s=900, rel=FLAKY, up_s=60), active(3, idle_s=10)]
    b = AutoscalerBounds(min_active=1, max_drains_per_tick=1)
    decisions, state = default_policy(ctx(active=nodes, bounds=b))
    assert drained(decisions) == ["a2"]
    assert state.last_scale_down_s == NOW
    # Cooldown: the next tick right after does nothing.
    again, _ = default_policy(ctx(active=[nodes[0], nodes[2]], bounds=b, now_s=NOW + 1), state)
    assert drained(again) == []
    # After the cooldown, a1 is idle but min_active=1 keeps one of the two... a3 is busy-ish.
    later, _ = default_policy(ctx(active=[nodes[0], nodes[2]], bounds=b, now_s=NOW + 61), state)
    assert drained(later) == ["a1"]
    last, _ = default_policy(ctx(active=[nodes[2]], bounds=b, now_s=NOW + 200), state)
    assert drained(last) == []


def test_no_drain_while_demand_is_unmet_or_just_activated() -> None:
    b = AutoscalerBounds(max_active=1)
    c = ctx(
        active=[active(1, idle_s=900, free=4)],
        pending=[Resources(8)],
        standby=[standby(1, cpus=8)],
        bounds=b,
    )
    decisions, _ = default_policy(c)
    assert decisions == ()  # at max_active and the demand does not fit: hold still
    state = PolicyState(activated_at={"a1": NOW - 30})
    assert drained(default_policy(ctx(active=[active(1, idle_s=900)]), state)[0]) == []


def test_no_flapping_between_ticks() -> None:
    """A steady workload on a hedged cluster does not alternate activate/drain."""
    b = AutoscalerBounds(idle_timeout_s=60, scale_down_cooldown_s=30)
    nodes = [active(i, free=0, rel=WeibullParams(0.7, 2 * HOUR), up_s=HOUR) for i in range(20)]
    spare = [active(100 + i, idle_s=3600) for i in range(3)]
    pool = [standby(i) for i in range(10)]
    state = None
    history = []
    for tick in range(10):
        decisions, state = default_policy(
            ctx(active=nodes + spare, standby=pool, bounds=b, now_s=NOW + 10 * tick), state
        )
        history.append((len(activated(decisions)), len(drained(decisions))))
    assert not any(a and d for a, d in history)
    ups = [a for a, _ in history]
    downs = [d for _, d in history]
    assert not (any(ups) and any(downs)), history


def test_over_max_active_drains_down() -> None:
    b = AutoscalerBounds(max_active=2)
    nodes = [active(i, idle_s=900 if i == 0 else 0) for i in range(4)]
    decisions, _ = default_policy(ctx(active=nodes, bounds=b))
    assert len(drained(decisions)) == 2 and "a0" in drained(decisions)


def test_min_active_is_kept() -> None:
    decisions, _ = default_policy(
        ctx(
            standby=[standby(1), standby(2, rel=FLAKY), standby(3)],
            bounds=AutoscalerBounds(min_active=2),
        )
    )
    assert sorted(activated(decisions)) == ["s1", "s3"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_active=st.integers(0, 8),
    n_standby=st.integers(0, 8),
    pending=st.lists(st.sampled_from([1.0, 2.0, 4.0, 16.0]), max_size=10),
    max_active=st.integers(1, 10),
    min_active=st.integers(0, 3),
)
def test_never_exceeds_max_and_decisions_are_sane(
    n_active: int, n_standby: int, pending: list[float], max_active: int, min_active: int
) -> None:
    b = AutoscalerBounds(max_active=max(max_active, min_active), min_active=min_active)
    nodes = [active(i, idle_s=1000 * (i % 2), free=float(i % 5)) for i in range(n_active)]
    pool = [standby(i, cpus=4 + 4 * (i % 3)) for i in range(n_standby)]
    decisions, _ = default_policy(
        ctx(active=nodes, standby=pool, pending=[Resources(c) for c in pending], bounds=b)
    )
    ups, downs = activated(decisions), drained(decisions)
    assert len(set(ups)) == len(ups) and set(ups) <= {s.donor_id for s in pool}
    assert set(downs) <= {n.donor_id for n in nodes}
    assert n_active + len(ups) <= max(b.max_active, n_active)
    if n_active <= b.max_active:
        assert n_active + len(ups) - len(downs) <= b.max_active
    if downs and n_active <= b.max_active:
        assert n_active - len(downs) >= min(b.min_active, n_active)
    assert not (ups and downs)


def test_invalid_bounds_name_the_field() -> None:
    with pytest.raises(ValidationError, match="max_active"):
        AutoscalerBounds(max_active=0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        load_bounds(idle_timeout_s=-5)
    with pytest.raises(ConfigError, match="min_active \\(5\\) must not exceed max_active \\(3\\)"):
        load_bounds(min_active=5, max_active=3)
    with pytest.raises(ConfigError, match="cooldown"):
        load_bounds(cooldown=3)
    assert load_bounds(max_active=10).max_active == 10
    with pytest.raises(ValueError, match="cpus"):
        Resources(-1)


def test_demand_activates_a_new_owner_before_a_second_donor_of_one_in_the_cluster() -> None:
    from dataclasses import replace as dc_replace

    role = {"dgpt.io/role": "donor"}
    a1 = dc_replace(active(1, free=0), owner="alice", labels=role)  # full: one replica there already
    a2 = dc_replace(standby(2, rel=STEADY), owner="alice", labels=role)  # alice's second machine, very steady
    b = dc_replace(standby(3, rel=FLAKY), owner="bob", labels=role)  # a new failure domain, less steady
    replica = Resources(0.5, 0, 0, {"dgpt.io/role": "donor"})
    decisions, _ = default_policy(ctx(active=[a1], standby=[a2, b], pending=[replica]))
    assert activated(decisions) == ["s3"], "replicas spread over owners, not onto alice's second machine"
    # Two more replicas: bob first, then alice's second machine (no other owner is left).
    decisions, _ = default_policy(ctx(active=[a1], standby=[a2, b], pending=[replica, replica]))
    assert activated(decisions)[0] == "s3"


SERVE_ONE_PER_NODE = {"CPU": 0.5, "node:__internal_implicit_resource_digits:DigitsClassifier": 1.0}


def test_a_replica_limited_per_node_activates_a_donor_though_cpu_is_free_on_active_ones() -> None:
    # Serve's max_replicas_per_node=1: the pending third replica cannot join the two active
    # donors that each run one, however much CPU they have free.
    c = ctx(pending=[Resources.from_ray(SERVE_ONE_PER_NODE)], active=[active(1), active(2)],
            standby=[standby(1), standby(2)])
    decisions, _ = default_policy(c)
    assert len(activated(decisions)) == 1
    assert "at most 1 per node" in decisions[0].reason


def test_a_donor_that_just_joined_and_runs_nothing_takes_the_pending_per_node_replica() -> None:
    # Two replicas were pending; two donors were activated for them and have just joined, but
    # Ray has not placed the replicas yet, so both still look pending. No third donor.
    joined = [active(1, up_s=3), active(2, up_s=3)]
    pending = [Resources.from_ray(SERVE_ONE_PER_NODE)] * 2
    decisions, _ = default_policy(ctx(pending=pending, active=joined, standby=[standby(1), standby(2)]))
    assert activated(decisions) == [], "the new donors are about to take the replicas"
    # One of them took a replica (CPU used): only the other counts as fresh, so one is activated.
    joined = [active(1, up_s=3, free=3.5), active(2, up_s=3)]
    decisions, _ = default_policy(ctx(pending=pending, active=joined, standby=[standby(1), standby(2)]))
    assert len(activated(decisions)) == 1
    # Past the grace (activation_lead_time_s), an untouched donor that demand still skips is
    # taken at its word: the demand gets a donor of its own.
    late = [active(1, up_s=AutoscalerBounds().activation_lead_time_s + 1)]
    decisions, _ = default_policy(ctx(pending=pending[:1], active=late, standby=[standby(1)]))
    assert len(activated(decisions)) == 1


def test_replicas_limited_per_node_each_get_their_own_new_donor_and_share_it_when_allowed() -> None:
    c = ctx(pending=[Resources.from_ray(SERVE_ONE_PER_NODE)] * 2, standby=[standby(i, cpus=8) for i in range(4)])
    assert len(activated(default_policy(c)[0])) == 2, "one replica per node: two donors for two replicas"
    two = {"CPU": 0.5, "node:__internal_implicit_resource_app:D": 0.5}  # max_replicas_per_node=2
    c = ctx(pending=[Resources.from_ray(two)] * 2, standby=[standby(i, cpus=8) for i in range(4)])
    assert len(activated(default_policy(c)[0])) == 1
