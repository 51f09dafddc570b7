"""Is a worker alive on this host? ``likeness worker --check``, a container healthcheck.

A worker's id is ``<hostname>-<pid>-<random>``, and every claim and every lease
renewal records its heartbeat in the job store. So a worker on this host is
healthy when some id of this host heartbeated within
``LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS`` (the window ``/readyz`` uses).
Every container has its own host name, so each replica of
``docker compose up --scale worker=N`` checks its own worker, not the pool.

Torch-free, and it loads no model: a healthcheck must answer in a second.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from dataclasses import dataclass

from likeness.jobs import JobStore, open_store_from_settings
from likeness.settings import Settings

_WORKER_SUFFIX = re.compile(r"\d+-[0-9a-f]+")


def new_worker_id(hostname: str | None = None) -> str:
    """Unique per process and readable in logs: host, pid, and a few random bytes."""
    return f"{hostname or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def runs_on(worker_id: str, hostname: str) -> bool:
    """Whether ``worker_id`` came from ``new_worker_id`` on ``hostname``.

    The whole suffix is checked, so host ``gpu`` does not claim the workers of ``gpu-2``.
    """
    prefix = f"{hostname}-"
    return worker_id.startswith(prefix) and bool(_WORKER_SUFFIX.fullmatch(worker_id[len(prefix) :]))


@dataclass(frozen=True)
class WorkerHealth:
    healthy: bool
    message: str


def check_worker(
    store: JobStore, hostname: str, max_age_seconds: float, *, now: float | None = None
) -> WorkerHealth:
    """Healthy when a worker on ``hostname`` heartbeated within ``max_age_seconds``."""
    now = time.time() if now is None else now
    mine = {w: t for w, t in store.worker_heartbeats().items() if runs_on(w, hostname)}
    if not mine:
        return WorkerHealth(False, f"no worker on host {hostname} has heartbeated yet")
    worker, last = max(mine.items(), key=lambda item: item[1])
    age = now - last.timestamp()
    if age > max_age_seconds:
        return WorkerHealth(
            False,
            f"worker {worker} last heartbeated {age:.0f} s ago "
            f"(limit LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS={max_age_seconds:g})",
        )
    return WorkerHealth(True, f"worker {worker} heartbeated {max(age, 0.0):.1f} s ago")


def run_check(settings: Settings, hostname: str | None = None) -> WorkerHealth:
    """Open the store of ``settings``, check this host's worker, close the store."""
    hostname = hostname or socket.gethostname()
    try:
        store = open_store_from_settings(settings)
        try:
            return check_worker(store, hostname, settings.worker_heartbeat_timeout_seconds)
        finally:
            store.close()
    except Exception as exc:  # any backend's connection error: report it, do not crash
        return WorkerHealth(False, f"cannot read the job store: {exc}")
