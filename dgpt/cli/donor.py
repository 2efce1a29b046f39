"""`dgpt donor`: donate this device (join, pause, resume, leave, credit) and list the fleet's donors."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from dgpt.cli.context import HomeOpt, client, console, home_path, settings
from dgpt.contract import DonorState
from dgpt.exceptions import ConfigError, DonorError

donor_app = typer.Typer(help="Donate this device: join, pause, resume, leave; list donors.", no_args_is_help=True)

DonorIdOpt = typer.Option(None, "--donor-id", help="On the local fabric: the simulated donor (id or name).")


def _threshold(text: str) -> float | None:
    if text.lower() in ("off", "none", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--load-threshold {text!r} must be a number of cores per core (e.g. 0.6) or 'off'") from None
    if not 0 < value <= 64:
        raise ConfigError(f"--load-threshold {value:g} must be > 0 and <= 64")
    return value


@donor_app.command("join")
def donor_join(
    head: str | None = typer.Option(None, "--head", help="Head API URL, e.g. https://HEAD:8080 (DGPT_HEAD_URL)."),
    token: str | None = typer.Option(None, "--token", help="Join token from `dgpt token create`."),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the join token (kept out of `ps`)."),
    cpus: float | None = typer.Option(None, "--cpus", help="CPU cores to offer (default: all)."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", help="Memory to offer in GiB (default: half)."),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs to offer (default: all CUDA GPUs)."),
    disk_gb: float | None = typer.Option(None, "--disk-gb", help="Disk to offer to the storage tier, GiB."),
    device_class: str = typer.Option("desktop", "--device-class", help="laptop, desktop, gpu-rig, server, ..."),
    owner: str | None = typer.Option(None, "--owner", help="Failure domain (default: this host's name)."),
    labels: str | None = typer.Option(None, "--labels", help="Extra node labels k=v,k2=v2."),
    name: str | None = typer.Option(None, "--name", help="Donor name (default: host name)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Donor state folder (default $DGPT_HOME/donor)."),
    node_ip: str | None = typer.Option(None, "--node-ip", help="Address the head reaches this machine at (DGPT_NODE_IP)."),
    ray_temp_dir: Path | None = typer.Option(
        None, "--ray-temp-dir", help="Ray temp folder of this donor's raylet (default Ray's); short paths only."),
    port_base: int | None = typer.Option(
        None, "--ray-port-base", help="First port of the node's block of 9 fixed Ray ports (DGPT_RAY_NODE_PORT_BASE; a donor listens on the first 6)."),
    worker_ports: str | None = typer.Option(
        None, "--worker-ports", help="Ray worker ports START-END (DGPT_RAY_WORKER_PORTS)."),
    load_threshold: str | None = typer.Option(
        None, "--load-threshold", help="Owner load per core that pauses donation, or 'off' (DGPT_IDLE_LOAD_THRESHOLD)."),
    allowed_hours: str | None = typer.Option(None, "--allowed-hours", help="Hours to donate, e.g. 22-7 (DGPT_ALLOWED_HOURS)."),
    storage_port: int | None = typer.Option(
        None, "--storage-port", min=1, max=65535,
        help="Port of this donor's piece server when it offers disk (default: --ray-port-base + 9; DGPT_STORAGE_PORT)."),
    warm_start: bool = typer.Option(
        True, "--warm-start/--no-warm-start",
        help="Keep a `ray start` with Ray imported while standby (~200 MB): joins ~2 s faster."),
    home: Path | None = HomeOpt,
) -> None:
    """Join this device to a dgpt fabric as a donor (blocks; Ctrl-C drains and leaves)."""
    from dgpt.config import storage_port as config_storage_port
    from dgpt.donor.agent import AgentConfig, DonorAgent, install_signal_handlers
    from dgpt.donor.caps import build_caps, parse_labels
    from dgpt.donor.profile import measure
    from dgpt.donor.protection import Mode, ProtectionConfig
    from dgpt.ray_node import NodePorts
    from dgpt.sdk.models import DEVICE_CLASSES, check_name
    from dgpt.tls import split_token

    s = settings(home=home, head_url=head, allowed_hours=allowed_hours, node_ip=node_ip,
                 ray_node_port_base=port_base, ray_worker_ports=worker_ports, storage_port=storage_port)
    if not s.head_url:
        raise ConfigError("--head is required (or set DGPT_HEAD_URL)", hint="e.g. --head https://HEAD:8080")
    if token_file is not None:
        if not token_file.is_file():
            raise ConfigError(f"--token-file {token_file} does not exist")
        token = token_file.read_text().strip()
    if not token:
        raise ConfigError("--token (or --token-file) is required", hint="ask the operator: `dgpt token create`")
    token, pin = split_token(token, "--token-file" if token_file is not None else "--token")
    pin = pin or s.head_fingerprint
    if s.head_url.startswith("http://") and pin is not None:
        raise ConfigError(f"--head {s.head_url} is plain HTTP, but the join token pins a certificate",
                          hint=f"use https://{s.head_url.removeprefix('http://')} (`dgpt status` on the head shows "
                               "api_url)")
    if device_class not in DEVICE_CLASSES:
        raise ConfigError(f"--device-class {device_class!r} must be one of {', '.join(DEVICE_CLASSES)}")
    if ray_temp_dir is not None and len(str(ray_temp_dir)) > 40:
        raise ConfigError(f"--ray-temp-dir {ray_temp_dir} is too long ({len(str(ray_temp_dir))} characters)",
                          hint="Ray's Unix sockets live below it and must stay under 107 bytes: use <= 40 characters")
    host = socket.gethostname().split(".")[0] or "donor"
    try:
        name = check_name(name or host, "--name")
        owner = check_name(owner or host, "--owner")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    threshold = _threshold(load_threshold) if load_threshold is not None else s.idle_load_threshold
    extra_labels = parse_labels(labels)
    state = state_dir or s.home / "donor"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat drowns the log
    with console.status("profiling this device"):
        profile = measure(state)
    caps = build_caps(profile, cpus=cpus, memory_gb=memory_gb, gpus=gpus, disk_gb=disk_gb)
    console.print(f"profile: {profile.cpus} cores, {profile.memory_bytes / 2**30:.1f} GiB, "
                  f"{profile.cpu_gflops:.1f} CPU GFLOPS, {len(profile.gpus)} GPU(s); offering {caps.cpus:g} CPU, "
                  f"{caps.memory_bytes / 2**30:.1f} GiB, {caps.gpus} GPU")
    overlay = None
    if s.overlay_join != "off":
        from dgpt.overlay.endpoint import DonorEndpoint

        overlay, why_not = DonorEndpoint.detect(state, s.overlay_interface, s.ray_node_port_base, s.ray_worker_ports)
        if overlay is None:
            # Fine on a network the head reaches; behind NAT its preflight explains what is missing.
            logging.getLogger("dgpt.donor").info("not offering to join through the overlay: %s", why_not)
    cfg = AgentConfig(
        head_url=s.head_url, join_token=token, name=name, device_class=device_class, owner=owner,
        state_dir=state, caps=caps, profile=profile, labels=extra_labels, node_ip=s.node_ip,
        head_pin=pin, load_threshold=threshold, load_calm_s=s.idle_calm_s, allowed_hours=s.allowed_hours, drain_deadline_s=s.drain_deadline_s,
        ray_temp_dir=ray_temp_dir, ports=NodePorts(s.ray_node_port_base, s.ray_worker_ports), warm_start=warm_start,
        overlay=overlay,
        protection=ProtectionConfig(caps=Mode(s.enforce_caps), sandbox=Mode(s.sandbox), sandbox_user=s.sandbox_user,
                                    shared=s.sandbox_shared_folders),
        storage_port=config_storage_port(s) if caps.disk_bytes else None,
    )
    agent = DonorAgent(cfg)
    install_signal_handlers(agent)
    raise typer.Exit(agent.run())


def _donor_dir(home: Path | None, donor_id: str | None) -> Path:
    from dgpt.donor.agent import find_state_dir

    return find_state_dir(home_path(home), donor_id)


@donor_app.command("pause")
def donor_pause(donor_id: str | None = DonorIdOpt, home: Path | None = HomeOpt) -> None:
    """The owner is back: drain this donor now and keep it out until `resume`."""
    from dgpt.donor.agent import state_files

    files = state_files(_donor_dir(home, donor_id))
    files["paused"].write_text(str(time.time()))
    console.print(f"paused {files['paused'].parent.name}: its work drains and it stays out until `dgpt donor resume`.")


@donor_app.command("resume")
def donor_resume(donor_id: str | None = DonorIdOpt, home: Path | None = HomeOpt) -> None:
    """Donate again after `pause`."""
    from dgpt.donor.agent import state_files

    files = state_files(_donor_dir(home, donor_id))
    files["paused"].unlink(missing_ok=True)
    console.print(f"resumed {files['paused'].parent.name}.")


@donor_app.command("leave")
def donor_leave(
    donor_id: str | None = DonorIdOpt,
    home: Path | None = HomeOpt,
    wait_s: float = typer.Option(120.0, "--wait-s", min=0, help="How long to wait for the drain."),
) -> None:
    """Drain this donor (DrainNode with a deadline), stop its raylet, and stop the agent."""
    from dgpt.donor.agent import state_files
    from dgpt.processes import alive, read_json, wait_until

    files = state_files(_donor_dir(home, donor_id))
    pid = (read_json(files["pid"]) or {}).get("pid")
    if not alive(pid):
        raise DonorError(f"the donor agent of {files['pid'].parent.name} is not running")
    # SIGINT is "the owner leaves" to the agent (SIGTERM is "the system stops it").
    os.kill(int(pid), signal.SIGINT)  # type: ignore[arg-type]
    with console.status("draining: running work finishes or moves, then the raylet stops"):
        done = wait_until(lambda: not alive(pid), wait_s)
    if not done:
        raise DonorError(f"the agent (pid {pid}) is still draining after {wait_s:g}s", hint="wait, or kill it")
    console.print("left the fabric; rejoin any time with `dgpt donor join` (the donor id is kept).")


@donor_app.command("list")
def donor_list(
    state: DonorState | None = typer.Option(None, "--state", help="Only donors in this state."),
    owner: str | None = typer.Option(None, "--owner", help="Only this owner's donors."),
    device_class: str | None = typer.Option(None, "--class", help="Only this device class."),
    limit: int = typer.Option(50, "--limit", min=1, max=5000, help="Donors per page."),
    after: str | None = typer.Option(None, "--after", help="Start after this donor id (a page's next cursor)."),
    home: Path | None = HomeOpt,
) -> None:
    """List donors, a page at a time (filter by state, owner, device class)."""
    with client(settings(home=home)) as c:
        page = c.donors_page(state=state, owner=owner, device_class=device_class, after=after, limit=limit)
    table = Table("donor", "name", "state", "class", "owner", "node", "CPU", "P(stay 1h)",
                  title=f"donors ({len(page.items)}" + (f" of {page.total})" if page.total is not None else ")"))
    for d in page.items:
        table.add_row(d.donor_id, d.name, d.state.value, d.device_class, d.owner, (d.node_id or "-")[:8],
                      f"{d.caps.cpus:g}", f"{d.reliability:.2f}" if d.reliability is not None else "-")
    console.print(table)
    if page.next_cursor:
        console.print(f"more: `dgpt donor list --after {page.next_cursor}`" + (f" --state {state.value}" if state else ""))


@donor_app.command("credit")
def donor_credit(
    donor_id: str | None = typer.Option(
        None, "--donor-id", help="A donor of this machine (id or name), or any donor with an API key."),
    entries: int = typer.Option(10, "--entries", min=0, max=1000, help="Latest ledger rows to show."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    home: Path | None = HomeOpt,
) -> None:
    """Show the credit this donor earned: total, recent average credit, per session, latest ledger rows."""
    from dgpt.cli.credit_view import print_credit
    from dgpt.donor.agent import state_files
    from dgpt.exceptions import DonorError
    from dgpt.processes import read_json
    from dgpt.sdk.client import DonorClient
    from dgpt.tls import HeadTrust

    s = settings(home=home)
    try:
        ident = read_json(_donor_dir(home, donor_id) / "donor.json") or {}
    except DonorError:
        if donor_id is None:
            raise
        ident = {}  # not a donor of this machine: ask as an operator, with the API key
    if ident.get("donor_secret"):
        url = ident.get("head_url") or s.local_head_url
        with DonorClient(url, trust=HeadTrust(url, cache=state_files(_donor_dir(home, donor_id))["head_cert"])) as dc:
            credit = dc.credit(ident["donor_id"], ident["donor_secret"], entries)
    else:
        with client(s) as c:
            credit = c.credit(str(donor_id), entries)
    print_credit(credit, as_json)
