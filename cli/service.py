"""``likeness worker`` and ``likeness serve``: the job service's processes."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.output import fail
from likeness.errors import LikenessError


def worker_command(
    once: Annotated[bool, typer.Option("--once", help="run at most one batch, then exit")] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="most jobs per batched search (default: LIKENESS_BATCH_SIZE, else the size "
            "measured fastest for the device and precision)",
        ),
    ] = None,
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="stop when this process is gone (used by serve)")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="run nothing: exit 0 if a worker on this host heartbeated within "
            "LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS, else 1 (a container healthcheck)",
        ),
    ] = False,
) -> None:
    """Run queued jobs: claim compatible ones, search them as one batch, store results.

    Settings come from LIKENESS_* variables (store, generator, device, ...).
    SIGTERM or Ctrl-C: finish the current batch, then exit 0; twice: abandon it.
    """
    if check:
        from likeness.settings import get_settings
        from likeness.worker_health import run_check

        health = run_check(get_settings())
        typer.echo(health.message)
        raise typer.Exit(0 if health.healthy else 1)

    from worker.process import main as run_worker

    try:
        code = run_worker(once=once, batch_size=batch_size, parent_pid=parent_pid)
    except LikenessError as e:
        fail(e.message)
    raise typer.Exit(code)


def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
) -> None:
    """Run the HTTP API and one worker (jobs in LIKENESS_DATA_DIR); Ctrl-C stops both."""
    from cli.serve import serve

    raise typer.Exit(serve(host, port))
