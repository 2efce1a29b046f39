"""The donor lifecycle's pure transition function: every (state, event) pair, event sequences,
and the pause on the head (drained, then kept out until resumed)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.contract import (
    AgentState,
    DonorState,
    HeartbeatAction,
    LeaveReason,
    PausedBy,
    SessionEnd,
    Target,
)
from dgpt.head.lifecycle import (
    EVENT_TYPES,
    Event,
    Heartbeat,
    LeaveRequested,
    Lifecycle,
    NodeAlive,
    NodeDead,
    Outcome,
    Paused,
    Registered,
    Resumed,
    Silent,
    TargetSet,
    step,
)

NOW = 1000.0
DEADLINE = 30.0


def _legal(lc: Lifecycle) -> None:
    """The invariants every reachable lifecycle holds."""
    if lc.node_id is not None:
        assert lc.state in (DonorState.ACTIVE, DonorState.DRAINING), lc
    if lc.state is DonorState.ACTIVE:
        assert lc.node_id is not None, lc
    if lc.state is DonorState.DRAINING:
        assert lc.drain_reason and lc.drain_deadline_at is not None, lc
    else:
        assert lc.drain_reason is None or lc.state is DonorState.DRAINING, lc
    if lc.paused:
        # Paused: out of Ray (or leaving it), and the autoscaler's target cannot bring it back.
        assert lc.target is Target.STANDBY and lc.paused_at is not None, lc
        assert lc.state not in (DonorState.ACTIVATING, DonorState.ACTIVE), lc


def _records() -> list[Lifecycle]:
    """One legal lifecycle per state (with and without a node where both are legal), both targets."""
    out = []
    for state, target in itertools.product(DonorState, Target):
        base = Lifecycle(state=state, target=target)
        if state is DonorState.ACTIVE:
            out.append(replace(base, node_id="n1"))
        elif state is DonorState.DRAINING:
            out.append(replace(base, node_id="n1", drain_reason="paused", drain_deadline_at=NOW + 10))
            out.append(replace(base, drain_reason="paused", drain_deadline_at=NOW + 10))
        else:
            out.append(base)
    # Paused on the head: every state a paused donor can be in (its target is standby).
    for lc in [r for r in out if r.target is Target.STANDBY and r.state not in (DonorState.ACTIVATING, DonorState.ACTIVE)]:
        out.append(replace(lc, paused_by=PausedBy.DONOR, paused_at=NOW - 5))
    return out


def _events() -> list[Event]:
    beats = [Heartbeat(agent, owner) for agent in AgentState for owner in (False, True)]
    return [Registered(), *beats, TargetSet(Target.ACTIVE), TargetSet(Target.STANDBY),
            LeaveRequested(LeaveReason.PAUSED.value, 20.0), LeaveRequested(LeaveReason.AUTOSCALER.value, 20.0),
            Paused(PausedBy.DONOR), Paused(PausedBy.OPERATOR), Resumed(),
            NodeAlive("n1"), NodeAlive("n2"), NodeDead("n1"), NodeDead("n2"), Silent(30.0)]


def _check_outcome(before: Lifecycle, event: Event, out: Outcome) -> None:
    _legal(out.lifecycle)
    assert (out.reply is not None) == isinstance(event, Heartbeat), "exactly heartbeats get a reply"
    if out.closed is not None:
        assert before.node_id is not None, "only an open session closes"
        assert out.closed.how in (SessionEnd.DRAINED, SessionEnd.LOST)
        if out.closed.how is SessionEnd.DRAINED:
            assert before.state is DonorState.DRAINING, "drained only if it was draining"
    if out.opened is not None:
        assert out.lifecycle.node_id == out.opened
        assert before.node_id is None or out.closed is not None, "a session opens only where none is open"
    if before.node_id is not None and out.lifecycle.node_id != before.node_id:
        assert out.closed is not None, "a node never leaves without closing its session"
    if out.reply is not None:
        if out.reply.action is HeartbeatAction.ACTIVATE:
            assert isinstance(event, Heartbeat) and not event.owner_active
            assert not out.lifecycle.paused, "a paused donor is never activated"
        if out.reply.action is HeartbeatAction.DRAIN:
            assert out.lifecycle.state is DonorState.DRAINING and (out.reply.deadline_s or 0) > 0
    if out.drain_node is not None:
        assert out.drain_node == before.node_id and out.lifecycle.state is DonorState.DRAINING


def test_every_state_event_pair_is_handled_and_legal() -> None:
    pairs = 0
    for record, event in itertools.product(_records(), _events()):
        _legal(record)
        out = step(record, event, NOW, DEADLINE)
        _check_outcome(record, event, out)
        pairs += 1
    covered = {(r.state, type(e)) for r, e in itertools.product(_records(), _events())}
    assert covered == set(itertools.product(DonorState, EVENT_TYPES))
    assert pairs == 19 * 21  # 7 legal records per target, both targets, 5 paused ones, x 21 events


@pytest.mark.parametrize(("state", "event", "after"), [
    (DonorState.REGISTERED, Heartbeat(AgentState.STANDBY), DonorState.STANDBY),
    (DonorState.STANDBY, NodeAlive("n1"), DonorState.STANDBY),  # the agent says so first
    (DonorState.ACTIVATING, NodeAlive("n1"), DonorState.ACTIVE),
    (DonorState.ACTIVE, NodeDead("n1"), DonorState.STANDBY),
    (DonorState.ACTIVE, LeaveRequested("paused", 20.0), DonorState.DRAINING),
    (DonorState.ACTIVE, Silent(30.0), DonorState.GONE),
    (DonorState.STANDBY, Silent(30.0), DonorState.GONE),
    (DonorState.GONE, Heartbeat(AgentState.STANDBY), DonorState.STANDBY),
    (DonorState.GONE, Registered(), DonorState.REGISTERED),
])
def test_main_transitions(state: DonorState, event: Event, after: DonorState) -> None:
    record = next(r for r in _records() if r.state is state and r.target is Target.STANDBY)
    assert step(record, event, NOW, DEADLINE).lifecycle.state is after


def test_sessions_close_as_drained_or_lost_for_the_right_reasons() -> None:
    active = Lifecycle(DonorState.ACTIVE, Target.ACTIVE, node_id="n1")
    lost = step(active, NodeDead("n1"), NOW, DEADLINE).closed
    assert lost is not None and (lost.how, lost.why) == (SessionEnd.LOST, "Ray node died")
    draining = step(active, LeaveRequested("paused", 20.0), NOW, DEADLINE)
    assert draining.drain_node == "n1" and draining.lifecycle.drain_deadline_at == NOW + 20
    drained = step(draining.lifecycle, NodeDead("n1"), NOW + 5, DEADLINE).closed
    assert drained is not None and (drained.how, drained.why) == (SessionEnd.DRAINED, "paused")
    silent = step(active, Silent(30.0), NOW, DEADLINE).closed
    assert silent is not None and silent.how is SessionEnd.LOST and "30s" in silent.why
    replaced = step(active, NodeAlive("n2"), NOW, DEADLINE)
    assert replaced.closed is not None and replaced.closed.how is SessionEnd.LOST and replaced.opened == "n2"


def test_the_autoscaler_scale_down_and_the_drain_deadline_ride_on_heartbeats() -> None:
    running = Lifecycle(DonorState.ACTIVE, Target.STANDBY, node_id="n1")
    out = step(running, Heartbeat(AgentState.ACTIVE), NOW, DEADLINE)
    assert out.reply is not None and out.reply.action is HeartbeatAction.DRAIN
    assert out.lifecycle.drain_reason == "autoscaler"
    later = step(out.lifecycle, Heartbeat(AgentState.ACTIVE), NOW + 20, DEADLINE)
    assert later.reply is not None and later.reply.deadline_s == pytest.approx(10.0)
    # A second leave keeps the first reason and deadline.
    again = step(out.lifecycle, LeaveRequested("sigterm", 5.0), NOW + 1, DEADLINE)
    assert again.lifecycle.drain_reason == "autoscaler" and again.drain_node is None


def test_a_pause_drains_the_donor_and_keeps_it_out_until_resumed() -> None:
    active = Lifecycle(DonorState.ACTIVE, Target.ACTIVE, node_id="n1")
    paused = step(active, Paused(PausedBy.DONOR), NOW, DEADLINE)
    lc = paused.lifecycle
    assert paused.drain_node == "n1" and lc.state is DonorState.DRAINING and lc.drain_reason == "paused"
    assert (lc.paused_by, lc.paused_at, lc.target) == (PausedBy.DONOR, NOW, Target.STANDBY)
    # The agent, still running, is told to drain; its reason travels with the answer.
    reply = step(lc, Heartbeat(AgentState.ACTIVE), NOW + 1, DEADLINE).reply
    assert reply is not None and (reply.action, reply.reason) == (HeartbeatAction.DRAIN, "paused")
    gone = step(lc, NodeDead("n1"), NOW + 5, DEADLINE)
    assert gone.closed is not None and (gone.closed.how, gone.closed.why) == (SessionEnd.DRAINED, "paused")
    lc = step(gone.lifecycle, Heartbeat(AgentState.STANDBY), NOW + 6, DEADLINE).lifecycle
    # The autoscaler wants it back: nothing changes, and its heartbeats say why it stays out.
    assert step(lc, TargetSet(Target.ACTIVE), NOW + 7, DEADLINE).lifecycle == lc
    standby = step(lc, Heartbeat(AgentState.STANDBY), NOW + 8, DEADLINE)
    assert standby.reply is not None and standby.reply.action is HeartbeatAction.STANDBY
    assert "paused" in standby.reply.reason and standby.lifecycle.state is DonorState.STANDBY
    # A second pause keeps the first one's author and time; a re-registration keeps the pause.
    assert step(lc, Paused(PausedBy.OPERATOR), NOW + 9, DEADLINE).lifecycle.paused_by is PausedBy.DONOR
    assert step(lc, Registered(), NOW + 9, DEADLINE).lifecycle.paused
    resumed = step(lc, Resumed(), NOW + 10, DEADLINE).lifecycle
    assert not resumed.paused and resumed.paused_at is None and resumed.target is Target.STANDBY
    wanted = step(resumed, TargetSet(Target.ACTIVE), NOW + 11, DEADLINE).lifecycle
    again = step(wanted, Heartbeat(AgentState.STANDBY), NOW + 12, DEADLINE)
    assert again.reply is not None and again.reply.action is HeartbeatAction.ACTIVATE


def test_a_raylet_that_runs_while_paused_is_drained() -> None:
    # Paused while its raylet was starting (or before a head restart): the next heartbeat drains it.
    lc = Lifecycle(DonorState.STANDBY, Target.STANDBY, paused_by=PausedBy.OPERATOR, paused_at=NOW)
    out = step(lc, Heartbeat(AgentState.STARTING), NOW + 1, DEADLINE)
    assert out.reply is not None and out.reply.action is HeartbeatAction.DRAIN
    assert out.lifecycle.state is DonorState.DRAINING and out.lifecycle.drain_reason == "paused"
    activating = Lifecycle(DonorState.ACTIVATING, Target.ACTIVE)
    out = step(activating, Paused(PausedBy.DONOR), NOW, DEADLINE)
    assert out.lifecycle.state is DonorState.DRAINING and out.drain_node is None


@st.composite
def event_sequences(draw: st.DrawFn) -> list[tuple[Event, float]]:
    n = draw(st.integers(1, 40))
    nodes = st.sampled_from(["n1", "n2", "n3"])
    event = st.one_of(
        st.just(Registered()),
        st.builds(Heartbeat, st.sampled_from(list(AgentState)), st.booleans(), st.none()),
        st.builds(TargetSet, st.sampled_from(list(Target))),
        st.builds(LeaveRequested, st.sampled_from([r.value for r in LeaveReason]), st.floats(1, 120)),
        st.builds(Paused, st.sampled_from(list(PausedBy))),
        st.just(Resumed()),
        st.builds(NodeAlive, nodes),
        st.builds(NodeDead, nodes),
        st.builds(Silent, st.floats(1, 120)),
    )
    return [(draw(event), draw(st.floats(0, 60))) for _ in range(n)]


@settings(max_examples=300, deadline=None)
@given(event_sequences())
def test_no_event_sequence_reaches_an_illegal_state(sequence: list[tuple[Event, float]]) -> None:
    lc, now = Lifecycle(), NOW
    open_session: str | None = None
    for event, dt in sequence:
        now += dt
        out = step(lc, event, now, DEADLINE)
        _check_outcome(lc, event, out)
        if out.closed is not None:
            assert open_session is not None
            open_session = None
        if out.opened is not None:
            assert open_session is None
            open_session = out.opened
        lc = out.lifecycle
        assert open_session == lc.node_id, "the open session is exactly the lifecycle's node"
