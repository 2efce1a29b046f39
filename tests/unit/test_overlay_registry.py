"""The registry with the overlay: direct or relayed, join arguments over the overlay, revocation,
and placement treating relayed donors as low bandwidth.

The registry runs on a real SQLite file with the real coordinator (its own SQLite file) over
the fake interface of test_overlay; reachability is a fake probe that answers per address.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dgpt.contract import HeartbeatAction, Target
from dgpt.exceptions import AuthError
from dgpt.fleet import FleetDonor, build_table
from dgpt.head.registry import Registry
from dgpt.head.store import RegistryStore
from dgpt.netaddr import Reachability
from dgpt.overlay import acl
from dgpt.overlay.addresses import OverlayNetwork
from dgpt.overlay.coordinator import OverlayCoordinator, PeerStore
from dgpt.placement.policy import place_gang, place_replicas, place_task
from dgpt.resources import Resources
from dgpt.sdk.models import OverlayOffer
from tests.unit.test_overlay import HEAD_KEY, FakeInterface, _key, _settings
from tests.unit.test_registry import Clock, FakeRay, _beat, _request


class Net:
    """Which addresses answer the head's probes."""

    def __init__(self) -> None:
        self.up: set[str] = set()

    def probe(self, host: str, port: int) -> Reachability:
        if host in self.up:
            return Reachability(host, port, True)
        return Reachability(host, port, False, "no answer in 2s: a firewall drops it, or NAT")


@pytest.fixture(autouse=True)
def _short_handshake_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # Preflights of donors whose tunnel never comes up must not outlive the test.
    from dgpt.head import registry as registry_module

    monkeypatch.setattr(registry_module, "OVERLAY_HANDSHAKE_WAIT_S", 0.2)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Registry, FakeInterface, Net, str]:
    iface, net = FakeInterface(), Net()
    settings = _settings(home=tmp_path, overlay_enabled=True, heartbeat_interval_s=1.0)
    coordinator = OverlayCoordinator(OverlayNetwork.parse("100.96.0.0/16"), HEAD_KEY, "10.1.0.1:51820",
                                     acl.head_port_set(settings), PeerStore(tmp_path / "overlay.sqlite"), iface)
    token_file = tmp_path / "ray_token"
    token_file.write_text("ray-secret")
    reg = Registry(settings, RegistryStore(tmp_path / "registry.sqlite"), FakeRay(), "10.1.0.1:23001", token_file,
                   clock=Clock(), probe=net.probe, overlay=coordinator)
    token = reg.create_token("join", "t").token
    assert token
    return reg, iface, net, token


def _offer(i: int) -> OverlayOffer:
    return OverlayOffer(public_key=_key(i), node_port_base=6380, worker_ports="10002-19999")


