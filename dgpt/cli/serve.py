"""`dgpt serve`: deploy Serve config files to the fabric, list endpoints and replicas, delete one."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from dgpt.cli.context import HomeOpt, console, err_console
from dgpt.cli.progress import stage_progress
from dgpt.config import load_settings
from dgpt.serve import deploy as serve_deploy

serve_app = typer.Typer(help="Inference endpoints: deploy Serve apps onto donors, see them, delete them.",
                        no_args_is_help=True)

def _replicas_text(per_donor: dict[str, int]) -> str:
    return " ".join(f"{donor}:{n}" for donor, n in per_donor.items()) or "-"


@serve_app.command("deploy")
def deploy_cmd(
    config: Path = typer.Argument(..., help="Serve config YAML (the `serve deploy` format)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every app is RUNNING."),
    timeout_s: float = typer.Option(300.0, "--timeout-s", min=1, help="How long to wait for RUNNING."),
    home: Path | None = HomeOpt,
) -> None:
    """Deploy the applications of CONFIG onto the fabric's donors; other apps keep running."""
    settings = load_settings({"home": home})
    names = serve_deploy.deploy(settings, config)
    console.print(f"Serve accepted {config}: {', '.join(names)}")
    if not wait:
        console.print("follow with [bold]dgpt serve status[/]")
        return

    with stage_progress(err_console, "waiting for replicas") as say:
        def on_wait(current: serve_deploy.ServeStatus, elapsed_s: float) -> None:
            apps = [current.app(n) for n in names]
            parts = [f"{a.name} {a.status} ({sum(a.replicas_per_donor().values())} replicas)"
                     for a in apps if a is not None]
            done = sum(1 for a in apps if a is not None and a.status == "RUNNING")
            say(f"{'; '.join(parts) or 'starting'} ({elapsed_s:.0f}s)", done / len(names))

        current = serve_deploy.wait_running(settings, names, timeout_s=timeout_s, on_wait=on_wait)
    for name in names:
        app = current.app(name)
        assert app is not None  # wait_running returns only once every app exists
        console.print(f"[green]{name} RUNNING[/] at {settings.serve_url}{app.route_prefix or ''} "
                      f"replicas per donor: {_replicas_text(app.replicas_per_donor())}")


@serve_app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    home: Path | None = HomeOpt,
) -> None:
    """List Serve applications, their deployments, and replicas per donor."""
    settings = load_settings({"home": home})
    current = serve_deploy.status(settings)
    if as_json:
        print(json.dumps({"applications": [
            {
                "name": a.name, "route_prefix": a.route_prefix, "status": a.status, "message": a.message,
                "from_config": a.from_config, "replicas_per_donor": a.replicas_per_donor(),
                "deployments": [
                    {"name": d.name, "status": d.status, "message": d.message, "target_replicas": d.target_replicas,
                     "replicas": [{"replica_id": r.replica_id, "state": r.state, "node_id": r.node_id,
                                   "donor": r.donor} for r in d.replicas]}
                    for d in a.deployments
                ],
            }
            for a in current.apps
        ]}, indent=2))
        return
    table = Table(title=f"Serve applications ({len(current.apps)})")
    for col in ("app", "route", "status", "deployment", "deployment status", "replicas per donor"):
        table.add_column(col)
    for a in current.apps:
        for i, d in enumerate(a.deployments or ()):
            per_donor: dict[str, int] = {}
            for r in d.replicas:
                if r.state == "RUNNING":
                    per_donor[r.donor] = per_donor.get(r.donor, 0) + 1
            table.add_row(a.name if i == 0 else "", (a.route_prefix or "-") if i == 0 else "",
                          a.status if i == 0 else "", d.name, d.status, _replicas_text(dict(sorted(per_donor.items()))))
        if not a.deployments:
            table.add_row(a.name, a.route_prefix or "-", a.status, "-", "-", "-")
    console.print(table)
    for a in current.apps:
        if a.status != "RUNNING" and a.message.strip():
            console.print(f"[yellow]{a.name}[/]: {a.message.strip()[-600:]}")


@serve_app.command("delete")
def delete_cmd(
    app_name: str = typer.Argument(..., metavar="APP", help="Application name (see `dgpt serve status`)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the app is gone."),
    home: Path | None = HomeOpt,
) -> None:
    """Delete one application deployed with `dgpt serve deploy`; the others keep running."""
    settings = load_settings({"home": home})
    serve_deploy.delete(settings, app_name)
    if wait:
        with console.status(f"deleting {app_name}: replicas finish their requests, then stop"):
            serve_deploy.wait_deleted(settings, app_name)
    console.print(f"deleted {app_name}")
