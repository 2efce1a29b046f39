"""The overlay's pure parts (addresses, peer configuration, ACL rules) and its coordinator.

The coordinator runs on a real SQLite file against a fake interface that applies ``wg set``
argument lists the way ``wg`` does (so what the coordinator tells the interface is checked
by its effect, not its spelling); the ACL text is checked by the kernel's own parser
(``nft --check``) where this machine may. The tunnels themselves are tested for real in
tests/integration/test_overlay.py.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from dgpt.config import Settings, load_settings
from dgpt.exceptions import ConfigError, Conflict, OverlayError
from dgpt.overlay import acl
from dgpt.overlay.addresses import OverlayNetwork
from dgpt.overlay.coordinator import OverlayCoordinator, PeerStore
from dgpt.overlay.peers import (
    PEERS_PER_CALL,
    Peer,
    allowed_ips,
    donor_commands,
    donor_peer,
    handshakes,
    head_peer,
    plan_sync,
    set_commands,
)
from dgpt.sdk.models import OverlayGrant, OverlayOffer


def _key(i: int) -> str:
    """A well-formed WireGuard key (32 bytes, base64), distinct per ``i``."""
    return base64.b64encode(i.to_bytes(4, "big") * 8).decode()


KEY_A, KEY_B, KEY_C, HEAD_KEY = _key(1), _key(2), _key(3), _key(99)


def _offer(key: str = KEY_A, base: int = 6380, workers: str = "10002-19999") -> OverlayOffer:
    return OverlayOffer(public_key=key, node_port_base=base, worker_ports=workers)


# ---------------------------------------------------------------- addresses


def test_the_head_takes_the_first_address_and_donors_the_next_free_ones() -> None:
    net = OverlayNetwork.parse("100.96.0.0/16")
    assert net.head_address == "100.96.0.1" and net.prefix_len == 16
    first = net.allocate(set())
    assert first == "100.96.0.2"
    assert net.allocate({"100.96.0.2", "100.96.0.3"}) == "100.96.0.4", "taken addresses are skipped"
    assert net.allocate(set(), cursor=OverlayNetwork.after(first)) == "100.96.0.3", "allocation moves forward"


def test_allocation_wraps_never_hands_out_the_broadcast_address_and_says_when_full() -> None:
    net = OverlayNetwork.parse("10.9.0.0/29")  # .0 network, .1 head, .2-.6 donors, .7 broadcast
    assert net.capacity == 5
    taken: set[str] = set()
    cursor = None
    for _ in range(5):
        address = net.allocate(taken, cursor)
        taken.add(address)
        cursor = OverlayNetwork.after(address)
    assert taken == {f"10.9.0.{i}" for i in range(2, 7)}
    with pytest.raises(OverlayError) as err:
        net.allocate(taken, cursor)
    assert "full (5 donors)" in err.value.message and "DGPT_OVERLAY_CIDR" in (err.value.hint or "")
    taken.discard("10.9.0.3")  # a revoked donor's address: the cursor wraps round to it
    assert net.allocate(taken, cursor) == "10.9.0.3"
    assert not net.is_donor_address("10.9.0.7") and not net.is_donor_address("10.9.0.1")


@pytest.mark.parametrize("cidr", ["100.96.0.1/16", "fd00::/64", "100.96.0.0/30", "banana"])
def test_a_bad_overlay_network_is_refused_naming_the_setting(cidr: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"overlay_cidr": cidr}, env={})
    assert "--overlay-cidr" in err.value.message and repr(cidr) in err.value.message
    with pytest.raises(OverlayError):
        OverlayNetwork.parse(cidr)


def test_the_interface_name_must_fit_linux() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({}, env={"DGPT_OVERLAY_INTERFACE": "a-very-long-interface"})
    assert "DGPT_OVERLAY_INTERFACE" in err.value.message and "1-15" in err.value.message


# ---------------------------------------------------------------- payloads


def test_an_offer_with_a_bad_key_or_worker_range_names_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        OverlayOffer(public_key="not-a-key", node_port_base=6380, worker_ports="10002-19999")
    assert "public_key" in str(err.value) and "wg pubkey" in str(err.value)
    with pytest.raises(ValidationError) as err:
        OverlayOffer(public_key=KEY_A, node_port_base=6380, worker_ports="10002")
    assert "worker_ports" in str(err.value)
    with pytest.raises(ValidationError):
        OverlayOffer(public_key=KEY_A, node_port_base=65533, worker_ports="10002-19999")


# ---------------------------------------------------------------- peer configuration


def _grant(address: str = "100.96.0.7", prefix_len: int = 16) -> OverlayGrant:
    return OverlayGrant(address=address, prefix_len=prefix_len, head_address="100.96.0.1", head_public_key=HEAD_KEY,
                        endpoint="203.0.113.5:51820", keepalive_s=25)


def test_a_donor_peer_may_send_from_its_own_address_only() -> None:
    peer = donor_peer(KEY_A, "100.96.0.7")
    assert peer.allowed_ips == ("100.96.0.7/32",) and peer.endpoint is None, "donors dial out: no endpoint"
    assert peer.args() == ["peer", KEY_A, "allowed-ips", "100.96.0.7/32"]


def test_a_donor_reaches_the_whole_overlay_through_the_head_and_keeps_its_nat_open() -> None:
    peer = head_peer(_grant())
    assert peer == Peer(HEAD_KEY, ("100.96.0.0/16",), "203.0.113.5:51820", 25)
    argv = donor_commands("dgpt0", Path("/state/overlay.key"), _grant())
    assert argv == [["wg", "set", "dgpt0", "private-key", "/state/overlay.key", "peer", HEAD_KEY,
                     "allowed-ips", "100.96.0.0/16", "endpoint", "203.0.113.5:51820", "persistent-keepalive", "25"]]
    assert sum(a.endswith("=") for a in argv[0]) == 1, "no key material but the head's public key"


def test_peer_changes_are_batched_within_command_line_limits() -> None:
    peers = [donor_peer(_key(i), f"100.96.{i // 250}.{i % 250 + 2}") for i in range(PEERS_PER_CALL * 2 + 3)]
    commands = set_commands("dgpt0", add=peers, remove=[KEY_B])
    assert len(commands) == 3 and all(c[:3] == ["wg", "set", "dgpt0"] for c in commands)
    flat = [a for c in commands for a in c[3:]]
    assert flat.count("peer") == len(peers) + 1 and flat[-3:] == ["peer", KEY_B, "remove"]
    assert set_commands("dgpt0") == []


def test_sync_plans_exactly_the_difference() -> None:
    current = {KEY_A: ("100.96.0.2/32",), KEY_B: ("100.96.0.3/32",), KEY_C: ("100.96.0.4/32",)}
    wanted = [donor_peer(KEY_A, "100.96.0.2"), donor_peer(KEY_B, "100.96.0.9"), donor_peer(HEAD_KEY, "100.96.0.5")]
    add, remove = plan_sync(current, wanted)
    assert [p.public_key for p in add] == [KEY_B, HEAD_KEY], "changed and missing peers are set; unchanged are not"
    assert remove == [KEY_C]
    assert plan_sync(current, [donor_peer(k, v[0].split("/")[0]) for k, v in current.items()]) == ([], [])


def test_wg_show_output_is_read_per_peer() -> None:
    text = f"{KEY_A}\t100.96.0.2/32\n{KEY_B}\t(none)\n{KEY_C}\t100.96.0.4/32 100.96.1.0/24\n"
    assert allowed_ips(text) == {KEY_A: ("100.96.0.2/32",), KEY_B: (), KEY_C: ("100.96.0.4/32", "100.96.1.0/24")}
    assert handshakes(f"{KEY_A}\t1700000000\n{KEY_B}\t0\n") == {KEY_A: 1700000000.0}, "0: never shook hands"


# ---------------------------------------------------------------- ACL


def _settings(**kw: object) -> Settings:
    return load_settings({"ray_port": 23001, "dashboard_port": 23002, "api_port": 23003, "http_port": 23004,
                          "ray_node_port_base": 24000, "ray_worker_ports": "11000-11999", **kw}, env={})


def test_the_head_admits_only_rays_and_dgpts_ports() -> None:
    ports = acl.head_port_set(_settings())
    for port in (23001, 23002, 23003, 23004, 24000, 24008, 11000, 11999):
        assert port in ports
    for port in (22, 23005, 24009, 10999, 12000, 51820):
        assert port not in ports, f"{port} must not be reachable over the overlay"
    assert ports.nft() == "{ 23001, 23002, 23003, 23004, 11000-11999, 24000-24008 }"


def test_a_port_set_refuses_impossible_ports() -> None:
    with pytest.raises(ValueError, match="70000"):
        acl.PortSet(ports=(70000,))
    with pytest.raises(ValueError, match="20-10"):
        acl.PortSet(ranges=((20, 10),))


def test_the_head_ruleset_relays_to_donors_on_their_ray_ports_only() -> None:
    donor = acl.node_port_set(6380, "10002-19999")
    text = acl.head_ruleset("dgo1", acl.head_port_set(_settings()), {"100.96.0.3": donor, "100.96.0.2": donor})
    assert text.startswith("table inet dgpt_dgo1 {}\ndelete table inet dgpt_dgo1\n"), "one atomic replacement"
    assert ("elements = { 100.96.0.2 . 6380-6389, 100.96.0.2 . 10002-19999, 100.96.0.3 . 6380-6389, "
            "100.96.0.3 . 10002-19999 }") in text
    forward = text.split("chain overlay_forward {", 1)[1]
    assert forward.index('oifname != "dgo1" counter drop') < forward.index("@donor_ports"), \
        "nothing is relayed off the overlay, before anything is accepted"
    assert forward.rstrip().splitlines()[-3].strip() == "counter drop", "the rest is dropped"
    assert acl.element_command("delete", "dgo1", acl.donor_elements("100.96.0.2", donor)) == (
        "delete element inet dgpt_dgo1 donor_ports { 100.96.0.2 . 6380-6389, 100.96.0.2 . 10002-19999 }\n")
    assert acl.element_command("add", "dgo1", []) == ""
    with pytest.raises(ValueError):
        acl.element_command("flush", "dgo1", ["x"])


def test_a_donors_piece_server_is_reachable_over_the_overlay_and_the_head_opens_no_such_port() -> None:
    from dgpt.config import load_settings, storage_port

    donor = load_settings({"ray_node_port_base": 6380}, env={})
    assert storage_port(donor) in acl.node_port_set(6380, "10002-19999")
    assert _settings().ray_node_port_base + 9 not in acl.head_port_set(_settings())


def test_a_donor_ruleset_admits_its_own_ray_ports_and_forwards_nothing() -> None:
    text = acl.donor_ruleset("dgpt0", acl.node_port_set(6380, "10002-19999"))
    assert "tcp dport { 6380-6389, 10002-19999 } accept" in text
    assert 'iifname "dgpt0" counter drop' in text.split("chain forward {", 1)[1]


def _nft_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "--check", "-f", "-"], input=text, capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft --check needs root and nftables")
def test_the_kernel_accepts_the_rulesets() -> None:
    donor = acl.node_port_set(6380, "10002-19999")
    head = acl.head_ruleset("dgo1", acl.head_port_set(_settings()), {"100.96.0.2": donor})
    for text in (head, acl.head_ruleset("dgo1", acl.head_port_set(_settings()), {}),
                 acl.donor_ruleset("dgo1", donor), acl.delete_table("dgo1")):
        out = _nft_check(text)
        assert out.returncode == 0, out.stderr
    assert _nft_check(head.replace("counter drop", "counter dorp", 1)).returncode != 0, "the check can fail"


# ---------------------------------------------------------------- coordinator


class FakeInterface:
    """The head's interface as ``wg`` and ``nft`` change it: peers from ``wg set``, the ACL's
    donor elements from the rulesets and element commands."""

    def __init__(self, name: str = "dgo1") -> None:
        self.name = name
        self.peers_by_key: dict[str, tuple[str, ...]] = {}
        self.shook: dict[str, float] = {}
        self.rulesets: list[str] = []
        self.elements: set[str] = set()

    def wg_set(self, commands: Sequence[Sequence[str]]) -> None:
        for argv in commands:
            assert list(argv[:3]) == ["wg", "set", self.name]
            args, key = list(argv[3:]), None
            while args:
                word = args.pop(0)
                if word == "peer":
                    key = args.pop(0)
                    self.peers_by_key.setdefault(key, ())
                elif word == "remove":
                    assert key is not None
                    self.peers_by_key.pop(key, None)
                elif word == "allowed-ips":
                    assert key is not None
                    self.peers_by_key[key] = tuple(args.pop(0).split(","))
                else:
                    raise AssertionError(f"unexpected wg set argument {word!r}")

    def peers(self) -> dict[str, tuple[str, ...]]:
        return dict(self.peers_by_key)

    def handshakes(self) -> dict[str, float]:
        return dict(self.shook)

    def nft(self, ruleset: str) -> None:
        self.rulesets.append(ruleset)
        if ruleset.startswith("add element") or ruleset.startswith("delete element"):
            items = {x.strip() for x in ruleset.split("{", 1)[1].rsplit("}", 1)[0].split(",")}
            if ruleset.startswith("delete") and not items <= self.elements:
                raise OverlayError("nft: no such element")
            self.elements = self.elements | items if ruleset.startswith("add") else self.elements - items
        elif "elements = {" in ruleset:
            self.elements = {x.strip() for x in ruleset.split("elements = {", 1)[1].split("}", 1)[0].split(",")}
        else:
            self.elements = set()

    def restart(self) -> None:
        """wireguard-go and the ACL came back empty (a restarted head)."""
        self.peers_by_key.clear()
        self.elements.clear()


def _coordinator(tmp_path: Path, iface: FakeInterface, cidr: str = "100.96.0.0/16") -> OverlayCoordinator:
    return OverlayCoordinator(OverlayNetwork.parse(cidr), HEAD_KEY, "203.0.113.5:51820",
                              acl.head_port_set(_settings()), PeerStore(tmp_path / "overlay.sqlite"), iface,
                              clock=lambda: 1000.0)


def test_a_grant_puts_the_donor_on_the_interface_and_the_acl(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    g = c.grant("d-1", _offer(KEY_A))
    assert g.address == "100.96.0.2" and g.head_address == "100.96.0.1" and g.prefix_len == 16
    assert g.head_public_key == HEAD_KEY and g.endpoint == "203.0.113.5:51820" and g.keepalive_s == 25
    assert iface.peers_by_key == {KEY_A: ("100.96.0.2/32",)}
    assert iface.elements == {"100.96.0.2 . 6380-6389", "100.96.0.2 . 10002-19999"}
    assert c.grant("d-1", _offer(KEY_A)) == g, "granting again changes nothing"
    g2 = c.grant("d-2", _offer(KEY_B, base=7000, workers="30000-30099"))
    assert g2.address == "100.96.0.3"
    assert "100.96.0.3 . 7000-7009" in iface.elements and "100.96.0.3 . 30000-30099" in iface.elements


def test_another_donors_key_is_refused(tmp_path: Path) -> None:
    c = _coordinator(tmp_path, FakeInterface())
    c.grant("d-1", _offer(KEY_A))
    with pytest.raises(Conflict) as err:
        c.grant("d-2", _offer(KEY_A))
    assert "d-1" in err.value.message and err.value.status_code == 409
    assert c.address_of("d-2") is None


def test_a_new_key_keeps_the_address_and_drops_the_old_peer(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    first = c.grant("d-1", _offer(KEY_A))
    again = c.grant("d-1", _offer(KEY_B, base=7000))
    assert again.address == first.address
    assert iface.peers_by_key == {KEY_B: (f"{first.address}/32",)}, "the old key no longer reaches the overlay"
    assert iface.elements == {f"{first.address} . 7000-7009", f"{first.address} . 10002-19999"}


def test_a_revoked_donor_is_off_the_interface_and_the_acl(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    a = c.grant("d-1", _offer(KEY_A))
    c.grant("d-2", _offer(KEY_B))
    assert c.revoke("d-1") is True
    assert KEY_A not in iface.peers_by_key and KEY_B in iface.peers_by_key
    assert not any(e.startswith(a.address + " ") for e in iface.elements)
    assert c.address_of("d-1") is None and c.revoke("d-1") is False
    # Its address is not handed out again while others are free.
    assert c.grant("d-3", _offer(KEY_C)).address == "100.96.0.4"


def test_a_restarted_head_gives_every_donor_its_address_back(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    a, b = c.grant("d-1", _offer(KEY_A)), c.grant("d-2", _offer(KEY_B))
    c.revoke("d-2")
    c.store.close()
    iface.restart()
    iface.peers_by_key[_key(500)] = ("100.96.0.99/32",)  # a peer the store does not know
    c2 = _coordinator(tmp_path, iface)
    c2.sync()
    assert iface.peers_by_key == {KEY_A: (f"{a.address}/32",)}, "stored peers back, strays and revoked gone"
    assert iface.elements == {f"{a.address} . 6380-6389", f"{a.address} . 10002-19999"}
    assert c2.grant("d-1", _offer(KEY_A)).address == a.address
    assert c2.grant("d-4", _offer(KEY_C)).address not in (a.address, b.address), "the cursor survives too"


def test_revoking_after_the_acl_lost_its_elements_still_rebuilds_it(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    c.grant("d-1", _offer(KEY_A))
    c.grant("d-2", _offer(KEY_B))
    iface.elements.clear()  # someone flushed the ruleset
    assert c.revoke("d-1")
    assert iface.elements == {"100.96.0.3 . 6380-6389", "100.96.0.3 . 10002-19999"}


def test_handshakes_are_per_donor(tmp_path: Path) -> None:
    iface = FakeInterface()
    c = _coordinator(tmp_path, iface)
    c.grant("d-1", _offer(KEY_A))
    assert c.handshake_at("d-1") is None and c.handshake_at("d-9") is None
    iface.shook[KEY_A] = 1234.0
    c._handshakes_at = -10.0  # past the cache
    assert c.handshake_at("d-1") == 1234.0


def test_grants_stay_inside_the_network(tmp_path: Path) -> None:
    c = _coordinator(tmp_path, FakeInterface(), cidr="10.44.0.0/24")
    network = ipaddress.ip_network("10.44.0.0/24")
    keys = [_key(1000 + i) for i in range(20)]
    for i, key in enumerate(keys):
        g = c.grant(f"d-{i}", _offer(key))
        assert ipaddress.ip_address(g.address) in network and g.address != "10.44.0.1"
    assert len({p.address for p in c.peers()}) == 20
