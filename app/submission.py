"""Turn an upscale request into a job record and its blobs, or say exactly what is wrong.

Everything is checked here, before the store is touched: a rejected request
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.labels import Labels
from likeness.errors import LikenessError
from likeness.images import DecodedImage, decode_image
from likeness.jobs import InputFile, JobOptions, JobRecord, batch_key, request_hash
from likeness.settings import Settings

MAX_SEED = 2**63 - 1
MAX_WEIGHT = 1000.0
MAX_EPS = 1.0
MAX_VIEWS = 16  # ObjectiveWeights.views' bound: each view costs a pass of F
MAX_IDEMPOTENCY_KEY = 255


@dataclass
class Upload:
    field: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass
class UpscaleForm:
    """The non-file form fields, as parsed (types checked, values not yet)."""

    race: str | None = None
    attributes: list[str] = field(default_factory=list)
    steps: int | None = None
    restarts: int | None = None
    seed: int | None = None
    identity_weight: float | None = None
    race_weight: float | None = None
    attr_weight: float | None = None
    eps: float | None = None
    views: int | None = None


class OutOfRange(LikenessError):
    status = 422

    def __init__(self, name: str, value: object, low: object, high: object) -> None:
        super().__init__("out_of_range", f"{name} must be between {low} and {high}; got {value}.")


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        raise OutOfRange(name, value, f"{low} (exclusive)" if low_open else low, high)


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


def parse_attributes(values: list[str], labels: Labels) -> dict[str, Literal[0, 1]]:
    wanted: dict[str, Literal[0, 1]] = {}
    # Repeated fields and comma-separated lists are both accepted.
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    for item in items:
        name, sep, raw = item.rpartition(":")
        if not sep or not name:
            raise LikenessError(
                "invalid_attribute",
                f"attribute {item!r} must look like Name:0 or Name:1.",
                status=422,
            )
        canonical = labels.attribute(name)
        if canonical is None:
            raise LikenessError(
                "unknown_attribute",
                f"Unknown attribute {name.strip()!r}; known: {', '.join(labels.attributes)}.",
                status=422,
            )
        if raw.strip() not in ("0", "1"):
            raise LikenessError(
                "invalid_attribute",
                f"attribute {canonical} must be 0 or 1; got {raw.strip()!r}.",
                status=422,
            )
        if canonical in wanted:
            raise LikenessError(
                "invalid_attribute", f"attribute {canonical} is given twice.", status=422
            )
        wanted[canonical] = 1 if raw.strip() == "1" else 0
    return wanted


def parse_race(race: str | None, labels: Labels) -> str | None:
    if race is None or not race.strip():
        return None
    canonical = labels.race(race)
    if canonical is None:
        raise LikenessError(
            "unknown_race",
            f"Unknown race {race.strip()!r}; known: {', '.join(labels.races)}.",
            status=422,
        )
    return canonical


def check_options(form: UpscaleForm, settings: Settings) -> None:
    if form.steps is not None:
        _in_range("steps", form.steps, settings.steps_min, settings.steps_max)
    if form.restarts is not None:
        _in_range("restarts", form.restarts, settings.restarts_min, settings.restarts_max)
    if form.seed is not None:
        _in_range("seed", form.seed, 0, MAX_SEED)
    for name in ("identity_weight", "race_weight", "attr_weight"):
        value = getattr(form, name)
        if value is not None:
            _in_range(name, value, 0.0, MAX_WEIGHT)
    if form.eps is not None:
        _in_range("eps", form.eps, 0.0, MAX_EPS, low_open=True)
    if form.views is not None:
        _in_range("views", form.views, 1, MAX_VIEWS)


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
    form: UpscaleForm,
    owner: str,
    idempotency_key: str | None,
    settings: Settings,
    labels: Labels,
    check_reference: Callable[[bytes], DecodedImage],
) -> tuple[JobRecord, dict[str, bytes]]:
    """Validate the whole request, then assemble the queued job and its input blobs."""
    key = check_idempotency_key(idempotency_key)
    thumb = decode_upload(thumbnail, lambda d: decode_image(d, max_pixels=settings.max_pixels))
    ref = decode_upload(reference, check_reference) if reference is not None else None
    race = parse_race(form.race, labels)
    attributes = parse_attributes(form.attributes, labels)
    check_options(form, settings)

    options = JobOptions(
        steps=form.steps if form.steps is not None else settings.steps_default,
        restarts=form.restarts if form.restarts is not None else settings.restarts_default,
        seed=form.seed,
        race=race,
        attributes=attributes,
        identity_weight=form.identity_weight,
        race_weight=form.race_weight,
        attr_weight=form.attr_weight,
        eps=form.eps,
        views=form.views,
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
        options.seed = secrets.randbelow(2**31)  # recorded, so the result can be reproduced
    options.batch_key = batch_key(options, min(thumb.pixels.shape[:2]))
    record = JobRecord(
        owner=owner,
        inputs=inputs,
        options=options,
        request_hash=rhash,
        idempotency_key=key,
    )
    return record, blobs
