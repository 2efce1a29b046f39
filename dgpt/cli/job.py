"""`dgpt job`: submit and follow jobs through the REST API (Ray Jobs on the fabric)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from dgpt.cli.context import HomeOpt, client, console, settings
from dgpt.exceptions import ConfigError

job_app = typer.Typer(help="Submit and follow jobs through the REST API.", no_args_is_help=True)


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
    with client(settings(home=home)) as c:
        job = c.submit_job(entrypoint, runtime_env, submission_id=submission_id)
    console.print(f"submitted [bold]{job.job_id}[/] ({job.status}); follow with `dgpt job logs {job.job_id}`")


@job_app.command("status")
def job_status(job_id: str, home: Path | None = HomeOpt) -> None:
    """Show a job's status."""
    with client(settings(home=home)) as c:
        job = c.job(job_id)
    console.print_json(job.model_dump_json())


@job_app.command("list")
def job_list(home: Path | None = HomeOpt) -> None:
    """List jobs."""
    with client(settings(home=home)) as c:
        jobs = c.jobs()
    table = Table("job", "status", "entrypoint")
    for job in jobs:
        table.add_row(job.job_id, job.status, job.entrypoint[:60])
    console.print(table)


@job_app.command("logs")
def job_logs(job_id: str, home: Path | None = HomeOpt) -> None:
    """Print a job's logs."""
    with client(settings(home=home)) as c:
        print(c.job_logs(job_id), end="")


@job_app.command("stop")
def job_stop(job_id: str, home: Path | None = HomeOpt) -> None:
    """Stop a job."""
    with client(settings(home=home)) as c:
        job = c.stop_job(job_id)
    console.print(f"{job.job_id}: {job.status}")
