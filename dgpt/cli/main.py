"""The `dgpt` command: one typer sub-app per noun, thin over the SDK and head functions."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dgpt.cli.progress import stage_progress
from dgpt.cli.serve import serve_app
from dgpt.config import Settings, load_settings
from dgpt.exceptions import ConfigError, DgptError, DonorError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(help="dgpt: donated idle devices as one elastic Ray fabric.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
head_app = typer.Typer(help="Run the head on a server.", no_args_is_help=True)
donor_app = typer.Typer(help="Donate this device: join, pause, resume, leave.", no_args_is_help=True)
job_app = typer.Typer(help="Submit and follow jobs through the REST API.", no_args_is_help=True)
token_app = typer.Typer(help="Join tokens for donors and API keys for apps.", no_args_is_help=True)
app.add_typer(head_app, name="head")
app.add_typer(donor_app, name="donor")
app.add_typer(job_app, name="job")
app.add_typer(token_app, name="token")
app.add_typer(serve_app, name="serve")

HomeOpt = typer.Option(None, "--home", help="State folder (default $DGPT_HOME or ~/.dgpt).")


def _settings(**overrides: Any) -> Settings:
    return load_settings(overrides)


def _client(settings: Settings):  # type: ignore[no-untyped-def]
    from dgpt.head.fabric import api_client

    return api_client(settings)


# ------------------------------------------------------------------ fabric


@app.command()
def up(
    donors: int = typer.Option(3, "--donors", "-n", min=0, max=16, help="Simulated donors to start."),
    home: Path | None = HomeOpt,
    ray_port: int | None = typer.Option(None, help="GCS port (DGPT_RAY_PORT)."),
    dashboard_port: int | None = typer.Option(None, help="Dashboard/Jobs port (DGPT_DASHBOARD_PORT)."),
    http_port: int | None = typer.Option(None, help="Serve HTTP port (DGPT_HTTP_PORT)."),
    min_active: int | None = typer.Option(
        None, "--min-active", min=0, help="Donors kept active; the rest wait for demand (default: all)."),
) -> None:
    """Start a head and N simulated donors on this machine, in the background."""
    from dgpt.head import fabric

    settings = _settings(home=home, ray_port=ray_port, dashboard_port=dashboard_port, http_port=http_port,
                         node_ip=None)
    if settings.node_ip is None:
        settings = settings.model_copy(update={"node_ip": "127.0.0.1"})
    with stage_progress(err_console, "starting") as say:
        fabric.up(settings, donors, progress=say, min_active=min_active)
    _print_addresses(settings)
    console.print(f"[green]fabric up[/] with {donors} donor(s). Stop it with [bold]dgpt down[/].")


@app.command()
def down(home: Path | None = HomeOpt) -> None:
    """Stop everything `dgpt up` started (by pid), donors first."""
    from dgpt.head import fabric

    settings = _settings(home=home)
    with stage_progress(err_console, "stopping") as say:
        result = fabric.down(settings, progress=say)
    console.print(f"stopped {result['donors']} donor(s) and {result['head']} head.")


def _head_block(settings: Settings) -> dict[str, Any]:
    from dgpt.head.process import head_addresses, shell_env

    return {**head_addresses(settings), "env": shell_env(settings)}


def _print_addresses(settings: Settings) -> None:
    head = _head_block(settings)
    table = Table(title="dgpt head", show_header=False)
    for key in ("ray_address", "dashboard_url", "api_url", "serve_url"):
        table.add_row(key, head[key])
    console.print(table)
    console.print("Plain Ray tools: [bold]eval \"$(dgpt env)\"[/] then `ray job submit -- python script.py`.")


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    home: Path | None = HomeOpt,
) -> None:
    """Show the head and every donor (state, node, resources, sessions)."""
    settings = _settings(home=home)
    head = _head_block(settings)
    with _client(settings) as client:
        donors = client.donors()
        cluster = client.cluster()
    data = {
        "head": head,
        "donors": [
            {
                "donor_id": d.donor_id, "name": d.name, "state": d.state, "device_class": d.device_class,
                "owner": d.owner, "node_id": d.node_id, "resources": d.resources, "labels": d.labels,
                "owner_active": d.owner_active,
                "sessions": [{"started_at": s.started_at, "ended_at": s.ended_at, "ended_as": s.ended_as,
                              "end_reason": s.end_reason, "node_id": s.node_id} for s in d.sessions],
                "profile": d.profile.model_dump(),
            }
            for d in donors
        ],
    }
    data["autoscaler"] = cluster.autoscaler
    endpoints = _endpoints(settings)
    data["endpoints"] = endpoints
    if as_json:
        print(json.dumps(data, indent=2))
        return
    _print_addresses(settings)
    table = Table(title=f"donors ({len(donors)})")
    for col in ("donor", "name", "state", "class", "owner", "node", "CPU", "mem GiB", "GFLOPS", "sessions"):
        table.add_column(col)
    for d in donors:
        ended = [s.ended_as for s in d.sessions if s.ended_as]
        table.add_row(
            d.donor_id, d.name, d.state + (" (owner)" if d.owner_active else ""), d.device_class, d.owner,
            (d.node_id or "-")[:8], f"{d.resources.get('CPU', 0):g}", f"{d.resources.get('memory', 0) / 2**30:.1f}",
            f"{d.profile.cpu_gflops:.0f}", f"{len(d.sessions)} ({', '.join(ended) or 'open'})",
        )
    console.print(table)
    _print_endpoints(endpoints)
    _print_autoscaler(cluster.autoscaler)


def _endpoints(settings: Settings) -> list[dict[str, Any]] | dict[str, str]:
    """Serve apps with their replicas per donor, or why they could not be listed."""
    from dgpt.exceptions import ServeError
    from dgpt.serve.deploy import endpoint_rows

    try:
        return endpoint_rows(settings)
    except ServeError as exc:
        return {"error": exc.message}


def _print_endpoints(endpoints: list[dict[str, Any]] | dict[str, str]) -> None:
    if isinstance(endpoints, dict):
        console.print(f"[yellow]endpoints: {endpoints['error']}[/]")
        return
    if not endpoints:
        console.print("endpoints: none (deploy one with `dgpt serve deploy deployments/digits.yaml`)")
        return
    table = Table("app", "route", "status", "replicas per donor", title="endpoints")
    for e in endpoints:
        table.add_row(e["app"], e["route"] or "-", e["status"],
                      " ".join(f"{d}:{n}" for d, n in e["replicas"].items()) or "-")
    console.print(table)


def _print_autoscaler(status: dict[str, Any]) -> None:
    if "error" in status:
        console.print(f"[yellow]{status['error']}[/]")
        return
    tick = status.get("last_tick", {})
    bounds = status.get("bounds", {})
    console.print(f"autoscaler: {status.get('ticks', 0)} ticks, {status.get('errors', 0)} errors; "
                  f"min/max active {bounds.get('min_active')}/{bounds.get('max_active')}; last tick: "
                  f"{tick.get('active', 0)} active, {tick.get('activating', 0)} activating, "
                  f"{tick.get('standby', 0)} standby, {tick.get('pending', 0)} pending shapes")
    recent = status.get("recent", [])[-8:]
    if recent:
        table = Table("when", "action", "donor", "reason", "result", title="autoscaler decisions (latest last)")
        for a in recent:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(a["at"])), a["action"], a["donor_id"],
                          a["reason"], ("ok: " if a["ok"] else "refused: ") + a["result"])
        console.print(table)


@app.command("env")
def env_cmd(home: Path | None = HomeOpt) -> None:
    """Print shell exports with which `ray job submit`, `ray status` and `serve deploy` reach the fabric."""
    from dgpt.head.process import shell_env

    for key, value in shell_env(_settings(home=home)).items():
        print(f"export {key}={value}")


@app.command("config")
def config_cmd(home: Path | None = HomeOpt) -> None:
    """Print every setting with its effective value (DGPT_* variables, config.toml, defaults)."""
    settings = _settings(home=home)
    table = Table("setting", "variable", "value", "meaning")
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "***" if name == "api_key" and value else str(value)
        table.add_row(name, f"DGPT_{name.upper()}", shown, field.description or "")
    console.print(table)


@app.command()
def demo(
    donors: int = typer.Option(3, "--donors", min=2, max=8, help="Simulated donors."),
    home: Path | None = HomeOpt,
) -> None:
    """Bring up a local fabric, run a real torch job on every donor, pause one donor mid-job, tear down."""
    from dgpt.cli.demo import run_demo

    raise typer.Exit(run_demo(_settings(home=home), donors, console))


# ------------------------------------------------------------------ head


@head_app.command("start")
def head_start(
    foreground: bool = typer.Option(False, "--foreground", help="Run in the foreground (systemd, containers)."),
    home: Path | None = HomeOpt,
) -> None:
    """Start the head: Ray head (token auth), dashboard/Jobs, Serve proxy, control plane, registry."""
    from dgpt.head.process import run_supervisor, start_head

    settings = _settings(home=home)
    if foreground:
        raise typer.Exit(run_supervisor(settings))
    with stage_progress(err_console, "starting the head") as say:
        start_head(settings, on_wait=lambda s: say(f"starting the head ({s:.0f}s)", min(s / 60, 0.95)))
    _print_addresses(settings)
    console.print("Create a join token for donors with [bold]dgpt token create[/].")


@head_app.command("stop")
def head_stop(home: Path | None = HomeOpt) -> None:
    """Stop the head started from this DGPT_HOME (by pid)."""
    from dgpt.head.process import stop_head

    if stop_head(_settings(home=home)):
        console.print("head stopped.")
    else:
        console.print("no head was running for this DGPT_HOME.")


# ------------------------------------------------------------------ donor


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
    head: str | None = typer.Option(None, "--head", help="Head URL, e.g. http://HEAD:8000 (DGPT_HEAD_URL)."),
    token: str | None = typer.Option(None, "--token", help="Join token from `dgpt token create`."),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the join token."),
    cpus: float | None = typer.Option(None, "--cpus", help="CPU cores to offer (default: all)."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", help="Memory to offer in GiB (default: half)."),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs to offer (default: all CUDA GPUs)."),
    disk_gb: float | None = typer.Option(None, "--disk-gb", help="Disk to offer to the storage tier, GiB."),
    device_class: str = typer.Option("desktop", "--device-class", help="laptop, desktop, gpu-rig, server, ..."),
    owner: str | None = typer.Option(None, "--owner", help="Failure domain (default: this host's name)."),
    labels: str | None = typer.Option(None, "--labels", help="Extra node labels k=v,k2=v2."),
    name: str | None = typer.Option(None, "--name", help="Donor name (default: host name)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Donor state folder (default $DGPT_HOME/donor)."),
    load_threshold: str = typer.Option("0.6", "--load-threshold", help="Owner load per core that pauses donation, or 'off'."),
    allowed_hours: str | None = typer.Option(None, "--allowed-hours", help="Hours to donate, e.g. 22-7 (DGPT_ALLOWED_HOURS)."),
) -> None:
    """Join this device to a dgpt fabric as a donor (blocks; Ctrl-C drains and leaves)."""
    import logging
    import socket

    from dgpt.donor.agent import AgentConfig, DonorAgent, install_signal_handlers
    from dgpt.donor.caps import build_caps, parse_labels
    from dgpt.donor.profile import measure
    from dgpt.sdk.models import DEVICE_CLASSES, check_name

    settings = _settings(head_url=head, allowed_hours=allowed_hours)
    if not settings.head_url:
        raise ConfigError("--head is required (or set DGPT_HEAD_URL)", hint="e.g. --head http://HEAD:8000")
    if token_file is not None:
        if not token_file.is_file():
            raise ConfigError(f"--token-file {token_file} does not exist")
        token = token_file.read_text().strip()
    if not token:
        raise ConfigError("--token (or --token-file) is required", hint="ask the operator: `dgpt token create`")
    if device_class not in DEVICE_CLASSES:
        raise ConfigError(f"--device-class {device_class!r} must be one of {', '.join(DEVICE_CLASSES)}")
    host = socket.gethostname().split(".")[0] or "donor"
    try:
        name = check_name(name or host, "--name")
        owner = check_name(owner or host, "--owner")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    threshold = _threshold(load_threshold)
    extra_labels = parse_labels(labels)
    state = state_dir or settings.home / "donor"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat drowns the log
    with console.status("profiling this device"):
        profile = measure(state)
    caps = build_caps(profile, cpus=cpus, memory_gb=memory_gb, gpus=gpus, disk_gb=disk_gb)
    console.print(f"profile: {profile.cpus} cores, {profile.memory_bytes / 2**30:.1f} GiB, "
                  f"{profile.cpu_gflops:.1f} CPU GFLOPS, {len(profile.gpus)} GPU(s); offering {caps.cpus:g} CPU, "
                  f"{caps.memory_bytes / 2**30:.1f} GiB, {caps.gpus} GPU")
    cfg = AgentConfig(
        head_url=settings.head_url, join_token=token, name=name, device_class=device_class, owner=owner,
        state_dir=state, caps=caps, profile=profile, labels=extra_labels, node_ip=settings.node_ip,
        load_threshold=threshold, allowed_hours=settings.allowed_hours, drain_deadline_s=settings.drain_deadline_s,
    )
    agent = DonorAgent(cfg)
    install_signal_handlers(agent)
    raise typer.Exit(agent.run())


def _donor_dir(home: Path | None, donor_id: str | None) -> Path:
    from dgpt.donor.agent import find_state_dir

    return find_state_dir(_settings(home=home).home, donor_id)


DonorIdOpt = typer.Option(None, "--donor-id", help="On the local fabric: the simulated donor (id or name).")


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
    assert pid is not None  # alive(pid) held above
    os.kill(int(pid), signal.SIGINT)
    with console.status("draining: running work finishes or moves, then the raylet stops"):
        done = wait_until(lambda: not alive(pid), wait_s)
    if not done:
        raise DonorError(f"the agent (pid {pid}) is still draining after {wait_s:g}s", hint="wait, or kill it")
    console.print("left the fabric; rejoin any time with `dgpt donor join` (the donor id is kept).")


# ------------------------------------------------------------------ jobs


@job_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def job_submit(
    ctx: typer.Context,
    working_dir: str | None = typer.Option(None, "--working-dir", help="runtime_env working_dir (a URI)."),
    runtime_env_json: str | None = typer.Option(None, "--runtime-env-json", help="runtime_env as JSON."),
    submission_id: str | None = typer.Option(None, "--submission-id"),
    home: Path | None = HomeOpt,
) -> None:
    """Submit a job: `dgpt job submit -- python train.py`."""
    entrypoint = " ".join(ctx.args).strip()
    if not entrypoint:
        raise ConfigError("the entrypoint is missing", hint="dgpt job submit -- python script.py")
    runtime_env: dict[str, Any] | None = None
    if runtime_env_json:
        try:
            runtime_env = json.loads(runtime_env_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--runtime-env-json is not valid JSON: {exc}") from None
        if not isinstance(runtime_env, dict):
            raise ConfigError("--runtime-env-json must be a JSON object")
    if working_dir:
        runtime_env = {**(runtime_env or {}), "working_dir": working_dir}
    with _client(_settings(home=home)) as client:
        job = client.submit_job(entrypoint, runtime_env, submission_id=submission_id)
    console.print(f"submitted [bold]{job.job_id}[/] ({job.status}); follow with `dgpt job logs {job.job_id}`")


@job_app.command("status")
def job_status(job_id: str, home: Path | None = HomeOpt) -> None:
    """Show a job's status."""
    with _client(_settings(home=home)) as client:
        job = client.job(job_id)
    console.print_json(job.model_dump_json())


