"""The embedded job store: one SQLite file in WAL mode, blobs in a table.

Every state change runs in a ``BEGIN IMMEDIATE`` transaction, which takes the
database's write lock up front: two processes can never both read a job as
queued and then both claim it. The JSON of the full record is the source of
truth; the few columns beside it exist to be indexed and queried.

Within one process, writes take a lock first, so the process is one writer
(its threads queue on the lock instead of sleeping in SQLite's busy handler);
each thread reads on its own connection, which WAL never blocks. Queue
positions come from a snapshot of the queued sequence numbers that is at most
``position_cache_seconds`` old (this process's own writes update it at once).
"""

from __future__ import annotations

import bisect
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from likeness.jobs.models import (
    Heartbeat,
    JobError,
    JobPage,
    JobRecord,
    JobStatus,
    Progress,
    utc_from_timestamp,
)
from likeness.jobs.store import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    Clock,
    IdempotencyConflict,
    JobStore,
    fresh_record,
    parse_cursor,
    worker_lost_error,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order; AUTOINCREMENT never reuses
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    idempotency_key TEXT,
    lease_expires REAL,
    record TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
    ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, batch_key, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    seen REAL NOT NULL
);
"""


class SQLiteJobStore(JobStore):
    def __init__(
        self,
        path: str | Path,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Clock = time.time,
        busy_timeout: float = 30.0,
        position_cache_seconds: float = 1.0,
    ) -> None:
        super().__init__(lease_seconds=lease_seconds, max_attempts=max_attempts, clock=clock)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout = busy_timeout
        self._write_lock = threading.Lock()
        self.position_cache_seconds = position_cache_seconds
        # (time.monotonic() when taken, queued seqs in order); None: take a new one.
        self._queued: tuple[float, list[int]] | None = None
        self._queued_lock = threading.Lock()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        conn = self._conn()
        # Switching to WAL takes an exclusive lock; skip it when another process already did.
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)

    # -- connections and transactions -------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread (FastAPI runs sync endpoints in a thread pool) and per
        # process (a forked worker must not share its parent's connection).
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
            # WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- row helpers ----------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = conn.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.model_validate_json(row[0]) if row else None

    @staticmethod
    def _save(conn: sqlite3.Connection, rec: JobRecord) -> None:
        conn.execute(
            "UPDATE jobs SET status = ?, lease_expires = ?, record = ? WHERE id = ?",
            (
                rec.status.value,
                rec.lease_expires.timestamp() if rec.lease_expires else None,
                rec.model_dump_json(),
                rec.id,
            ),
        )

    def _touch_worker(self, conn: sqlite3.Connection, worker_id: str, now: float) -> None:
        conn.execute(
            "INSERT INTO workers (id, seen) VALUES (?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
            (worker_id, now),
        )

    @staticmethod
    def _finalize(rec: JobRecord, status: JobStatus, now: datetime) -> None:
        rec.status = status
        rec.finished = rec.updated = now
        rec.lease_expires = None

    # -- the interface --------------------------------------------------------------------

    def create(self, record: JobRecord, blobs: Mapping[str, bytes]) -> tuple[JobRecord, bool]:
        rec = fresh_record(record, self.clock())
        with self._write() as conn:
            if rec.idempotency_key is not None:
                row = conn.execute(
                    "SELECT record FROM jobs WHERE owner = ? AND idempotency_key = ?",
                    (rec.owner, rec.idempotency_key),
                ).fetchone()
                if row:
                    existing = JobRecord.model_validate_json(row[0])
                    if existing.request_hash != rec.request_hash:
                        raise IdempotencyConflict(rec.idempotency_key)
                    return existing, False
            seq = conn.execute(
                "INSERT INTO jobs (id, owner, status, batch_key, idempotency_key, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.owner,
                    rec.status.value,
                    rec.options.batch_key,
                    rec.idempotency_key,
                    rec.model_dump_json(),
                ),
            ).lastrowid
            conn.executemany(
                "INSERT INTO blobs (job_id, name, data) VALUES (?, ?, ?)",
                [(rec.id, name, data) for name, data in blobs.items()],
            )
        if seq is not None:
            with self._queued_lock:
                if self._queued is not None:
                    bisect.insort(self._queued[1], seq)
        return rec, True

    def get(self, job_id: str) -> JobRecord | None:
        return self._load(self._conn(), job_id)

    def list_jobs(self, owner: str, *, limit: int = 20, cursor: str | None = None) -> JobPage:
        if limit < 1:
            raise ValueError("limit must be positive")
        before = parse_cursor(cursor)
        rows = (
            self._conn()
            .execute(
                "SELECT seq, record FROM jobs WHERE owner = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?",
                (owner, before if before is not None else 2**63 - 1, limit + 1),
            )
            .fetchall()
        )
        items = [JobRecord.model_validate_json(r[1]) for r in rows[:limit]]
        next_cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
        return JobPage(items=items, next_cursor=next_cursor)

    def queue_position(self, job_id: str) -> int | None:
        conn = self._conn()
        row = conn.execute("SELECT status, seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not row or row[0] != JobStatus.QUEUED.value:
            return None
        return bisect.bisect_left(self._queued_seqs(conn), row[1]) + 1

    def _queued_seqs(self, conn: sqlite3.Connection) -> list[int]:
        # One scan of the queue index per position_cache_seconds, not one COUNT per poll.
        now = time.monotonic()
        with self._queued_lock:
            if self._queued is not None and now - self._queued[0] < self.position_cache_seconds:
                return self._queued[1]
        seqs = [
            int(r[0])
            for r in conn.execute(
                "SELECT seq FROM jobs WHERE status = ? ORDER BY seq", (JobStatus.QUEUED.value,)
            )
        ]
        with self._queued_lock:
            self._queued = (now, seqs)
        return seqs

    def _forget_queue(self) -> None:
        with self._queued_lock:
            self._queued = None

    def _reap(self, conn: sqlite3.Connection, now: float) -> None:
        rows = conn.execute(
            "SELECT record FROM jobs WHERE status = ? AND lease_expires <= ?",
            (JobStatus.RUNNING.value, now),
        ).fetchall()
        stamp = utc_from_timestamp(now)
        for (raw,) in rows:
            rec = JobRecord.model_validate_json(raw)
            if rec.cancel_requested:
                self._finalize(rec, JobStatus.CANCELED, stamp)
            elif rec.attempts >= self.max_attempts:
                self._finalize(rec, JobStatus.FAILED, stamp)
                rec.error = worker_lost_error(self.max_attempts)
            else:
                # Back to the queue; its seq is unchanged, so it is next in line.
                rec.status = JobStatus.QUEUED
                rec.lease_owner = rec.lease_expires = None
                rec.updated = stamp
            self._save(conn, rec)

    def claim(
        self, worker_id: str, n: int = 1, *, lease_seconds: float | None = None
    ) -> list[JobRecord]:
        if n < 1:
            raise ValueError("n must be positive")
        now = self.clock()
        expires = utc_from_timestamp(now + self._lease(lease_seconds))
        try:
            return self._claim(worker_id, n, now, expires)
        finally:
            # Reaping and claiming both change the queue.
            self._forget_queue()

    def _claim(self, worker_id: str, n: int, now: float, expires: datetime) -> list[JobRecord]:
        stamp = utc_from_timestamp(now)
        with self._write() as conn:
            self._reap(conn, now)
            self._touch_worker(conn, worker_id, now)
            first = conn.execute(
                "SELECT batch_key FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                (JobStatus.QUEUED.value,),
            ).fetchone()
            if first is None:
                return []
            rows = conn.execute(
                "SELECT record FROM jobs WHERE status = ? AND batch_key = ? ORDER BY seq LIMIT ?",
                (JobStatus.QUEUED.value, first[0], n),
            ).fetchall()
            batch_id = uuid.uuid4().hex
            claimed = []
            for (raw,) in rows:
                rec = JobRecord.model_validate_json(raw)
                rec.status = JobStatus.RUNNING
                rec.lease_owner, rec.lease_expires = worker_id, expires
                rec.attempts += 1
                rec.started = rec.updated = stamp
                rec.batch_id = batch_id
                self._save(conn, rec)
                claimed.append(rec)
        return claimed

    def heartbeat(
        self, worker_id: str, job_ids: Iterable[str], *, lease_seconds: float | None = None
    ) -> Heartbeat:
        now = self.clock()
        expires = utc_from_timestamp(now + self._lease(lease_seconds))
        beat = Heartbeat()
        with self._write() as conn:
            self._touch_worker(conn, worker_id, now)
            for job_id in job_ids:
                rec = self._load(conn, job_id)
                if rec is None or rec.status != JobStatus.RUNNING or rec.lease_owner != worker_id:
                    continue
                rec.lease_expires = expires
                rec.updated = utc_from_timestamp(now)
                self._save(conn, rec)
                beat.held.append(job_id)
                if rec.cancel_requested:
                    beat.cancel_requested.append(job_id)
        return beat

    def update_progress(
        self, job_id: str, progress: Progress, *, worker_id: str | None = None
    ) -> bool:
        with self._write() as conn:
            rec = self._load(conn, job_id)
            if rec is None or rec.status != JobStatus.RUNNING:
                return False
            if worker_id is not None and rec.lease_owner != worker_id:
                return False
            rec.progress = progress
            rec.updated = utc_from_timestamp(self.clock())
            self._save(conn, rec)
        return True

    def request_cancel(self, job_id: str) -> JobRecord | None:
        stamp = utc_from_timestamp(self.clock())
        with self._write() as conn:
            rec = self._load(conn, job_id)
            if rec is None:
                return None
            if rec.status == JobStatus.QUEUED:
                self._finalize(rec, JobStatus.CANCELED, stamp)
                self._save(conn, rec)
            elif rec.status == JobStatus.RUNNING and not rec.cancel_requested:
                rec.cancel_requested = True
                rec.updated = stamp
                self._save(conn, rec)
        self._forget_queue()
        return rec

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
        self._check_final(status)
        stamp = utc_from_timestamp(self.clock())
        with self._write() as conn:
            rec = self._load(conn, job_id)
            if rec is None or rec.status != JobStatus.RUNNING or rec.lease_owner != worker_id:
                return False
            self._finalize(rec, JobStatus(status), stamp)
            rec.result, rec.error = result, error
            self._save(conn, rec)
            conn.executemany(
                "INSERT OR REPLACE INTO blobs (job_id, name, data) VALUES (?, ?, ?)",
                [(job_id, name, data) for name, data in (result_blobs or {}).items()],
            )
        return True

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT data FROM blobs WHERE job_id = ? AND name = ?", (job_id, name))
            .fetchone()
        )
        return bytes(row[0]) if row else None

    def counts_by_status(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for status, count in self._conn().execute(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status"
        ):
            counts[JobStatus(status)] = int(count)
        return counts

    def record_worker_heartbeat(self, worker_id: str) -> None:
        with self._write() as conn:
            self._touch_worker(conn, worker_id, self.clock())

    def last_worker_heartbeat(self) -> datetime | None:
        row = self._conn().execute("SELECT MAX(seen) FROM workers").fetchone()
        return utc_from_timestamp(row[0]) if row and row[0] is not None else None

    def worker_heartbeats(self) -> dict[str, datetime]:
        rows = self._conn().execute("SELECT id, seen FROM workers").fetchall()
        return {str(worker): utc_from_timestamp(seen) for worker, seen in rows}

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()
