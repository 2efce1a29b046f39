"""The `dgpt` command: one typer sub-app per noun, thin over the SDK and head functions."""

from __future__ import annotations

import sys

import typer

from dgpt.cli import fabric
from dgpt.cli.context import err_console
from dgpt.cli.donor import donor_app
from dgpt.cli.head import head_app
from dgpt.cli.job import job_app
from dgpt.cli.serve import serve_app
from dgpt.cli.storage import storage_app
from dgpt.cli.token import token_app
from dgpt.config import load_settings
from dgpt.exceptions import ConfigError, DgptError

app = typer.Typer(help="dgpt: donated idle devices as one elastic Ray fabric.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
fabric.register(app)
app.add_typer(head_app, name="head")
app.add_typer(donor_app, name="donor")
app.add_typer(job_app, name="job")
app.add_typer(token_app, name="token")
app.add_typer(serve_app, name="serve")
app.add_typer(storage_app, name="storage")


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
