"""The shared job store: Redis, for an app and workers on several hosts.

Every state change is one Lua script, which Redis runs atomically, so claims
from many workers never overlap. Layout under ``prefix``::

    job:<id>       hash   'doc' (JSON of the fields that never change) + one field
                          per lifecycle field (status, lease_owner, created, ...)
    blobs:<id>     hash   blob name -> bytes (inputs and results)
    queue          zset   queued job ids by sequence number (FIFO)
    leases         zset   running job ids by lease expiry time
    owner:<owner>  zset   an owner's job ids by sequence number (listing)
    done:<status>  zset   final job ids by expiry time (counting)
    idem:<hash>    string job id for an (owner, Idempotency-Key) pair
    workers        zset   worker id by last heartbeat time
    seq            int    sequence counter

Queued and running jobs never expire; a finished job, its blobs and its
idempotency key expire ``result_ttl_seconds`` after it finishes. Job keys are
computed inside the scripts, so this needs a single Redis server, not a cluster.

``AsyncRedisJobStore`` is the API's side of the same layout: the asyncio client,
with connect and read timeouts, running the same scripts.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from likeness.jobs.aio import (
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT_SECONDS,
    AsyncJobStore,
    Build,
    bounded,
)
from likeness.jobs.models import (
    FINAL_STATUSES,
    Heartbeat,
    JobError,
    JobPage,
    JobRecord,
    JobStatus,
    Progress,
    utc_from_timestamp,
)
from likeness.jobs.store import (
    CLAIM_SCAN_LIMIT,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    Clock,
    IdempotencyConflict,
    JobStore,
    fresh_record,
    parse_cursor,
    worker_lost_error,
)

DEFAULT_RESULT_TTL_SECONDS = 7 * 24 * 3600
_DOC_FIELDS = {"id", "owner", "inputs", "options", "request_hash", "idempotency_key"}
# Worker heartbeats older than this are dropped so the 'workers' set stays small.
_WORKER_FORGET_SECONDS = 24 * 3600

# Every script gets ARGV[1..4] = prefix, now, now + result TTL, result TTL.
_PRELUDE = """
local P = ARGV[1]
local now = ARGV[2]
local function job_key(id) return P .. 'job:' .. id end
local function blob_key(id) return P .. 'blobs:' .. id end
local function finalize(id, status)
  local k = job_key(id)
  redis.call('HSET', k, 'status', status, 'finished', now, 'updated', now, 'lease_expires', '')
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('ZADD', P .. 'done:' .. status, ARGV[3], id)
  redis.call('EXPIRE', k, ARGV[4])
  redis.call('EXPIRE', blob_key(id), ARGV[4])
  local idem = redis.call('HGET', k, 'idem')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, ARGV[4]) end
end
"""

_CREATE = """
local id, owner, idem, rhash = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then
    local h = redis.call('HGET', job_key(existing), 'request_hash')
    if h == rhash then return {'existing', existing} end
    if h then return {'conflict', existing} end
  end
end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', job_key(id), 'doc', ARGV[9], 'progress', ARGV[10], 'batch_key', ARGV[11],
  'request_hash', rhash, 'idem', idem, 'status', 'queued', 'seq', seq, 'created', now,
  'updated', now, 'started', '', 'finished', '', 'attempts', 0, 'lease_owner', '',
  'lease_expires', '', 'cancel_requested', '0', 'batch_id', '', 'result', '', 'error', '')
for i = 13, #ARGV, 2 do
  redis.call('HSET', blob_key(id), ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', P .. 'queue', seq, id)
redis.call('ZADD', P .. 'owner:' .. owner, seq, id)
if idem ~= '' then redis.call('SET', idem, id) end
return {'created', id}
"""

_CLAIM = """
local worker, n, lease_expires = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local max_attempts, batch_id, lost, scan_limit = tonumber(ARGV[8]), ARGV[9], ARGV[10],
  tonumber(ARGV[11])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now)) do
  local k = job_key(id)
  local f = redis.call('HMGET', k, 'status', 'cancel_requested', 'attempts', 'seq')
  if f[1] ~= 'running' then
    redis.call('ZREM', P .. 'leases', id)
  elseif f[2] == '1' then
    finalize(id, 'canceled')
  elseif tonumber(f[3]) >= max_attempts then
    redis.call('HSET', k, 'error', lost)
    finalize(id, 'failed')
  else
    -- back to the queue under its old sequence number: next in line
    redis.call('HSET', k, 'status', 'queued', 'lease_owner', '', 'lease_expires', '',
      'updated', now)
    redis.call('ZREM', P .. 'leases', id)
    redis.call('ZADD', P .. 'queue', f[4], id)
  end
