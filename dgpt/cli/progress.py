"""Progress display for long CLI operations: a live bar on a terminal, plain lines in logs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_ELAPSED = re.compile(r"\s*\(\d+s\)")


@contextmanager
def stage_progress(console: Console, first: str) -> Iterator[Callable[[str, float], None]]:
    """Yield ``say(message, fraction)``: it moves a live bar, or prints each new message once.

    Off a terminal (CI logs, pipes) rich draws no live bar, so every change of message is
    printed as a line instead: a long operation always shows where it is.
    """
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    task = progress.add_task(first, total=1.0)
    last = [""]

    def say(message: str, fraction: float) -> None:
        progress.update(task, description=message, completed=fraction)
        key = _ELAPSED.sub("", message)  # a ticking "(12s)" is not news in a log
        if not console.is_terminal and key != last[0]:
            console.print(f"  {message}")
        last[0] = key

    with progress:
        yield say
