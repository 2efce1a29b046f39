"""The embedded default: a head and N simulated donors on this machine (`dgpt up` / `dgpt down`).

Each simulated donor is a real donor agent process with its own caps, device class, owner
and state folder, and its own raylet with a Ray temp folder of its own (as on a separate
machine: its own sockets, logs and unpacked runtime envs). ``$DGPT_HOME/fabric.json``
records every pid, so `dgpt down` stops exactly what `dgpt up` started, and removes the
donors' Ray temp folders.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dgpt.config import Settings, load_settings, parse_port_range
from dgpt.donor.agent import SHUTDOWN_DRAIN_S, SHUTDOWN_SIGNAL
from dgpt.exceptions import FabricError
from dgpt.head.paths import head_paths, ray_temp_dir
from dgpt.head.process import head_running, settings_env, start_head, stop_head
from dgpt.processes import (
    alive,
    free_port,
    port_in_use,
    read_json,
    spawn_detached,
    stop_tree,
    write_json,
    write_secret,
)
from dgpt.sdk.client import Client

#: Disk each simulated donor offers the storage tier: room for a demo's data set in pieces.
LOCAL_DISK_GB = 2.0

@dataclass(frozen=True)
class DonorSpec:
    """One simulated donor: its caps and identity on the local fabric, and where it listens.

    ``port_base`` / ``worker_ports``: its own block of fixed Ray ports and worker range
    (simulated donors share one machine's ports); 0 / "" until :func:`up` assigns them.
    """

    name: str
    device_class: str
    owner: str
    cpus: float
    memory_gb: float
    port_base: int = 0
    worker_ports: str = ""
    # Simulated donors share one machine: each other's load is not an owner coming back, so
    # their load detector is off unless a threshold is given.
    load_threshold: str = "off"
    # Disk offered to the storage tier (its piece server listens on port_base + 9).
    disk_gb: float = LOCAL_DISK_GB
    # A verification drill on this donor (DGPT_FAULT_INJECT, dgpt/verify/fault.py); "" for none.
    fault_inject: str = ""


# Three classes of very different size, so placement and status show heterogeneity.
_CLASSES = (("laptop", 1.0, 1.5), ("desktop", 2.0, 2.0), ("server", 2.0, 3.0))


def donor_specs(n: int) -> list[DonorSpec]:
    """N simulated donors, cycling through device classes, each its own owner."""
    if not 0 <= n <= MAX_LOCAL_DONORS:
        raise FabricError(f"--donors {n} must be between 0 and {MAX_LOCAL_DONORS} on one machine")
    specs = []
    for i in range(n):
        cls, cpus, mem = _CLASSES[i % len(_CLASSES)]
        specs.append(DonorSpec(name=f"donor-{i + 1}", device_class=cls, owner=f"owner-{i + 1}", cpus=cpus, memory_gb=mem))
    return specs


#: Simulated donor i of the local fabric listens on the block ``ray_node_port_base + 10 * (i + 1)``.
PORT_BLOCK_STRIDE = 10
MAX_LOCAL_DONORS = 16


def local_port_layout(settings: Settings, n_donors: int) -> tuple[str, list[tuple[int, str]]]:
    """Ports of a local fabric: the head's worker range, and each donor's port base and range.

    The donors share the machine, so each gets its own block of fixed ports and its own
    slice of ``ray_worker_ports`` (the head the first slice).

    Raises:
        FabricError: the worker range is too small to slice for this many donors.
    """
    lo, hi = parse_port_range(settings.ray_worker_ports)
    width = (hi - lo + 1) // (n_donors + 1)
    if width < 16:
        raise FabricError(f"ray_worker_ports {settings.ray_worker_ports} is too small for a head and {n_donors} donors "
                          "on one machine", hint="widen DGPT_RAY_WORKER_PORTS (at least 16 ports per node)")
    slices = [f"{lo + i * width}-{lo + (i + 1) * width - 1}" for i in range(n_donors + 1)]
    donors = [(settings.ray_node_port_base + PORT_BLOCK_STRIDE * (i + 1), slices[i + 1]) for i in range(n_donors)]
    return slices[0], donors


def _free_block(size: int) -> int:
    """A base port whose ``size`` ports from there are free now (outside the ephemeral range)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 32767 - size, PORT_BLOCK_STRIDE)
        if not any(port_in_use(p) for p in range(base, base + size)):
            return base
    raise FabricError(f"found no {size} free ports in a row in 20000-32767", hint="stop other fabrics on this machine")


