"""One behavioural contract, run against a real SQLite file and a real Redis server.

Redis is the one at $LIKENESS_TEST_REDIS_URL (default redis://127.0.0.1:6379/0);
every test writes under its own key prefix and deletes it afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from likeness.errors import LikenessError
from likeness.jobs import (
    IdempotencyConflict,
    InputFile,
    InvalidCursor,
    JobError,
    JobOptions,
    JobRecord,
    JobStatus,
    JobStore,
    Progress,
    open_store,
)
from likeness.jobs.redis_store import RedisJobStore
from likeness.jobs.sqlite_store import SQLiteJobStore

REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = 1_700_000_000.25
LEASE = 10.0


def _redis_unreachable() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable ({exc})"
    return None


REDIS_SKIP = _redis_unreachable()


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """Knows where one store lives, so tests can open it again (or from another process)."""

    kind: str
    location: str  # SQLite file path, or Redis key prefix
    clock: FakeClock = field(default_factory=FakeClock)
    opened: list[JobStore] = field(default_factory=list)

    def open(self, *, real_clock: bool = False, **kwargs: Any) -> JobStore:
        kwargs.setdefault("lease_seconds", LEASE)
        if not real_clock:
            kwargs["clock"] = self.clock
        store: JobStore
        if self.kind == "sqlite":
            store = SQLiteJobStore(self.location, **kwargs)
        else:
            store = RedisJobStore(REDIS_URL, prefix=self.location, **kwargs)
        self.opened.append(store)
        return store


def _backends(kind: str, tmp_path: Path) -> Iterator[Backend]:
    if kind == "sqlite":
        b = Backend("sqlite", str(tmp_path / "jobs.sqlite3"))
    else:
        b = Backend("redis", f"likeness-test:{uuid.uuid4().hex}:")
    yield b
    for store in b.opened:
        store.close()
    if b.kind == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=b.location + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


needs_redis = pytest.mark.skipif(bool(REDIS_SKIP), reason=REDIS_SKIP or "")


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backends(request.param, tmp_path)


@pytest.fixture
def redis_backend(tmp_path: Path) -> Iterator[Backend]:
    yield from _backends("redis", tmp_path)


@pytest.fixture
def store(backend: Backend) -> JobStore:
    return backend.open()


def make_job(
    owner: str = "alice",
    *,
    key: str | None = None,
    rhash: str = "h1",
    batch_key: str = "b",
    steps: int = 50,
) -> JobRecord:
    return JobRecord(
        owner=owner,
        options=JobOptions(
            steps=steps,
            restarts=2,
            seed=7,
            race="Asian",
            attributes={"Smiling": 1},
            eps=2e-3,
            batch_key=batch_key,
        ),
        inputs={
            "thumbnail": InputFile(filename="t.png", size=3, sha256="ab" * 32, width=16, height=16)
        },
        request_hash=rhash,
        idempotency_key=key,
    )


def add(store: JobStore, n: int = 1, **kwargs: Any) -> list[JobRecord]:
    return [store.create(make_job(**kwargs), {"thumbnail": b"png"})[0] for _ in range(n)]


def total(store: JobStore) -> int:
    return sum(store.counts_by_status().values())


# -- create / get ---------------------------------------------------------------------------


def test_create_then_get_returns_the_same_record(store: JobStore) -> None:
    job = make_job()
    created, fresh = store.create(job, {"thumbnail": b"\x89PNG"})
    assert fresh
    assert created.id == job.id and len(created.id) == 32
    assert created.status is JobStatus.QUEUED
    assert created.created is not None and created.created.timestamp() == T0
    assert created.progress == Progress(step=0, steps=50)
    assert store.get(job.id) == created
    assert store.get("0" * 32) is None


def test_create_owns_lifecycle_fields(store: JobStore) -> None:
    job = make_job().model_copy(
        update={"status": JobStatus.SUCCEEDED, "attempts": 5, "lease_owner": "w"}
    )
    created, _ = store.create(job, {})
    assert (created.status, created.attempts, created.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert store.get(job.id) == created


def test_idempotent_create_returns_existing_job(store: JobStore) -> None:
    first, fresh1 = store.create(make_job(key="k1", rhash="same"), {"thumbnail": b"one"})
    again, fresh2 = store.create(make_job(key="k1", rhash="same"), {"thumbnail": b"two"})
    assert (fresh1, fresh2) == (True, False)
    assert again.id == first.id
    assert total(store) == 1
    assert store.get_blob(first.id, "thumbnail") == b"one"


def test_idempotency_key_reused_with_other_request_conflicts(store: JobStore) -> None:
    store.create(make_job(key="k1", rhash="one"), {})
    with pytest.raises(IdempotencyConflict) as info:
        store.create(make_job(key="k1", rhash="two"), {})
    assert isinstance(info.value, LikenessError)
    assert (info.value.code, info.value.status) == ("idempotency_conflict", 409)
    assert total(store) == 1


def test_concurrent_creates_with_one_key_make_one_job(store: JobStore) -> None:
    def create(_: int) -> str:
        return store.create(make_job(key="race", rhash="same"), {"thumbnail": b"x"})[0].id

    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(create, range(12)))
    assert len(ids) == 1
    assert total(store) == 1


def test_idempotency_keys_are_per_owner(store: JobStore) -> None:
    a, _ = store.create(make_job("alice", key="k", rhash="one"), {})
    b, fresh = store.create(make_job("bob", key="k", rhash="two"), {})
    assert fresh and a.id != b.id
    assert total(store) == 2


# -- claim ----------------------------------------------------------------------------------


def test_claim_is_fifo_and_grants_a_lease(store: JobStore) -> None:
    jobs = add(store, 3)
    [got] = store.claim("w1")
    assert got.id == jobs[0].id
    assert got.status is JobStatus.RUNNING
    assert (got.attempts, got.lease_owner) == (1, "w1")
    assert got.lease_expires is not None and got.lease_expires.timestamp() == T0 + LEASE
    assert got.started is not None and got.batch_id
    assert store.get(got.id) == got
    assert [j.id for j in store.claim("w2")] == [jobs[1].id]
    assert [j.id for j in store.claim("w3", 5)] == [jobs[2].id]
    assert store.claim("w4") == []


def test_claim_on_empty_queue_returns_nothing(store: JobStore) -> None:
    assert store.claim("w1", 4) == []


def test_claim_batches_only_compatible_jobs(store: JobStore) -> None:
    a, b, c, d = (add(store, batch_key=k)[0] for k in ("x", "y", "x", "x"))
    batch = store.claim("w1", 2)
    assert [j.id for j in batch] == [a.id, c.id]
    assert len({j.batch_id for j in batch}) == 1
    assert [j.id for j in store.claim("w2", 5)] == [b.id]
    assert [j.id for j in store.claim("w3", 5)] == [d.id]


def _claim_until_empty(kind: str, location: str, worker: str, out: Any) -> None:
    # Runs in a child process: a store of its own, opened from the location alone.
    b = Backend(kind, location)
    store = b.open(real_clock=True, lease_seconds=600)
    got: list[str] = []
    while batch := store.claim(worker, 2):
        got += [j.id for j in batch]
    store.close()
    out.put(got)


def test_concurrent_processes_never_claim_the_same_job(backend: Backend) -> None:
    store = backend.open(real_clock=True)
    ids = {j.id for j in add(store, 60)}
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_until_empty, args=(backend.kind, backend.location, f"w{i}", out))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    claimed = [job_id for r in results for job_id in r]
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert set(claimed) == ids
    assert store.counts_by_status()[JobStatus.RUNNING] == 60


def test_concurrent_threads_sharing_one_store_never_claim_the_same_job(store: JobStore) -> None:
    ids = {j.id for j in add(store, 40)}

    def drain(worker: str) -> list[str]:
        got: list[str] = []
        while batch := store.claim(worker, 1):
            got += [j.id for j in batch]
        return got

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(drain, [f"t{i}" for i in range(4)]))
    claimed = [job_id for r in results for job_id in r]
    assert len(claimed) == len(set(claimed)) == len(ids)


# -- leases ---------------------------------------------------------------------------------


def test_expired_lease_is_claimed_again_with_one_more_attempt(
    store: JobStore, backend: Backend
) -> None:
    [job] = add(store)
    [waiting] = add(store)
    store.claim("w1")
    backend.clock.advance(LEASE + 1)
    [again] = store.claim("w2")
    assert again.id == job.id, "the lost job goes back to the front of the queue"
    assert (again.attempts, again.lease_owner, again.status) == (2, "w2", JobStatus.RUNNING)
    assert store.heartbeat("w1", [job.id]).held == []
    assert not store.finish(job.id, "w1", JobStatus.SUCCEEDED, result={"by": "w1"})
    assert store.finish(job.id, "w2", JobStatus.SUCCEEDED, result={"by": "w2"})
    final = store.get(job.id)
    assert final is not None and final.result == {"by": "w2"}
    assert store.queue_position(waiting.id) == 1


def test_worker_lost_after_max_attempts(backend: Backend) -> None:
    store = backend.open(max_attempts=2)
    [job] = add(store)
    for worker in ("w1", "w2"):
        assert [j.id for j in store.claim(worker)] == [job.id]
        backend.clock.advance(LEASE + 1)
    assert store.claim("w3") == []
    lost = store.get(job.id)
    assert lost is not None
    assert lost.status is JobStatus.FAILED
    assert lost.error is not None and lost.error.code == "worker_lost"
    assert lost.attempts == 2 and lost.finished is not None and lost.lease_expires is None


def test_heartbeat_keeps_the_lease(store: JobStore, backend: Backend) -> None:
    [job] = add(store)
    store.claim("w1")
    backend.clock.advance(LEASE * 0.8)
    beat = store.heartbeat("w1", [job.id, "f" * 32])
    assert beat.held == [job.id] and beat.cancel_requested == []
    backend.clock.advance(LEASE * 0.8)  # past the first lease, within the renewed one
    assert store.claim("w2") == []
    held = store.get(job.id)
    assert held is not None and held.lease_owner == "w1"
    assert held.lease_expires is not None
    assert held.lease_expires.timestamp() == pytest.approx(T0 + LEASE * 0.8 + LEASE)


def test_expired_job_with_cancel_request_ends_canceled(store: JobStore, backend: Backend) -> None:
    [job] = add(store)
    store.claim("w1")
    store.request_cancel(job.id)
    backend.clock.advance(LEASE + 1)
    assert store.claim("w2") == []
    canceled = store.get(job.id)
    assert canceled is not None and canceled.status is JobStatus.CANCELED


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_of_queued_job_is_immediate(store: JobStore) -> None:
    [job, other] = add(store, 2)
    canceled = store.request_cancel(job.id)
    assert canceled is not None and canceled.status is JobStatus.CANCELED
    assert canceled.finished is not None
    assert store.get(job.id) == canceled
    assert store.queue_position(job.id) is None
    assert store.queue_position(other.id) == 1
    assert [j.id for j in store.claim("w1", 5)] == [other.id]


def test_cancel_of_running_job_flags_it_for_the_worker(store: JobStore) -> None:
    [job] = add(store)
    store.claim("w1")
    flagged = store.request_cancel(job.id)
    assert flagged is not None
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
    assert store.heartbeat("w1", [job.id]).cancel_requested == [job.id]
    assert store.finish(job.id, "w1", JobStatus.CANCELED)
    done = store.get(job.id)
    assert done is not None and done.status is JobStatus.CANCELED


def test_cancel_of_final_or_unknown_job_changes_nothing(store: JobStore) -> None:
    [job] = add(store)
    store.claim("w1")
    store.finish(job.id, "w1", JobStatus.SUCCEEDED, result={"ok": True})
    after = store.request_cancel(job.id)
    assert after is not None and after.status is JobStatus.SUCCEEDED
    assert not after.cancel_requested
    assert store.request_cancel("0" * 32) is None


# -- finish and progress --------------------------------------------------------------------


def test_finish_is_idempotent(store: JobStore) -> None:
    [job] = add(store)
    store.claim("w1")
    png = bytes(range(256)) * 4
    assert store.finish(
        job.id, "w1", JobStatus.SUCCEEDED, result={"mse": 0.001}, result_blobs={"result.png": png}
    )
    first = store.get(job.id)
    assert not store.finish(
        job.id,
        "w1",
        JobStatus.FAILED,
        error=JobError(code="x", message="y"),
        result_blobs={"result.png": b"other"},
    )
    assert store.get(job.id) == first
    assert first is not None and first.status is JobStatus.SUCCEEDED
    assert first.result == {"mse": 0.001} and first.error is None
    assert first.finished is not None and first.lease_expires is None
    assert store.get_blob(job.id, "result.png") == png


def test_finish_records_the_error(store: JobStore) -> None:
    [job] = add(store)
    store.claim("w1")
    assert store.finish(job.id, "w1", JobStatus.FAILED, error=JobError(code="no_face", message="m"))
    failed = store.get(job.id)
    assert failed is not None and failed.error == JobError(code="no_face", message="m")


def test_finish_by_a_worker_without_the_lease_is_refused(store: JobStore) -> None:
    [job, queued] = add(store, 2)
    store.claim("w1")
    assert not store.finish(job.id, "w2", JobStatus.SUCCEEDED)
    assert not store.finish(queued.id, "w1", JobStatus.SUCCEEDED), "never claimed"
    assert not store.finish("0" * 32, "w1", JobStatus.SUCCEEDED)
    running = store.get(job.id)
    assert running is not None and running.status is JobStatus.RUNNING


def test_finish_needs_a_final_status(store: JobStore) -> None:
    [job] = add(store)
    store.claim("w1")
    with pytest.raises(ValueError):
        store.finish(job.id, "w1", JobStatus.QUEUED)


def test_progress_is_recorded_only_for_the_lease_holder(store: JobStore) -> None:
    [job, queued] = add(store, 2)
    store.claim("w1")
    progress = Progress(step=10, steps=50, best_mse=0.25)
    assert store.update_progress(job.id, progress, worker_id="w1")
    assert not store.update_progress(job.id, Progress(step=11, steps=50), worker_id="w2")
    assert not store.update_progress(queued.id, progress)
    got = store.get(job.id)
    assert got is not None and got.progress == progress
    got_queued = store.get(queued.id)
    assert got_queued is not None and got_queued.progress.step == 0


# -- queue, listing, blobs, counts ------------------------------------------------------------


def test_queue_position(store: JobStore) -> None:
    a, b, c = add(store, 3)
    assert [store.queue_position(j.id) for j in (a, b, c)] == [1, 2, 3]
    store.claim("w1")
    store.request_cancel(b.id)
    assert [store.queue_position(j.id) for j in (a, b, c)] == [None, None, 1]
    assert store.queue_position("0" * 32) is None


def test_listing_is_per_owner_newest_first_and_paginated(store: JobStore) -> None:
    mine = []
    for i in range(5):
        mine += add(store, owner="alice")
        if i % 2:
            add(store, owner="bob")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.list_jobs("alice", limit=2, cursor=cursor)
        assert len(page.items) <= 2
        seen += [j.id for j in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [j.id for j in reversed(mine)]
    assert pages == 3
    assert len(store.list_jobs("bob", limit=10).items) == 2
    assert store.list_jobs("carol").items == []
    for bad in ("not-a-cursor", "²", str(2**63)):  # not ASCII digits; past any seq number
        with pytest.raises(InvalidCursor):
            store.list_jobs("alice", cursor=bad)


def test_blobs_round_trip(store: JobStore) -> None:
    data = {"thumbnail": bytes(range(256)), "reference": b"\x00" * 1000 + b"\xff"}
    job, _ = store.create(make_job(), data)
    assert store.get_blob(job.id, "thumbnail") == data["thumbnail"]
    assert store.get_blob(job.id, "reference") == data["reference"]
    assert store.get_blob(job.id, "result.png") is None
    assert store.get_blob("0" * 32, "thumbnail") is None


def test_counts_by_status(store: JobStore) -> None:
    jobs = add(store, 5)
    store.claim("w1", 3)  # jobs 0..2
    store.finish(jobs[0].id, "w1", JobStatus.SUCCEEDED)
    store.finish(jobs[1].id, "w1", JobStatus.FAILED, error=JobError(code="c", message="m"))
    store.request_cancel(jobs[3].id)
    assert store.counts_by_status() == {
        JobStatus.QUEUED: 1,
        JobStatus.RUNNING: 1,
        JobStatus.SUCCEEDED: 1,
        JobStatus.FAILED: 1,
        JobStatus.CANCELED: 1,
    }


def test_worker_heartbeats(store: JobStore, backend: Backend) -> None:
    assert store.last_worker_heartbeat() is None
    store.record_worker_heartbeat("w1")
    backend.clock.advance(5)
    store.record_worker_heartbeat("w2")
    last = store.last_worker_heartbeat()
    assert last is not None and last.timestamp() == T0 + 5
    backend.clock.advance(5)
    store.claim("w3")  # claiming counts as a heartbeat too
    last = store.last_worker_heartbeat()
    assert last is not None and last.timestamp() == T0 + 10


def test_heartbeats_by_worker(store: JobStore, backend: Backend) -> None:
    assert store.worker_heartbeats() == {}
    [job] = add(store, 1)
    store.claim("host-a-1-abc")
    backend.clock.advance(5)
    store.record_worker_heartbeat("host-b-2-def")
    backend.clock.advance(5)
    store.heartbeat("host-a-1-abc", [job.id])  # renewing a lease counts too
    beats = store.worker_heartbeats()
    assert {w: t.timestamp() for w, t in beats.items()} == {
        "host-a-1-abc": T0 + 10,
        "host-b-2-def": T0 + 5,
    }
    assert all(t.tzinfo is not None for t in beats.values())


def test_everything_survives_reopening(backend: Backend) -> None:
    store = backend.open()
    a, b = add(store, 2)
    store.claim("w1")
    store.update_progress(a.id, Progress(step=3, steps=50, best_mse=0.5))
    before = [store.get(a.id), store.get(b.id)]
    counts = store.counts_by_status()
    store.close()
    again = backend.open()  # a new connection / a new client
    assert [again.get(a.id), again.get(b.id)] == before
    assert again.counts_by_status() == counts
    assert again.get_blob(a.id, "thumbnail") == b"png"
    assert again.queue_position(b.id) == 1
    assert again.last_worker_heartbeat() is not None
    assert again.finish(a.id, "w1", JobStatus.SUCCEEDED)


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    sqlite = open_store(f"sqlite:///{tmp_path}/x/jobs.sqlite3")
    try:
        assert isinstance(sqlite, SQLiteJobStore)
        assert (tmp_path / "x" / "jobs.sqlite3").exists()
    finally:
        sqlite.close()
    with pytest.raises(ValueError):
        open_store("postgres://nope")


@needs_redis
def test_redis_expires_finished_jobs_only(redis_backend: Backend) -> None:
    backend = redis_backend
    store = backend.open(result_ttl_seconds=100)
    [done, queued] = add(store, 2)
    store.claim("w1")
    store.finish(done.id, "w1", JobStatus.SUCCEEDED, result_blobs={"result.png": b"x"})
    client = redis.Redis.from_url(REDIS_URL)
    prefix = backend.location
    assert 0 < client.ttl(f"{prefix}job:{done.id}") <= 100
    assert 0 < client.ttl(f"{prefix}blobs:{done.id}") <= 100
    assert client.ttl(f"{prefix}job:{queued.id}") == -1
    assert client.ttl(f"{prefix}blobs:{queued.id}") == -1
    client.close()


def test_sqlite_positions_are_a_snapshot_that_own_writes_keep_exact(tmp_path: Path) -> None:
    backend = Backend("sqlite", str(tmp_path / "jobs.sqlite3"))
    api = backend.open(position_cache_seconds=3600)
    worker = backend.open()  # another process sharing the file
    a, b, c = add(api, 3)
    assert [api.queue_position(j.id) for j in (a, b, c)] == [1, 2, 3]
    [d] = add(api, 1)  # this store's own writes update its snapshot at once
    assert api.queue_position(d.id) == 4
    worker.claim("w1")  # another process's claim shows once the snapshot is renewed
    assert api.queue_position(b.id) == 2
    assert isinstance(api, SQLiteJobStore)
    api.position_cache_seconds = 0
    assert [api.queue_position(j.id) for j in (a, b, c, d)] == [None, 1, 2, 3]
