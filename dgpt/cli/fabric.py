"""Fabric commands on the root: `dgpt up|down|status|env|config|demo`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from dgpt.cli.context import HomeOpt, client, console, err_console, settings
from dgpt.cli.progress import stage_progress
from dgpt.config import Settings

#: Donors `dgpt status` lists; the rest are counted (see `dgpt donor list` for pages).
STATUS_DONORS = 50


def register(app: typer.Typer) -> None:
    """Add the fabric commands to the root app."""
    app.command()(up)
    app.command()(down)
    app.command()(status)
    app.command("env")(env_cmd)
    app.command("config")(config_cmd)
    app.command()(demo)


def up(
    donors: int = typer.Option(3, "--donors", "-n", min=0, max=16, help="Simulated donors to start."),
    home: Path | None = HomeOpt,
    ray_port: int | None = typer.Option(None, help="GCS port (DGPT_RAY_PORT)."),
    dashboard_port: int | None = typer.Option(None, help="Dashboard/Jobs port (DGPT_DASHBOARD_PORT)."),
    http_port: int | None = typer.Option(None, help="Serve HTTP port (DGPT_HTTP_PORT)."),
    api_port: int | None = typer.Option(None, help="Control-plane API port (DGPT_API_PORT)."),
    min_active: int | None = typer.Option(
        None, "--min-active", min=0, help="Donors kept active; the rest wait for demand (default: all)."),
) -> None:
    """Start a head and N simulated donors on this machine, in the background."""
    from dgpt.head import fabric

    s = settings(home=home, ray_port=ray_port, dashboard_port=dashboard_port, http_port=http_port,
                 api_port=api_port)
    if s.node_ip is None:
        s = s.model_copy(update={"node_ip": "127.0.0.1"})
    with stage_progress(err_console, "starting") as say:
        fabric.up(s, donors, progress=say, min_active=min_active)
    print_addresses(s)
    console.print(f"[green]fabric up[/] with {donors} donor(s). Stop it with [bold]dgpt down[/].")


def down(home: Path | None = HomeOpt) -> None:
    """Stop everything `dgpt up` started (by pid), donors first."""
    from dgpt.head import fabric

    with stage_progress(err_console, "stopping") as say:
        result = fabric.down(settings(home=home), progress=say)
    console.print(f"stopped {result['donors']} donor(s) and {result['head']} head.")


def head_block(s: Settings) -> dict[str, Any]:
    from dgpt.head.process import head_addresses, shell_env

    return {**head_addresses(s), "env": shell_env(s)}


def print_addresses(s: Settings) -> None:
    head = head_block(s)
    table = Table(title="dgpt head", show_header=False)
    for key in ("ray_address", "dashboard_url", "api_url", "serve_url", "api_fingerprint"):
        if key in head:
            table.add_row(key, head[key])
    console.print(table)
    console.print("Plain Ray tools: [bold]eval \"$(dgpt env)\"[/] then `ray job submit -- python script.py`.")
    console.print(f"Donors join with [bold]dgpt donor join --head {s.local_head_url} --token ...[/]")


def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    home: Path | None = HomeOpt,
) -> None:
    """Show the head, donors by state, the first donors, endpoints and the autoscaler."""
    s = settings(home=home)
    head = head_block(s)
    with client(s) as c:
        page = c.donors_page(limit=STATUS_DONORS)
        cluster = c.cluster()
        credit = {x.donor_id: x for x in c.credits()}
    donors = page.items
    data: dict[str, Any] = {
        "head": head,
        "donors_by_state": cluster.donors_by_state,
        "donors_total": page.total,
        "donors": [
            {
                "donor_id": d.donor_id, "name": d.name, "state": d.state.value, "device_class": d.device_class,
                "owner": d.owner, "node_id": d.node_id, "resources": d.resources, "labels": d.labels,
                "owner_active": d.owner_active, "reliability": d.reliability, "trust": d.trust,
                "sessions_total": d.sessions_total,
                "credit": credit[d.donor_id].total_credit if d.donor_id in credit else 0.0,
                "recent_average_credit": credit[d.donor_id].recent_average_credit if d.donor_id in credit else 0.0,
                "problem": d.problem,
                "network": _network(d.relayed), "overlay_ip": d.overlay_ip,
                "logs": str(s.home / "logs" / f"{d.name}.log"),
                "sessions": [{"started_at": x.started_at, "ended_at": x.ended_at,
                              "ended_as": x.ended_as.value if x.ended_as else None,
                              "end_reason": x.end_reason, "node_id": x.node_id} for x in d.sessions],
                "profile": d.profile.model_dump(),
            }
            for d in donors
        ],
        "autoscaler": cluster.autoscaler,
        "endpoints": _endpoints(s),
        "rogue_nodes": [r.model_dump() for r in cluster.rogue_nodes],
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print_addresses(s)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(cluster.donors_by_state.items())) or "none"
    console.print(f"donors: {counts}")
    table = Table(title=f"donors ({len(donors)}" + (f" of {page.total})" if page.total else ")"))
    for col in ("donor", "name", "state", "class", "owner", "node", "network", "CPU", "mem GiB", "GFLOPS", "P(stay 1h)",
                "trust", "sessions", "credit (RAC/day)"):
        table.add_column(col)
    for d in donors:
        ended = [x.ended_as.value for x in d.sessions if x.ended_as]
        table.add_row(
            d.donor_id, d.name, d.state.value + (" (owner)" if d.owner_active else ""), d.device_class, d.owner,
            (d.node_id or "-")[:8], _network(d.relayed) or "-", f"{d.resources.get('CPU', 0):g}", f"{d.resources.get('memory', 0) / 2**30:.1f}",
            f"{d.profile.cpu_gflops:.0f}", f"{d.reliability:.2f}" if d.reliability is not None else "-",
            f"{d.trust:.2f}" if d.trust is not None else "-",
            f"{d.sessions_total} ({', '.join(ended[-3:]) or 'open'})",
            f"{credit[d.donor_id].total_credit:.2f} ({credit[d.donor_id].recent_average_credit:.1f})"
            if d.donor_id in credit else "0",
        )
    console.print(table)
    for d in donors:
        if d.problem:
            console.print(f"[yellow]{d.name} is not activated:[/] {d.problem}")
    for r in cluster.rogue_nodes:
        console.print(f"[red]Ray node {r.node_id[:8]} at {r.address} is not as granted:[/] {r.reason}; "
                      + ("gone from Ray" if r.gone_at is not None else
                         "drained, kept out of placement" if r.drain_requested else "drain not accepted yet"))
    if page.next_cursor:
        console.print(f"more donors: `dgpt donor list --after {page.next_cursor}`")
    console.print(f"logs: {s.home / 'logs'}/<donor>.log (agents), $DGPT_HOME/donors/<donor>/raylet.log (`ray start`)")
    _print_endpoints(data["endpoints"])
    _print_autoscaler(cluster.autoscaler)


def _network(relayed: bool | None) -> str | None:
    """How Ray reaches a donor: ``direct``, ``relayed`` (through the head's overlay), or not known yet."""
    return None if relayed is None else ("relayed" if relayed else "direct")


def _endpoints(s: Settings) -> list[dict[str, Any]] | dict[str, str]:
    """Serve apps with their replicas per donor, or why they could not be listed."""
    from dgpt.exceptions import ServeError
    from dgpt.serve.deploy import endpoint_rows

    try:
        return endpoint_rows(s)
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


def _print_autoscaler(state: dict[str, Any]) -> None:
    if "error" in state:
        console.print(f"[yellow]{state['error']}[/]")
        return
    tick = state.get("last_tick", {})
    bounds = state.get("bounds", {})
    console.print(f"autoscaler: {state.get('ticks', 0)} ticks, {state.get('errors', 0)} errors; "
                  f"min/max active {bounds.get('min_active')}/{bounds.get('max_active')}; last tick: "
                  f"{tick.get('active', 0)} active, {tick.get('activating', 0)} activating, "
                  f"{tick.get('standby', 0)} standby, {tick.get('pending', 0)} pending shapes")
    recent = state.get("recent", [])[-8:]
    if recent:
        table = Table("when", "action", "donor", "reason", "result", title="autoscaler decisions (latest last)")
        for a in recent:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(a["at"])), a["action"], a["donor_id"],
                          a["reason"], ("ok: " if a["ok"] else "refused: ") + a["result"])
        console.print(table)


def env_cmd(home: Path | None = HomeOpt) -> None:
    """Print shell exports with which `ray job submit`, `ray status` and `serve deploy` reach the fabric."""
    from dgpt.head.process import shell_env

    for key, value in shell_env(settings(home=home)).items():
        print(f"export {key}={value}")


def config_cmd(home: Path | None = HomeOpt) -> None:
    """Print every setting with its effective value (DGPT_* variables, config.toml, defaults)."""
    s = settings(home=home)
    table = Table("setting", "variable", "value", "meaning")
    for name, field in Settings.model_fields.items():
        value = getattr(s, name)
        shown = "***" if name == "api_key" and value else str(value)
        table.add_row(name, f"DGPT_{name.upper()}", shown, field.description or "")
    console.print(table)


def demo(
    donors: int = typer.Option(3, "--donors", min=2, max=8, help="Simulated donors."),
    home: Path | None = HomeOpt,
) -> None:
    """Bring up a local fabric, run a real torch job on every donor, pause one donor mid-job, tear down."""
    from dgpt.cli.demo import run_demo

    raise typer.Exit(run_demo(settings(home=home), donors, console))