def private_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a fabric of its own: ``home``, free ports, loopback only, no ``DGPT_*`` read.

    Tests and benchmarks start their fabrics with these, so they never clash with a fabric
    already running on the machine: free head ports, a free block of node ports for the head
    and up to 16 donors, and a random 1,700-port window of Ray's worker range.
    """
    import random

    workers_lo = random.randrange(10002, 19999 - 1700)
    block_size = PORT_BLOCK_STRIDE * (MAX_LOCAL_DONORS + 1)
    base = _free_block(block_size)
    ports: list[int] = []
    while len(ports) < 5:  # the head's own ports: free, distinct, and outside the node-port block
        port = free_port()
        if port not in ports and not base <= port < base + block_size:
            ports.append(port)
    defaults = {"home": home, "ray_port": ports[0], "dashboard_port": ports[1], "http_port": ports[2],
                "api_port": ports[3], "metrics_port": ports[4], "node_ip": "127.0.0.1", "http_host": "127.0.0.1",
                "ray_node_port_base": base, "ray_worker_ports": f"{workers_lo}-{workers_lo + 1699}"}
    return load_settings({**defaults, **overrides}, env={})


def fabric_file(settings: Settings) -> Path:
    return settings.home / "fabric.json"


def api_client(settings: Settings) -> Client:
    """A client for this DGPT_HOME's head, with the head's API key unless DGPT_API_KEY is set."""
    key = settings.api_key
    key_file = head_paths(settings.home)["api_key"]
    if key is None and key_file.is_file():
        key = key_file.read_text().strip()
    from dgpt.tls import head_trust

    return Client(settings.local_head_url, key, trust=head_trust(settings))


def donor_argv(settings: Settings, spec: DonorSpec, token_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "dgpt.cli.main", "donor", "join",
        "--head", settings.local_head_url,
        "--token-file", str(token_file),
        "--name", spec.name,
        "--device-class", spec.device_class,
        "--owner", spec.owner,
        "--cpus", f"{spec.cpus:g}",
        "--memory-gb", f"{spec.memory_gb:g}",
        "--state-dir", str(settings.home / "donors" / spec.name),
        "--ray-temp-dir", str(ray_temp_dir(settings.home, spec.name)),
        "--ray-port-base", str(spec.port_base),
        "--worker-ports", spec.worker_ports,
        "--load-threshold", spec.load_threshold,
        *(["--disk-gb", f"{spec.disk_gb:g}"] if spec.disk_gb > 0 else []),
    ]


def start_donor(settings: Settings, spec: DonorSpec) -> int:
    token_file = head_paths(settings.home)["dir"] / "join_token"
    log = settings.home / "logs" / f"{spec.name}.log"
    env = settings_env(settings)
    if spec.fault_inject:
        env["DGPT_FAULT_INJECT"] = spec.fault_inject
    return spawn_detached(donor_argv(settings, spec, token_file), log, env)


def up(settings: Settings, n_donors: int, progress: Callable[[str, float], None] | None = None,
       timeout_s: float = 300.0, min_active: int | None = None,
       specs: list[DonorSpec] | None = None) -> dict[str, Any]:
    """Start a head and ``n_donors`` simulated donors; return once they have joined.

    Args:
        min_active: donors the autoscaler keeps active (its ``min_active`` bound); the others
            wait in standby until demand needs them. Default: all of them.
        specs: the donors' caps and identities (default: :func:`donor_specs`).

    Raises:
        FabricError: a fabric already runs for this DGPT_HOME, a bound is invalid, or it did
            not come up in time.
    """
    say = progress or (lambda msg, frac: None)
    specs = specs if specs is not None else donor_specs(n_donors)
    if len(specs) != n_donors:
        raise FabricError(f"{len(specs)} donor specs given for --donors {n_donors}")
    keep = n_donors if min_active is None else min_active
    if not 0 <= keep <= n_donors:
        raise FabricError(f"--min-active {keep} must be between 0 and --donors ({n_donors})")
    settings = settings.model_copy(update={"min_active_donors": keep,
                                           "max_active_donors": max(settings.max_active_donors, keep, 1)})
    existing = read_json(fabric_file(settings))
    if existing and (alive(existing.get("head_pid")) or any(alive(d.get("pid")) for d in existing.get("donors", []))):
        raise FabricError(f"a fabric already runs for DGPT_HOME={settings.home}", hint="stop it with `dgpt down`")
    if head_running(settings):
        raise FabricError(f"a head already runs for DGPT_HOME={settings.home}", hint="stop it with `dgpt down`")
    head_workers, donor_ports = local_port_layout(settings, len(specs))
    specs = [spec if spec.port_base else replace(spec, port_base=base, worker_ports=workers)
             for spec, (base, workers) in zip(specs, donor_ports, strict=True)]
    say("starting the head (Ray head, Serve, control plane)", 0.05)
    head = start_head(settings.model_copy(update={"ray_worker_ports": head_workers}),
                      on_wait=lambda s: say(f"starting the head ({s:.0f}s)", 0.05 + min(s / 60, 1) * 0.35))
    record: dict[str, Any] = {"head_pid": head["pid"], "donors": [], "started_at": time.time(), "home": str(settings.home)}
    write_json(fabric_file(settings), record)
    client = api_client(settings)
    try:
        token = client.create_token("join", "local fabric donors")
        assert token.token
        write_secret(head_paths(settings.home)["dir"] / "join_token", token.token)
        for i, spec in enumerate(specs):
            say(f"starting donor agent {spec.name} ({spec.device_class})", 0.4 + 0.1 * i / max(1, len(specs)))
            record["donors"].append({"name": spec.name, "pid": start_donor(settings, spec),
                                     "state_dir": str(settings.home / "donors" / spec.name), "spec": asdict(spec)})
            write_json(fabric_file(settings), record)
        deadline = time.monotonic() + timeout_s
        while True:
            donors = client.donors()
            active = [d for d in donors if d.state == "active" and d.node_id]
            say(f"donors registered: {len(donors)}/{len(specs)}, active: {len(active)}/{keep}",
                0.5 + 0.5 * (len(active) + len(donors)) / max(1, keep + len(specs)))
            if len(active) >= keep and len(donors) >= len(specs):
                break
            dead = [d["name"] for d in record["donors"] if not alive(d["pid"])]
            if dead:
                raise FabricError(f"donor agent(s) {', '.join(dead)} exited while joining",
                                  hint=f"see {settings.home / 'logs'}/<donor>.log")
            if time.monotonic() > deadline:
                raise FabricError(f"only {len(active)} of {len(specs)} donors became active in {timeout_s:.0f}s",
                                  hint=f"see the logs in {settings.home / 'logs'}")
            time.sleep(0.5)
    except BaseException:
        down(settings)
        raise
    finally:
        client.close()
    say("fabric ready", 1.0)
    return {"head": head, "donors": record["donors"]}


def restart_donor(settings: Settings, name: str, **changes: Any) -> int:
    """Start a simulated donor's agent again after it left or died; it rejoins with its donor id.

    ``changes`` replace fields of its :class:`DonorSpec` from now on (e.g. ``load_threshold``).

    Raises:
        FabricError: no fabric runs here, no such donor, or its agent still runs.
    """
    record = read_json(fabric_file(settings))
    if not record:
        raise FabricError(f"no fabric runs for DGPT_HOME={settings.home}", hint="start one with `dgpt up`")
    entry = next((d for d in record["donors"] if d["name"] == name), None)
    if entry is None:
        known = ", ".join(d["name"] for d in record["donors"])
        raise FabricError(f"the fabric has no donor {name!r}", hint=f"its donors: {known}")
    if alive(entry.get("pid")):
        raise FabricError(f"donor {name} still runs (pid {entry['pid']})", hint=f"`dgpt donor leave --donor-id {name}` first")
    spec = replace(DonorSpec(**entry["spec"]), **changes)
    entry["spec"] = asdict(spec)
    entry["pid"] = start_donor(settings, spec)
    write_json(fabric_file(settings), record)
    return int(entry["pid"])


def down(settings: Settings, progress: Callable[[str, float], None] | None = None) -> dict[str, int]:
    """Stop every process this DGPT_HOME's fabric started, by pid: donors first, then the head."""
    say = progress or (lambda msg, frac: None)
    record = read_json(fabric_file(settings)) or {"donors": []}
    donors = [d for d in record.get("donors", []) if alive(d.get("pid"))]
    killed = 0
    say(f"draining {len(donors)} donor(s)", 0.1)
    import concurrent.futures as cf

    # Donors drain in parallel: each asks the head for DrainNode, then stops its raylet.
    with cf.ThreadPoolExecutor(max_workers=max(1, len(donors))) as pool:
        # The shutdown signal: drain briefly (the whole fabric is stopping, work has nowhere to go).
        stop = lambda d: stop_tree(int(d["pid"]), grace_s=SHUTDOWN_DRAIN_S + 30, sig=SHUTDOWN_SIGNAL)  # noqa: E731
        for pids in pool.map(stop, donors):
            killed += len(pids)
    say("stopping the head", 0.6)
    head_stopped = stop_head(settings)
    for d in record.get("donors", []):
        shutil.rmtree(ray_temp_dir(settings.home, d["name"]), ignore_errors=True)
    fabric_file(settings).unlink(missing_ok=True)
    say("fabric stopped", 1.0)
    return {"donors": len(donors), "head": int(head_stopped), "killed": killed}
