"""One WireGuard interface on this machine, run by ``wireguard-go`` and set with ``wg``, ``ip`` and ``nft``.

The only module of the overlay that runs commands. ``wireguard-go`` is the userspace
implementation (no kernel module needed); it runs in the foreground as a child of the
process that owns the interface (the head's supervisor, a donor's agent) and dies with it,
and the interface goes away with ``wireguard-go``. ``wg`` talks to it through its socket in
``/var/run/wireguard``. Private keys only ever pass as files readable by their owner.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from dgpt.exceptions import OverlayError
from dgpt.overlay.peers import allowed_ips, handshakes
from dgpt.processes import die_with_parent, stop_tree, write_secret

log = logging.getLogger("dgpt.overlay")

#: The commands an overlay member needs (Debian: wireguard-go, wireguard-tools, iproute2, nftables).
TOOLS = ("wireguard-go", "wg", "ip", "nft")
#: ``wireguard-go`` creates its interface and socket within a second; a loaded machine gets ten.
START_TIMEOUT_S = 10.0
#: WireGuard's own default MTU: 1500 less its IPv6-sized header, so it fits any path.
MTU = 1420
SOCKET_DIR = Path("/var/run/wireguard")


def missing_tools() -> str | None:
    """Why this machine cannot run an overlay interface, with the fix; None when it can."""
    if os.geteuid() != 0:
        return ("the overlay needs root (a TUN device, addresses and nftables rules): run as root, "
                "or set DGPT_OVERLAY_JOIN=off")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not found: install them (Debian: apt-get install wireguard-go "
                "wireguard-tools nftables iproute2), or set DGPT_OVERLAY_JOIN=off")
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: load the tun module (modprobe tun) or give the container the device"
    return None


def run(argv: Sequence[str], what: str, input_text: str | None = None, timeout_s: float = 30.0) -> str:
    """Run one command; its output.

    Raises:
        OverlayError: it failed; the message says what it was doing and what the command said.
    """
    try:
        out = subprocess.run(list(argv), input=input_text, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise OverlayError(f"{what}: `{argv[0]}` is not installed",
                           hint="apt-get install wireguard-go wireguard-tools nftables iproute2") from None
    except subprocess.TimeoutExpired:
        raise OverlayError(f"{what}: `{' '.join(argv[:3])}` did not finish in {timeout_s:g}s") from None
    if out.returncode != 0:
        raise OverlayError(f"{what}: `{' '.join(argv[:4])}` failed: {(out.stderr or out.stdout).strip()[:400]}",
                           hint="see `wg show`, `ip addr` and `nft list ruleset` on this machine")
    return out.stdout


def make_key(path: Path) -> str:
    """The public key of the private key in ``path``, generating the key (mode 0600) if missing."""
    if not path.is_file():
        write_secret(path, run(["wg", "genkey"], "generating a WireGuard key").strip() + "\n")
    os.chmod(path, 0o600)
    return run(["wg", "pubkey"], "reading a WireGuard public key", input_text=path.read_text()).strip()


class Interface:
    """A WireGuard interface named ``name``, and the ``wireguard-go`` process behind it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return SOCKET_DIR / f"{self.name}.sock"

    def exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", "dev", self.name], capture_output=True).returncode == 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, log_path: Path) -> None:
        """Create the interface (``wireguard-go -f``), once its socket answers.

        Raises:
            OverlayError: an interface of that name exists already, or wireguard-go failed.
        """
        if self.running:
            return
        if self.exists():
            raise OverlayError(f"a network interface named {self.name} exists already (another overlay, or one "
                               "left by a killed process)",
                               hint=f"remove it with `ip link del {self.name}`, or set DGPT_OVERLAY_INTERFACE")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(["wireguard-go", "-f", self.name], stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.socket.exists() and self.exists()):
            if self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise OverlayError(f"wireguard-go {self.name} exited with code {self._proc.returncode}: "
                                   + " / ".join(tail), hint=f"see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise OverlayError(f"wireguard-go did not create {self.name} within {START_TIMEOUT_S:g}s",
                                   hint=f"see {log_path}")
            time.sleep(0.05)

    def address(self, address: str, prefix_len: int) -> None:
        """Give the interface its overlay address (the route to the overlay comes with it) and bring it up."""
        run(["ip", "address", "replace", f"{address}/{prefix_len}", "dev", self.name], f"addressing {self.name}")
        run(["ip", "link", "set", "dev", self.name, "mtu", str(MTU), "up"], f"bringing {self.name} up")

    def listen(self, private_key_file: Path, port: int) -> None:
        run(["wg", "set", self.name, "private-key", str(private_key_file), "listen-port", str(port)],
            f"setting {self.name}'s key and UDP port {port}")

    def forward(self) -> None:
        """Let packets that arrive here be routed back out (the head's relay between donors).

        Only this interface's flag: the machine's other interfaces keep not forwarding, and
        the ACL (``dgpt.overlay.acl``) drops anything routed off the overlay.
        """
        path = Path(f"/proc/sys/net/ipv4/conf/{self.name}/forwarding")
        try:
            path.write_text("1\n")
        except OSError as exc:
            raise OverlayError(f"cannot enable forwarding on {self.name}: {exc}",
                               hint="the head must run as root in a network namespace it may configure") from None

    def wg_set(self, commands: Sequence[Sequence[str]]) -> None:
        for argv in commands:
            run(argv, f"configuring {self.name}'s peers")

    def peers(self) -> dict[str, tuple[str, ...]]:
        """Public key -> allowed IPs of every peer the interface has."""
        return allowed_ips(run(["wg", "show", self.name, "allowed-ips"], f"reading {self.name}'s peers"))

    def handshakes(self) -> dict[str, float]:
        """Public key -> last handshake time (epoch s) of the peers heard from."""
        return handshakes(run(["wg", "show", self.name, "latest-handshakes"], f"reading {self.name}'s handshakes"))

    def nft(self, ruleset: str) -> None:
        if ruleset:
            run(["nft", "-f", "-"], f"applying {self.name}'s overlay ACL", input_text=ruleset)

    def stop(self) -> None:
        """Stop ``wireguard-go`` (the interface goes with it) and remove what is left."""
        if self._proc is None:
            return  # not ours to remove
        if self._proc.poll() is None:
            stop_tree(self._proc.pid, grace_s=5)
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._proc = None
        if self.exists():
            subprocess.run(["ip", "link", "del", "dev", self.name], capture_output=True)
