"""Response bodies of the HTTP API (requests are multipart forms, see routes/upscale.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from likeness.jobs import InputFile, JobError, JobOptions, JobRecord, JobStatus, Progress

_JOB_ID_SLOT = "__job_id__"


class JobLinks(BaseModel):
    self: str = Field(..., description="This job's status: GET.")
    result: str = Field(..., description="The upscaled PNG once the job succeeded: GET.")
    cancel: str = Field(..., description="Cancel the job: POST.")

    @classmethod
    def of(cls, request: Request, job_id: str) -> JobLinks:
        # The routes' paths are looked up once per app, not three router searches a request.
        paths: list[str] | None = getattr(request.app.state, "job_link_paths", None)
        if paths is None:
            paths = [
                request.app.url_path_for(name, job_id=_JOB_ID_SLOT)
                for name in ("get_job", "get_job_result", "cancel_job")
            ]
            request.app.state.job_link_paths = paths
        base = str(request.base_url).rstrip("/")
        own, result, cancel = (base + path.replace(_JOB_ID_SLOT, job_id) for path in paths)
        return cls(self=own, result=result, cancel=cancel)


class SubmitResponse(BaseModel):
    id: str = Field(..., description="The job id (128-bit, hex).")
    status: JobStatus = Field(..., description="Status right after submission: usually queued.")
    links: JobLinks


class Timings(BaseModel):
    wait_seconds: float | None = Field(
        default=None, description="From submission to the latest start (or to now while queued)."
    )
    run_seconds: float | None = Field(
        default=None, description="From the latest start to the end (or to now while running)."
    )


class PublicOptions(BaseModel):
    """The options as the worker will use them (defaults filled in, seed chosen)."""

    steps: int = Field(..., description="Optimisation steps of the latent search.")
    restarts: int = Field(..., description="Independent random starts.")
    seed: int | None = Field(
        default=None, description="Random seed; resubmit with it to reproduce."
    )
    race: str | None = Field(default=None, description="Race label steered towards.")
    keep_race: bool = Field(
        default=True, description="With no race: the race the thumbnail shows is kept."
    )
    attributes: dict[str, int] = Field(..., description="Attribute name -> wanted value (0/1).")
    identity_weight: float | None = Field(default=None, description="None: the engine's default.")
    race_weight: float | None = Field(default=None, description="None: the engine's default.")
    attr_weight: float | None = Field(default=None, description="None: the engine's default.")
    eps: float | None = Field(default=None, description="None: the engine's default.")
    views: int | None = Field(default=None, description="None: the engine's default (1).")
    mode: str = Field(default="thumbnail", description="thumbnail or photo, as decided.")
    faces: str = Field(default="all", description="Photo mode: the faces asked for.")

    @classmethod
    def of(cls, options: JobOptions) -> PublicOptions:
        return cls.model_validate(options.model_dump(exclude={"batch_key"}))


class JobView(BaseModel):
    id: str = Field(..., description="The job id.")
    status: JobStatus = Field(..., description="queued, running, succeeded, failed or canceled.")
    queue_position: int | None = Field(
        default=None, description="1 when the job is next in line; null unless queued."
    )
    progress: Progress = Field(..., description="Search progress of the current attempt.")
    options: PublicOptions
    inputs: dict[str, InputFile] = Field(..., description="The uploaded files.")
    attempts: int = Field(..., description="How many times a worker picked the job up.")
    cancel_requested: bool = Field(..., description="Cancellation asked while running.")
    created: datetime | None = Field(default=None, description="Submission time (UTC).")
    started: datetime | None = Field(default=None, description="Start of the latest attempt (UTC).")
    finished: datetime | None = Field(default=None, description="When the job became final (UTC).")
    updated: datetime | None = Field(default=None, description="Last change (UTC).")
    timings: Timings
    result: dict[str, Any] | None = Field(
        default=None, description="The worker's report on success."
    )
    error: JobError | None = Field(default=None, description="Why the job failed.")
    links: JobLinks

    @classmethod
    def of(
        cls, request: Request, job: JobRecord, queue_position: int | None, now: datetime
    ) -> JobView:
        return cls(
            id=job.id,
            status=job.status,
            queue_position=queue_position,
            progress=job.progress,
            options=PublicOptions.of(job.options),
            inputs=job.inputs,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            created=job.created,
            started=job.started,
            finished=job.finished,
            updated=job.updated,
            timings=_timings(job, now),
            result=job.result,
            error=job.error,
            links=JobLinks.of(request, job.id),
        )


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)


def _timings(job: JobRecord, now: datetime) -> Timings:
    end = job.finished or now
    if job.status is JobStatus.QUEUED or job.started is None:
        return Timings(wait_seconds=_seconds(job.created, end))
    return Timings(
        wait_seconds=_seconds(job.created, job.started), run_seconds=_seconds(job.started, end)
    )


class JobList(BaseModel):
    items: list[JobView] = Field(..., description="The caller's jobs, newest first.")
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for the next page; null on the last page."
    )


class DetectedFace(BaseModel):
    index: int = Field(..., description="The face's index, largest face first (from 0).")
    box: list[float] = Field(..., description="x1, y1, x2, y2 in the photo's pixels.")
    prob: float = Field(..., description="The detector's confidence.")
    face_side: float = Field(
        ..., description="Side in photo pixels of the face's FFHQ frame: its own resolution."
    )
    thumbnail_size: int = Field(..., description="Thumbnail side the face is searched at.")
    usable: bool = Field(..., description="Whether photo mode can upscale this face.")
    large: bool = Field(
        default=False,
        description="Its frame spans more than LIKENESS_PHOTO_MAX_FACE_FRACTION of the "
        "generator's side: faces=all and largest leave it as the photo's pixels, an index "
        "upscales it anyway.",
    )
    reason: str | None = Field(
        default=None, description="Why it is not upscaled by default: not usable, or large."
    )
    chosen: bool = Field(..., description="Part of faces=all.")
    landmarks: list[list[float]] = Field(..., description="Eyes, nose, mouth corners (x, y).")
    to_thumbnail: list[list[float]] = Field(
        ..., description="2x3 similarity from photo to thumbnail coordinates (pixel corners)."
    )


class FacesResponse(BaseModel):
    width: int = Field(..., description="The photo's width in pixels.")
    height: int = Field(..., description="The photo's height in pixels.")
    min_face_size: float = Field(
        ..., description="The smallest face side (pixels) the detector finds in this photo."
    )
    max_faces: int = Field(..., description="Most faces one request may choose.")
    faces: list[DetectedFace] = Field(..., description="Every face found, largest first.")


class Health(BaseModel):
    status: str = Field(default="ok", description="Always 'ok': the process answers.")


class Ready(BaseModel):
    status: str = Field(default="ready", description="'ready' when jobs will be picked up.")
    last_worker_heartbeat: datetime | None = Field(
        default=None, description="When a worker last reported in."
    )
