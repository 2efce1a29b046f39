"""The donor lifecycle as a pure transition function: (lifecycle, event, now) -> outcome.

DESIGN.md's state machine, ``registered -> standby -> activating -> active -> draining ->
standby | gone``, driven by nine events:

=================  ===========================================================================
event              who sends it
=================  ===========================================================================
Registered         the donor agent registers (or registers again after a restart)
Heartbeat          the agent reports its raylet (standby | starting | active | draining)
TargetSet          the autoscaler wants the donor in the cluster or out of it
LeaveRequested     the donor, an operator or the autoscaler drains it
Paused             the donor's owner (its secret) or an operator pauses it on the head
Resumed            the same, resuming it
NodeAlive          the monitor saw the donor's Ray node alive in Ray's node table
NodeDead           the monitor saw that node dead
Silent             the monitor saw no heartbeat for longer than the donor's timeout
=================  ===========================================================================

A donor holds an open session exactly while it has a Ray node (``node_id`` set, state
ACTIVE or DRAINING). A session opens when its node is first seen alive and closes, as
``drained`` if the donor was draining and ``lost`` otherwise, when the node dies, the agent
reports its raylet gone, the donor falls silent, or a new node replaces it. The outcome
says which session to open or close, what to answer a heartbeat, and which node to drain;
the registry applies it (SQLite, DrainNode). Nothing here does I/O.

A donor paused on the head drains (reason ``paused``, so its session ends ``drained``), and
stays out of Ray until it is resumed: its target is held at standby and the autoscaler's
``TargetSet(active)`` changes nothing. The pause is part of the stored record, so it
survives re-registration and a head restart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dgpt.contract import (
    AgentState,
    DonorState,
    HeartbeatAction,
    LeaveReason,
    PausedBy,
    SessionEnd,
    Target,
)

_RUNNING_WITH_NODE = frozenset({DonorState.ACTIVE, DonorState.DRAINING})


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The lifecycle part of a donor's record.

    ``node_id`` is the Ray node of its open session (None when no session is open);
    ``drain_deadline_at`` is when a drain in progress must be over (epoch seconds);
    ``paused_by`` who paused it on the head, since ``paused_at`` (None: not paused).
    """

    state: DonorState = DonorState.REGISTERED
    target: Target = Target.STANDBY
    node_id: str | None = None
    drain_reason: str | None = None
    drain_deadline_at: float | None = None
    owner_active: bool = False
    paused_by: PausedBy | None = None
    paused_at: float | None = None

    @property
    def paused(self) -> bool:
        return self.paused_by is not None


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Registered:
    pass


@dataclass(frozen=True, slots=True)
class Heartbeat:
    agent: AgentState
    owner_active: bool = False
    owner_reason: str | None = None


@dataclass(frozen=True, slots=True)
class TargetSet:
    target: Target


@dataclass(frozen=True, slots=True)
class LeaveRequested:
    reason: str
    deadline_s: float


@dataclass(frozen=True, slots=True)
class Paused:
    by: PausedBy


@dataclass(frozen=True, slots=True)
class Resumed:
    pass


@dataclass(frozen=True, slots=True)
class NodeAlive:
    node_id: str


@dataclass(frozen=True, slots=True)
class NodeDead:
    node_id: str


@dataclass(frozen=True, slots=True)
class Silent:
    timeout_s: float


Event = Registered | Heartbeat | TargetSet | LeaveRequested | Paused | Resumed | NodeAlive | NodeDead | Silent
EVENT_TYPES: tuple[type, ...] = (Registered, Heartbeat, TargetSet, LeaveRequested, Paused, Resumed, NodeAlive,
                                 NodeDead, Silent)

# ---------------------------------------------------------------- outcome


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a heartbeat (the registry adds the Ray join arguments and intervals)."""

    action: HeartbeatAction
    reason: str
    deadline_s: float | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """A session that ended, and how."""

    how: SessionEnd
    why: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one event did. ``closed`` is applied before ``opened`` (a replaced node)."""

    lifecycle: Lifecycle
    reply: Reply | None = None
    closed: Closed | None = None
    opened: str | None = None
    drain_node: str | None = None
    change: str = ""

    @property
    def state_changed(self) -> bool:
        return bool(self.change)


def paused_reason(by: PausedBy) -> str:
    """What a paused donor's heartbeats are answered (the agent logs it)."""
    return f"paused on the head by {'its owner' if by is PausedBy.DONOR else 'an operator'}: resume it to donate again"


