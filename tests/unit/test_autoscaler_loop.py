"""The autoscaler's mechanism around the pure policy: constraints, actuator, loop (fakes only)."""

from __future__ import annotations

import pytest

from autoscaler.actuator import Actuator
from autoscaler.bounds import AutoscalerBounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import ActivateDonor, DrainDonor
from autoscaler.loop import AutoscalerLoop
from autoscaler.policies import PolicyState, default_policy
from dgpt.fleet import FleetDonor, FleetView, build_table
from dgpt.reliability.model import fit_recorded
from dgpt.resources import Demand, Resources
from dgpt.sdk.models import SessionView

GIB = 2**30
NOW = 1_000_000.0
BOUNDS = AutoscalerBounds(min_active=0, max_active=10, idle_timeout_s=60, min_lifetime_s=0, scale_down_cooldown_s=0)


def _active(donor_id: str, cpu_free: float, idle_s: float) -> FleetDonor:
    return FleetDonor(donor_id, owner=donor_id, caps=Resources(2, 0, 2 * GIB), available=Resources(cpu_free, 0, 2 * GIB),
                      idle_s=idle_s, node_id=f"n-{donor_id}", since_s=NOW - 3600)


def _standby(donor_id: str) -> FleetDonor:
    return FleetDonor(donor_id, owner=donor_id, caps=Resources(2, 0, 2 * GIB), since_s=NOW - 3600)


def _ctx(demand: Demand, active: list[FleetDonor], standby: list[FleetDonor] = ()) -> AutoscalerContext:  # type: ignore[assignment]
    return AutoscalerContext(BOUNDS, demand, FleetView(NOW, tuple(active), (), build_table(standby)))


def test_request_resources_reserves_active_capacity_and_the_rest_is_demand() -> None:
    # One 2-CPU bundle holds idle donor a (so it is not drained); the other needs a new donor.
    demand = Demand.of(constraints=[Resources(2), Resources(2)])
    decisions, _ = default_policy(_ctx(demand, [_active("a", 2.0, idle_s=500)], [_standby("s")]))
    assert decisions == (ActivateDonor("s", decisions[0].reason),)
    assert "pending demand" in decisions[0].reason
    # Without the bundles the idle donor is drained.
    decisions, _ = default_policy(_ctx(Demand(), [_active("a", 2.0, idle_s=500)]))
    assert [type(d) for d in decisions] == [DrainDonor]


def test_autoscaler_drains_are_not_departures_for_reliability() -> None:
    ended = [SessionView(session_id=i, node_id="n", started_at=NOW - 1000 * (i + 1), ended_at=NOW - 1000 * i,
                         ended_as="drained", end_reason=reason) for i, reason in enumerate(["autoscaler"] * 5)]
    left = [s.model_copy(update={"end_reason": "paused"}) for s in ended]
    patient = fit_recorded(ended, "desktop", NOW)
    leaver = fit_recorded(left, "desktop", NOW)
    assert patient.p_stay(0, 3600) > leaver.p_stay(0, 3600)


class FakeRegistry:
    def __init__(self, refuse: set[str] = frozenset(), broken: set[str] = frozenset()) -> None:
        self.targets: dict[str, str] = {}
        self.drains: list[str] = []
        self.refuse, self.broken = refuse, broken

    def set_target(self, donor_id: str, target: str) -> None:
        if donor_id in self.broken:
            raise RuntimeError("registry restarting")
        self.targets[donor_id] = target

    def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]:
        self.drains.append(donor_id)
        return (donor_id not in self.refuse, "node is busy" if donor_id in self.refuse else "drain accepted")


def test_actuator_applies_each_decision_and_records_failures() -> None:
    registry = FakeRegistry(refuse={"busy"}, broken={"x"})
    applied = Actuator(registry, 30.0).apply(
        (ActivateDonor("a", "demand"), ActivateDonor("x", "demand"), DrainDonor("idle", "idle"),
         DrainDonor("busy", "idle")), now_s=NOW)
    assert registry.targets == {"a": "active"}
    assert registry.drains == ["idle", "busy"]
    assert [(a.donor_id, a.ok) for a in applied] == [("a", True), ("x", False), ("idle", True), ("busy", False)]
    assert "registry restarting" in applied[1].result


def test_loop_hands_state_back_and_survives_a_bad_tick() -> None:
    calls: list[PolicyState | None] = []
    ticks = iter([None, RuntimeError("GCS unreachable"), None])

    def collect():
        item = next(ticks)
        if isinstance(item, Exception):
            raise item
        return _ctx(Demand(), [], [_standby("d")])

    def policy(ctx, state):
        calls.append(state)
        return (ActivateDonor("d", "min_active=1"),), PolicyState(last_scale_up_s=len(calls))

    loop = AutoscalerLoop(collect, Actuator(FakeRegistry(), 30.0), policy=policy, clock=lambda: NOW)
    for _ in range(3):
        loop.safe_tick()
    assert loop.ticks == 2 and loop.errors == 1 and "GCS unreachable" in (loop.last_error or "")
    assert calls == [None, PolicyState(last_scale_up_s=1)]
    status = loop.status(AutoscalerBounds())
    assert [a["action"] for a in status["recent"]] == ["activate", "activate"]
    assert status["last_tick"]["standby"] == 1


def test_loop_propagates_nothing_even_from_the_actuator() -> None:
    class Exploding(Actuator):
        def apply(self, decisions, now_s):
            raise OSError("boom")

    loop = AutoscalerLoop(lambda: _ctx(Demand(), []), Exploding(FakeRegistry(), 1.0))
    loop.safe_tick()
    assert loop.errors == 1


@pytest.mark.parametrize("bad", [{"min_active": -1}, {"max_active": 0}, {"min_active": 5, "max_active": 2}])
def test_bad_bounds_name_the_field(bad) -> None:
    from autoscaler.bounds import load_bounds
    from dgpt.exceptions import ConfigError

    with pytest.raises(ConfigError) as err:
        load_bounds(**bad)
    assert any(key in str(err.value) for key in bad)
