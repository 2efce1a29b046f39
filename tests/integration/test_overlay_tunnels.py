"""The overlay's tunnels, relay and ACL between real namespaces, without Ray (no fabric lock).

The head's hub and coordinator run in the root namespace, as the head runs them; each donor
is behind a masquerading router (tests/nat.py) and brings its endpoint up with the grant the
coordinator gave it. Then: the head reaches each donor only over the overlay; donors reach
each other through the head's relay on Ray ports only; nothing else crosses; revocation
cuts a donor off even though it keeps its key and tunnel; a restarted coordinator restores
the head's peers from its store.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dgpt.config import Settings, load_settings
from dgpt.netaddr import tcp_reachable
from dgpt.overlay.coordinator import OverlayCoordinator
from dgpt.overlay.hub import OverlayHub
from dgpt.overlay.wireguard import missing_tools
from dgpt.sdk.models import OverlayGrant, OverlayOffer
from tests.hosts import Host, TestNetwork
from tests.integration.conftest import wait_for
from tests.nat import homes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RAY_PORT = 6380  # a donor's node-manager port (its default block)
OTHER_PORT = 2222  # not a Ray port


@dataclass
class Overlay:
    net: TestNetwork
    settings: Settings
    hub: OverlayHub
    coordinator: OverlayCoordinator
    grants: dict[str, OverlayGrant]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _iface(net: TestNetwork, host: Host) -> str:
    return f"dgw{net.tag}{host.name[-1]}"


def _env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def _donor_script(state: Path, iface: str, grant: OverlayGrant | None) -> str:
    """On a donor: print its offer, or bring its endpoint up with ``grant`` and listen on a
    Ray port and a non-Ray port until killed."""
    if grant is None:
        return (f"from pathlib import Path\nfrom dgpt.overlay.endpoint import DonorEndpoint\n"
                f"print(DonorEndpoint(Path({str(state)!r}), {iface!r}, 6380, '10002-19999').offer().model_dump_json())\n")
    return f"""
import signal, socket, sys, threading, time
from pathlib import Path
from dgpt.overlay.endpoint import DonorEndpoint
from dgpt.sdk.models import OverlayGrant
e = DonorEndpoint(Path({str(state)!r}), {iface!r}, 6380, '10002-19999')
e.up(OverlayGrant.model_validate_json({grant.model_dump_json()!r}))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the tunnel is taken down below
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', port)); s.listen()
    while True:
        s.accept()[0].close()
for port in ({RAY_PORT}, {OTHER_PORT}):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print('UP', flush=True)
try:
    while True:
        time.sleep(1)
finally:
    e.down()