def _wait(condition, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def _checked(reg: Registry, donor_id: str) -> bool:
    return reg._entries[donor_id].reach is not None


def test_a_donor_behind_nat_is_relayed_and_joins_ray_at_its_overlay_address(parts) -> None:  # type: ignore[no-untyped-def]
    reg, iface, net, token = parts
    resp = reg.register(_request("home", node_ip="192.168.1.20", ray_ports=[6380, 6381], overlay=_offer(1)), token)
    grant = resp.overlay
    assert grant is not None and grant.address == "100.96.0.2" and grant.head_address == "100.96.0.1"
    assert iface.peers_by_key == {_key(1): ("100.96.0.2/32",)}, "the head's interface has it as a peer"
    iface.shook[_key(1)] = time.time()  # its tunnel comes up
    net.up.add(grant.address)  # and its Ray ports answer there (never at 192.168.1.20)
    _wait(lambda: _checked(reg, resp.donor_id))
    view = reg.donor_view(resp.donor_id)
    assert view.relayed is True and view.overlay_ip == "100.96.0.2" and view.problem is None
    _beat(reg, resp.donor_id, resp.donor_secret)
    standby = reg.fleet_view().standby
    assert list(standby.donor_ids) == [resp.donor_id] and standby.relayed is not None
    assert standby.relayed.tolist() == [1.0], "the autoscaler sees it as relayed"
    reg.set_target(resp.donor_id, Target.ACTIVE)
    answer = _beat(reg, resp.donor_id, resp.donor_secret)
    assert answer.action is HeartbeatAction.ACTIVATE and answer.ray is not None
    assert answer.ray.node_ip == "100.96.0.2", "Ray advertises the overlay address"
    assert answer.ray.gcs_address == "100.96.0.1:23001", "and dials the head's GCS over the overlay"


def test_a_donor_the_head_reaches_stays_direct(parts) -> None:  # type: ignore[no-untyped-def]
    reg, iface, net, token = parts
    net.up.add("10.1.0.11")
    resp = reg.register(_request("office", node_ip="10.1.0.11", ray_ports=[6380, 6381], overlay=_offer(2)), token)
    assert resp.overlay is not None, "it is on the overlay too (so it reaches relayed donors)"
    _wait(lambda: _checked(reg, resp.donor_id))
    assert reg.donor_view(resp.donor_id).relayed is False
    reg.set_target(resp.donor_id, Target.ACTIVE)
    answer = _beat(reg, resp.donor_id, resp.donor_secret)
    assert answer.ray is not None and answer.ray.node_ip is None and answer.ray.gcs_address == "10.1.0.1:23001"


def test_a_tunnel_that_never_comes_up_keeps_the_donor_out_and_says_why(parts) -> None:  # type: ignore[no-untyped-def]
    reg, iface, net, token = parts
    resp = reg.register(_request("home", node_ip="192.168.1.20", ray_ports=[6380, 6381], overlay=_offer(1)), token)
    _wait(lambda: _checked(reg, resp.donor_id))
    view = reg.donor_view(resp.donor_id)
    assert view.relayed is None and view.problem is not None
    assert "192.168.1.20:6380" in view.problem and "100.96.0.2:6380" in view.problem
    assert "UDP 51820" in view.problem and "never reached the head" in view.problem
    assert resp.donor_id not in set(reg.fleet_view().standby.donor_ids)
    # The tunnel shakes hands later: the next tick checks again at once, not in 5 minutes.
    iface.shook[_key(1)] = time.time() + 1
    net.up.add("100.96.0.2")
    _wait(lambda: (reg.tick(), reg.donor_view(resp.donor_id).relayed)[1])
    assert resp.donor_id in set(reg.fleet_view().standby.donor_ids)


def test_revoking_the_join_token_cuts_its_donors_off_the_overlay(parts) -> None:  # type: ignore[no-untyped-def]
    reg, iface, net, token = parts
    other = reg.create_token("join", "other").token
    assert other
    a = reg.register(_request("a", node_ip="192.168.1.20", ray_ports=[6380, 6381], overlay=_offer(1)), token)
    b = reg.register(_request("b", node_ip="192.168.2.20", ray_ports=[6380, 6381], overlay=_offer(2)), other)
    token_id = next(t.token_id for t in reg.list_tokens() if t.label == "t")
    reg.revoke_token(token_id)
    assert _key(1) not in iface.peers_by_key and _key(2) in iface.peers_by_key
    assert not any(e.startswith("100.96.0.2 ") for e in iface.elements), "nothing is relayed to it any more"
    with pytest.raises(AuthError) as err:
        _beat(reg, a.donor_id, a.donor_secret)
    assert "revoked" in err.value.message
    with pytest.raises(AuthError):
        reg.register(_request("a", node_ip="192.168.1.20", overlay=_offer(1), donor_id=a.donor_id,
                              donor_secret=a.donor_secret), token)
    assert _key(1) not in iface.peers_by_key, "a revoked token gets no new grant"
    _beat(reg, b.donor_id, b.donor_secret)  # the other token's donor is untouched
    # A restarted head still refuses it.
    reg2 = Registry(reg.settings, RegistryStore(reg.store.path), FakeRay(), reg.gcs_address, reg.ray_token_path,
                    probe=net.probe, overlay=reg.overlay)
    assert "revoked" in (reg2.donor_view(a.donor_id).problem or "")
    with pytest.raises(AuthError):
        reg2.heartbeat(a.donor_id, a.donor_secret, __import__("dgpt.sdk.models", fromlist=["Heartbeat"]).Heartbeat(
            state="standby"))


def test_a_donor_without_an_offer_gets_no_grant(parts) -> None:  # type: ignore[no-untyped-def]
    reg, iface, _, token = parts
    resp = reg.register(_request("plain", node_ip="10.1.0.12", ray_ports=[6380, 6381]), token)
    assert resp.overlay is None and iface.peers_by_key == {}


# ---------------------------------------------------------------- placement


def _donor(i: int, relayed: bool) -> FleetDonor:
    return FleetDonor(donor_id=f"d{i}", owner=f"o{i}", caps=Resources(4, 0, 8 * 2**30),
                      available=Resources(4, 0, 8 * 2**30), gflops=50.0, node_id=f"n{i}", relayed=relayed)


def test_gangs_avoid_relayed_donors_and_replicas_and_tasks_prefer_them() -> None:
    table = build_table([_donor(0, True), _donor(1, False), _donor(2, True), _donor(3, False)])
    gang = place_gang(table, [Resources(1, 0, 0)] * 2, 0.0, horizon_s=3600)
    assert set(gang.donor_ids) == {"d1", "d3"}  # type: ignore[union-attr]
    replicas = place_replicas(table, Resources(1, 0, 0), 2, 0.0)
    assert set(replicas.donor_ids) == {"d0", "d2"}  # type: ignore[union-attr]
    task = place_task(table, Resources(1, 0, 0), 0.0)
    assert task.donor_ids[0] in {"d0", "d2"}  # type: ignore[union-attr]
    # With too few direct donors a gang still takes a relayed one rather than not run.
    three = place_gang(table, [Resources(1, 0, 0)] * 3, 0.0, horizon_s=3600)
    assert {"d1", "d3"} <= set(three.donor_ids)  # type: ignore[union-attr]


def test_a_busy_direct_donor_still_loses_a_replica_to_an_idle_one_only_by_load() -> None:
    # The preference is small: an idle direct donor beats a heavily loaded relayed one.
    idle_direct = _donor(0, False)
    busy_relayed = FleetDonor(donor_id="d1", owner="o1", caps=Resources(4, 0, 8 * 2**30),
                              available=Resources(1, 0, 8 * 2**30), gflops=50.0, node_id="n1", load=0.75, relayed=True)
    replicas = place_replicas(build_table([idle_direct, busy_relayed]), Resources(1, 0, 0), 1, 0.0)
    assert replicas.donor_ids == ("d0",)  # type: ignore[union-attr]


# ---------------------------------------------------------------- what an operator sees


def test_status_shows_whether_each_donor_is_direct_or_relayed(api_server) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from dgpt.cli.main import app
    from dgpt.head.registry import Preflight
    from dgpt.sdk.client import DonorClient
    from dgpt.sdk.models import DeviceProfile, DonorCaps, RegisterRequest

    join = api_server.registry.create_token("join", "t").token
    ids = []
    with DonorClient(api_server.url) as d:
        for name in ("home", "office", "new"):
            ids.append(d.register(RegisterRequest(
                name=name, owner=name, profile=DeviceProfile(cpus=2, memory_bytes=4 * 2**30, cpu_gflops=10.0),
                caps=DonorCaps(cpus=1, memory_bytes=2**30)), join).donor_id)
    reg = api_server.registry
    # What the preflight found (the registry's own record of it): relayed, direct, not checked.
    reg._entries[ids[0]].reach = Preflight(True, 0.0, relayed=True)
    reg._entries[ids[0]].overlay_ip = "100.96.0.2"
    reg._entries[ids[1]].reach = Preflight(True, 0.0)
    env = {"DGPT_HOME": str(api_server.home), "DGPT_API_PORT": str(api_server.settings.api_port),
           "DGPT_NODE_IP": "127.0.0.1", "DGPT_HTTP_HOST": "127.0.0.1"}
    out = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert out.exit_code == 0, out.output
    donors = {d["name"]: d for d in json.loads(out.output)["donors"]}
    assert donors["home"]["network"] == "relayed" and donors["home"]["overlay_ip"] == "100.96.0.2"
    assert donors["office"]["network"] == "direct" and donors["new"]["network"] is None
    table = CliRunner().invoke(app, ["status"], env={**env, "COLUMNS": "250"})
    assert table.exit_code == 0 and "network" in table.output and "relayed" in table.output and "direct" in table.output


def test_a_check_that_raced_the_raylets_start_is_repeated_once_the_raylet_joins(parts) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_registry import _activate

    reg, iface, net, token = parts
    req = _request("home", node_ip="192.168.1.20", ray_ports=[6380, 6381], overlay=_offer(1))
    resp = reg.register(req, token)
    iface.shook[_key(1)] = 1.0  # its tunnel is up (long before anything below: no new handshake)
    net.up.add("100.96.0.2")
    _wait(lambda: _checked(reg, resp.donor_id))
    assert reg.donor_view(resp.donor_id).relayed is True
    # The agent restarts and registers again; its raylet starts at once (its address was
    # checked already), so the re-registration's check finds nothing answering.
    net.up.discard("100.96.0.2")
    reg.register(req.model_copy(update={"donor_id": resp.donor_id, "donor_secret": resp.donor_secret}), token)
    _wait(lambda: reg.donor_view(resp.donor_id).relayed is None)
    clock = reg.clock
    clock.now += 1  # type: ignore[attr-defined]
    net.up.add("100.96.0.2")  # the raylet listens now
    _activate(reg, reg.adapter, clock, resp.donor_id, resp.donor_secret, "n-home")  # type: ignore[arg-type]
    # The raylet joined after the failed check: the next tick checks again, not 5 minutes later.
    _wait(lambda: (reg.tick(), reg.donor_view(resp.donor_id).relayed)[1] is True)
    assert reg.donor_view(resp.donor_id).problem is None
