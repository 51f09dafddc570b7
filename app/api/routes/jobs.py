"""The caller's jobs: status, result image, cancellation, listing.

A job of another owner answers exactly like a job that does not exist (404),
so ids cannot be probed.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from app.api.deps import OwnerDep, StoreDep
from app.api.errors import ERROR_RESPONSES, ErrorBody
from app.api.schemas import JobList, JobView
from likeness.errors import LikenessError
from likeness.jobs import RESULT_BLOB, AsyncJobStore, JobRecord, JobStatus, face_blob
from likeness.jobs.models import utc_from_timestamp

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_PAGE = 100
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobNotFound(LikenessError):
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__("not_found", f"There is no job {job_id!r} for this caller.")


async def load_own_job(
    store: AsyncJobStore, owner: str, job_id: str
) -> tuple[JobRecord, int | None]:
    """The caller's job and its queue position (while queued)."""
    job, position = await store.get(job_id) if _JOB_ID.fullmatch(job_id) else (None, None)
    if job is None or job.owner != owner:
        raise JobNotFound(job_id)
    return job, position


async def finished_png(
    store: AsyncJobStore, job: JobRecord, blob: str, *, ready: str, missing: str, filename: str
) -> Response:
    """A PNG blob of a job: 404 result_not_ready until the job is final, 404 no_result when
    it did not succeed or has no such blob."""
    if not job.status.is_final:
        raise LikenessError(
            "result_not_ready",
            f"The job is {job.status.value}; {ready} once it has succeeded.",
            status=404,
        )
    data = await store.get_blob(job.id, blob) if job.status is JobStatus.SUCCEEDED else None
    if data is None:
        raise LikenessError("no_result", missing, status=404)
    return Response(
        data,
        media_type="image/png",
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


def view(request: Request, store: AsyncJobStore, job: JobRecord, position: int | None) -> JobView:
    return JobView.of(request, job, position, utc_from_timestamp(store.clock()))


@router.get("", response_model=JobList, summary="List your jobs", responses=ERROR_RESPONSES)
async def list_jobs(
    request: Request,
    store: StoreDep,
    owner: OwnerDep,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE, description=f"Jobs per page, 1..{MAX_PAGE}.")
    ] = 20,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page; omit for the first.")
    ] = None,
) -> JobList:
    """The caller's jobs, newest first, a page at a time."""
    page, positions = await store.list_jobs(owner, limit=limit, cursor=cursor)
    return JobList(
        items=[view(request, store, job, positions.get(job.id)) for job in page.items],
        next_cursor=page.next_cursor,
    )


@router.get(
    "/{job_id}",
    name="get_job",
    response_model=JobView,
    summary="A job's status",
    responses=ERROR_RESPONSES,
)
async def get_job(request: Request, job_id: str, store: StoreDep, owner: OwnerDep) -> JobView:
    """Status, queue position, progress, timings, and the report or error once final.

    The position is at most about a second old under load."""
    job, position = await load_own_job(store, owner, job_id)
    return view(request, store, job, position)


@router.get(
    "/{job_id}/result",
    name="get_job_result",
    response_class=Response,
    summary="The upscaled image",
    responses={
        200: {"content": {"image/png": {}}, "description": "The upscaled face as PNG."},
        **ERROR_RESPONSES,
        404: {
            "model": ErrorBody,
            "description": "No such job (not_found), not finished yet (result_not_ready), or "
            "finished without an image (no_result).",
        },
    },
)
async def get_job_result(job_id: str, store: StoreDep, owner: OwnerDep) -> Response:
    job, _ = await load_own_job(store, owner, job_id)
    return await finished_png(
        store,
        job,
        RESULT_BLOB,
        ready="the result exists",
        missing=f"The job ended {job.status.value} and has no result image.",
        filename=f"{job.id}.png",
    )


@router.get(
    "/{job_id}/faces/{index}",
    name="get_job_face",
    response_class=Response,
    summary="One upscaled face of a photo job",
    responses={
        200: {"content": {"image/png": {}}, "description": "The face as PNG."},
        **ERROR_RESPONSES,
        404: {
            "model": ErrorBody,
            "description": "No such job (not_found), not finished yet (result_not_ready), or "
            "no such face in its result (no_result).",
        },
    },
)
async def get_job_face(
    job_id: str,
    store: StoreDep,
    owner: OwnerDep,
    index: Annotated[int, Path(ge=0, le=10**6, description="The face's index in the report.")],
    kind: Annotated[
        Literal["upscaled", "thumbnail"],
        Query(
            description="upscaled: the face the search found, in its FFHQ frame at the "
            "generator's side; thumbnail: the aligned crop of the photo it was searched from."
        ),
    ] = "upscaled",
) -> Response:
    job, _ = await load_own_job(store, owner, job_id)
    return await finished_png(
        store,
        job,
        face_blob(index, "" if kind == "upscaled" else kind),
        ready="its faces exist",
        missing=f"The job has no face {index} (only photo jobs have faces; the report lists them).",
        filename=f"{job.id}-face{index}.png",
    )


@router.post(
    "/{job_id}/cancel",
    name="cancel_job",
    response_model=JobView,
    summary="Cancel a job",
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorBody, "description": "The job already ended (code job_finished)."},
    },
)
async def cancel_job(request: Request, job_id: str, store: StoreDep, owner: OwnerDep) -> JobView:
    """A queued job is canceled at once; a running one stops at its next step check.

    Canceling a canceled job is a no-op; a succeeded or failed one answers 409.
    """
    await load_own_job(store, owner, job_id)
    job = await store.request_cancel(job_id)
    if job is None:  # it expired between the two calls
        raise JobNotFound(job_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise LikenessError(
            "job_finished", f"The job already {job.status.value}; nothing to cancel.", status=409
        )
    # Never queued after a cancel request: canceled, running (flagged) or final.
    return view(request, store, job, None)
