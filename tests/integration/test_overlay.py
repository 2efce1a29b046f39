"""Donors behind NAT join through the WireGuard overlay, tested for real.

Each donor is a host behind a router of its own that masquerades (tests/nat.py): it can dial
out, and nothing can dial in. The head runs in the root namespace at the test bridge's
address with the overlay on (wireguard-go, no kernel module). Donors join with nothing but
the head's URL and a join token; the head finds it cannot reach them, reaches them over the
overlay instead, and Ray runs over overlay addresses, donor to donor through the head's
relay. A job runs tasks on both donors, a Serve replica on one answers through the head, a
donor drains and rejoins, the ACL keeps everything but Ray's and dgpt's ports off the
overlay, and a donor whose join token is revoked can no longer reach the overlay, even
with its key and its old grant. A third donor on the head's own network stays direct (Ray
reaches it at its own address) and reaches the relayed ones through its tunnel.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dgpt.config import Settings
from dgpt.head.fabric import api_client, private_settings
from dgpt.head.process import shell_env, start_head, stop_head
from dgpt.netaddr import tcp_reachable
from dgpt.overlay.wireguard import missing_tools
from dgpt.processes import alive, read_json
from dgpt.serve import deploy as serve_deploy
from tests.hosts import Host, TestNetwork
from tests.integration.conftest import FAST_DONOR_TIMINGS, RAY_TEST_ENV, wait_for
from tests.nat import homes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DIGITS_YAML = ROOT / "deployments" / "digits.yaml"
HOMES = ("h1", "h2")  # behind NAT
DIRECT = "h3"  # on the head's network: the head reaches it at its own address
#: A donor's default Ray ports (it runs with dgpt's defaults inside its own namespace).
DONOR_NODE_MANAGER_PORT = 6380


@dataclass
class Fabric:
    net: TestNetwork
    settings: Settings
    tokens: dict[str, Path]  # host -> its join token file
    token_ids: dict[str, str]
    agents: dict[str, int]

    def donor(self, name: str) -> Host:
        return self.net.hosts[name]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _agent_env(f: Fabric, host: Host) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(host.root), "DGPT_HOME": str(host.root / "home"), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT), **RAY_TEST_ENV,
            # Every host shares /var/run/wireguard here, so each names its interface apart.
            "DGPT_OVERLAY_INTERFACE": f"dgw{f.net.tag}{host.name[-1]}"}


def start_agent(f: Fabric, name: str) -> int:
    """`dgpt donor join --head URL --token-file F` on host ``name``: nothing about NAT or the overlay.

    But the load detector: these hosts share one machine's processes, so each would take the
    others' work for its owner's and drain (and stay out for its calm period)."""
    host = f.donor(name)
    argv = [sys.executable, "-m", "dgpt.cli.main", "donor", "join", "--head", f.settings.local_head_url,
            "--token-file", str(f.tokens[name]), "--cpus", "1", "--memory-gb", "1.5", "--load-threshold", "off"]
    proc = host.popen(argv, env=_agent_env(f, host), log=host.root / "agent.log")
    f.agents[name] = proc.pid
    return proc.pid


def _status(f: Fabric) -> dict:
    out = subprocess.run([sys.executable, "-m", "dgpt.cli.main", "status", "--json"],
                         env={**os.environ, "DGPT_HOME": str(f.settings.home)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _donors(f: Fabric) -> dict[str, dict]:
    """hostname -> donor, from `dgpt status --json` (what an operator sees)."""
    return {d["profile"]["hostname"]: d for d in _status(f)["donors"]}


def _active_relayed(f: Fabric, names: tuple[str, ...] = HOMES, direct: tuple[str, ...] = ()) -> bool:
    donors = _donors(f)
    return all(n in donors and donors[n]["state"] == "active" and donors[n]["node_id"]
               and donors[n]["network"] == ("direct" if n in direct else "relayed") for n in (*names, *direct))


def _head_peers(f: Fabric) -> dict[str, str]:
    """Public key -> allowed IPs on the head's interface (`wg show`)."""
    out = subprocess.run(["wg", "show", f.settings.overlay_interface, "allowed-ips"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


def _connects(host: Host, address: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection from ``host`` to ``address:port`` is accepted."""
    code = (f"import socket\ntry:\n socket.create_connection(({address!r}, {port}), timeout={timeout_s})\n"
            " print('OPEN')\nexcept OSError as e:\n print('CLOSED', e)\n")
    out = host.run([sys.executable, "-c", code], timeout_s=timeout_s + 30)
    return out.stdout.startswith("OPEN")


def _keep_logs(net: TestNetwork) -> None:
    """Copy the agents' and the head's logs out of the network's folder, which goes with it."""
    import shutil

    keep = Path("/tmp/dgpt-overlay-test-logs")
    shutil.rmtree(keep, ignore_errors=True)
    for log in [*net.root.glob("*/agent.log"), *net.root.glob("*/home/donor/*.log"), *net.root.glob("head-home/logs/*")]:
        target = keep / log.relative_to(net.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, target)


@pytest.fixture(scope="module")
def fab(ray_test_env: None) -> Iterator[Fabric]:
    problem = missing_tools()
    if problem:
        pytest.skip(problem)
    with homes(*HOMES) as (net, _):
        net.add_host(DIRECT)
        home = net.root / "head-home"
        settings = private_settings(
            home, **FAST_DONOR_TIMINGS, node_ip=net.head_ip, http_host="0.0.0.0", min_active_donors=len(HOMES) + 1,
            overlay_enabled=True, overlay_port=_free_udp_port(), overlay_interface=f"dgo{net.tag}",
            overlay_cidr=f"100.{random.randrange(64, 127)}.{random.randrange(256)}.0/24")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(ROOT))  # the head's Ray workers import this checkout
            start_head(settings)
            f = Fabric(net, settings, {}, {}, {})
            try:
                with api_client(settings) as client:
                    for name in (*HOMES, DIRECT):
                        made = client.create_token("join", f"home {name}")
                        assert made.token
                        f.tokens[name] = net.root / f"join_token_{name}"
                        f.tokens[name].write_text(made.token)
                        f.token_ids[name] = made.token_id
                for name in (*HOMES, DIRECT):
                    start_agent(f, name)
                wait_for(lambda: _active_relayed(f, direct=(DIRECT,)), 300,
                         "both donors behind NAT active, relayed, and the third direct")
                yield f
            finally:
                stop_head(settings)
                _keep_logs(net)
    assert subprocess.run(["ip", "link", "show", settings.overlay_interface], capture_output=True).returncode != 0, \
        "the head's overlay interface is gone with the head"


# ---------------------------------------------------------------------- joining


def test_donors_behind_nat_cannot_be_reached_and_join_relayed(fab: Fabric) -> None:
    donors = _donors(fab)
    for name in HOMES:
        lan_ip = fab.donor(name).ip
        assert not tcp_reachable(lan_ip, DONOR_NODE_MANAGER_PORT, timeout_s=1).ok, \
            f"the head must not reach {name} at {lan_ip}: it is behind NAT"
        other = next(h for h in HOMES if h != name)
        assert not _connects(fab.donor(other), lan_ip, DONOR_NODE_MANAGER_PORT, 1), "nor the other donor"
    overlay_ips = {n: donors[n]["overlay_ip"] for n in HOMES}
    assert all(ip and ip.startswith(fab.settings.overlay_cidr.rsplit(".", 1)[0]) for ip in overlay_ips.values())
    code = ("import json, ray\nray.init(logging_level='ERROR', log_to_driver=False)\n"
            "print('RESULT ' + json.dumps({n['Labels'].get('dgpt.io/donor-id', 'head'): n['NodeManagerAddress'] "
            "for n in ray.nodes() if n['Alive']}))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(fab.settings)},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    for name in HOMES:
        assert nodes[donors[name]["donor_id"]] == overlay_ips[name], f"{name}'s raylet advertises its overlay address"
    assert nodes[donors[DIRECT]["donor_id"]] == fab.donor(DIRECT).ip, "the direct donor keeps its own address"
    assert donors[DIRECT]["overlay_ip"], "and is on the overlay too, to reach the relayed ones"
    peers = _head_peers(fab)
    assert sorted(peers.values()) == sorted(f"{d['overlay_ip']}/32" for d in donors.values())


def test_a_job_runs_tasks_on_both_donors(fab: Fabric, tmp_path: Path) -> None:
    out = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--entrypoint-num-cpus", "0",
                          "--", "python", "-m", "dgpt.cli.demo_job", "--tasks", "8", "--seconds", "0.5"],
                         env={**os.environ, **shell_env(fab.settings)}, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("DGPT_RESULT "))
    per_donor = json.loads(line.split(" ", 1)[1])["per_donor"]
    assert set(per_donor) == {d["donor_id"] for d in _donors(fab).values()}, "tasks ran on all three donors"


@pytest.mark.parametrize("src,dst", [("h1", "h2"), (DIRECT, "h1"), ("h2", DIRECT)])
def test_objects_move_donor_to_donor(fab: Fabric, src: str, dst: str) -> None:
    # A task on one donor reads a 2 MiB object made on another: the object managers talk over
    # the overlay, relayed by the head (NAT to NAT, direct to NAT), or straight (NAT to direct).
    donors = _donors(fab)
    a, b = donors[src]["donor_id"], donors[dst]["donor_id"]
    code = f"""
import json, ray
from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, In
ray.init(logging_level='ERROR', log_to_driver=False)
def on(d): return NodeLabelSchedulingStrategy(hard={{'dgpt.io/donor-id': In(d)}})
@ray.remote(num_cpus=0.1)
def make(): return b'x' * (2 << 20)
@ray.remote(num_cpus=0.1)
def size(blobs): return len(ray.get(blobs[0]))
ref = make.options(scheduling_strategy=on({a!r})).remote()
print('RESULT ' + json.dumps(ray.get(size.options(scheduling_strategy=on({b!r})).remote([ref]), timeout=120)))
"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(fab.settings)},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:]) == 2 << 20


# ---------------------------------------------------------------------- ACL


class _Listener:
    """A TCP listener in the root namespace that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_only_rays_and_dgpts_ports_cross_the_overlay(fab: Fabric) -> None:
    head_overlay = _status(fab)["donors"][0]["overlay_ip"].rsplit(".", 1)[0] + ".1"
    h1, h2 = fab.donor("h1"), fab.donor("h2")
    assert _connects(h1, head_overlay, fab.settings.api_port), "the control-plane API is reachable over the overlay"
    assert _connects(h1, head_overlay, fab.settings.ray_port), "and the GCS"
    listener = _Listener()
    try:
        assert _connects(h1, fab.net.head_ip, listener.port), "the port is open at the head's own address"
        before = listener.accepted
        assert not _connects(h1, head_overlay, listener.port, 2), "but not over the overlay"
        assert listener.accepted == before
    finally:
        listener.sock.close()
    # Donor to donor: the relay passes the other donor's Ray ports only.
    h2_overlay = _donors(fab)["h2"]["overlay_ip"]
    assert _connects(h1, h2_overlay, DONOR_NODE_MANAGER_PORT), "h2's raylet is reachable from h1 through the relay"
    h2.popen([sys.executable, "-c", "import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', 2222)); "
              "s.listen(); time.sleep(120)"], env={"PATH": "/usr/bin:/bin"}, log=h2.root / "listener.log")
    wait_for(lambda: 2222 in h2.listening(), 30, "a listener on h2:2222")
    assert not _connects(h1, h2_overlay, 2222, 2), "a non-Ray port of another donor is not relayed"
    # Nothing is routed off the overlay into the head's networks.
    h1_overlay = _donors(fab)["h1"]["overlay_ip"]
    route = subprocess.run(["ip", "route", "get", fab.net.head_ip, "from", h1_overlay, "iif",
                            fab.settings.overlay_interface], capture_output=True, text=True)
    assert route.returncode == 0  # the kernel would route it; the ACL's forward chain drops it
    rules = subprocess.run(["nft", "list", "table", "inet", f"dgpt_{fab.settings.overlay_interface}"],
                           capture_output=True, text=True, check=True).stdout
    assert f'oifname != "{fab.settings.overlay_interface}"' in rules


# ---------------------------------------------------------------------- Serve


def _one_replica_config(tmp_path: Path, donor_id: str) -> Path:
    """digits with one replica, on ``donor_id``."""
    config = yaml.safe_load(DIGITS_YAML.read_text())
    dep = config["applications"][0]["deployments"][0]
    dep["num_replicas"] = 1
    dep.pop("autoscaling_config", None)
    dep["ray_actor_options"]["label_selector"] = {"dgpt.io/donor-id": donor_id}
    path = tmp_path / "digits-one.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_serve_replica_on_a_relayed_donor_answers_through_the_head(fab: Fabric, tmp_path: Path) -> None:
    import httpx

    relayed = _donors(fab)["h1"]
    serve_deploy.deploy(fab.settings, _one_replica_config(tmp_path, relayed["donor_id"]))

    def running() -> list[str]:
        app = serve_deploy.status(fab.settings).app("digits")
        if app is None or app.status != "RUNNING":
            return []
        return [r.node_id for d in app.deployments for r in d.replicas if r.state == "RUNNING"]

    nodes = wait_for(running, 300, "one digits replica running")
    donors = _donors(fab)
    by_node = {d["node_id"]: d for d in donors.values()}
    where = by_node.get(nodes[0], {})
    assert where.get("donor_id") == relayed["donor_id"] and where["network"] == "relayed", \
        f"the replica runs on {where.get('name')}, not h1; h1's sessions: {donors['h1']['sessions']}"
    r = httpx.post(f"{fab.settings.serve_url}/digits/predict", json={"pixels": [0] * 64}, timeout=60)
    assert r.status_code == 200, r.text
    serve_deploy.delete(fab.settings, "digits")


# ---------------------------------------------------------------------- drain and rejoin


def test_a_relayed_donor_drains_and_rejoins_at_the_same_overlay_address(fab: Fabric) -> None:
    name = "h2"
    host = fab.donor(name)
    before = _donors(fab)[name]
    out = host.run([sys.executable, "-m", "dgpt.cli.main", "donor", "leave", "--wait-s", "90"],
                   env=_agent_env(fab, host), timeout_s=150)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: not alive(fab.agents[name]), 30, "the agent to exit")
    after = _donors(fab)[name]
    assert after["sessions"][-1]["ended_as"] == "drained" and after["sessions"][-1]["end_reason"] == "leave"
    assert subprocess.run(["ip", "netns", "exec", host.ns, "ip", "link", "show", _agent_env(fab, host)[
        "DGPT_OVERLAY_INTERFACE"]], capture_output=True).returncode != 0, "its tunnel went down with the agent"
    start_agent(fab, name)
    wait_for(lambda: _active_relayed(fab, direct=(DIRECT,)), 240, f"{name} active again, relayed")
    again = _donors(fab)[name]
    assert again["donor_id"] == before["donor_id"] and again["overlay_ip"] == before["overlay_ip"]
    assert again["sessions_total"] == before["sessions_total"] + 1