def _close(lc: Lifecycle, why_lost: str) -> Closed:
    """How the open session of ``lc`` ends: drained if it was draining, else lost."""
    if lc.state is DonorState.DRAINING:
        return Closed(SessionEnd.DRAINED, lc.drain_reason or "drained")
    return Closed(SessionEnd.LOST, why_lost)


def _out_of_cluster(lc: Lifecycle, state: DonorState) -> Lifecycle:
    return replace(lc, state=state, node_id=None, drain_reason=None, drain_deadline_at=None)


def step(lc: Lifecycle, event: Event, now: float, drain_deadline_s: float) -> Outcome:
    """Apply one event to a donor's lifecycle.

    Args:
        lc: the donor's lifecycle before the event.
        event: what happened.
        now: the clock (epoch seconds).
        drain_deadline_s: the drain deadline for drains the head starts itself.

    Returns:
        The new lifecycle, the heartbeat reply (Heartbeat events only), the session to
        close and/or open, the node to drain, and a note of what changed ("" if nothing).
    """
    if isinstance(event, Heartbeat):
        return _heartbeat(lc, event, now, drain_deadline_s)
    if isinstance(event, Registered):
        if lc.node_id is not None:
            # A new agent process: its old raylet died with the old agent.
            restarted = _close(lc, "the agent restarted")
            return Outcome(_out_of_cluster(lc, DonorState.REGISTERED), closed=restarted, change="registered again")
        if lc.state in (DonorState.GONE, DonorState.STANDBY, DonorState.DRAINING, DonorState.ACTIVATING):
            return Outcome(_out_of_cluster(lc, DonorState.REGISTERED), change="registered again")
        return Outcome(lc)
    if isinstance(event, TargetSet):
        if event.target is lc.target or (lc.paused and event.target is Target.ACTIVE):
            return Outcome(lc)  # a paused donor stays out whatever the autoscaler wants
        return Outcome(replace(lc, target=event.target), change=f"target {event.target.value}")
    if isinstance(event, Paused):
        if lc.paused:
            return Outcome(lc)  # the first pause stands
        paused = replace(lc, target=Target.STANDBY, paused_by=event.by, paused_at=now)
        if not lc.state.running or lc.state is DonorState.DRAINING:
            return Outcome(paused, change=f"paused by {event.by.value}")
        new = replace(paused, state=DonorState.DRAINING, drain_reason=LeaveReason.PAUSED.value,
                      drain_deadline_at=now + drain_deadline_s)
        return Outcome(new, drain_node=lc.node_id, change=f"paused by {event.by.value}: draining")
    if isinstance(event, Resumed):
        if not lc.paused:
            return Outcome(lc)
        # Its target stays standby: the autoscaler activates it when demand needs it.
        return Outcome(replace(lc, paused_by=None, paused_at=None), change="resumed")
    if isinstance(event, LeaveRequested):
        if not lc.state.running:
            return Outcome(lc)  # not running: nothing to drain; it simply stays out
        target = Target.STANDBY if event.reason == LeaveReason.AUTOSCALER.value else lc.target
        if lc.state is DonorState.DRAINING:
            # Already leaving: the first reason and the earlier deadline stand.
            return Outcome(replace(lc, target=target))
        new = replace(lc, state=DonorState.DRAINING, target=target, drain_reason=event.reason,
                      drain_deadline_at=now + event.deadline_s)
        return Outcome(new, drain_node=lc.node_id, change=f"draining ({event.reason})")
    if isinstance(event, NodeAlive):
        if lc.state is DonorState.ACTIVATING:
            new = replace(lc, state=DonorState.ACTIVE, node_id=event.node_id)
            return Outcome(new, opened=event.node_id, change="active")
        if lc.state in _RUNNING_WITH_NODE:
            if lc.node_id is None:
                return Outcome(replace(lc, node_id=event.node_id), opened=event.node_id, change="node seen")
            if lc.node_id != event.node_id:
                # A new raylet while the old session is open: the old node died unseen.
                return Outcome(replace(lc, node_id=event.node_id), closed=Closed(SessionEnd.LOST, "replaced by a new Ray node"),
                               opened=event.node_id, change="new node")
        return Outcome(lc)
    if isinstance(event, NodeDead):
        if lc.node_id is None or lc.node_id != event.node_id:
            return Outcome(lc)
        dead = _close(lc, "Ray node died")
        return Outcome(_out_of_cluster(lc, DonorState.STANDBY), closed=dead,
                       change=f"{dead.how.value}: node {event.node_id[:8]} dead")
    if isinstance(event, Silent):
        if lc.state is DonorState.GONE:
            return Outcome(lc)
        lost = Closed(SessionEnd.LOST, f"no heartbeat for {event.timeout_s:g}s") if lc.node_id else None
        return Outcome(_out_of_cluster(lc, DonorState.GONE), closed=lost,
                       change="lost: heartbeat timeout" if lost else "gone: heartbeat timeout")
    raise TypeError(f"unknown lifecycle event {event!r}")


