"""The autoscaler's mechanism around the pure policy: context collection, actuator, loop (fakes only)."""

from __future__ import annotations

import pytest

from autoscaler.actuator import Actuator
from autoscaler.bounds import AutoscalerBounds
from autoscaler.collect import build_context
from autoscaler.decisions import ActivateDonor, DrainDonor
from autoscaler.loop import AutoscalerLoop
from autoscaler.policies import PolicyState
from dgpt.head.ray_adapter import ClusterDemand, DemandShape, GangRequest, NodeUsage
from dgpt.sdk.models import DeviceProfile, DonorCaps, DonorView, SessionView

GIB = 2**30
NOW = 1_000_000.0


def _donor(donor_id: str, state: str, *, node_id: str | None = None, target: str = "standby",
           owner_active: bool = False, heartbeat_age_s: float = 1.0, cpus: float = 2,
           sessions: list[SessionView] | None = None) -> DonorView:
    return DonorView(
        donor_id=donor_id, name=donor_id, state=state, device_class="desktop", owner=f"o-{donor_id}",
        node_id=node_id, profile=DeviceProfile(cpus=4, memory_bytes=8 * GIB, cpu_gflops=20.0),
        caps=DonorCaps(cpus=cpus, memory_bytes=2 * GIB), resources={}, labels={"dgpt.io/donor-id": donor_id},
        registered_at=NOW - 3600, last_heartbeat_at=NOW - heartbeat_age_s, owner_active=owner_active,
        sessions=sessions or [], stats={"target": target},
    )


def _usage(node_id: str, cpu_free: float, idle_s: float = 0.0, status: str = "RUNNING") -> NodeUsage:
    return NodeUsage(node_id=node_id, available={"CPU": cpu_free}, total={"CPU": 2.0}, idle_s=idle_s, status=status)


BOUNDS = AutoscalerBounds(min_active=0, max_active=10)


def test_context_sorts_donors_into_active_activating_standby() -> None:
    donors = [
        _donor("a", "active", node_id="n-a", target="active",
               sessions=[SessionView(session_id=1, node_id="n-a", started_at=NOW - 50)]),
        _donor("b", "activating", target="active"),
        _donor("c", "standby", target="active"),          # told to activate, not started yet
        _donor("d", "standby"),
        _donor("e", "standby", owner_active=True),       # owner is back: not available
        _donor("f", "standby", heartbeat_age_s=999),     # silent: not available
        _donor("g", "gone"),
    ]
    ctx = build_context(donors, [_usage("n-a", 1.5, idle_s=7)], ClusterDemand(), BOUNDS, NOW, 30.0)
    assert [n.donor_id for n in ctx.active] == ["a"]
    assert ctx.active[0].available.cpus == 1.5 and ctx.active[0].idle_s == 7
    assert ctx.active[0].session_start_s == NOW - 50
    assert sorted(d.donor_id for d in ctx.activating) == ["b", "c"]
    assert [d.donor_id for d in ctx.standby] == ["d"]


def test_context_carries_pending_shapes_gangs_and_unmet_constraints() -> None:
    donors = [_donor("a", "active", node_id="n-a", target="active")]
    demand = ClusterDemand(
        shapes=[DemandShape({"CPU": 1.0}, {"zone": "eu"})],
        gangs=[GangRequest([DemandShape({"CPU": 1.0}), DemandShape({"CPU": 1.0})], "STRICT_SPREAD")],
        constraints=[DemandShape({"CPU": 2.0}), DemandShape({"CPU": 2.0})],
    )
    ctx = build_context(donors, [_usage("n-a", 2.0, idle_s=500)], demand, BOUNDS, NOW, 30.0)
    assert ctx.pending[0].cpus == 1.0 and dict(ctx.pending[0].label_selector) == {"zone": "eu"}
    assert ctx.pending_gangs[0].strategy == "STRICT_SPREAD" and len(ctx.pending_gangs[0].bundles) == 2
    # One 2-CPU constraint holds donor a (busy, its CPUs reserved), the other is demand.
    assert [p.cpus for p in ctx.pending[1:]] == [2.0]
    assert ctx.active[0].idle_s == 0.0 and ctx.active[0].available.cpus == 0.0


def test_autoscaler_drains_are_not_departures_for_reliability() -> None:
    ended = [SessionView(session_id=i, node_id="n", started_at=NOW - 1000 * (i + 1), ended_at=NOW - 1000 * i,
                         ended_as="drained", end_reason=reason) for i, reason in enumerate(["autoscaler"] * 5)]
    left = [s.model_copy(update={"end_reason": "paused"}) for s in ended]
    from autoscaler.collect import reliability

    patient = reliability(_donor("a", "standby", sessions=ended), NOW)
    leaver = reliability(_donor("b", "standby", sessions=left), NOW)
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
        return build_context([_donor("d", "standby")], [], ClusterDemand(), AutoscalerBounds(min_active=1), NOW, 30)

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

    loop = AutoscalerLoop(lambda: build_context([], [], ClusterDemand(), BOUNDS, NOW, 30),
                          Exploding(FakeRegistry(), 1.0))
    loop.safe_tick()
    assert loop.errors == 1


@pytest.mark.parametrize("bad", [{"min_active": -1}, {"max_active": 0}, {"min_active": 5, "max_active": 2}])
def test_bad_bounds_name_the_field(bad) -> None:
    from autoscaler.bounds import load_bounds
    from dgpt.exceptions import ConfigError

    with pytest.raises(ConfigError) as err:
        load_bounds(**bad)
    assert any(key in str(err.value) for key in bad)
