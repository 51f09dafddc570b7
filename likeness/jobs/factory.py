"""Pick the store implementation from a URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from likeness.jobs.aio import DEFAULT_TIMEOUT_SECONDS, AsyncJobStore, ThreadedJobStore
from likeness.jobs.store import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, JobStore

if TYPE_CHECKING:
    from likeness.settings import Settings

SQLITE_SCHEME = "sqlite:///"


def open_store(
    url: str,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    redis_key_prefix: str = "likeness:",
    result_ttl_seconds: int = 7 * 24 * 3600,
) -> JobStore:
    """``sqlite:///<path>`` (``sqlite:////abs/path`` for an absolute one) or ``redis://…``."""
    if url.startswith(SQLITE_SCHEME):
        from likeness.jobs.sqlite_store import SQLiteJobStore

        return SQLiteJobStore(
            url[len(SQLITE_SCHEME) :], lease_seconds=lease_seconds, max_attempts=max_attempts
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        # Imported here so SQLite-only installs need no redis package.
        from likeness.jobs.redis_store import RedisJobStore

        return RedisJobStore(
            url,
            prefix=redis_key_prefix,
            result_ttl_seconds=result_ttl_seconds,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
        )
    raise ValueError(f"unsupported job store URL {url!r}: use sqlite:///<path> or redis://...")


def open_store_from_settings(settings: Settings) -> JobStore:
    return open_store(
        settings.store,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        redis_key_prefix=settings.redis_key_prefix,
        result_ttl_seconds=settings.result_ttl_seconds,
    )


def async_store(
    store: JobStore, *, url: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> AsyncJobStore:
    """The API's awaitable view of ``store``: a Redis store opened from ``url`` through the
    asyncio client, any other store (or one passed in without its URL) on a thread pool."""
    from likeness.jobs.redis_store import REDIS_OUTAGES, AsyncRedisJobStore, RedisJobStore

    if isinstance(store, RedisJobStore):
        if url is not None:
            return AsyncRedisJobStore(store, url, timeout=timeout)
        return ThreadedJobStore(store, timeout=timeout, outages=REDIS_OUTAGES)
    return ThreadedJobStore(store, timeout=timeout)
