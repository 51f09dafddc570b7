"""The job record: what the app writes, the worker reads and updates, and clients see."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from likeness.request import Restarts, Steps, UpscaleRequest


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

ANONYMOUS = "anonymous"

# Blob names both sides agree on: the app stores the inputs, the worker the result.
THUMBNAIL_BLOB = "thumbnail"
REFERENCE_BLOB = "reference"
RESULT_BLOB = "result.png"


def face_blob(index: int, kind: str = "") -> str:
    """Blob name of a photo job's face ``index``: the upscaled face, or (``kind``
    "thumbnail") the aligned thumbnail it was upscaled from."""
    return f"face-{index}{'-' + kind if kind else ''}.png"


def new_job_id() -> str:
    """128 random bits as hex: unguessable, so an id alone reveals nothing about others."""
    return secrets.token_hex(16)


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class Progress(BaseModel):
    step: int = Field(default=0, ge=0, description="Search steps done so far.")
    steps: int = Field(default=0, ge=0, description="Search steps the job will run in total.")
    best_mse: float | None = Field(
        default=None,
        description="Lowest downscaling error (MSE against the thumbnail) found so far.",
    )


class InputFile(BaseModel):
    """An uploaded file; its bytes are a blob of the same name, kept beside the record."""

    filename: str | None = Field(default=None, description="Name the client gave the file, if any.")
    content_type: str | None = Field(default=None, description="Content type the client declared.")
    size: int = Field(..., ge=0, description="Size in bytes.")
    sha256: str = Field(..., description="SHA-256 of the bytes, hex.")
    width: int | None = Field(default=None, description="Width in pixels as decoded.")
    height: int | None = Field(default=None, description="Height in pixels as decoded.")


class JobOptions(UpscaleRequest):
    """The request as the job stores it: steps, restarts and seed settled, race and
    attribute names as the labels spell them."""

    steps: Steps
    restarts: Restarts
    batch_key: str = Field(
        default="",
        description="Jobs with equal batch keys can share one batched search; claim() "
        "only hands out jobs with the same key together.",
    )


class JobError(BaseModel):
    code: str = Field(..., description="Machine-readable reason.")
    message: str = Field(..., description="One sentence a user can act on.")


class JobRecord(BaseModel):
    """One upscaling request and everything that happened to it."""

    id: str = Field(default_factory=new_job_id, description="128-bit random id, hex.")
    owner: str = Field(
        default=ANONYMOUS, description="SHA-256 of the caller's API key, or 'anonymous'."
    )
    status: JobStatus = Field(default=JobStatus.QUEUED, description="Where the job is now.")
    progress: Progress = Field(default_factory=Progress, description="Search progress.")
    inputs: dict[str, InputFile] = Field(
        default_factory=dict, description="Blob name ('thumbnail', 'reference') -> file facts."
    )
    options: JobOptions = Field(..., description="How to search.")
    request_hash: str = Field(
        default="", description="Hash of inputs and options, to tell a retry from a new request."
    )
    idempotency_key: str | None = Field(
        default=None, description="The client's Idempotency-Key header, if it sent one."
    )
    result: dict[str, Any] | None = Field(
        default=None, description="The worker's report once the job succeeded."
    )
    error: JobError | None = Field(default=None, description="Why the job failed.")
    created: datetime | None = Field(default=None, description="When the job was submitted.")
    started: datetime | None = Field(
        default=None, description="When the latest attempt was claimed by a worker."
    )
    finished: datetime | None = Field(default=None, description="When the job became final.")
    updated: datetime | None = Field(default=None, description="Last change of any kind.")
    attempts: int = Field(default=0, ge=0, description="How many times a worker claimed the job.")
    lease_owner: str | None = Field(
        default=None, description="The worker holding (or that last held) the job."
    )
    lease_expires: datetime | None = Field(
        default=None, description="When the running job may be claimed again without heartbeat."
    )
    cancel_requested: bool = Field(
        default=False, description="A client asked to cancel while the job was running."
    )
    batch_id: str | None = Field(
        default=None, description="Shared by the jobs claimed together into one batched search."
    )


class JobPage(BaseModel):
    items: list[JobRecord]
    next_cursor: str | None = None


class Heartbeat(BaseModel):
    """What a worker learns from renewing its leases."""

    held: list[str] = Field(default_factory=list, description="Jobs whose lease was renewed.")
    cancel_requested: list[str] = Field(
        default_factory=list, description="Held jobs a client asked to cancel."
    )


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def request_hash(input_hashes: Mapping[str, str], options: Mapping[str, Any]) -> str:
    """Hash of what the client sent: a retried request hashes the same, a changed one not."""
    return hashlib.sha256(
        _canonical({"inputs": dict(input_hashes), "options": dict(options)})
    ).hexdigest()


def batch_key(options: JobOptions, thumbnail_side: int) -> str:
    """Key of the jobs one batched search can run together.

    The search stacks thumbnails of one size into a tensor and runs one step
    count, restart count and set of loss weights over the batch; race,
    attributes, seed and reference are per-element and do not split batches.
    """
    shared = options.model_dump(
        include={
            "steps",
            "restarts",
            "identity_weight",
            "race_weight",
            "attr_weight",
            "eps",
            "views",
            "mode",
        }
    )
    shared["thumbnail_side"] = thumbnail_side
    return hashlib.sha256(_canonical(shared)).hexdigest()[:16]
