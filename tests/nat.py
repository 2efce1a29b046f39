"""Home networks behind NAT for integration tests, on top of tests/hosts.py.

A home network is a router host on the test bridge (its "public" side, an address of its
own there) and a donor host behind it on a LAN of its own. The router masquerades what the
LAN sends out (nftables), and forwards nothing inward that the LAN did not start: no port
forwarding. So the donor can dial the head, and neither the head nor any other host can open
a connection to it: a laptop at home.

The root namespace (the head's) would send packets for a LAN address out of its default
route, off this machine. So each LAN gets an ``unreachable`` route there for as long as it
exists: the head's attempts to reach a donor's LAN address fail at once, and never leave.

    with homes("h1", "h2") as (net, by_name):
        donor = by_name["h1"].donor    # a Host: popen, run, cut, restore work
        donor.popen([...], env=..., log=...)
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.hosts import Host, TestNetwork, _ip


@dataclass
class Home:
    """One home network: the router on the bridge and the donor behind it."""

    router: Host
    donor: Host
    lan: str  # "172.N.M.0/24": the router .1, the donor .2
    lan_gateway: str


@contextmanager
def homes(*names: str) -> Iterator[tuple[TestNetwork, dict[str, Home]]]:
    """A test network with one home network per name; everything is removed afterwards."""
    with TestNetwork.create() as net:
        made: dict[str, Home] = {}
        try:
            for name in names:
                made[name] = add_home(net, name)
            yield net, made
        finally:
            for home in made.values():
                _ip("route", "del", "unreachable", home.lan, check=False)


def _free_lan() -> str:
    """A private /24 that this machine has no route of its own for."""
    for _ in range(100):
        lan = f"172.{random.randrange(16, 32)}.{random.randrange(256)}.0/24"
        if not _ip("route", "show", lan).stdout.strip():
            return lan
    raise RuntimeError("found no free 172.16.0.0/12 subnet for a test LAN")


def _nft(ns: str, rules: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {out.stderr.strip()}")


def add_home(net: TestNetwork, name: str) -> Home:
    """A donor host ``name`` behind a masquerading router ``name-nat`` on ``net``'s bridge.

    The caller removes the LAN's ``unreachable`` route afterwards (:func:`homes` does).
    """
    lan = _free_lan()
    # First: from now on nothing here sends this LAN's packets off the machine.
    _ip("route", "add", "unreachable", lan)
    router = net.add_host(f"{name}-nat")
    index = len(net.hosts)
    base = lan.rsplit(".", 1)[0]
    gateway = f"{base}.1"
    donor = Host(name=name, ns=f"dgpt-{net.tag}-{name}", ip=f"{base}.2", veth_host=f"dgl{net.tag}{index}"[:15],
                 veth_ns=f"dgm{net.tag}{index}"[:15], root=net.root / name, gateway=gateway)
    donor.root.mkdir(parents=True, exist_ok=True)
    _ip("netns", "add", donor.ns)
    net.hosts[name] = donor  # from here on the network's close() removes it
    # The LAN: a veth pair between the router's namespace and the donor's.
    _ip("link", "add", donor.veth_host, "netns", router.ns, "type", "veth", "peer", "name", donor.veth_ns,
        "netns", donor.ns)
    _ip("addr", "add", f"{gateway}/24", "dev", donor.veth_host, ns=router.ns)
    _ip("link", "set", "dev", donor.veth_host, "up", ns=router.ns)
    _ip("addr", "add", f"{donor.ip}/24", "dev", donor.veth_ns, ns=donor.ns)
    _ip("link", "set", "dev", donor.veth_ns, "up", ns=donor.ns)
    _ip("link", "set", "dev", "lo", "up", ns=donor.ns)
    _ip("route", "add", "default", "via", gateway, ns=donor.ns)
    subprocess.run(["ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    wan, lan_if = router.veth_ns, donor.veth_host
    _nft(router.ns, f"""table ip dgpt_home {{
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{wan}" masquerade
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{lan_if}" oifname "{wan}" accept
  }}
}}
""")
    return Home(router=router, donor=donor, lan=lan, lan_gateway=gateway)
