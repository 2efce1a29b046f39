"""The registry on a real SQLite file, with a fake Ray node table and a fake clock.

Registration and tokens, heartbeats and their answers, the monitor's reconciliation with
Ray's nodes, silence, the fleet view placement and the autoscaler read, pagination, the
pause on the head, what the pages show (fleet size over time, ended sessions, load), and
what survives reopening the file. No Ray: the adapter is a fake node table.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dgpt.config import load_settings
from dgpt.contract import LABEL_DONOR_ID, DonorState, HeartbeatAction, LeaveReason, PausedBy, Target
from dgpt.exceptions import AuthError, Conflict, InvalidRequest, NotFound
from dgpt.head import registry as registry_module
from dgpt.head.ray_adapter import NodeUsage, RayNode
from dgpt.head.registry import Registry
from dgpt.head.store import RegistryStore
from dgpt.sdk.models import DeviceProfile, DonorCaps, Heartbeat, LeaveRequest, RegisterRequest

GIB = 2**30
T0 = 1_000_000.0


class FakeRay:
    """Ray's node table as the registry reads it, and the drains it asks for."""

    def __init__(self) -> None:
        self.nodes_by_id: dict[str, tuple[str, bool]] = {}
        self.started: dict[str, int] = {}
        self.extra: dict[str, dict[str, float]] = {}
        self.fail_drains = False
        self.drains: list[tuple[str, str]] = []
        self.refuse_idle = False

    def join(self, node_id: str, donor_id: str) -> None:
        self.nodes_by_id[node_id] = (donor_id, True)
        self.started[node_id] = len(self.started) + 1

    def die(self, node_id: str) -> None:
        donor_id, _ = self.nodes_by_id[node_id]
        self.nodes_by_id[node_id] = (donor_id, False)

    def nodes(self) -> list[RayNode]:
        # Newest first, as a dict of the GCS's might list them: the registry must not rely on order.
        return [RayNode(node_id=n, alive=alive, labels={LABEL_DONOR_ID: d} if d else {},
                        resources_total=self.extra.get(n, {}), node_ip="10.0.0.2", is_head=False,
                        started_ms=self.started.get(n, 0))
                for n, (d, alive) in reversed(self.nodes_by_id.items())]

    def drain_node(self, node_id: str, reason: str, message: str, deadline_s: float) -> tuple[bool, str]:
        if self.fail_drains:
            raise RuntimeError("GCS unavailable")
        self.drains.append((node_id, reason))
        if reason == "idle" and self.refuse_idle:
            return False, "node is busy"
        return True, ""


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _request(name: str = "d1", **kw: object) -> RegisterRequest:
    return RegisterRequest(
        name=name, device_class=kw.pop("device_class", "desktop"), owner=kw.pop("owner", "alice"),  # type: ignore[arg-type]
        profile=DeviceProfile(cpus=8, memory_bytes=16 * GIB, cpu_gflops=50.0),
        caps=DonorCaps(cpus=2, memory_bytes=2 * GIB), **kw,  # type: ignore[arg-type]
    )


def _registry(home: Path, ray: FakeRay, clock: Clock) -> Registry:
    settings = load_settings({"home": home, "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 10.0,
                              "standby_heartbeat_interval_s": 30.0}, env={})
    store = RegistryStore(home / "head" / "registry.sqlite")
    token = home / "ray_token"
    token.write_text("ray-secret")
    return Registry(settings, store, ray, "10.0.0.1:6379", token, clock=clock)


@pytest.fixture
def ray() -> FakeRay:
    return FakeRay()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(tmp_path: Path, ray: FakeRay, clock: Clock) -> Registry:
    return _registry(tmp_path, ray, clock)


@pytest.fixture
def token(reg: Registry) -> str:
    made = reg.create_token("join", "test").token
    assert made
    return made


