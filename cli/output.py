"""What every command shares: the error console, failing with an exit code, progress bars,
the command line as typed (for provenance)."""

from __future__ import annotations

import shlex
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2
EXIT_NOT_ACCEPTED = 3


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def typed_command() -> str:
    """This process's command line as a user would retype it, for a manifest's provenance."""
    return shlex.join(["likeness", *sys.argv[1:]])


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
