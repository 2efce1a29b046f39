"""Separate hosts for integration tests: network namespaces on a bridge, each a machine of its own.

Each host is a network namespace with its own address on a test bridge, and every process
started on it also gets its own hostname (a UTS namespace) and its own /tmp (a mount
namespace), as a donor on another machine would: Ray's default temp folder, its sockets and
unpacked runtime environments are its own. The head runs in the root namespace at the
bridge's address. Needs root (CI runs as root); tests skip with the reason otherwise.

    with TestNetwork.create() as net:
        h1 = net.add_host("h1")
        agent = h1.popen([...], env=..., log=...)
        h1.cut()          # the donor's network goes away without a reset
        h1.restore()
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def why_not_available() -> str | None:
    """Why network-namespace hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "separate hosts need root (network namespaces, a bridge, veth pairs)"
    for tool in ("ip", "ss", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (Debian: iproute2 / util-linux)"
    probe = f"dgpt-probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot create a network namespace here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_hosts() -> None:
    reason = why_not_available()
    if reason:
        pytest.skip(reason)


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    out = subprocess.run(argv, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out


@dataclass
class Host:
    """One test host: a namespace, its address, and the processes started on it."""

    name: str
    ns: str
    ip: str
    veth_host: str
    veth_ns: str
    root: Path  # its own disk folder (outside /tmp, which is private to each host)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run on this host: its netns, its hostname, a private /tmp, and name
        resolution of its own (the host's name resolves; no DNS server, so no lookup hangs)."""
        etc = self.root / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.ip} {self.name}\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        setup = (f"mount -t tmpfs tmpfs /tmp && mount --bind {etc / 'hosts'} /etc/hosts && "
                 f"mount --bind {etc / 'resolv.conf'} /etc/resolv.conf && hostname {self.name} && exec \"$@\"")
        return ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", setup, "sh", *command]

    def popen(self, command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``command`` on this host in the background; output goes to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv(command), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, command: Sequence[str], env: dict[str, str] | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command), env=env, capture_output=True, text=True, timeout=timeout_s)

    def cut(self) -> None:
        """Take the host's network down inside its namespace: no reset, packets just stop."""
        _ip("link", "set", "dev", self.veth_ns, "down", ns=self.ns)

    def restore(self) -> None:
        _ip("link", "set", "dev", self.veth_ns, "up", ns=self.ns)
        _ip("route", "replace", "default", "via", self.gateway, ns=self.ns)

    gateway: str = ""

    def listening(self) -> dict[int, set[str]]:
        """TCP port -> names of the processes listening on it, in this host's namespace."""
        return listening_ports(self.ns)

    def block_inbound(self, ports: Sequence[int]) -> None:
        """A firewall on the host that silently drops inbound TCP to ``ports`` (nftables)."""
        rules = (f"table inet dgpt_test {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n"
                 f"  tcp dport {{ {', '.join(str(p) for p in ports)} }} drop\n }}\n}}\n")
        out = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"nft in {self.ns}: {out.stderr.strip()}")


def listening_ports(ns: str | None, pids: bool = False) -> dict[int, set]:
    """TCP port -> names (or, with ``pids``, pids) of the processes listening on it, in ``ns`` or here."""
    argv = ["ss", "-ltnpH"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    ports: dict[int, set] = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        port = int(cols[3].rsplit(":", 1)[1])
        users = line.split("users:((", 1)[-1] if "users:((" in line else ""
        found = set()
        for part in users.split("),("):
            if pids:
                if "pid=" in part:
                    found.add(int(part.split("pid=")[1].split(",")[0]))
            elif '"' in part:
                found.add(part.split('"')[1])
        ports.setdefault(port, set()).update(found)
    return ports


@dataclass
class TestNetwork:
    """A bridge in the root namespace (the head's side) and hosts hung off it."""

    bridge: str
    prefix: str  # "10.N.0"
    root: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    tag: str = ""

    __test__ = False  # not a pytest test class

    @property
    def head_ip(self) -> str:
        return f"{self.prefix}.1"

    @classmethod
    @contextmanager
    def create(cls, root: Path | None = None) -> Iterator[TestNetwork]:
        require_hosts()
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        octet = random.randrange(100, 250)
        net = cls(bridge=f"dgb{tag}", prefix=f"10.{octet}.0",
                  root=root or Path(f"/var/tmp/dgpt-hosts-{tag}"), tag=tag)
        net.root.mkdir(parents=True, exist_ok=True)
        try:
            _ip("link", "add", "name", net.bridge, "type", "bridge")
            _ip("addr", "add", f"{net.head_ip}/24", "dev", net.bridge)
            _ip("link", "set", "dev", net.bridge, "up")
            yield net
        finally:
            net.close()

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name=name, ns=f"dgpt-{self.tag}-{name}", ip=f"{self.prefix}.{10 + index}",
                    veth_host=f"dgh{self.tag}{index}"[:15], veth_ns=f"dgn{self.tag}{index}"[:15],
                    root=self.root / name, gateway=self.head_ip)
        host.root.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", host.ns)
        _ip("link", "add", host.veth_host, "type", "veth", "peer", "name", host.veth_ns)
        _ip("link", "set", "dev", host.veth_host, "master", self.bridge, "up")
        _ip("link", "set", "dev", host.veth_ns, "netns", host.ns)
        _ip("addr", "add", f"{host.ip}/24", "dev", host.veth_ns, ns=host.ns)
        _ip("link", "set", "dev", host.veth_ns, "up", ns=host.ns)
        _ip("link", "set", "dev", "lo", "up", ns=host.ns)
        _ip("route", "add", "default", "via", self.head_ip, ns=host.ns)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        import psutil

        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    parent = psutil.Process(proc.pid)
                    victims = [parent, *parent.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for victim in victims:
                    try:
                        victim.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(victims, timeout=10)
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.veth_host, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