def _db_rows(reg: Registry, table: str) -> int:
    with sqlite3.connect(reg.store.path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def _beat(reg: Registry, donor_id: str, secret: str, state: str = "standby", **kw: object):
    resp, _ = reg.heartbeat(donor_id, secret, Heartbeat(state=state, **kw))  # type: ignore[arg-type]
    return resp


def _activate(reg: Registry, ray: FakeRay, clock: Clock, donor_id: str, secret: str, node_id: str) -> None:
    """The autoscaler activates, the agent starts its raylet, the monitor sees the node."""
    reg.set_target(donor_id, Target.ACTIVE)
    resp = _beat(reg, donor_id, secret, "standby")
    assert resp.action is HeartbeatAction.ACTIVATE and resp.ray is not None
    clock.now += 1
    _beat(reg, donor_id, secret, "starting")
    ray.join(node_id, donor_id)
    clock.now += 1
    reg.tick()
    assert reg.donor_view(donor_id).state is DonorState.ACTIVE


# ---------------------------------------------------------------- tokens and registration


def test_register_without_valid_token_stores_nothing(reg: Registry) -> None:
    for bad in (None, "", "dgpt_join_wrong"):
        with pytest.raises(AuthError) as err:
            reg.register(_request(), bad)
        assert err.value.status_code == 401
        assert "join token" in err.value.message
    assert _db_rows(reg, "donors") == 0 and len(reg) == 0


def test_revoked_token_is_refused(reg: Registry, token: str) -> None:
    token_id = reg.list_tokens()[0].token_id
    reg.revoke_token(token_id)
    with pytest.raises(AuthError, match="revoked"):
        reg.register(_request(), token)
    with pytest.raises(NotFound):
        reg.revoke_token(token_id)


def test_tokens_are_stored_hashed_wherever_sqlite_put_them(reg: Registry, token: str) -> None:
    from dgpt.head.store import hash_secret

    # In WAL mode a fresh row lives in the -wal file until a checkpoint: read both.
    files = [reg.store.path, reg.store.path.with_name(reg.store.path.name + "-wal")]
    raw = b"".join(f.read_bytes() for f in files if f.exists())
    assert hash_secret(token).encode() in raw, "the token row must be in these files, else this test looks nowhere"
    assert token.encode() not in raw


def test_reregistration_keeps_the_donor_id(reg: Registry, token: str) -> None:
    first = reg.register(_request(), token)
    assert not first.reused
    again = reg.register(_request(donor_id=first.donor_id, donor_secret=first.donor_secret), token)
    assert (again.donor_id, again.donor_secret, again.reused) == (first.donor_id, first.donor_secret, True)
    assert len(reg) == 1 and _db_rows(reg, "donors") == 1


def test_reregistration_with_a_wrong_secret_is_a_conflict(reg: Registry, token: str) -> None:
    first = reg.register(_request(), token)
    with pytest.raises(Conflict, match="another secret"):
        reg.register(_request(donor_id=first.donor_id, donor_secret="x" * 32), token)


def test_unknown_donor_and_wrong_secret_answer_alike(reg: Registry, token: str) -> None:
    donor = reg.register(_request(), token)
    with pytest.raises(AuthError) as unknown:
        _beat(reg, "d-nope", donor.donor_secret)
    with pytest.raises(AuthError) as wrong:
        _beat(reg, donor.donor_id, "wrong-secret-wrong-secret")
    assert (unknown.value.status_code, unknown.value.message) == (wrong.value.status_code, wrong.value.message)


def test_labels_follow_the_naming_contract(reg: Registry, token: str) -> None:
    donor_id = reg.register(_request(owner="bob", labels={"zone": "eu-1"}), token).donor_id
    labels = reg.donor_view(donor_id).labels
    assert labels == {"dgpt.io/donor-id": donor_id, "dgpt.io/role": "donor", "dgpt.io/owner": "bob",
                      "dgpt.io/device-class": "desktop", "dgpt.io/gpu": "none", "zone": "eu-1"}


# ---------------------------------------------------------------- lifecycle through the registry


def test_a_new_donor_waits_for_the_autoscaler_then_gets_join_arguments(reg: Registry, token: str) -> None:
    d = reg.register(_request(), token)
    assert reg.donor_view(d.donor_id).state is DonorState.REGISTERED
    assert _beat(reg, d.donor_id, d.donor_secret).action is HeartbeatAction.STANDBY
    assert reg.donor_view(d.donor_id).state is DonorState.STANDBY
    reg.set_target(d.donor_id, Target.ACTIVE)
    resp = _beat(reg, d.donor_id, d.donor_secret)
    assert resp.action is HeartbeatAction.ACTIVATE and resp.ray is not None
    assert resp.ray.gcs_address == "10.0.0.1:6379" and resp.ray.auth_token == "ray-secret"
    assert resp.ray.num_cpus == 2 and resp.ray.labels[LABEL_DONOR_ID] == d.donor_id
    # A donor that already runs is told to go on, without the token again.
    assert _beat(reg, d.donor_id, d.donor_secret, "starting").ray is None


def test_activate_then_drain_ends_drained_with_its_reason(reg: Registry, ray: FakeRay, clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    assert [s.ended_as for s in reg.donor_view(d.donor_id).sessions] == [None]
    resp = reg.leave(d.donor_id, d.donor_secret, LeaveRequest(reason=LeaveReason.PAUSED, deadline_s=20))
    assert resp.state is DonorState.DRAINING and resp.drain_requested
    assert ray.drains == [("n1", "preemption")]
    answer = _beat(reg, d.donor_id, d.donor_secret, "active")
    assert answer.action is HeartbeatAction.DRAIN and 0 < (answer.drain_deadline_s or 0) <= 20
    ray.die("n1")
    reg.tick()
    view = reg.donor_view(d.donor_id)
    assert view.state is DonorState.STANDBY
    assert [(s.ended_as.value if s.ended_as else None, s.end_reason) for s in view.sessions] == [("drained", "paused")]


def test_scale_down_drains_a_running_donor(reg: Registry, ray: FakeRay, clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    accepted, _ = reg.drain_idle(d.donor_id, "idle", 20.0)
    assert accepted and ray.drains == [("n1", "idle")], "IDLE_TERMINATION, and only once"
    assert _beat(reg, d.donor_id, d.donor_secret, "active").action is HeartbeatAction.DRAIN
    ray.die("n1")
    reg.tick()
    session = reg.donor_view(d.donor_id).sessions[-1]
    assert (session.ended_as.value if session.ended_as else None, session.end_reason) == ("drained", "autoscaler")
    assert reg.donor_view(d.donor_id).target is Target.STANDBY


def test_ray_refusing_an_idle_drain_changes_nothing(reg: Registry, ray: FakeRay, clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    ray.refuse_idle = True
    accepted, message = reg.drain_idle(d.donor_id, "idle", 20.0)
    assert not accepted and "busy" in message
    view = reg.donor_view(d.donor_id)
    assert (view.state, view.target) == (DonorState.ACTIVE, Target.ACTIVE)


def test_drain_idle_of_a_donor_not_running_only_changes_its_target(reg: Registry, token: str) -> None:
    d = reg.register(_request(), token)
    reg.set_target(d.donor_id, Target.ACTIVE)
    accepted, message = reg.drain_idle(d.donor_id, "idle", 30.0)
    assert accepted and "standby" in message
    assert reg.donor_view(d.donor_id).target is Target.STANDBY


def test_owner_active_keeps_the_donor_out(reg: Registry, token: str) -> None:
    d = reg.register(_request(), token)
    reg.set_target(d.donor_id, Target.ACTIVE)
    resp = _beat(reg, d.donor_id, d.donor_secret, owner_active=True, owner_reason="paused by the owner")
    assert resp.action is HeartbeatAction.STANDBY and "paused" in resp.reason
    assert reg.donor_view(d.donor_id).owner_active


def test_dead_node_of_an_active_donor_ends_lost(reg: Registry, ray: FakeRay, clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    ray.die("n1")
    changes = reg.tick()
    assert changes and "lost" in changes[0][1]
    assert reg.donor_view(d.donor_id).sessions[-1].ended_as.value == "lost"  # type: ignore[union-attr]


def test_silence_ends_lost_and_a_rejoin_opens_a_new_session(reg: Registry, ray: FakeRay, clock: Clock,
                                                            token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    clock.now += 11  # past heartbeat_timeout_s=10 while its node still looks alive
    reg.tick()
    view = reg.donor_view(d.donor_id)
    assert view.state is DonorState.GONE and view.sessions[-1].ended_as.value == "lost"  # type: ignore[union-attr]
    assert "no heartbeat" in (view.sessions[-1].end_reason or "")
    reg.register(_request(donor_id=d.donor_id, donor_secret=d.donor_secret), token)
    ray.nodes_by_id.clear()
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n2")
    assert [(s.node_id, s.ended_as.value if s.ended_as else None) for s in reg.donor_view(d.donor_id).sessions] == [
        ("n1", "lost"), ("n2", None)]


def test_a_killed_agents_old_node_still_listed_alive_is_never_matched_again(reg: Registry, ray: FakeRay, clock: Clock,
                                                                         token: str) -> None:
    # A whole donor SIGKILLed and restarted at once: its new agent registers and starts a new
    # raylet while the GCS still lists the old one alive (its health check has not failed yet).
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    reg.register(_request(donor_id=d.donor_id, donor_secret=d.donor_secret), token)
    reg.tick()  # n1 still alive: not reopened for the new agent
    assert reg.donor_view(d.donor_id).state is not DonorState.ACTIVE
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n2")
    for _ in range(5):
        clock.now += 1
        reg.tick()
    ray.die("n1")
    reg.tick()
    sessions = [(s.node_id, s.ended_as.value if s.ended_as else None) for s in reg.donor_view(d.donor_id).sessions]
    assert sessions == [("n1", "lost"), ("n2", None)], "one lost session for the killed raylet, no flapping"


def test_a_newer_raylet_of_the_same_donor_wins_over_an_older_one(reg: Registry, ray: FakeRay, clock: Clock,
                                                                 token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    ray.join("n2", d.donor_id)  # a new raylet while the old one still looks alive
    for _ in range(4):
        clock.now += 1
        reg.tick()
    sessions = [(s.node_id, s.ended_as.value if s.ended_as else None) for s in reg.donor_view(d.donor_id).sessions]
    assert sessions == [("n1", "lost"), ("n2", None)]


def test_a_node_that_joins_without_a_session_is_flagged_drained_and_never_matched(reg: Registry, ray: FakeRay,
                                                                                  clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    ray.nodes_by_id["stranger"] = ("", True)  # the Ray token, but no donor session
    ray.join("poser", d.donor_id)  # a second raylet under d's donor id, claiming the head's resource
    ray.extra["poser"] = {"node:__internal_head__": 1.0}
    clock.now += 1
    reg.tick()
    rogue = {r.node_id: r for r in reg.rogue_nodes()}
    assert set(rogue) == {"stranger", "poser"}
    assert "no dgpt.io/donor-id label" in rogue["stranger"].reason and "head's resource" in rogue["poser"].reason
    assert all(r.drain_requested for r in rogue.values())
    assert ("stranger", "preemption") in ray.drains and ("poser", "preemption") in ray.drains
    view = reg.donor_view(d.donor_id)
    assert view.node_id == "n1" and [s.node_id for s in view.sessions] == ["n1"], "the poser took no session"
    reg.tick()
    assert [n for n, _ in ray.drains].count("poser") == 1, "drained once"
    ray.join("late", "")  # a drain that fails is asked again on the next tick
    ray.fail_drains = True
    reg.tick()
    assert not {r.node_id: r for r in reg.rogue_nodes()}["late"].drain_requested
    ray.fail_drains = False
    reg.tick()
    assert {r.node_id: r for r in reg.rogue_nodes()}["late"].drain_requested
    del ray.nodes_by_id["late"]
    del ray.nodes_by_id["stranger"]
    reg.tick()
    gone = {r.node_id: r.gone_at for r in reg.rogue_nodes()}
    assert gone == {"stranger": clock.now, "poser": None, "late": clock.now}, "gone nodes stay listed, marked gone"
    asked = len(ray.drains)
    reg.tick()
    assert len(ray.drains) == asked, "a gone node is never asked to drain again"
    clock.now += registry_module.ROGUE_GONE_KEPT_S + 1
    reg.tick()
    assert [r.node_id for r in reg.rogue_nodes()] == ["poser"], "gone nodes leave the list after a while"


def test_a_drained_donors_raylet_gets_a_grace_before_it_counts_as_sessionless(reg: Registry, ray: FakeRay,
                                                                             clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    reg.set_target(d.donor_id, Target.STANDBY)
    _beat(reg, d.donor_id, d.donor_secret, "standby")  # the agent says its raylet stopped; Ray still lists it
    reg.tick()
    assert reg.rogue_nodes() == []
    clock.now += 31
    _beat(reg, d.donor_id, d.donor_secret, "standby")
    reg.tick()
    (rogue,) = reg.rogue_nodes()
    assert rogue.node_id == "n1" and "granted no session (standby)" in rogue.reason


def test_a_standby_donor_times_out_only_after_its_longer_interval(reg: Registry, token: str, clock: Clock) -> None:
    d = reg.register(_request(), token)
    _beat(reg, d.donor_id, d.donor_secret)
    clock.now += 11  # an active donor would be lost by now; a standby one long-polls for 30 s
    reg.tick()
    assert reg.donor_view(d.donor_id).state is DonorState.STANDBY
    clock.now += 30
    reg.tick()
    assert reg.donor_view(d.donor_id).state is DonorState.GONE


# ---------------------------------------------------------------- long-poll and intervals


def test_standby_heartbeats_may_be_held_and_running_ones_never(reg: Registry, ray: FakeRay, clock: Clock,
                                                               token: str) -> None:
    d = reg.register(_request(), token)
    resp, hold = reg.heartbeat(d.donor_id, d.donor_secret, Heartbeat(state="standby", wait_s=25), can_hold=True)
    assert resp.action is HeartbeatAction.STANDBY and hold == 25
    assert resp.heartbeat_interval_s == registry_module.REPOLL_S and resp.wait_s == 30
    # When the head cannot hold it (too many held), the donor waits its whole interval instead.
    resp, hold = reg.heartbeat(d.donor_id, d.donor_secret, Heartbeat(state="standby", wait_s=25), can_hold=False)
    assert hold == 0 and resp.heartbeat_interval_s == 30
    woken: list[str] = []
    reg.on_wake = woken.append
    reg.set_target(d.donor_id, Target.ACTIVE)
    assert woken == [d.donor_id], "an activation wakes the donor's held heartbeat"
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    resp, hold = reg.heartbeat(d.donor_id, d.donor_secret, Heartbeat(state="active", wait_s=25), can_hold=True)
    assert hold == 0 and resp.heartbeat_interval_s == 1.0 and resp.wait_s == 0


def test_the_standby_interval_stretches_with_the_fleet(reg: Registry, token: str, monkeypatch) -> None:
    monkeypatch.setattr(registry_module, "STANDBY_BEATS_PER_S", 2.0)
    for i in range(100):
        reg.register(_request(f"d{i}"), token)
    # 100 standby donors at 2 heartbeats/s: each waits 50 s (never below the 30 s floor).
    assert reg.standby_interval_s() == 50.0


# ---------------------------------------------------------------- views


def test_fleet_view_sorts_donors_into_active_activating_standby(reg: Registry, ray: FakeRay, clock: Clock,
                                                                token: str) -> None:
    made = {name: reg.register(_request(name, owner=name), token) for name in "abcdef"}
    for d in made.values():
        _beat(reg, d.donor_id, d.donor_secret)
    _activate(reg, ray, clock, made["a"].donor_id, made["a"].donor_secret, "n-a")
    reg.update_usage([NodeUsage("n-a", available={"CPU": 1.5, "memory": GIB}, total={"CPU": 2.0}, idle_s=7,
                                status="RUNNING")])
    reg.set_target(made["b"].donor_id, Target.ACTIVE)  # told to activate, not started yet
    _beat(reg, made["c"].donor_id, made["c"].donor_secret, owner_active=True, owner_reason="load")  # owner back
    clock.now += 45  # d, e and f fall silent; a, b and c heartbeat again
    for name in "abc":
        _beat(reg, made[name].donor_id, made[name].donor_secret, "active" if name == "a" else "standby",
              owner_active=name == "c")
    _beat(reg, made["d"].donor_id, made["d"].donor_secret)  # d is fresh again
    view = reg.fleet_view()
    names = {d.donor_id: n for n, d in made.items()}
    assert [names[d.donor_id] for d in view.active] == ["a"]
    active = view.active[0]
    assert active.available is not None and active.available.cpus == 1.5 and active.idle_s == 7
    assert active.node_id == "n-a" and active.since_s == T0 + 2
    assert [names[d.donor_id] for d in view.activating] == ["b"]
    assert [names[str(d)] for d in view.standby.donor_ids] == ["d"], "silent and owner-active donors are no candidates"
    assert view.standby.cpu_total.tolist() == [2.0]


def test_node_states_carry_fresh_state_reliability_and_reachability(reg: Registry, ray: FakeRay, clock: Clock,
                                                                    token: str) -> None:
    steady = reg.register(_request("steady", owner="s"), token)
    flaky = reg.register(_request("flaky", owner="f"), token)
    for i in range(15):
        start = T0 - 30 * 86400 + i * 86400
        reg.record_session(steady.donor_id, start, start + 20 * 3600, "drained")
        reg.record_session(flaky.donor_id, start, start + 60, "lost")
    _activate(reg, ray, clock, steady.donor_id, steady.donor_secret, "n-steady")
    _activate(reg, ray, clock, flaky.donor_id, flaky.donor_secret, "n-flaky")
    _beat(reg, steady.donor_id, steady.donor_secret, "active")
    states = reg.node_states()
    assert states["n-steady"]["state"] == "active" and states["n-steady"]["reachable"]
    assert states["n-steady"]["reliability"] > states["n-flaky"]["reliability"]
    reg.leave(flaky.donor_id, flaky.donor_secret, LeaveRequest(reason=LeaveReason.PAUSED))
    assert reg.node_states()["n-flaky"]["state"] == "draining", "state is never cached"
    clock.now += 3  # more than 2.5 heartbeat intervals of silence
    _beat(reg, flaky.donor_id, flaky.donor_secret, "draining")
    states = reg.node_states()
    assert not states["n-steady"]["reachable"] and states["n-flaky"]["reachable"]


def test_node_states_and_donor_views_carry_the_trust_the_verification_store_gives(
        reg: Registry, ray: FakeRay, clock: Clock, token: str, tmp_path: Path) -> None:
    from dgpt.verify.trust import DonorOutcome, TrustBook

    book = TrustBook(tmp_path / "trust.sqlite")  # the control plane points it at registry.sqlite
    reg.trust_scores = book.scores
    reg.trust_record = lambda donor_id: (r.as_dict() if (r := book.summary(donor_id)) else None)
    liar = reg.register(_request("liar", owner="l"), token)
    honest = reg.register(_request("honest", owner="h"), token)
    _activate(reg, ray, clock, liar.donor_id, liar.donor_secret, "n-liar")
    _activate(reg, ray, clock, honest.donor_id, honest.donor_secret, "n-honest")
    assert reg.node_states()["n-liar"]["trust"] is None, "never checked: unknown, not a made-up score"
    book.record([DonorOutcome(liar.donor_id, "t1", "invalid", node_id="n-liar"),
                 DonorOutcome(honest.donor_id, "t1", "valid", node_id="n-honest")])
    states = reg.node_states()
    assert states["n-liar"]["trust"] < states["n-honest"]["trust"]
    assert (states["n-liar"]["owner"], states["n-honest"]["owner"]) == ("l", "h")
    view = reg.donor_view(liar.donor_id)
    assert view.trust == states["n-liar"]["trust"] and view.verification is not None
    assert (view.verification.invalid, view.verification.valid) == (1, 0)
    assert [(o.task_id, o.outcome) for o in view.verification.recent] == [("t1", "invalid")]
    page, _, _ = reg.list_donors()
    assert {d.name: d.trust for d in page} == {"liar": view.trust, "honest": states["n-honest"]["trust"]}
    assert all(d.verification is None for d in page), "pages carry the score, not every record"


def test_reliability_is_refitted_only_when_a_session_ends(reg: Registry, ray: FakeRay, clock: Clock, token: str,
                                                          monkeypatch) -> None:
    d = reg.register(_request(), token)
    fits: list[int] = []
    real = registry_module.fit_recorded
    monkeypatch.setattr(registry_module, "fit_recorded", lambda *a: fits.append(1) or real(*a))
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    for _ in range(20):
        _beat(reg, d.donor_id, d.donor_secret, "active")
        reg.node_states()
        reg.fleet_view()
    assert fits == []
    ray.die("n1")
    reg.tick()
    assert fits == [1]


def test_donors_are_listed_a_page_at_a_time_and_filtered(reg: Registry, token: str) -> None:
    ids = [reg.register(_request(f"d{i}", owner=f"o{i % 3}", device_class="laptop" if i % 2 else "desktop"),
                        token).donor_id for i in range(10)]
    seen, after = [], None
    while True:
        page, after, total = reg.list_donors(limit=4, after=after)
        assert total == 10
        seen += [d.donor_id for d in page]
        if after is None:
            break
    assert seen == ids
    owners, _, total = reg.list_donors(owner="o1")
    assert [d.owner for d in owners] == ["o1"] * 3 and total is None
    laptops, _, _ = reg.list_donors(device_class="laptop", state=DonorState.REGISTERED)
    assert len(laptops) == 5
    with pytest.raises(InvalidRequest, match="after"):
        reg.list_donors(after="d-nope")



def test_views_of_named_donors_skip_unknown_ones_and_match_the_list(reg: Registry, token: str) -> None:
    ids = [reg.register(_request(f"d{i}"), token).donor_id for i in range(5)]
    views = reg.donor_views([ids[3], "d-nope", ids[1]])
    assert [v.donor_id for v in views] == [ids[3], ids[1]]
    listed = {v.donor_id: v for v in reg.list_donors(max_sessions=0)[0]}
    assert all(v == listed[v.donor_id] for v in views)

# ---------------------------------------------------------------- durability


def test_records_survive_reopening_the_file(tmp_path: Path, ray: FakeRay, clock: Clock) -> None:
    first = _registry(tmp_path, ray, clock)
    token = first.create_token("join", "t").token
    assert token
    d = first.register(_request(), token)
    _activate(first, ray, clock, d.donor_id, d.donor_secret, "n1")
    first.store.close()
    second = _registry(tmp_path, ray, clock)
    view = second.donor_view(d.donor_id)
    assert view.state is DonorState.ACTIVE and len(view.sessions) == 1 and view.target is Target.ACTIVE
    assert second.register(_request(donor_id=d.donor_id, donor_secret=d.donor_secret), token).reused
    assert [x.donor_id for x in second.fleet_view().active] == [], "a re-registered agent's old raylet is gone"


def test_a_failed_request_leaves_nothing(reg: Registry, token: str) -> None:
    d = reg.register(_request(), token)
    with pytest.raises(ValueError):
        reg.record_session(d.donor_id, started_at=10.0, ended_at=5.0, ended_as="lost")
    with pytest.raises(NotFound):
        reg.record_session("d-nope", started_at=1.0, ended_at=5.0, ended_as="lost")
    assert _db_rows(reg, "sessions") == 0 and reg.donor_view(d.donor_id).sessions_total == 0


# ---------------------------------------------------------------- preflight


def _wait(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_donor_whose_ray_ports_do_not_answer_is_never_activated(tmp_path: Path, ray: FakeRay, clock: Clock) -> None:
    from dgpt.netaddr import Reachability

    blocked = {("10.0.0.7", 6381)}
    reg = _registry(tmp_path, ray, clock)
    reg.probe = lambda host, port: (Reachability(host, port, False, "no answer in 2s: a firewall drops it, or NAT")
                                    if (host, port) in blocked else Reachability(host, port, True))
    token = reg.create_token("join", "t").token
    good = reg.register(_request("good", node_ip="10.0.0.6", ray_ports=[6380, 6381]), token)
    bad = reg.register(_request("bad", node_ip="10.0.0.7", ray_ports=[6380, 6381]), token)
    _wait(lambda: reg._entries[good.donor_id].reach is not None and reg._entries[bad.donor_id].reach is not None)
    for d in (good, bad):
        _beat(reg, d.donor_id, d.donor_secret)
    candidates = {str(x) for x in reg.fleet_view().standby.donor_ids}
    assert candidates == {good.donor_id}, "only a donor the head reaches may be activated"
    view = reg.donor_view(bad.donor_id)
    assert view.problem and "10.0.0.7:6381" in view.problem and "open TCP 6381" in view.problem
    resp = _beat(reg, bad.donor_id, bad.donor_secret)
    assert resp.action is HeartbeatAction.STANDBY and "10.0.0.7:6381" in resp.reason, "the donor is told why"
    assert reg.donor_view(bad.donor_id).sessions_total == 0, "no lost session against its name"
    # Fixed (the operator opened the port): the periodic re-check clears it.
    blocked.clear()
    clock.now += registry_module.PREFLIGHT_RECHECK_S + 1
    _beat(reg, bad.donor_id, bad.donor_secret)
    reg.tick()
    _wait(lambda: reg._entries[bad.donor_id].reach.ok)  # type: ignore[union-attr]
    assert bad.donor_id in {str(x) for x in reg.fleet_view().standby.donor_ids}


def test_a_donor_that_cannot_reach_the_gcs_gives_way_to_another(reg: Registry, token: str) -> None:
    d = reg.register(_request("far"), token)
    reg.set_target(d.donor_id, Target.ACTIVE)
    problem = "cannot reach the head's Ray GCS at 10.0.0.1:6379: connection refused; open TCP 6379 ..."
    resp = _beat(reg, d.donor_id, d.donor_secret, problem=problem)
    assert resp.action is HeartbeatAction.STANDBY and "GCS" in resp.reason
    view = reg.donor_view(d.donor_id)
    assert view.target is Target.STANDBY and view.problem == problem
    assert d.donor_id not in {str(x) for x in reg.fleet_view().standby.donor_ids}
    _beat(reg, d.donor_id, d.donor_secret)  # it reaches the GCS again
    assert reg.donor_view(d.donor_id).problem is None
    assert d.donor_id in {str(x) for x in reg.fleet_view().standby.donor_ids}


# ---------------------------------------------------------------- pause on the head


def _standby_ids(reg: Registry) -> list[str]:
    return [str(d) for d in reg.fleet_view().standby.donor_ids]


def test_a_paused_donor_drains_ends_drained_and_stays_out_until_resumed(reg: Registry, ray: FakeRay, clock: Clock,
                                                                        token: str) -> None:
    d = reg.register(_request(), token)
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    by = reg.pauser(d.donor_id, d.donor_secret)
    answer = reg.pause(d.donor_id, by)
    assert by is PausedBy.DONOR and answer.paused and answer.paused_by is PausedBy.DONOR and answer.paused_at == clock.now
    assert answer.state is DonorState.DRAINING and answer.drain_requested and ray.drains == [("n1", "preemption")]
    drain = _beat(reg, d.donor_id, d.donor_secret, "active")
    assert drain.action is HeartbeatAction.DRAIN and drain.reason == "paused"
    ray.die("n1")
    clock.now += 1
    reg.tick()
    _beat(reg, d.donor_id, d.donor_secret, "standby")
    view = reg.donor_view(d.donor_id)
    assert (view.state, view.paused, view.paused_by, view.target) == (DonorState.STANDBY, True, PausedBy.DONOR,
                                                                     Target.STANDBY)
    session = view.sessions[-1]
    assert (session.ended_as.value if session.ended_as else None, session.end_reason) == ("drained", "paused")
    # The autoscaler never sees it as a candidate, and wanting it changes nothing.
    assert d.donor_id not in _standby_ids(reg)
    reg.set_target(d.donor_id, Target.ACTIVE)
    standby = _beat(reg, d.donor_id, d.donor_secret)
    assert standby.action is HeartbeatAction.STANDBY and standby.ray is None and "paused" in standby.reason
    assert reg.pause(d.donor_id, PausedBy.OPERATOR).message.startswith("already paused by donor")
    resumed = reg.resume(d.donor_id, PausedBy.DONOR)
    assert not resumed.paused and resumed.paused_by is None and "resumed" in resumed.message
    assert d.donor_id in _standby_ids(reg)
    reg.set_target(d.donor_id, Target.ACTIVE)
    assert _beat(reg, d.donor_id, d.donor_secret).action is HeartbeatAction.ACTIVATE
    assert reg.resume(d.donor_id, PausedBy.OPERATOR).message == "not paused"


def test_a_standby_donor_paused_by_an_operator_is_not_drained(reg: Registry, ray: FakeRay, token: str) -> None:
    d = reg.register(_request(), token)
    _beat(reg, d.donor_id, d.donor_secret)
    answer = reg.pause(d.donor_id, PausedBy.OPERATOR)
    assert answer.state is DonorState.STANDBY and not answer.drain_requested and ray.drains == []
    assert "not running" in answer.message and reg.donor_view(d.donor_id).paused_by is PausedBy.OPERATOR
    with pytest.raises(NotFound):
        reg.pause("d-nobody", PausedBy.OPERATOR)
    # The owner cannot lift an operator's pause; an operator can.
    with pytest.raises(Conflict) as err:
        reg.resume(d.donor_id, PausedBy.DONOR)
    assert err.value.status_code == 409 and reg.donor_view(d.donor_id).paused
    assert not reg.resume(d.donor_id, PausedBy.OPERATOR).paused


def test_who_may_pause_a_donor(reg: Registry, token: str) -> None:
    d = reg.register(_request(), token)
    other = reg.register(_request("d2"), token)
    api_key = reg.create_token("api", "operator").token
    assert api_key
    assert reg.pauser(d.donor_id, d.donor_secret) is PausedBy.DONOR
    assert reg.pauser(d.donor_id, api_key) is PausedBy.OPERATOR
    # Another donor's secret, a wrong one, an unknown donor: one answer, ids cannot be enumerated.
    for donor_id, credential in ((d.donor_id, other.donor_secret), (d.donor_id, "x" * 20), ("d-nobody", "x" * 20)):
        with pytest.raises(AuthError) as err:
            reg.pauser(donor_id, credential)
        assert err.value.status_code == 401 and err.value.message == registry_module.UNKNOWN_OR_WRONG
    with pytest.raises(AuthError) as err:
        reg.pauser(d.donor_id, None)
    assert "secret or an API key" in err.value.message
    with pytest.raises(NotFound):
        reg.pauser("d-nobody", api_key)  # operators may know which donors exist


def test_the_pause_survives_reopening_the_file(tmp_path: Path, ray: FakeRay, clock: Clock) -> None:
    first = _registry(tmp_path, ray, clock)
    token = first.create_token("join", "t").token
    assert token
    d = first.register(_request(), token)
    _beat(first, d.donor_id, d.donor_secret)
    first.pause(d.donor_id, PausedBy.DONOR)
    first.store.close()
    clock.now += 60
    second = _registry(tmp_path, ray, clock)
    view = second.donor_view(d.donor_id)
    assert (view.paused, view.paused_by, view.paused_at) == (True, PausedBy.DONOR, T0)
    # Its agent restarts too: registering again keeps the pause, and it is still not activated.
    second.register(_request(donor_id=d.donor_id, donor_secret=d.donor_secret), token)
    second.set_target(d.donor_id, Target.ACTIVE)
    assert _beat(second, d.donor_id, d.donor_secret).action is HeartbeatAction.STANDBY
    assert second.donor_view(d.donor_id).paused and d.donor_id not in _standby_ids(second)
    with sqlite3.connect(second.store.path) as db:
        assert db.execute("SELECT paused_by, paused_at FROM donors").fetchall() == [("donor", T0)]


# ---------------------------------------------------------------- what the pages show


def test_the_fleet_history_samples_changes_once_per_interval_and_stays_bounded(tmp_path: Path, ray: FakeRay,
                                                                              clock: Clock, monkeypatch) -> None:
    monkeypatch.setattr(registry_module, "FLEET_SAMPLES_KEPT", 5)
    reg = _registry(tmp_path, ray, clock)
    token = reg.create_token("join", "t").token
    assert token
    a = reg.register(_request("a"), token)
    clock.now += 1  # the same 10 s interval: the later counts stand for it
    reg.register(_request("b"), token)
    assert reg.fleet_history() == [(T0 + 1, {"registered": 2}), (T0 + 1, {"registered": 2})]
    clock.now += 20
    _beat(reg, a.donor_id, a.donor_secret)
    clock.now += 1
    history = reg.fleet_history()
    assert history[-2:] == [(T0 + 21, {"registered": 1, "standby": 1}), (T0 + 22, {"registered": 1, "standby": 1})]
    assert [at for at, _ in reg.fleet_history(since=T0 + 1)] == [T0 + 21, T0 + 22], "only samples after `since`"
    for i in range(10):
        clock.now += 20
        reg.register(_request(f"x{i}"), token)
    assert len(reg.fleet_history()) == 5 + 1, "the oldest samples are dropped; the last point is now"
    assert reg.fleet_history()[-1][1]["registered"] == 11


def test_the_fleet_history_survives_a_head_restart(tmp_path: Path, ray: FakeRay, clock: Clock, monkeypatch) -> None:
    monkeypatch.setattr(registry_module, "FLEET_SAMPLES_KEPT", 4)
    reg = _registry(tmp_path, ray, clock)
    token = reg.create_token("join", "t").token
    assert token
    for i in range(6):
        clock.now += 20
        reg.register(_request(f"d{i}"), token)
        reg.tick()  # the monitor's tick writes the samples taken since the last one
    clock.now += 1
    reg.register(_request("late"), token)  # the same interval as the last sample: it replaces it
    reg.tick()
    before = reg.fleet_history()[:-1]
    # (Silent registered donors go `gone`: the totals count every donor.)
    assert [sum(c.values()) for _, c in before] == [3, 4, 5, 7], "the last interval's sample is its latest counts"
    with sqlite3.connect(reg.store.path) as db:  # in the file (WAL included), bounded
        stored = db.execute("SELECT at, counts FROM fleet_samples ORDER BY bucket").fetchall()
    assert len(stored) == 4 and json.loads(stored[-1][1]) == before[-1][1]
    reg.store.close()
    clock.now += 30
    again = _registry(tmp_path, ray, clock)
    assert again.fleet_history()[:4] == before, "a restarted head plots the fleet from before it"
    assert again.fleet_history()[-1][0] == clock.now


def test_ended_sessions_are_listed_newest_first_and_survive_a_restart(tmp_path: Path, ray: FakeRay,
                                                                      clock: Clock) -> None:
    reg = _registry(tmp_path, ray, clock)
    token = reg.create_token("join", "t").token
    assert token
    a, b = reg.register(_request("alpha"), token), reg.register(_request("beta"), token)
    _activate(reg, ray, clock, a.donor_id, a.donor_secret, "na")
    _activate(reg, ray, clock, b.donor_id, b.donor_secret, "nb")
    ray.die("na")
    clock.now += 1
    reg.tick()
    reg.leave(b.donor_id, b.donor_secret, LeaveRequest(reason=LeaveReason.LEAVE, deadline_s=10))
    ray.die("nb")
    clock.now += 1
    reg.tick()
    ended = reg.ended_sessions()
    assert [(s.donor_name, s.ended_as.value if s.ended_as else None, s.end_reason) for s in ended] == [
        ("beta", "drained", "leave"), ("alpha", "lost", "Ray node died")]
    assert [s.donor_id for s in reg.ended_sessions(limit=1)] == [b.donor_id]
    reg.store.close()
    again = _registry(tmp_path, ray, clock)
    assert [(s.donor_id, s.session_id) for s in again.ended_sessions()] == [(s.donor_id, s.session_id) for s in ended]


def test_a_running_donors_view_carries_its_load(reg: Registry, ray: FakeRay, clock: Clock, token: str) -> None:
    d = reg.register(_request(), token)
    assert reg.donor_view(d.donor_id).load is None, "no raylet, no load"
    _activate(reg, ray, clock, d.donor_id, d.donor_secret, "n1")
    reg.update_usage([NodeUsage("n1", available={"CPU": 0.5}, total={"CPU": 2.0}, idle_s=0, status="RUNNING")])
    assert reg.donor_view(d.donor_id).load == 0.75


def test_a_file_of_an_older_head_gains_the_pause_columns_and_keeps_its_donors(tmp_path: Path, ray: FakeRay,
                                                                              clock: Clock) -> None:
    first = _registry(tmp_path, ray, clock)
    token = first.create_token("join", "t").token
    assert token
    d = first.register(_request(), token)
    first.store.close()
    with sqlite3.connect(tmp_path / "head" / "registry.sqlite") as db:  # as a head before the pause wrote it
        db.execute("ALTER TABLE donors DROP COLUMN paused_by")
        db.execute("ALTER TABLE donors DROP COLUMN paused_at")
    second = _registry(tmp_path, ray, clock)
    assert not second.donor_view(d.donor_id).paused
    second.pause(d.donor_id, PausedBy.OPERATOR)
    second.store.close()
    assert _registry(tmp_path, ray, clock).donor_view(d.donor_id).paused_by is PausedBy.OPERATOR
