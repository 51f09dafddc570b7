"""POST /upscale: validate a thumbnail (and options), queue a job, answer 202 at once."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Header, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.deps import (
    LabelsDep,
    OwnerDep,
    PhotoPlannerDep,
    ReferenceCheckerDep,
    SettingsDep,
    StoreDep,
)
from app.api.errors import ERROR_RESPONSES, ErrorBody
from app.api.request_form import request_form
from app.api.schemas import FacesResponse, JobLinks, SubmitResponse
from app.submission import Upload, build_job, decode_upload
from likeness.errors import LikenessError
from likeness.images import decode_image

router = APIRouter(tags=["upscale"])


async def read_upload(upload: UploadFile, field: str, limit: int) -> Upload:
    # Starlette has spooled the part already; read one byte past the limit to detect excess.
    await upload.seek(0)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise LikenessError(
            "upload_too_large", f"{field} is larger than the limit of {limit} bytes.", status=413
        )
    return Upload(field, data, upload.filename or None, upload.content_type)


def _is_empty_file_input(upload: UploadFile) -> bool:
    # A browser form with no file chosen still sends the part, with no name and no bytes.
    return not upload.filename and (upload.size or 0) == 0


@router.post(
    "/upscale",
    status_code=202,
    response_model=SubmitResponse,
    summary="Queue a thumbnail, or a photo's faces, for upscaling",
    responses={
        **ERROR_RESPONSES,
        400: {"model": ErrorBody, "description": "Bad Idempotency-Key."},
        409: {
            "model": ErrorBody,
            "description": "Idempotency-Key reused with a different request "
            "(code idempotency_conflict).",
        },
        413: {
            "model": ErrorBody,
            "description": "A file over the byte or pixel limit (codes upload_too_large, "
            "image_too_large, request_too_large).",
        },
        422: {
            "model": ErrorBody,
            "description": "Invalid input; among the codes: no_face (a photo without a usable "
            "face: the message gives the image size and the smallest face the detector "
            "finds in it), faces_too_large (faces=all or largest, but every usable face is "
            "already over half the generator's side: the message gives their sizes; choose "
            "one by index to upscale it anyway), too_many_faces, invalid_faces, "
            "invalid_mode, out_of_range.",
        },
        429: {
            "model": ErrorBody,
            "description": "Too many reference photos or photos being checked at once "
            "(codes reference_checks_busy, photo_checks_busy); retry after Retry-After "
            "seconds.",
        },
        503: {
            "model": ErrorBody,
            "description": "The job store does not answer (code store_unavailable); retry "
            "after Retry-After seconds.",
        },
    },
)
async def submit_upscale(
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    owner: OwnerDep,
    labels: LabelsDep,
    check_reference: ReferenceCheckerDep,
    plan_photo: PhotoPlannerDep,
    thumbnail: Annotated[
        UploadFile,
        File(
            description="The image (PNG, JPEG, WEBP, BMP or GIF), at most "
            "LIKENESS_MAX_UPLOAD_BYTES bytes. Thumbnail mode: a low-resolution face, roughly "
            "centred (non-square images are centre-cropped), at most "
            "LIKENESS_THUMBNAIL_MAX_PIXELS pixels (default: 8 times the generator's side, "
            "squared). Photo mode: any photo with faces of at least 20 pixels, at most "
            "LIKENESS_PHOTO_MAX_PIXELS pixels (default 4096*4096)."
        ),
    ],
    form: Annotated[dict[str, Any], Depends(request_form)],
    reference: Annotated[
        UploadFile | None,
        File(description="Optional photo of the same person; the search keeps its identity."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string (<= 255 printable ASCII). Retrying with the same "
            "key and the same request returns the first job instead of a new one; the same "
            "key with a different request is refused with 409.",
        ),
    ] = None,
) -> SubmitResponse:
    """Validate everything, store the inputs and a queued job, and return its links.

    Poll the `self` link for progress; fetch `result` once the status is
    `succeeded`. Nothing is stored when any check fails.
    """
    limit = settings.max_upload_bytes
    thumb_upload = await read_upload(thumbnail, "thumbnail", limit)
    ref_upload = (
        None
        if reference is None or _is_empty_file_input(reference)
        else await read_upload(reference, "reference", limit)
    )
    # The request's one trip off the event loop: decode, hash, check, (SQLite) insert.
    job, created = await store.create(
        partial(
            build_job,
            thumbnail=thumb_upload,
            reference=ref_upload,
            form=form,
            owner=owner,
            idempotency_key=idempotency_key,
            settings=settings,
            labels=labels,
            check_reference=check_reference,
            thumbnail_max_pixels=request.app.state.thumbnail_max_pixels,
            plan_photo=plan_photo,
        )
    )
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return SubmitResponse(id=job.id, status=job.status, links=JobLinks.of(request, job.id))


@router.post(
    "/faces",
    response_model=FacesResponse,
    summary="Find the faces of a photo",
    responses={
        **ERROR_RESPONSES,
        413: {
            "model": ErrorBody,
            "description": "A file over the byte or pixel limit (codes upload_too_large, "
            "image_too_large).",
        },
        422: {
            "model": ErrorBody,
            "description": "Not an image, or no usable face (code no_face: the message gives "
            "the image size and the smallest face the detector finds in it).",
        },
        429: {
            "model": ErrorBody,
            "description": "Too many photos being checked at once (code photo_checks_busy); "
            "retry after Retry-After seconds.",
        },
    },
)
async def find_faces(
    settings: SettingsDep,
    owner: OwnerDep,
    plan_photo: PhotoPlannerDep,
    photo: Annotated[
        UploadFile,
        File(description="The photo, as POST /upscale takes it in photo mode."),
    ],
) -> FacesResponse:
    """Detect faces as photo mode does, without queueing anything: each face's box,
    confidence, own resolution, the thumbnail size it would be searched at, and whether
    it is usable; pick indices from it for the ``faces`` field of ``POST /upscale``."""
    upload = await read_upload(photo, "photo", settings.max_upload_bytes)

    def detect() -> FacesResponse:
        image = decode_upload(
            upload, lambda d: decode_image(d, max_pixels=settings.photo_max_pixels)
        )
        plan = plan_photo(image, "all", listing=True)
        return FacesResponse.model_validate(
            plan.describe() | {"max_faces": settings.photo_max_faces}
        )

    return await run_in_threadpool(detect)
