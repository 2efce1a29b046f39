"""The registry's SQLite store on a real file: tokens, registration, heartbeats, sessions."""

from __future__ import annotations

import sqlite3

import pytest

from dgpt.exceptions import AuthError, Conflict, NotFound
from dgpt.head.store import NodeObservation, RegistryStore
from dgpt.sdk.models import DeviceProfile, DonorCaps, Heartbeat, RegisterRequest

GIB = 2**30


def _request(name: str = "d1", **kw) -> RegisterRequest:
    return RegisterRequest(
        name=name, device_class="desktop", owner=kw.pop("owner", "alice"),
        profile=DeviceProfile(cpus=8, memory_bytes=16 * GIB, cpu_gflops=50.0),
        caps=DonorCaps(cpus=2, memory_bytes=2 * GIB), **kw,
    )


@pytest.fixture
def store(tmp_path):
    s = RegistryStore(tmp_path / "registry.sqlite")
    yield s
    s.close()


@pytest.fixture
def token(store):
    return store.create_token("join", "test", now=0.0).token


def _rows(path, table):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_register_without_valid_token_stores_nothing(store, tmp_path):
    for bad in (None, "", "dgpt_join_wrong"):
        with pytest.raises(AuthError) as err:
            store.register(_request(), bad, now=1.0)
        assert err.value.status_code == 401
    assert _rows(tmp_path / "registry.sqlite", "donors") == 0


def test_revoked_token_is_refused(store, token):
    token_id = store.list_tokens()[0].token_id
    store.revoke_token(token_id, now=2.0)
    with pytest.raises(AuthError, match="revoked"):
        store.register(_request(), token, now=3.0)
    with pytest.raises(NotFound):
        store.revoke_token(token_id, now=4.0)


def test_tokens_are_stored_hashed(store, token, tmp_path):
    raw = (tmp_path / "registry.sqlite").read_bytes()
    assert token.encode() not in raw


def test_reregistration_keeps_the_donor_id(store, token):
    donor_id, secret, reused = store.register(_request(), token, now=1.0)
    assert not reused
    again, secret2, reused = store.register(_request(donor_id=donor_id, donor_secret=secret), token, now=2.0)
    assert (again, secret2, reused) == (donor_id, secret, True)
    assert len(store.list_donors()) == 1


def test_reregistration_with_a_wrong_secret_is_a_conflict(store, token):
    donor_id, _, _ = store.register(_request(), token, now=1.0)
    with pytest.raises(Conflict):
        store.register(_request(donor_id=donor_id, donor_secret="x" * 32), token, now=2.0)


def test_unknown_donor_and_wrong_secret(store, token):
    donor_id, _, _ = store.register(_request(), token, now=1.0)
    with pytest.raises(NotFound):
        store.authenticate_donor("d-nope", "x")
    with pytest.raises(AuthError):
        store.authenticate_donor(donor_id, "wrong")


def _activate(store, donor_id, node_id, now):
    store.set_target(donor_id, "active")  # the autoscaler's ActivateDonor
    decision = store.heartbeat(donor_id, Heartbeat(state="standby"), now, 30.0)
    assert decision.action == "activate"
    store.heartbeat(donor_id, Heartbeat(state="starting"), now + 1, 30.0)
    store.reconcile([NodeObservation(node_id, donor_id, True)], now + 2, heartbeat_timeout_s=10.0)