end
redis.call('ZADD', P .. 'workers', now, worker)
local head = redis.call('ZRANGE', P .. 'queue', 0, 0)
if #head == 0 then return {} end
local key = redis.call('HGET', job_key(head[1]), 'batch_key')
local claimed = {}
local offset = 0
while #claimed < n and offset < scan_limit do
  local ids = redis.call('ZRANGE', P .. 'queue', offset, offset + 99)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #claimed < n and redis.call('HGET', job_key(id), 'batch_key') == key then
      claimed[#claimed + 1] = id
    end
  end
  offset = offset + 100
end
for _, id in ipairs(claimed) do
  local k = job_key(id)
  redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSET', k, 'status', 'running', 'lease_owner', worker,
    'lease_expires', lease_expires, 'started', now, 'updated', now, 'batch_id', batch_id)
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZADD', P .. 'leases', lease_expires, id)
end
return claimed
"""

_HEARTBEAT = """
local worker, lease_expires = ARGV[5], ARGV[6]
local held, cancel = {}, {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local k = job_key(id)
  local f = redis.call('HMGET', k, 'status', 'lease_owner', 'cancel_requested')
  if f[1] == 'running' and f[2] == worker then
    redis.call('HSET', k, 'lease_expires', lease_expires, 'updated', now)
    redis.call('ZADD', P .. 'leases', lease_expires, id)
    held[#held + 1] = id
    if f[3] == '1' then cancel[#cancel + 1] = id end
  end
end
redis.call('ZADD', P .. 'workers', now, worker)
return {held, cancel}
"""

_PROGRESS = """
local k = job_key(ARGV[5])
local f = redis.call('HMGET', k, 'status', 'lease_owner')
if f[1] ~= 'running' then return 0 end
if ARGV[6] ~= '' and f[2] ~= ARGV[6] then return 0 end
redis.call('HSET', k, 'progress', ARGV[7], 'updated', now)
return 1
"""

_CANCEL = """
local id = ARGV[5]
local k = job_key(id)
local f = redis.call('HMGET', k, 'status', 'cancel_requested')
if not f[1] then return {} end
if f[1] == 'queued' then
  finalize(id, 'canceled')
elseif f[1] == 'running' and f[2] ~= '1' then
  redis.call('HSET', k, 'cancel_requested', '1', 'updated', now)
end
return redis.call('HGETALL', k)
"""

_FINISH = """
local id, worker, status = ARGV[5], ARGV[6], ARGV[7]
local k = job_key(id)
local f = redis.call('HMGET', k, 'status', 'lease_owner')
if f[1] ~= 'running' or f[2] ~= worker then return 0 end
redis.call('HSET', k, 'result', ARGV[8], 'error', ARGV[9])
for i = 10, #ARGV, 2 do
  redis.call('HSET', blob_key(id), ARGV[i], ARGV[i + 1])
end
finalize(id, status)
return 1
"""


# The API's poll in one command: a job's fields and, while queued, its 0-based rank.
_GET = """
local k = job_key(ARGV[5])
local rank = redis.call('ZRANK', P .. 'queue', ARGV[5])
return {redis.call('HGETALL', k), rank or -1}
"""


def _ts(value: str) -> datetime | None:
    return utc_from_timestamp(float(value)) if value else None


def _flat_pairs(blobs: Mapping[str, bytes] | None) -> list[str | bytes]:
    out: list[str | bytes] = []
    for name, data in (blobs or {}).items():
        out += [name, data]
    return out


class RedisJobStore(JobStore):
    def __init__(
        self,
        client: redis.Redis | str,
        *,
        prefix: str = "likeness:",
        result_ttl_seconds: int = DEFAULT_RESULT_TTL_SECONDS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(lease_seconds=lease_seconds, max_attempts=max_attempts, clock=clock)
        self._owns_client = isinstance(client, str)
        # Blobs are bytes, so responses are never decoded implicitly.
        self.r = redis.Redis.from_url(client) if isinstance(client, str) else client
        self.prefix = prefix
        self.result_ttl_seconds = int(result_ttl_seconds)
        register = self.r.register_script
        self._create = register(_PRELUDE + _CREATE)
        self._claim = register(_PRELUDE + _CLAIM)
        self._heartbeat = register(_PRELUDE + _HEARTBEAT)
        self._progress = register(_PRELUDE + _PROGRESS)
        self._cancel = register(_PRELUDE + _CANCEL)
        self._finish = register(_PRELUDE + _FINISH)

    # -- helpers --------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _argv(self, now: float) -> list[str | bytes]:
        # repr() of a float round-trips exactly, so stored times read back unchanged.
        return [
            self.prefix,
            repr(now),
            repr(now + self.result_ttl_seconds),
            str(self.result_ttl_seconds),
        ]

    def _idem_key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
        return self._k("idem", digest)

    @staticmethod
    def _record(raw: Mapping[bytes, bytes]) -> JobRecord:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        doc: dict[str, Any] = json.loads(f["doc"])
        doc.update(
            status=f["status"],
            progress=json.loads(f["progress"]),
            result=json.loads(f["result"]) if f["result"] else None,
            error=json.loads(f["error"]) if f["error"] else None,
            created=_ts(f["created"]),
            updated=_ts(f["updated"]),
            started=_ts(f["started"]),
            finished=_ts(f["finished"]),
            attempts=int(f["attempts"]),
            lease_owner=f["lease_owner"] or None,
            lease_expires=_ts(f["lease_expires"]),
            cancel_requested=f["cancel_requested"] == "1",
            batch_id=f["batch_id"] or None,
        )
        return JobRecord.model_validate(doc)

    def _get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self._k("job", job_id))
        return [self._record(raw) if raw else None for raw in pipe.execute()]

    # -- the interface --------------------------------------------------------------------

    def create(self, record: JobRecord, blobs: Mapping[str, bytes]) -> tuple[JobRecord, bool]:
        now = self.clock()
        rec = fresh_record(record, now)
        idem = (
            self._idem_key(rec.owner, rec.idempotency_key)
            if rec.idempotency_key is not None
            else ""
        )
        outcome, job_id = self._create(
            args=[
                *self._argv(now),
                rec.id,
                rec.owner,
                idem,
                rec.request_hash,
                rec.model_dump_json(include=_DOC_FIELDS),
                rec.progress.model_dump_json(),
                rec.options.batch_key,
                str(len(blobs)),
                *_flat_pairs(blobs),
            ]
        )
        if outcome == b"created":
            return rec, True
        if outcome == b"conflict":
            raise IdempotencyConflict(cast(str, rec.idempotency_key))
        existing = self.get(job_id.decode())
        if existing is None:  # expired between the script and this read
            return self.create(record, blobs)
        return existing, False

    def get(self, job_id: str) -> JobRecord | None:
        return self._get_many([job_id])[0]

    def list_jobs(self, owner: str, *, limit: int = 20, cursor: str | None = None) -> JobPage:
        if limit < 1:
            raise ValueError("limit must be positive")
        before = parse_cursor(cursor)
        key = self._k("owner", owner)
        pairs = cast(
            list[tuple[bytes, float]],
            self.r.zrange(
                key,
                f"({before}" if before is not None else "+inf",
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            ),
        )
        ids = [member.decode() for member, _ in pairs[:limit]]
        records = self._get_many(ids)
        gone = [job_id for job_id, rec in zip(ids, records, strict=True) if rec is None]
        if gone:  # expired jobs leave their id in the owner index; drop it lazily
            self.r.zrem(key, *gone)
        next_cursor = str(int(pairs[limit - 1][1])) if len(pairs) > limit else None
        return JobPage(items=[r for r in records if r is not None], next_cursor=next_cursor)

    def queue_position(self, job_id: str) -> int | None:
        rank = self.r.zrank(self._k("queue"), job_id)
        return None if rank is None else int(cast(int, rank)) + 1

    def claim(
        self, worker_id: str, n: int = 1, *, lease_seconds: float | None = None
    ) -> list[JobRecord]:
        if n < 1:
            raise ValueError("n must be positive")
        now = self.clock()
        ids = self._claim(
            args=[
                *self._argv(now),
                worker_id,
                str(n),
                repr(now + self._lease(lease_seconds)),
                str(self.max_attempts),
                uuid.uuid4().hex,
                worker_lost_error(self.max_attempts).model_dump_json(),
                str(CLAIM_SCAN_LIMIT),
            ]
        )
        records = self._get_many([i.decode() for i in ids])
        return [r for r in records if r is not None]

    def heartbeat(
        self, worker_id: str, job_ids: Iterable[str], *, lease_seconds: float | None = None
    ) -> Heartbeat:
        now = self.clock()
        held, cancel = self._heartbeat(
            args=[*self._argv(now), worker_id, repr(now + self._lease(lease_seconds)), *job_ids]
        )
        return Heartbeat(
            held=[i.decode() for i in held], cancel_requested=[i.decode() for i in cancel]
        )

    def update_progress(
        self, job_id: str, progress: Progress, *, worker_id: str | None = None
    ) -> bool:
        done = self._progress(
            args=[*self._argv(self.clock()), job_id, worker_id or "", progress.model_dump_json()]
        )
        return bool(done)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        flat = self._cancel(args=[*self._argv(self.clock()), job_id])
        if not flat:
            return None
        return self._record(dict(zip(flat[::2], flat[1::2], strict=True)))

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
        done = self._finish(
            args=[
                *self._argv(self.clock()),
                job_id,
                worker_id,
                JobStatus(status).value,
                json.dumps(result) if result is not None else "",
                error.model_dump_json() if error is not None else "",
                *_flat_pairs(result_blobs),
            ]
        )
        return bool(done)

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        return cast(bytes | None, self.r.hget(self._k("blobs", job_id), name))

    def counts_by_status(self) -> dict[JobStatus, int]:
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(self._k("queue"))
        pipe.zcard(self._k("leases"))
        finals = sorted(FINAL_STATUSES)
        for status in finals:
            key = self._k("done", status.value)
            pipe.zremrangebyscore(key, "-inf", now)  # expired with their job
            pipe.zcard(key)
        replies = pipe.execute()
        counts = {JobStatus.QUEUED: int(replies[0]), JobStatus.RUNNING: int(replies[1])}
        for i, status in enumerate(finals):
            counts[status] = int(replies[3 + 2 * i])
        return {status: counts[status] for status in JobStatus}

    def record_worker_heartbeat(self, worker_id: str) -> None:
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self._k("workers"), {worker_id: now})
        pipe.zremrangebyscore(self._k("workers"), "-inf", now - _WORKER_FORGET_SECONDS)
        pipe.execute()

    def last_worker_heartbeat(self) -> datetime | None:
        top = cast(
            list[tuple[bytes, float]],
            self.r.zrange(self._k("workers"), 0, 0, desc=True, withscores=True),
        )
        return utc_from_timestamp(top[0][1]) if top else None

    def worker_heartbeats(self) -> dict[str, datetime]:
        beats = cast(
            list[tuple[bytes | str, float]],
            self.r.zrange(self._k("workers"), 0, -1, withscores=True),
        )
        return {
            worker.decode() if isinstance(worker, bytes) else worker: utc_from_timestamp(seen)
            for worker, seen in beats
        }

    def ping(self) -> None:
        self.r.ping()

    def close(self) -> None:
        if self._owns_client:
            self.r.close()


# What a Redis outage looks like from the client: refused, reset, or no answer in time.
REDIS_OUTAGES: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


class AsyncRedisJobStore(AsyncJobStore):
    """The API's calls on the asyncio client; every call answers within ``timeout``
    seconds or raises ``StoreUnavailable``."""

    def __init__(
        self,
        store: RedisJobStore,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        super().__init__(store, timeout=timeout, threads=threads)
        self.sync = store
        # One quick retry (a connection the server closed while idle), no backoff: the
        # whole call is bounded by ``timeout`` anyway, and an outage is answered at once.
        self.r = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=AsyncRetry(NoBackoff(), 1),
        )
        self._create = self.r.register_script(_PRELUDE + _CREATE)
        self._cancel = self.r.register_script(_PRELUDE + _CANCEL)
        self._get = self.r.register_script(_PRELUDE + _GET)

    async def _call(self, call: Any) -> Any:
        return await bounded(call, self.timeout, REDIS_OUTAGES)

    async def _get_many(self, job_ids: Sequence[str], positions: bool) -> list[Any]:
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.sync._k("job", job_id))
                if positions:
                    pipe.zrank(self.sync._k("queue"), job_id)
            replies: list[Any] = await pipe.execute()
        return replies

    async def create(self, build: Build) -> tuple[JobRecord, bool]:
        record, blobs = await self.off_loop(build)
        now = self.clock()
        rec = fresh_record(record, now)
        idem = (
            self.sync._idem_key(rec.owner, rec.idempotency_key)
            if rec.idempotency_key is not None
            else ""
        )
        args = [
            *self.sync._argv(now),
            rec.id,
            rec.owner,
            idem,
            rec.request_hash,
            rec.model_dump_json(include=_DOC_FIELDS),
            rec.progress.model_dump_json(),
            rec.options.batch_key,
            str(len(blobs)),
            *_flat_pairs(blobs),
        ]
        outcome, job_id = await self._call(self._create(args=args))
        if outcome == b"created":
            return rec, True
        if outcome == b"conflict":
            raise IdempotencyConflict(cast(str, rec.idempotency_key))
        existing, _ = await self.get(job_id.decode())
        if existing is None:  # expired between the script and this read
            return await self.create(lambda: (record, blobs))
        return existing, False

    async def get(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        flat, rank = await self._call(self._get(args=[*self.sync._argv(self.clock()), job_id]))
        if not flat:
            return None, None
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return self.sync._record(raw), None if rank < 0 else int(rank) + 1

    async def list_jobs(
        self, owner: str, *, limit: int, cursor: str | None
    ) -> tuple[JobPage, dict[str, int]]:
        if limit < 1:
            raise ValueError("limit must be positive")
        before = parse_cursor(cursor)
        key = self.sync._k("owner", owner)
        pairs = cast(
            list[tuple[bytes, float]],
            await self._call(
                self.r.zrange(
                    key,
                    f"({before}" if before is not None else "+inf",
                    "-inf",
                    desc=True,
                    byscore=True,
                    offset=0,
                    num=limit + 1,
                    withscores=True,
                )
            ),
        )
        ids = [member.decode() for member, _ in pairs[:limit]]
        replies = await self._call(self._get_many(ids, positions=True))
        items: list[JobRecord] = []
        positions: dict[str, int] = {}
        gone = []
        for job_id, raw, rank in zip(ids, replies[::2], replies[1::2], strict=True):
            if not raw:
                gone.append(job_id)
                continue
            items.append(self.sync._record(raw))
            if rank is not None:
                positions[job_id] = int(rank) + 1
        if gone:  # expired jobs leave their id in the owner index; drop it lazily
            await self._call(self.r.zrem(key, *gone))
        next_cursor = str(int(pairs[limit - 1][1])) if len(pairs) > limit else None
        return JobPage(items=items, next_cursor=next_cursor), positions

    async def request_cancel(self, job_id: str) -> JobRecord | None:
        flat = await self._call(self._cancel(args=[*self.sync._argv(self.clock()), job_id]))
        if not flat:
            return None
        return self.sync._record(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def get_blob(self, job_id: str, name: str) -> bytes | None:
        data = await self._call(self.r.hget(self.sync._k("blobs", job_id), name))
        return cast(bytes | None, data)

    async def counts_by_status(self) -> dict[JobStatus, int]:
        now = self.clock()
        finals = sorted(FINAL_STATUSES)

        async def run() -> list[Any]:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.zcard(self.sync._k("queue"))
                pipe.zcard(self.sync._k("leases"))
                for status in finals:
                    key = self.sync._k("done", status.value)
                    pipe.zremrangebyscore(key, "-inf", now)  # expired with their job
                    pipe.zcard(key)
                replies: list[Any] = await pipe.execute()
            return replies

        replies = await self._call(run())
        counts = {JobStatus.QUEUED: int(replies[0]), JobStatus.RUNNING: int(replies[1])}
        for i, status in enumerate(finals):
            counts[status] = int(replies[3 + 2 * i])
        return {status: counts[status] for status in JobStatus}

    async def last_worker_heartbeat(self) -> datetime | None:
        top = cast(
            list[tuple[bytes, float]],
            await self._call(
                self.r.zrange(self.sync._k("workers"), 0, 0, desc=True, withscores=True)
            ),
        )
        return utc_from_timestamp(top[0][1]) if top else None

    async def ping(self) -> None:
        await self._call(self.r.ping())

    async def aclose(self) -> None:
        await super().aclose()
        await self.r.aclose()
