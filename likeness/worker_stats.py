"""Worker counters (batches, batch sizes, jobs, step and job durations) for /metrics.

The worker is not an HTTP server, so it writes its counters as a small JSON
file under ``<data_dir>/workers/`` and the API renders every fresh file in its
Prometheus exposition. That covers ``likeness serve`` and any deployment where
the API and the workers share the data directory (a docker volume); workers on
other hosts keep their files locally. Torch-free: the API imports this.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

# Files not rewritten for this long belong to workers that are gone: their series end
# instead of lingering. A live worker rewrites its file at least every REFRESH_SECONDS.
MAX_AGE_SECONDS = 3600.0
REFRESH_SECONDS = 60.0
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerStats(BaseModel):
    """Counters of one worker process since it started (Prometheus handles restarts)."""

    worker: str = Field(..., description="Worker id: host-pid-random.")
    updated: float = Field(default_factory=time.time, description="Unix time of the last write.")
    batch_sizes: dict[int, int] = Field(
        default_factory=dict, description="Jobs in one batched search -> how many such searches."
    )
    jobs: dict[str, int] = Field(
        default_factory=dict, description="Final status this worker gave -> number of jobs."
    )
    job_seconds_sum: float = Field(default=0.0, description="Claim-to-finish time of its jobs.")
    job_seconds_count: int = 0
    step_seconds_sum: float = Field(default=0.0, description="Wall time of its search steps.")
    step_seconds_count: int = 0

    def record_batch(self, size: int) -> None:
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def record_job(self, status: str, seconds: float) -> None:
        self.jobs[status] = self.jobs.get(status, 0) + 1
        self.job_seconds_sum += seconds
        self.job_seconds_count += 1

    def record_steps(self, steps: int, seconds: float) -> None:
        self.step_seconds_sum += seconds
        self.step_seconds_count += steps


def stats_dir(data_dir: Path) -> Path:
    return data_dir / "workers"


def _file(directory: Path, worker: str) -> Path:
    # Worker ids come from hostnames; keep the file name to a safe alphabet.
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker)
    return directory / f"{safe}.json"


def write_stats(stats: WorkerStats, directory: Path) -> None:
    """Replace the worker's file atomically, so a scrape never reads half of it."""
    directory.mkdir(parents=True, exist_ok=True)
    stats.updated = time.time()
    target = _file(directory, stats.worker)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(stats.model_dump_json())
    tmp.replace(target)


def read_stats(directory: Path, *, now: float | None = None) -> list[WorkerStats]:
    """Every fresh, readable worker file, by worker id."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            stats = WorkerStats.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, json.JSONDecodeError):
            continue  # a worker may be replacing it right now, or it is not ours
        if now - stats.updated <= MAX_AGE_SECONDS:
            found.append(stats)
    return found


def remove_stale(directory: Path, *, now: float | None = None) -> None:
    """Delete files of workers gone for longer than MAX_AGE_SECONDS (restarts add new ids)."""
    now = time.time() if now is None else now
    for path in directory.glob("*.json") if directory.is_dir() else []:
        try:
            if now - path.stat().st_mtime > MAX_AGE_SECONDS:
                path.unlink()
        except OSError:
            continue


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(workers: Iterable[WorkerStats]) -> list[str]:
    """Prometheus text lines for these workers (HELP/TYPE once per family)."""
    workers = list(workers)
    if not workers:
        return []
    lines = [
        "# HELP likeness_worker_batch_size Jobs run together in one batched search.",
        "# TYPE likeness_worker_batch_size histogram",
    ]
    for w in workers:
        wl = f'worker="{_label(w.worker)}"'
        for bound in BATCH_SIZE_BUCKETS:
            count = sum(n for size, n in w.batch_sizes.items() if size <= bound)
            lines.append(f'likeness_worker_batch_size_bucket{{{wl},le="{bound}"}} {count}')
        total = sum(w.batch_sizes.values())
        jobs = sum(size * n for size, n in w.batch_sizes.items())
        lines += [
            f'likeness_worker_batch_size_bucket{{{wl},le="+Inf"}} {total}',
            f"likeness_worker_batch_size_sum{{{wl}}} {jobs}",
            f"likeness_worker_batch_size_count{{{wl}}} {total}",
        ]
    lines += [
        "# HELP likeness_worker_jobs_total Jobs a worker finished, by final status.",
        "# TYPE likeness_worker_jobs_total counter",
    ]
    for w in workers:
        wl = f'worker="{_label(w.worker)}"'
        for status, n in sorted(w.jobs.items()):
            lines.append(f'likeness_worker_jobs_total{{{wl},status="{_label(status)}"}} {n}')
    for name, help_text in (
        ("job_seconds", "Time from claiming a job to finishing it."),
        ("step_seconds", "Wall time of one step of a batched search."),
    ):
        lines += [
            f"# HELP likeness_worker_{name} {help_text}",
            f"# TYPE likeness_worker_{name} summary",
        ]
        for w in workers:
            wl = f'worker="{_label(w.worker)}"'
            lines += [
                f"likeness_worker_{name}_sum{{{wl}}} {getattr(w, name + '_sum'):.6f}",
                f"likeness_worker_{name}_count{{{wl}}} {getattr(w, name + '_count')}",
            ]
    return lines
