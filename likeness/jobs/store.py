"""The job store interface both the app and the worker program against.

Life of a job::

    create ─▶ queued ─claim─▶ running ─finish─▶ succeeded | failed | canceled
                 ▲                │
                 └─ lease expired ┘  (attempts < max_attempts; else failed/worker_lost)

Every transition is atomic in the backend (an SQLite write transaction or one
Redis Lua script), so any number of app and worker processes can share a store.
Times come from the store's ``clock`` (injectable for tests); leases are
absolute times, so worker hosts need roughly synchronised clocks.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from likeness.errors import LikenessError
from likeness.jobs.models import (
    Heartbeat,
    JobError,
    JobPage,
    JobRecord,
    JobStatus,
    Progress,
    utc_from_timestamp,
)

Clock = Callable[[], float]

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_ATTEMPTS = 3
# A claim looks this far down the queue for jobs compatible with the first one;
# bounded so one claim never scans an arbitrarily long queue.
CLAIM_SCAN_LIMIT = 1000


class IdempotencyConflict(LikenessError):
    status = 409

    def __init__(self, key: str) -> None:
        super().__init__(
            "idempotency_conflict",
            f"Idempotency-Key {key!r} was already used with a different request; "
            "use a new key for a new request.",
        )


class StoreUnavailable(LikenessError):
    """The backend did not answer in time or refused the connection: retry later."""

    status = 503
    retry_after_seconds = 5
    headers = {"Retry-After": str(retry_after_seconds)}

    def __init__(
        self, code: str = "store_unavailable", message: str = "", *, status: int | None = None
    ) -> None:
        message = message or (
            f"The job store is not answering; retry in {self.retry_after_seconds} s."
        )
        super().__init__(code, message, status=status)


class InvalidCursor(LikenessError):
    status = 422

    def __init__(self) -> None:
        super().__init__("invalid_cursor", "The cursor is not one this API returned.")


def worker_lost_error(max_attempts: int) -> JobError:
    return JobError(
        code="worker_lost",
        message=f"The worker running this job stopped responding; gave up after "
        f"{max_attempts} attempt(s).",
    )


def fresh_record(record: JobRecord, now: float) -> JobRecord:
    """The record as first stored: the store, not the caller, owns the lifecycle fields."""
    stamp = utc_from_timestamp(now)
    return record.model_copy(
        update={
            "status": JobStatus.QUEUED,
            "progress": Progress(steps=record.options.steps),
            "result": None,
            "error": None,
            "created": stamp,
            "updated": stamp,
            "started": None,
            "finished": None,
            "attempts": 0,
            "lease_owner": None,
            "lease_expires": None,
            "cancel_requested": False,
            "batch_id": None,
        }
    )


# Cursors are job sequence numbers, which both stores keep below SQLite's INTEGER limit.
MAX_CURSOR = 2**63 - 1


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    # isdigit alone admits digits int() refuses ("²") and numbers no store can hold
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > MAX_CURSOR:
        raise InvalidCursor()
    return int(cursor)


class JobStore(ABC):
    """Durable job records, their blobs, leases and worker heartbeats."""

    def __init__(
        self,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Clock = time.time,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.clock = clock

    @abstractmethod
    def create(self, record: JobRecord, blobs: Mapping[str, bytes]) -> tuple[JobRecord, bool]:
        """Store a new queued job and its input blobs in one atomic step.

        The store stamps ``created``/``updated`` and resets the lifecycle fields.
        With ``record.idempotency_key`` set, an earlier job of the same owner and
        key is returned instead (``created`` False) when its ``request_hash``
        matches, and ``IdempotencyConflict`` (409) is raised when it does not.
        """

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def list_jobs(self, owner: str, *, limit: int = 20, cursor: str | None = None) -> JobPage:
        """The owner's jobs, newest first; pass ``next_cursor`` back for the next page."""

    @abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to be claimed; None unless the job is queued."""

    @abstractmethod
    def claim(
        self, worker_id: str, n: int = 1, *, lease_seconds: float | None = None
    ) -> list[JobRecord]:
        """Move up to ``n`` queued jobs with the oldest job's batch key to running.

        First, running jobs whose lease expired go back to the front of the queue
        (or fail with ``worker_lost`` once ``max_attempts`` claims are used up, or
        become canceled if cancellation was requested). Claimed jobs get
        ``attempts + 1``, a lease for ``worker_id`` and one shared ``batch_id``.
        Also records a worker heartbeat.
        """

    @abstractmethod
    def heartbeat(
        self, worker_id: str, job_ids: Iterable[str], *, lease_seconds: float | None = None
    ) -> Heartbeat:
        """Extend the leases ``worker_id`` still holds; report those and pending cancels.

        A job missing from ``held`` is no longer this worker's: stop working on it.
        Also records a worker heartbeat.
        """

    @abstractmethod
    def update_progress(
        self, job_id: str, progress: Progress, *, worker_id: str | None = None
    ) -> bool:
        """Record progress of a running job (held by ``worker_id`` when given)."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; flag a running one for its worker; final: no-op.

        Returns the job as it is afterwards, or None if there is no such job.
        """

    @abstractmethod
    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: JobError | None = None,
        result_blobs: Mapping[str, bytes] | None = None,
    ) -> bool:
        """Record the outcome of a running job and its result blobs, atomically.

        Returns False, changing nothing, when the job is already final (a retried
        finish) or when ``worker_id`` is not the job's lease owner any more
        (another worker claimed it after the lease ran out). A lease that ran
        out but was not yet claimed again still counts as held: the work is done.
        """

    @abstractmethod
    def get_blob(self, job_id: str, name: str) -> bytes | None: ...

    @abstractmethod
    def counts_by_status(self) -> dict[JobStatus, int]:
        """Number of stored jobs in each status (every status present)."""

    @abstractmethod
    def record_worker_heartbeat(self, worker_id: str) -> None: ...

    @abstractmethod
    def last_worker_heartbeat(self) -> datetime | None:
        """Time of the most recent heartbeat of any worker, or None if none ever."""

    @abstractmethod
    def worker_heartbeats(self) -> dict[str, datetime]:
        """Each worker's most recent heartbeat, by worker id (``likeness worker --check``)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    @abstractmethod
    def close(self) -> None: ...

    def _check_final(self, status: JobStatus) -> None:
        if not JobStatus(status).is_final:
            raise ValueError(f"finish() needs a final status, not {status!r}")

    def _lease(self, lease_seconds: float | None) -> float:
        return self.lease_seconds if lease_seconds is None else lease_seconds
