"""`dgpt head`: run the head on a server (Ray head, dashboard/Jobs, Serve proxy, control plane)."""

from __future__ import annotations

from pathlib import Path

import typer

from dgpt.cli.context import HomeOpt, console, err_console, settings
from dgpt.cli.progress import stage_progress

head_app = typer.Typer(help="Run the head on a server.", no_args_is_help=True)


@head_app.command("start")
def head_start(
    foreground: bool = typer.Option(False, "--foreground", help="Run in the foreground (systemd, containers)."),
    node_ip: str | None = typer.Option(None, "--node-ip", help="Address donors reach this machine at (DGPT_NODE_IP)."),
    home: Path | None = HomeOpt,
) -> None:
    """Start the head: Ray head (token auth), dashboard/Jobs, Serve proxy, control plane, registry."""
    from dgpt.cli.fabric import print_addresses
    from dgpt.head.process import advertised, run_supervisor, start_head

    s = advertised(settings(home=home, node_ip=node_ip))
    if foreground:
        raise typer.Exit(run_supervisor(s))
    with stage_progress(err_console, "starting the head") as say:
        start_head(s, on_wait=lambda t: say(f"starting the head ({t:.0f}s)", min(t / 60, 0.95)))
    print_addresses(s)
    console.print("Create a join token for donors with [bold]dgpt token create[/].")


@head_app.command("stop")
def head_stop(home: Path | None = HomeOpt) -> None:
    """Stop the head started from this DGPT_HOME (by pid)."""
    from dgpt.head.process import stop_head

    if stop_head(settings(home=home)):
        console.print("head stopped.")
    else:
        console.print("no head was running for this DGPT_HOME.")