# ---------------------------------------------------------------------- revocation


def test_a_donor_whose_token_is_revoked_can_no_longer_reach_the_overlay(fab: Fabric) -> None:
    name, keep = "h2", "h1"
    host = fab.donor(name)
    d = _donors(fab)[name]
    head_overlay = d["overlay_ip"].rsplit(".", 1)[0] + ".1"
    assert _connects(host, head_overlay, fab.settings.ray_port), "it reaches the head's GCS over the overlay now"
    state = host.root / "home" / "donor"
    grant_json = json.dumps({"address": d["overlay_ip"], "prefix_len": 24, "head_address": head_overlay,
                             "head_public_key": subprocess.run(["wg", "show", fab.settings.overlay_interface,
                                                                "public-key"], capture_output=True, text=True,
                                                               check=True).stdout.strip(),
                             "endpoint": f"{fab.net.head_ip}:{fab.settings.overlay_port}", "keepalive_s": 25})
    with api_client(fab.settings) as client:
        client.revoke_token(fab.token_ids[name])
    assert d["overlay_ip"] + "/32" not in _head_peers(fab).values(), "its peer is gone from the head at once"
    wait_for(lambda: not alive(fab.agents[name]), 60, "its agent to stop (the head refuses it)")
    assert "revoked" in (host.root / "agent.log").read_text()
    # Even a donor that keeps its key and its grant and brings the tunnel up again by itself
    # cannot reach the overlay: the head drops everything its key sends.
    code = f"""
import json, socket, sys, time
from pathlib import Path
from dgpt.overlay.endpoint import DonorEndpoint
from dgpt.sdk.models import OverlayGrant
e = DonorEndpoint(Path({str(state)!r}), {_agent_env(fab, host)['DGPT_OVERLAY_INTERFACE']!r}, 6380, '10002-19999')
e.up(OverlayGrant(**json.loads({grant_json!r})))
try:
    time.sleep(2)
    socket.create_connection(({head_overlay!r}, {fab.settings.ray_port}), timeout=4)
    print('OPEN')
except OSError as exc:
    print('CLOSED', exc)
finally:
    e.down()
"""
    out = host.run([sys.executable, "-c", code], env=_agent_env(fab, host), timeout_s=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("CLOSED"), out.stdout
    view = _donors(fab)[name]
    assert view["state"] != "active" or not view["node_id"]
    # The other donor is untouched.
    wait_for(lambda: _active_relayed(fab, (keep,)), 60, f"{keep} still active")
    assert _connects(fab.donor(keep), head_overlay, fab.settings.ray_port)
    info = read_json(fab.settings.home / "head" / "head.json")
    assert info is not None
