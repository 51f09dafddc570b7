"""The job store as an event loop sees it: awaitable, bounded in time, and raising
``StoreUnavailable`` (503, Retry-After) when the backend does not answer.

The API needs only a few calls of the store, and it makes each request's
blocking work one call: ``create`` runs the caller's ``build`` (decode, hash,
checks) and, for SQLite, the insert in the same pool thread. Two
implementations:

- ``ThreadedJobStore`` runs a synchronous store (SQLite) on a small thread pool;
  the SQLite store serialises its writers with a lock and reads on one
  connection per thread.
- ``AsyncRedisJobStore`` talks to Redis with the asyncio client (connect and
  read timeouts), running the same Lua scripts as ``RedisJobStore``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import TypeVar

from likeness.jobs.models import JobPage, JobRecord, JobStatus
from likeness.jobs.store import JobStore, StoreUnavailable

T = TypeVar("T")
Build = Callable[[], tuple[JobRecord, Mapping[str, bytes]]]

DEFAULT_TIMEOUT_SECONDS = 2.0
DEFAULT_THREADS = 8


class AsyncJobStore(ABC):
    """What the API asks of a job store, awaitable. ``store`` is the synchronous one."""

    def __init__(
        self,
        store: JobStore,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="likeness-store")

    def clock(self) -> float:
        return self.store.clock()

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run blocking work on this store's pool (not bounded in time: it may write)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    @abstractmethod
    async def create(self, build: Build) -> tuple[JobRecord, bool]:
        """Run ``build`` off the loop and store the job it returns (see ``JobStore.create``)."""

    @abstractmethod
    async def get(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        """The job and, while it is queued, its queue position."""

    @abstractmethod
    async def list_jobs(
        self, owner: str, *, limit: int, cursor: str | None
    ) -> tuple[JobPage, dict[str, int]]:
        """A page of the owner's jobs and the queue positions of its queued ones."""

    @abstractmethod
    async def request_cancel(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def get_blob(self, job_id: str, name: str) -> bytes | None: ...

    @abstractmethod
    async def counts_by_status(self) -> dict[JobStatus, int]: ...

    @abstractmethod
    async def last_worker_heartbeat(self) -> datetime | None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ThreadedJobStore(AsyncJobStore):
    """A synchronous store on a thread pool; reads are bounded by ``timeout``.

    ``outages`` are the backend's exceptions that mean it is unreachable or
    locked (for SQLite, ``OperationalError``: locked, I/O error, cannot open).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        threads: int = DEFAULT_THREADS,
        outages: tuple[type[BaseException], ...] = (sqlite3.OperationalError,),
    ) -> None:
        super().__init__(store, timeout=timeout, threads=threads)
        self.outages = outages

    def _guard(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self.outages as exc:
            raise StoreUnavailable() from exc

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.off_loop(partial(self._guard, fn))
        except TimeoutError:
            raise StoreUnavailable() from None

    async def create(self, build: Build) -> tuple[JobRecord, bool]:
        def work() -> tuple[JobRecord, bool]:
            record, blobs = build()
            return self._guard(lambda: self.store.create(record, blobs))

        # A write is awaited to its end (bounded by the store's busy timeout): answering
        # before it commits could tell a client "failed" about a job that exists.
        return await self.off_loop(work)

    async def get(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        def work() -> tuple[JobRecord | None, int | None]:
            job = self.store.get(job_id)
            queued = job is not None and job.status is JobStatus.QUEUED
            return job, self.store.queue_position(job_id) if queued else None

        return await self._read(work)

    async def list_jobs(
        self, owner: str, *, limit: int, cursor: str | None
    ) -> tuple[JobPage, dict[str, int]]:
        def work() -> tuple[JobPage, dict[str, int]]:
            page = self.store.list_jobs(owner, limit=limit, cursor=cursor)
            positions: dict[str, int] = {}
            for job in page.items:
                if job.status is JobStatus.QUEUED:
                    position = self.store.queue_position(job.id)
                    if position is not None:
                        positions[job.id] = position
            return page, positions

        return await self._read(work)

    async def request_cancel(self, job_id: str) -> JobRecord | None:
        return await self.off_loop(partial(self._guard, lambda: self.store.request_cancel(job_id)))

    async def get_blob(self, job_id: str, name: str) -> bytes | None:
        return await self._read(lambda: self.store.get_blob(job_id, name))

    async def counts_by_status(self) -> dict[JobStatus, int]:
        return await self._read(self.store.counts_by_status)

    async def last_worker_heartbeat(self) -> datetime | None:
        return await self._read(self.store.last_worker_heartbeat)

    async def ping(self) -> None:
        await self._read(self.store.ping)


async def bounded(
    call: Awaitable[T], timeout: float, outages: tuple[type[BaseException], ...]
) -> T:
    """Await ``call`` at most ``timeout`` s; an outage or the timeout is ``StoreUnavailable``."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        raise StoreUnavailable() from None
    except outages as exc:
        raise StoreUnavailable() from exc
