"""The job contract shared by the app and the worker: the record and the store.

Torch-free on purpose: the API process imports this and must stay small.
"""

from likeness.jobs.aio import AsyncJobStore, ThreadedJobStore
from likeness.jobs.factory import async_store, open_store, open_store_from_settings
from likeness.jobs.models import (
    ANONYMOUS,
    FINAL_STATUSES,
    REFERENCE_BLOB,
    RESULT_BLOB,
    THUMBNAIL_BLOB,
    Heartbeat,
    InputFile,
    JobError,
    JobOptions,
    JobPage,
    JobRecord,
    JobStatus,
    Progress,
    batch_key,
    face_blob,
    new_job_id,
    request_hash,
)
from likeness.jobs.store import IdempotencyConflict, InvalidCursor, JobStore, StoreUnavailable

__all__ = [
    "ANONYMOUS",
    "AsyncJobStore",
    "FINAL_STATUSES",
    "Heartbeat",
    "IdempotencyConflict",
    "InputFile",
    "InvalidCursor",
    "JobError",
    "JobOptions",
    "JobPage",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "Progress",
    "REFERENCE_BLOB",
    "RESULT_BLOB",
    "StoreUnavailable",
    "THUMBNAIL_BLOB",
    "ThreadedJobStore",
    "async_store",
    "batch_key",
    "face_blob",
    "new_job_id",
    "open_store",
    "open_store_from_settings",
    "request_hash",
]
