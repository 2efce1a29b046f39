"""Throughput through the overlay's relay, side by side with the same transfer without it.

Why placement treats relayed donors as low bandwidth: between two donors behind NAT every
byte goes donor -> head (wireguard-go decrypts) -> donor (encrypts again), in userspace.
This builds the topology of tests/integration/test_overlay_tunnels.py (head in the root
namespace, donors behind masquerading routers) plus two plain hosts on the same bridge, and
times one bulk TCP transfer of each kind in one run:

- ``direct``: host to host over the bridge, no tunnel (the baseline: direct donors);
- ``relayed``: NAT donor to NAT donor through the head's relay;
- ``to_head``: NAT donor to the head over its tunnel (one WireGuard hop).

Needs root, wireguard-go, wg and nft. Every address is inside this machine's namespaces.

    python -m benchmarks.overlay_relay [--mib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path

from dgpt.config import load_settings
from dgpt.overlay.coordinator import OverlayCoordinator
from dgpt.overlay.hub import OverlayHub
from dgpt.overlay.wireguard import missing_tools
from dgpt.sdk.models import OverlayOffer
from tests.hosts import Host
from tests.nat import homes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "overlay_relay.json"
#: In Ray's default worker range (10002-19999), which the ACL lets through to the head and
#: to donors; random, since the root namespace may have other listeners.
PORT = random.randrange(15000, 20000)


def _env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


SINK = f"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {PORT})); s.listen()
print('LISTENING', flush=True)
while True:
    c, _ = s.accept()
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        t0 = t0 or time.monotonic()
        n += len(b)
    print('GOT', n, time.monotonic() - (t0 or time.monotonic()), flush=True)
    c.close()
"""


def _send(src: Host | None, address: str, mib: int) -> float:
    """Seconds to send ``mib`` MiB from ``src`` (None: the root namespace) to ``address``."""
    code = (f"import socket, time\nc = socket.create_connection(({address!r}, {PORT}), timeout=30)\n"
            f"buf = b'x' * (1 << 20)\nt0 = time.monotonic()\nfor _ in range({mib}):\n    c.sendall(buf)\n"
            "c.shutdown(socket.SHUT_WR)\nc.recv(1)\nprint(time.monotonic() - t0)\n")
    import subprocess

    argv = [sys.executable, "-c", code]
    out = (subprocess.run(argv, capture_output=True, text=True, timeout=300) if src is None
           else src.run(argv, env=_env(), timeout_s=300))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _offer(host: Host, iface: str) -> OverlayOffer:
    """The donor's offer (its key is made on its own host)."""
    state = host.root / "state"
    out = host.run([sys.executable, "-c", "from pathlib import Path\nfrom dgpt.overlay.endpoint import "
                    f"DonorEndpoint\nprint(DonorEndpoint(Path({str(state)!r}), {iface!r}, 6380, '10002-19999')"
                    ".offer().model_dump_json())"], env=_env())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return OverlayOffer.model_validate_json(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer")
    parser.add_argument("--repeats", type=int, default=3, help="transfers of each kind (the median is reported)")
    args = parser.parse_args()
    problem = missing_tools()
    if problem:
        sys.exit(f"cannot run: {problem}")
    with homes("h1", "h2") as (net, by_name):
        plain = [net.add_host("p1"), net.add_host("p2")]
        settings = load_settings({
            "home": net.root / "head-home", "node_ip": net.head_ip, "overlay_enabled": True,
            "overlay_port": random.randrange(40000, 50000), "overlay_interface": f"dgo{net.tag}",
            "overlay_cidr": f"100.{random.randrange(64, 127)}.{random.randrange(256)}.0/24"}, env={})
        hub = OverlayHub(settings, settings.home / "head" / "overlay.key", settings.home / "logs" / "wireguard.log")
        hub.up()
        try:
            coordinator = OverlayCoordinator.open(settings, settings.home / "head" / "overlay.sqlite")
            addresses = {}
            for name, home in by_name.items():
                iface = f"dgw{net.tag}{name[-1]}"
                grant = coordinator.grant(f"d-{name}", _offer(home.donor, iface))
                addresses[name] = grant.address
                home.donor.popen([sys.executable, "-c", f"""
import signal, sys, time
from pathlib import Path
from dgpt.overlay.endpoint import DonorEndpoint
from dgpt.sdk.models import OverlayGrant
e = DonorEndpoint(Path({str(home.donor.root / 'state')!r}), {iface!r}, 6380, '10002-19999')
e.up(OverlayGrant.model_validate_json({grant.model_dump_json()!r}))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    while True:
        time.sleep(1)
finally:
    e.down()
"""], env=_env(), log=home.donor.root / "endpoint.log")
            for host in (by_name["h2"].donor, plain[1]):
                host.popen([sys.executable, "-c", SINK], env=_env(), log=host.root / "sink.log")
            import subprocess

            sink_here = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.DEVNULL, env=_env())
            time.sleep(3)  # tunnels shake hands, sinks listen
            h1 = by_name["h1"].donor
            kinds = {
                "direct": lambda: _send(plain[0], plain[1].ip, args.mib),
                "relayed": lambda: _send(h1, addresses["h2"], args.mib),
                "to_head": lambda: _send(h1, coordinator.head_address, args.mib),
            }
            seconds = {k: statistics.median(f() for _ in range(args.repeats)) for k, f in kinds.items()}
            sink_here.terminate()
            for home in by_name.values():
                for proc in home.donor.procs:
                    proc.terminate()
                for proc in home.donor.procs:
                    proc.wait(15)
        finally:
            hub.down()
    mib_s = {k: round(args.mib / s, 1) for k, s in seconds.items()}
    result = {"benchmark": "overlay_relay", "mib_per_transfer": args.mib, "repeats": args.repeats,
              "mib_per_s": mib_s, "relayed_vs_direct": round(mib_s["relayed"] / mib_s["direct"], 3),
              "to_head_vs_direct": round(mib_s["to_head"] / mib_s["direct"], 3),
              "cpus": __import__("os").cpu_count(), "at": time.time()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
