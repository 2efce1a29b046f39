"""`dgpt storage`: files on the donors' storage tier (put, get, ls, rm) and its durability (status)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from dgpt.cli.context import HomeOpt, client, console, settings
from dgpt.exceptions import ConfigError

storage_app = typer.Typer(help="Files on the donors' storage tier: put, get, ls, rm, status.", no_args_is_help=True)

#: Bytes read from a local file per request chunk.
CHUNK_BYTES = 8 << 20


def _chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    task = progress.add_task(f"put {path.name}", total=path.stat().st_size) if progress else None
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))
            yield chunk


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@storage_app.command("put")
def storage_put(
    local: Path = typer.Argument(..., help="The local file to store."),
    remote: str = typer.Argument(..., help="Its path in the storage tier, e.g. data/train.parquet."),
    no_overwrite: bool = typer.Option(False, "--no-overwrite", help="Fail if the path exists."),
    home: Path | None = HomeOpt,
) -> None:
    """Store a local file; it becomes visible once every piece is stored."""
    if not local.is_file():
        raise ConfigError(f"LOCAL {local} is not a file", hint="give the path of an existing file")
    progress = Progress(*Progress.get_default_columns()[:2], DownloadColumn(), TransferSpeedColumn(), console=console,
                        transient=True) if local.stat().st_size > CHUNK_BYTES else None
    with client(settings(home=home)) as c:
        if progress is None:
            entry = c.storage_put(remote, local.read_bytes(), overwrite=not no_overwrite)
        else:
            with progress:
                entry = c.storage_put(remote, _chunks(local, progress), overwrite=not no_overwrite)
    console.print(f"stored [bold]{entry.path}[/] ({_size(entry.size)}, {entry.profile})")


@storage_app.command("get")
def storage_get(
    remote: str = typer.Argument(..., help="The path in the storage tier."),
    local: Path | None = typer.Argument(None, help="Where to write it (default: its name here; '-': stdout)."),
    home: Path | None = HomeOpt,
) -> None:
    """Fetch a file; every piece is checked against its hash on the way."""
    with client(settings(home=home)) as c:
        if local is not None and str(local) == "-":
            n = c.storage_download(remote, sys.stdout.buffer)
            return
        target = local or Path(remote.rstrip("/").rsplit("/", 1)[-1])
        if target.is_dir():
            target = target / remote.rstrip("/").rsplit("/", 1)[-1]
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as out, Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                                     console=console, transient=True):
                n = c.storage_download(remote, out)
        except BaseException:
            partial.unlink(missing_ok=True)  # no half-written file under the real name
            raise
        partial.replace(target)
    console.print(f"wrote {target} ({_size(n)})")


@storage_app.command("ls")
def storage_ls(path: str = typer.Argument("", help="A directory (default: the root)."), home: Path | None = HomeOpt) -> None:
    """List a directory."""
    with client(settings(home=home)) as c:
        entries = c.storage_ls(path)
    table = Table("path", "type", "size", "profile")
    for e in entries:
        table.add_row(e.path + ("/" if e.type == "directory" else ""), e.type,
                      _size(e.size) if e.type == "file" else "", e.profile or "")
    console.print(table)


@storage_app.command("rm")
def storage_rm(
    path: str = typer.Argument(..., help="A file, or a directory."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="A directory: its files too."),
    home: Path | None = HomeOpt,
) -> None:
    """Delete a file (or a directory)."""
    with client(settings(home=home)) as c:
        removed = c.storage_rm(path, recursive=recursive)
    console.print(f"deleted {path}" + (f" ({len(removed)} file(s))" if len(removed) != 1 else ""))


_STATE_STYLE = {"healthy": "green", "repair due": "yellow", "unreadable": "red", "lost": "bold red"}


@storage_app.command("status")
def storage_status(home: Path | None = HomeOpt) -> None:
    """Durability of every file, the repair backlog, and the donors of the storage tier."""
    with client(settings(home=home)) as c:
        status = c.storage_status()
    files = Table("file", "size", "profile", "segments", "durable (worst)", "online (worst)", "can lose", "state",
                  title="files")
    for f in status.files:
        files.add_row(f.path, _size(f.size), f"{f.k} of {f.n}", str(f.segments), f"{f.min_durable}/{f.n}",
                      f"{f.min_readable}/{f.n}", str(f.losses_tolerated),
                      f"[{_STATE_STYLE[f.state]}]{f.state}[/]")
    console.print(files)
    donors = Table("donor", "owner", "state", "used", "capacity", "pieces", "audits ok/failed", title="donors")
    for d in status.donors:
        donors.add_row(d.donor_id, d.owner, d.state, _size(d.used_bytes), _size(d.capacity_bytes), str(d.pieces),
                       f"{d.audits_passed}/{d.audits_failed}")
    console.print(donors)
    console.print(f"repair backlog: [bold]{status.repair_backlog}[/] segment(s); lost: {status.lost_segments}; "
                  f"eligible donors: {status.eligible_donors}; new files get: {status.profile or 'none'}")
    if status.profile_warning:
        console.print(f"[yellow]note:[/] {status.profile_warning}")