@job_app.command("list")
def job_list(home: Path | None = HomeOpt) -> None:
    """List jobs."""
    with _client(_settings(home=home)) as client:
        jobs = client.jobs()
    table = Table("job", "status", "entrypoint")
    for job in jobs:
        table.add_row(job.job_id, job.status, job.entrypoint[:60])
    console.print(table)


@job_app.command("logs")
def job_logs(job_id: str, home: Path | None = HomeOpt) -> None:
    """Print a job's logs."""
    with _client(_settings(home=home)) as client:
        print(client.job_logs(job_id), end="")


@job_app.command("stop")
def job_stop(job_id: str, home: Path | None = HomeOpt) -> None:
    """Stop a job."""
    with _client(_settings(home=home)) as client:
        job = client.stop_job(job_id)
    console.print(f"{job.job_id}: {job.status}")


# ------------------------------------------------------------------ tokens


@token_app.command("create")
def token_create(
    kind: str = typer.Option("join", "--kind", help="join (for donors) or api (for apps)."),
    label: str = typer.Option("", "--label", help="A note to recognise it by."),
    home: Path | None = HomeOpt,
) -> None:
    """Create a join token (donors) or API key (apps); the secret is shown once."""
    if kind not in ("join", "api"):
        raise ConfigError(f"--kind {kind!r} must be 'join' or 'api'")
    with _client(_settings(home=home)) as client:
        token = client.create_token(kind, label)
    console.print(f"{kind} token {token.token_id}: [bold]{token.token}[/] (shown once; store it safely)")


@token_app.command("list")
def token_list(home: Path | None = HomeOpt) -> None:
    """List tokens (never their secrets)."""
    with _client(_settings(home=home)) as client:
        tokens = client.tokens()
    table = Table("id", "kind", "label", "created", "revoked")
    for t in tokens:
        table.add_row(t.token_id, t.kind, t.label, time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at)),
                      "yes" if t.revoked_at else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, home: Path | None = HomeOpt) -> None:
    """Revoke a token: donors and apps using it are refused from now on."""
    with _client(_settings(home=home)) as client:
        client.revoke_token(token_id)
    console.print(f"revoked {token_id}")


def _debug() -> bool:
    try:
        return load_settings().debug
    except DgptError:
        return False


def main() -> None:
    """Entry point: typed errors print their message and next step; tracebacks only with DGPT_DEBUG=1.

    Usage errors (unknown flags, out-of-range values) are typer's own: it names the flag and exits 2.
    """
    try:
        app()
    except DgptError as exc:
        if _debug():
            raise
        err_console.print(f"[red]error:[/] {exc.message}")
        if exc.hint:
            err_console.print(f"  [yellow]->[/] {exc.hint}")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


if __name__ == "__main__":
    main()