def test_lifecycle_activate_then_drain_ends_drained(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    _activate(store, donor_id, "n1", now=1.0)
    donor = store.get_donor(donor_id)
    assert donor.state == "active" and donor.node_id == "n1"
    assert [s.ended_as for s in donor.sessions] == [None]

    state, node = store.begin_leave(donor_id, "paused", now=5.0, deadline_s=20.0)
    assert (state, node) == ("draining", "n1")
    decision = store.heartbeat(donor_id, Heartbeat(state="active"), 6.0, 20.0)
    assert decision.action == "drain" and 0 < decision.drain_deadline_s <= 20.0
    store.reconcile([NodeObservation("n1", donor_id, False)], now=8.0, heartbeat_timeout_s=10.0)
    donor = store.get_donor(donor_id)
    assert donor.state == "standby"
    assert [s.ended_as for s in donor.sessions] == ["drained"]


def test_a_new_donor_waits_for_the_autoscaler(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    assert store.heartbeat(donor_id, Heartbeat(state="standby"), 1.0, 30.0).action == "standby"
    store.set_target(donor_id, "active")
    assert store.heartbeat(donor_id, Heartbeat(state="standby"), 2.0, 30.0).action == "activate"


def test_scale_down_target_drains_a_running_donor(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    _activate(store, donor_id, "n1", now=1.0)
    store.set_target(donor_id, "standby")
    decision = store.heartbeat(donor_id, Heartbeat(state="active"), 5.0, 20.0)
    assert decision.action == "drain"
    store.reconcile([NodeObservation("n1", donor_id, False)], now=8.0, heartbeat_timeout_s=10.0)
    session = store.get_donor(donor_id).sessions[-1]
    assert (session.ended_as, session.end_reason) == ("drained", "autoscaler")


def test_owner_active_keeps_the_donor_out(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    decision = store.heartbeat(donor_id, Heartbeat(state="standby", owner_active=True, owner_reason="paused"), 1.0, 30.0)
    assert decision.action == "standby"


def test_dead_node_of_an_active_donor_ends_lost(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    _activate(store, donor_id, "n1", now=1.0)
    changes = store.reconcile([NodeObservation("n1", donor_id, False)], now=4.0, heartbeat_timeout_s=10.0)
    assert changes and "lost" in changes[0][1]
    assert store.get_donor(donor_id).sessions[-1].ended_as == "lost"


def test_heartbeat_silence_ends_lost_and_rejoin_opens_a_new_session(store, token):
    donor_id, secret, _ = store.register(_request(), token, now=0.0)
    _activate(store, donor_id, "n1", now=1.0)
    store.reconcile([NodeObservation("n1", donor_id, True)], now=30.0, heartbeat_timeout_s=10.0)
    donor = store.get_donor(donor_id)
    assert donor.state == "gone" and donor.sessions[-1].ended_as == "lost"

    store.register(_request(donor_id=donor_id, donor_secret=secret), token, now=40.0)
    _activate(store, donor_id, "n2", now=41.0)
    donor = store.get_donor(donor_id)
    assert donor.state == "active"
    assert [(s.node_id, s.ended_as) for s in donor.sessions] == [("n1", "lost"), ("n2", None)]


def test_records_survive_reopening_the_file(tmp_path):
    path = tmp_path / "registry.sqlite"
    first = RegistryStore(path)
    token = first.create_token("join", "t", now=0.0).token
    donor_id, _, _ = first.register(_request(), token, now=0.0)
    _activate(first, donor_id, "n1", now=1.0)
    first.close()
    second = RegistryStore(path)
    donor = second.get_donor(donor_id)
    assert donor.state == "active" and len(donor.sessions) == 1
    assert second.check_token("join", token)
    second.close()


def test_a_failed_transaction_leaves_nothing(store, token):
    donor_id, _, _ = store.register(_request(), token, now=0.0)
    with pytest.raises(ValueError):
        store.record_session(donor_id, started_at=10.0, ended_at=5.0, ended_as="lost")
    with pytest.raises(NotFound):
        store.record_session("d-nope", started_at=1.0, ended_at=5.0, ended_as="lost")
    assert store.sessions() == []


def test_labels_follow_the_naming_contract(store, token):
    donor_id, _, _ = store.register(_request(owner="bob", labels={"zone": "eu-1"}), token, now=0.0)
    labels = store.get_donor(donor_id).labels
    assert labels["dgpt.io/donor-id"] == donor_id
    assert labels["dgpt.io/role"] == "donor"
    assert labels["dgpt.io/owner"] == "bob"
    assert labels["dgpt.io/device-class"] == "desktop"
    assert labels["dgpt.io/gpu"] == "none"
    assert labels["zone"] == "eu-1"