"""


def _connects(host: Host | None, address: str, port: int, timeout_s: float = 2.0) -> bool:
    if host is None:
        return tcp_reachable(address, port, timeout_s).ok
    code = (f"import socket\ntry:\n socket.create_connection(({address!r}, {port}), timeout={timeout_s})\n"
            " print('OPEN')\nexcept OSError as e:\n print('CLOSED', e)\n")
    return host.run([sys.executable, "-c", code], env=_env(), timeout_s=timeout_s + 30).stdout.startswith("OPEN")


@pytest.fixture(scope="module")
def ov() -> Iterator[Overlay]:
    problem = missing_tools()
    if problem:
        pytest.skip(problem)
    with homes("h1", "h2") as (net, by_name):
        settings = load_settings({
            "home": net.root / "head-home", "node_ip": net.head_ip, "overlay_enabled": True,
            "overlay_port": _free_udp_port(), "overlay_interface": f"dgo{net.tag}",
            "overlay_cidr": f"100.{random.randrange(64, 127)}.{random.randrange(256)}.0/24"}, env={})
        hub = OverlayHub(settings, settings.home / "head" / "overlay.key", settings.home / "logs" / "wireguard.log")
        hub.up()
        try:
            coordinator = OverlayCoordinator.open(settings, settings.home / "head" / "overlay.sqlite")
            grants = {}
            for home in by_name.values():
                host = home.donor
                out = host.run([sys.executable, "-c", _donor_script(host.root / "state", _iface(net, host), None)],
                               env=_env())
                assert out.returncode == 0, out.stderr
                grants[host.name] = coordinator.grant(f"d-{host.name}", OverlayOffer.model_validate_json(out.stdout))
                host.popen([sys.executable, "-c", _donor_script(host.root / "state", _iface(net, host),
                                                                grants[host.name])], env=_env(), log=host.root / "ep.log")
            for home in by_name.values():
                wait_for(lambda h=home.donor: "UP" in (h.root / "ep.log").read_text(), 30, f"{home.donor.name}'s tunnel")
            yield Overlay(net, settings, hub, coordinator, grants)
        finally:
            for home in by_name.values():
                for proc in home.donor.procs:
                    proc.terminate()
                for proc in home.donor.procs:
                    proc.wait(15)
            hub.down()
    assert not list(Path("/var/run/wireguard").glob(f"dgw{net.tag}*")), "every donor's interface is gone"


def test_the_head_reaches_donors_behind_nat_only_over_the_overlay(ov: Overlay) -> None:
    for name, grant in ov.grants.items():
        host = ov.net.hosts[name]
        assert not _connects(None, host.ip, RAY_PORT, 1), f"{name} is behind NAT"
        assert wait_for(lambda g=grant: _connects(None, g.address, RAY_PORT), 20, f"{name} over the overlay")
    shook = ov.coordinator.handshake_at("d-h1")
    assert shook is not None, "the head saw h1's handshake (it dialled out)"


def test_donors_reach_each_others_ray_ports_through_the_relay_and_nothing_else(ov: Overlay) -> None:
    h1, h2 = ov.net.hosts["h1"], ov.net.hosts["h2"]
    a, b = ov.grants["h1"].address, ov.grants["h2"].address
    assert _connects(h1, b, RAY_PORT) and _connects(h2, a, RAY_PORT), "Ray ports are relayed both ways"
    assert not _connects(h1, b, OTHER_PORT), "another port of a donor is not relayed"
    assert _connects(h2, "127.0.0.1", OTHER_PORT), "(it does listen there)"
    assert not _connects(None, b, OTHER_PORT), "and the donor's own ACL keeps it from the head too"


def test_the_overlay_reaches_the_heads_ray_and_dgpt_ports_only(ov: Overlay) -> None:
    h1 = ov.net.hosts["h1"]
    head = ov.grants["h1"].head_address
    listeners = {}
    for port in (ov.settings.api_port, 2223):  # a dgpt port and one that is nobody's
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        listeners[port] = s
    try:
        assert _connects(h1, head, ov.settings.api_port), "the API port is open over the overlay"
        assert _connects(h1, ov.net.head_ip, 2223), "the other port is open at the head's own address"
        assert not _connects(h1, head, 2223), "but not over the overlay"
    finally:
        for s in listeners.values():
            s.close()


def test_nothing_is_routed_off_the_overlay(ov: Overlay) -> None:
    # h1 sends to h2's router (a host on the head's bridge) with the overlay as its route:
    # the head would forward it out of the bridge; the ACL drops it.
    h1 = ov.net.hosts["h1"]
    router = ov.net.hosts["h2-nat"]
    subprocess.run(["ip", "netns", "exec", h1.ns, "ip", "route", "add", f"{router.ip}/32", "dev",
                    _iface(ov.net, h1)], check=True)
    ov.coordinator.interface.wg_set([["wg", "set", ov.settings.overlay_interface, "peer",
                                      ov.coordinator.store.get("d-h1").public_key,  # type: ignore[union-attr]
                                      "allowed-ips", f"{ov.grants['h1'].address}/32"]])
    listener = router.popen([sys.executable, "-c", "import socket\ns = socket.socket(); s.bind(('0.0.0.0', 2224)); "
                             "s.listen()\nwhile True: s.accept()[0].close()"], env=_env(), log=router.root / "l.log")
    try:
        wait_for(lambda: 2224 in router.listening(), 20, "a listener on the router")
        assert not _connects(h1, router.ip, 2224), "the head is no router into its own networks"
    finally:
        listener.kill()
        subprocess.run(["ip", "netns", "exec", h1.ns, "ip", "route", "del", f"{router.ip}/32"], check=False)


def test_a_revoked_donor_keeps_its_tunnel_but_reaches_nothing(ov: Overlay) -> None:
    h2 = ov.net.hosts["h2"]
    a, b = ov.grants["h1"].address, ov.grants["h2"].address
    head = ov.grants["h2"].head_address
    assert _connects(h2, a, RAY_PORT)
    ov.coordinator.revoke("d-h2")
    peers = subprocess.run(["wg", "show", ov.settings.overlay_interface, "allowed-ips"], capture_output=True,
                           text=True, check=True).stdout
    assert f"{b}/32" not in peers and f"{a}/32" in peers
    assert not _connects(h2, a, RAY_PORT), "the revoked donor cannot reach the other donor"
    assert not _connects(h2, head, ov.settings.api_port), "nor the head"
    assert not _connects(None, b, RAY_PORT), "and the head no longer reaches it"
    assert _connects(None, a, RAY_PORT), "the other donor is untouched"


def test_a_restarted_coordinator_restores_the_peers_from_its_store(ov: Overlay) -> None:
    # The control-plane actor restarts: the interface keeps running, the new coordinator syncs.
    subprocess.run(["wg", "set", ov.settings.overlay_interface, "peer", ov.coordinator.store.get("d-h1").public_key,  # type: ignore[union-attr]
                    "remove"], check=True)
    assert not _connects(None, ov.grants["h1"].address, RAY_PORT, 1)
    ov.coordinator.store.close()
    again = OverlayCoordinator.open(ov.settings, ov.settings.home / "head" / "overlay.sqlite")
    assert again.address_of("d-h1") == ov.grants["h1"].address and again.address_of("d-h2") is None
    # The head knows h1's key again but not where it is until h1 shakes hands, which it does
    # 15 s after it sends data that gets no answer (its raylet dialling the GCS, here a probe).
    h1, head = ov.net.hosts["h1"], ov.grants["h1"].head_address
    assert wait_for(lambda: _connects(h1, head, ov.settings.api_port, 3) or
                    _connects(None, ov.grants["h1"].address, RAY_PORT, 1), 90, "h1 back after the sync")
    assert _connects(None, ov.grants["h1"].address, RAY_PORT)
    ov.coordinator = again
    assert json.loads(OverlayGrant.model_validate(ov.grants["h1"].model_dump()).model_dump_json())["address"]
