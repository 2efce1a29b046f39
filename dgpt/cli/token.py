"""`dgpt token`: join tokens for donors and API keys for apps."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from dgpt.cli.context import HomeOpt, client, console, settings
from dgpt.exceptions import ConfigError

token_app = typer.Typer(help="Join tokens for donors and API keys for apps.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    kind: str = typer.Option("join", "--kind", help="join (for donors) or api (for apps)."),
    label: str = typer.Option("", "--label", help="A note to recognise it by."),
    home: Path | None = HomeOpt,
) -> None:
    """Create a join token (donors) or API key (apps); the secret is shown once."""
    if kind not in ("join", "api"):
        raise ConfigError(f"--kind {kind!r} must be 'join' or 'api'")
    with client(settings(home=home)) as c:
        token = c.create_token(kind, label)
    console.print(f"{kind} token {token.token_id}: [bold]{token.token}[/] (shown once; store it safely)")


@token_app.command("list")
def token_list(home: Path | None = HomeOpt) -> None:
    """List tokens (never their secrets)."""
    with client(settings(home=home)) as c:
        tokens = c.tokens()
    table = Table("id", "kind", "label", "created", "revoked")
    for t in tokens:
        table.add_row(t.token_id, t.kind, t.label, time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at)),
                      "yes" if t.revoked_at else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, home: Path | None = HomeOpt) -> None:
    """Revoke a token: donors and apps using it are refused from now on."""
    with client(settings(home=home)) as c:
        c.revoke_token(token_id)
    console.print(f"revoked {token_id}")
