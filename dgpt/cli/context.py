"""What every `dgpt` command shares: the consoles, the --home option, settings and the API client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dgpt.config import Settings, load_settings
from dgpt.sdk.client import Client

console = Console()
err_console = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="State folder (default $DGPT_HOME or ~/.dgpt).")


def settings(**overrides: Any) -> Settings:
    """The settings with CLI flags (``None``: not given) winning over everything else."""
    return load_settings(overrides)


def client(s: Settings) -> Client:
    """A client for this DGPT_HOME's head, with the head's API key unless DGPT_API_KEY is set."""
    from dgpt.head.fabric import api_client

    return api_client(s)


def home_path(home: Path | None) -> Path:
    return settings(home=home).home
