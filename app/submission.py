"""Turn an upscale request into a job record and its blobs, or say exactly what is wrong.

Everything is checked here, before the store is touched: a rejected request
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.labels import Labels
from likeness.errors import LikenessError
from likeness.images import DecodedImage, decode_image
from likeness.jobs import InputFile, JobOptions, JobRecord, batch_key, request_hash
from likeness.labels import canonical_attributes, canonical_race, parse_attribute_pairs
from likeness.photo import PhotoPlan, resolve_mode
from likeness.request import choose_seed, settle, validate_request
from likeness.settings import Settings

MAX_IDEMPOTENCY_KEY = 255


@dataclass
class Upload:
    field: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise LikenessError(
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
        )
    return key


def decode_upload(upload: Upload, decode: Callable[[bytes], DecodedImage]) -> DecodedImage:
    """Decode, naming the form field in the error so the client knows which file is bad."""
    try:
        return decode(upload.data)
    except LikenessError as exc:
        raise type(exc)(exc.code, f"{upload.field}: {exc.message}", status=exc.status) from None


def _input_file(upload: Upload, image: DecodedImage) -> InputFile:
    width, height = image.original_size
    return InputFile(
        filename=upload.filename,
        content_type=upload.content_type,
        size=len(upload.data),
        sha256=hashlib.sha256(upload.data).hexdigest(),
        width=width,
        height=height,
    )


def build_job(
    *,
    thumbnail: Upload,
    reference: Upload | None,
    form: Mapping[str, Any],
    owner: str,
    idempotency_key: str | None,
    settings: Settings,
    labels: Labels,
    check_reference: Callable[[bytes], DecodedImage],
    thumbnail_max_pixels: int | None = None,
    plan_photo: Callable[[DecodedImage, str], PhotoPlan] | None = None,
) -> tuple[JobRecord, dict[str, bytes]]:
    """Validate the whole request, then assemble the queued job and its input blobs.

    The image is a thumbnail or a photo as ``mode`` says (auto: by its longer side);
    each has its own pixel limit, and a photo must have usable faces (``plan_photo``
    finds them, or refuses with no_face, invalid_faces or too_many_faces).
    Blocking (decoding, hashing, face detection, the reference check): call it off the
    event loop.
    """
    key = check_idempotency_key(idempotency_key)
    values = dict(form)
    values["attributes"] = parse_attribute_pairs(values.get("attributes") or [])
    wanted = settle(validate_request(values), settings)
    thumb_limit = thumbnail_max_pixels or settings.max_pixels
    # The header decides auto; a photo's own (larger) limit bounds what is decoded for it.
    limit = thumb_limit if wanted.mode == "thumbnail" else settings.photo_max_pixels
    thumb = decode_upload(thumbnail, lambda d: decode_image(d, max_pixels=limit))
    width, height = thumb.original_size
    mode = resolve_mode(wanted.mode, width, height, settings.thumbnail_max_side)
    if mode == "photo" and plan_photo is not None:
        plan_photo(thumb, wanted.faces)
    ref = decode_upload(reference, check_reference) if reference is not None else None
    options = JobOptions.model_validate(
        wanted.model_dump()
        | {
            "race": canonical_race(wanted.race, labels.races),
            "attributes": canonical_attributes(wanted.attributes, labels.attributes),
            "mode": mode,
        }
    )
    inputs = {"thumbnail": _input_file(thumbnail, thumb)}
    blobs = {"thumbnail": thumbnail.data}
    if reference is not None and ref is not None:
        inputs["reference"] = _input_file(reference, ref)
        blobs["reference"] = reference.data
    # Hashed before a seed is chosen: a retry without a seed is the same request.
    rhash = request_hash(
        {name: f.sha256 for name, f in inputs.items()}, options.model_dump(mode="json")
    )
    if options.seed is None:
        options.seed = choose_seed()
    # Photos run one job per search (their faces batched); thumbnails batch by size.
    side = min(thumb.pixels.shape[:2]) if mode == "thumbnail" else 0
    options.batch_key = batch_key(options, side)
    record = JobRecord(
        owner=owner,
        inputs=inputs,
        options=options,
        request_hash=rhash,
        idempotency_key=key,
    )
    return record, blobs
