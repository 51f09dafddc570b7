"""Liveness, readiness and Prometheus metrics. No authentication: these are for
orchestrators and scrapers, and reveal only counts."""

from __future__ import annotations

import logging
from functools import partial

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from app.api.deps import SettingsDep, StoreDep
from app.api.errors import ErrorBody, error_response
from app.api.schemas import Health, Ready
from likeness.jobs import AsyncJobStore, JobStatus
from likeness.settings import Settings
from likeness.worker_stats import read_stats, render, stats_dir

router = APIRouter(tags=["health"])
log = logging.getLogger("likeness.app")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 whenever the process answers; says nothing about the store or workers, and
    waits on neither the store nor a thread."""
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness",
    responses={503: {"model": ErrorBody, "description": "store_unreachable or no_worker."}},
)
async def readyz(settings: SettingsDep, store: StoreDep) -> Ready | JSONResponse:
    """200 when the job store answers and a worker heartbeated within
    LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS; otherwise 503 with the reason."""
    try:
        await store.ping()
        last = await store.last_worker_heartbeat()
    except Exception as exc:
        log.warning("readiness: job store unreachable: %s", exc)
        return error_response(503, "store_unreachable", "The job store does not answer.")
    window = settings.worker_heartbeat_timeout_seconds
    if last is None:
        return error_response(503, "no_worker", "No worker has ever reported in.")
    age = store.clock() - last.timestamp()
    if age > window:
        return error_response(
            503, "no_worker", f"No worker heartbeat for {age:.0f} s (limit {window:g} s)."
        )
    return Ready(last_worker_heartbeat=last)


async def _exposition(store: AsyncJobStore, settings: Settings) -> str:
    lines = [
        "# HELP likeness_store_up Whether the job store answered the scrape (1) or not (0).",
        "# TYPE likeness_store_up gauge",
    ]
    try:
        counts = await store.counts_by_status()
        last = await store.last_worker_heartbeat()
    except Exception as exc:
        log.warning("metrics: job store unreachable: %s", exc)
        return "\n".join([*lines, "likeness_store_up 0", ""])
    lines += [
        "likeness_store_up 1",
        "# HELP likeness_jobs Jobs in the store, by status.",
        "# TYPE likeness_jobs gauge",
        *(f'likeness_jobs{{status="{s.value}"}} {counts[s]}' for s in JobStatus),
        "# HELP likeness_queue_depth Jobs waiting for a worker.",
        "# TYPE likeness_queue_depth gauge",
        f"likeness_queue_depth {counts[JobStatus.QUEUED]}",
    ]
    if last is not None:
        age = max(0.0, store.clock() - last.timestamp())
        lines += [
            "# HELP likeness_worker_heartbeat_age_seconds Seconds since a worker last reported.",
            "# TYPE likeness_worker_heartbeat_age_seconds gauge",
            f"likeness_worker_heartbeat_age_seconds {age:.3f}",
            "# HELP likeness_worker_last_heartbeat_timestamp_seconds Unix time of that report.",
            "# TYPE likeness_worker_last_heartbeat_timestamp_seconds gauge",
            f"likeness_worker_last_heartbeat_timestamp_seconds {last.timestamp():.3f}",
        ]
    # Batch sizes, step and job durations come from the workers sharing our data directory.
    stats = await store.off_loop(partial(read_stats, stats_dir(settings.data_dir)))
    lines += render(stats)
    return "\n".join([*lines, ""])


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={200: {"content": {PROMETHEUS_TEXT: {}}, "description": "Text exposition."}},
)
async def metrics(store: StoreDep, settings: SettingsDep) -> PlainTextResponse:
    """Jobs by status, queue depth, worker heartbeat age and, from the workers sharing
    LIKENESS_DATA_DIR, batch sizes and job and step durations, in Prometheus text format."""
    return PlainTextResponse(await _exposition(store, settings), media_type=PROMETHEUS_TEXT)