def _heartbeat(lc: Lifecycle, hb: Heartbeat, now: float, drain_deadline_s: float) -> Outcome:
    lc = replace(lc, owner_active=hb.owner_active)
    owner_reply = Reply(HeartbeatAction.STANDBY, f"owner active: {hb.owner_reason or 'back'}")
    if hb.agent is AgentState.STANDBY:
        closed: Closed | None = None
        change = ""
        if lc.node_id is not None:
            # The agent says its raylet is gone: close what was open.
            closed = _close(lc, "the agent reported its raylet stopped")
            change = closed.how.value
        wants_in = lc.target is Target.ACTIVE and not hb.owner_active and not lc.paused
        state = DonorState.ACTIVATING if wants_in else DonorState.STANDBY
        if state is not lc.state:
            change = change or state.value
        new = _out_of_cluster(lc, state)
        if hb.owner_active:
            return Outcome(new, reply=owner_reply, closed=closed, change=change)
        if wants_in:
            return Outcome(new, reply=Reply(HeartbeatAction.ACTIVATE, "activated"), closed=closed, change=change)
        if lc.paused_by is not None:
            return Outcome(new, reply=Reply(HeartbeatAction.STANDBY, paused_reason(lc.paused_by)), closed=closed,
                           change=change)
        return Outcome(new, reply=Reply(HeartbeatAction.STANDBY, "standby"), closed=closed, change=change)
    if hb.agent is AgentState.DRAINING:
        if lc.state in (DonorState.ACTIVE, DonorState.ACTIVATING):
            new = replace(lc, state=DonorState.DRAINING, drain_reason=lc.drain_reason or "agent draining",
                          drain_deadline_at=lc.drain_deadline_at or now + drain_deadline_s)
            return Outcome(new, reply=Reply(HeartbeatAction.STANDBY, "draining"), change="draining (agent)")
        return Outcome(lc, reply=Reply(HeartbeatAction.STANDBY, "draining"))
    # STARTING or ACTIVE: a raylet runs (or is starting).
    if lc.state is DonorState.DRAINING:
        left = max(1.0, lc.drain_deadline_at - now) if lc.drain_deadline_at else drain_deadline_s
        return Outcome(lc, reply=Reply(HeartbeatAction.DRAIN, lc.drain_reason or "drain requested by the head", left))
    if hb.owner_active:
        return Outcome(lc, reply=owner_reply)
    if lc.paused:
        # A raylet runs although it was paused (it was starting, or the head restarted).
        new = replace(lc, state=DonorState.DRAINING, drain_reason=LeaveReason.PAUSED.value,
                      drain_deadline_at=now + drain_deadline_s)
        return Outcome(new, reply=Reply(HeartbeatAction.DRAIN, LeaveReason.PAUSED.value, drain_deadline_s),
                       change="draining (paused)")
    if lc.target is Target.STANDBY:
        new = replace(lc, state=DonorState.DRAINING, drain_reason=LeaveReason.AUTOSCALER.value,
                      drain_deadline_at=now + drain_deadline_s)
        return Outcome(new, reply=Reply(HeartbeatAction.DRAIN, "scaled down", drain_deadline_s),
                       change="draining (autoscaler)")
    if lc.node_id is None and lc.state is not DonorState.ACTIVATING:
        # The raylet runs but the monitor has not matched its node yet.
        new = replace(lc, state=DonorState.ACTIVATING)
        return Outcome(new, reply=Reply(HeartbeatAction.ACTIVATE, "running"), change="activating")
    return Outcome(lc, reply=Reply(HeartbeatAction.ACTIVATE, "running"))
