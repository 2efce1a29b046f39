"""RegistryCore without Ray (no adapter): what Serve routers and the autoscaler read from it."""

from __future__ import annotations

from dgpt.config import load_settings
from dgpt.head.registry import RegistryCore
from dgpt.head.store import NodeObservation
from dgpt.sdk.models import DeviceProfile, DonorCaps, Heartbeat, RegisterRequest

GIB = 2**30


def _core(tmp_path, now):
    settings = load_settings({"home": tmp_path}, env={})
    return RegistryCore(settings, "127.0.0.1:1", adapter=None, clock=lambda: now[0])


def _join(core, name, now):
    token = core.store.create_token("join", "t", now[0]).token
    req = RegisterRequest(name=name, device_class="desktop", owner=name,
                          profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=10.0),
                          caps=DonorCaps(cpus=1, memory_bytes=GIB))
    donor_id = core.register(req, token).donor_id
    core.store.set_target(donor_id, "active")
    core.store.heartbeat(donor_id, Heartbeat(state="standby"), now[0], 30.0)
    core.store.reconcile([NodeObservation(f"node-{name}", donor_id, True)], now[0], 30.0)
    return donor_id


def test_node_states_carry_fresh_state_and_reliability(tmp_path) -> None:
    now = [1_000_000.0]
    core = _core(tmp_path, now)
    steady, flaky = _join(core, "steady", now), _join(core, "flaky", now)
    for i in range(15):
        start = now[0] - 30 * 86400 + i * 86400
        core.store.record_session(steady, start, start + 20 * 3600, "drained")
        core.store.record_session(flaky, start, start + 60, "lost")
    states = core.node_states()
    assert states["node-steady"]["state"] == "active"
    assert states["node-steady"]["reliability"] > states["node-flaky"]["reliability"]

    core.store.begin_leave(flaky, "paused", now[0], 30.0)
    assert core.node_states()["node-flaky"]["state"] == "draining", "state is never cached"


def test_drain_idle_of_a_donor_not_running_only_changes_its_target(tmp_path) -> None:
    now = [1_000_000.0]
    core = _core(tmp_path, now)
    token = core.store.create_token("join", "t", now[0]).token
    req = RegisterRequest(name="idle", device_class="laptop", owner="o",
                          profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=10.0),
                          caps=DonorCaps(cpus=1, memory_bytes=GIB))
    donor_id = core.register(req, token).donor_id
    core.store.set_target(donor_id, "active")
    accepted, message = core.drain_idle(donor_id, "idle", 30.0)
    assert accepted and "standby" in message
    assert core.store.get_donor(donor_id).stats["target"] == "standby"
