"""The upscale request: one model, with its bounds, behind the API form, the CLI's
options and the options a job stores.

Fields left out (None) are filled later and in one order: the request, then the
generator's manifest settings, then the engine's defaults (``resolve_search`` in the
pipeline). Steps, restarts and the seed are settled here, before a job is stored, so
a job records what it ran with.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from likeness.errors import LikenessError
from likeness.settings import Settings

MAX_STEPS = 10_000
MAX_RESTARTS = 64
MAX_SEED = 2**63 - 1
MAX_WEIGHT = 1000.0
MAX_EPS = 1.0
MAX_VIEWS = 16  # each view costs F another pass per step

Steps = Annotated[
    int, Field(ge=1, le=MAX_STEPS, description="Optimisation steps of the latent search.")
]
Restarts = Annotated[
    int, Field(ge=1, le=MAX_RESTARTS, description="Independent random starts per thumbnail.")
]


class UpscaleRequest(BaseModel):
    """How to upscale one thumbnail: everything but the images."""

    steps: Steps | None = None
    restarts: Restarts | None = None
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Random seed; the same seed gives the same output on the same device "
        "and weights. Omitted: one is chosen and reported.",
    )
    race: str | None = Field(
        default=None,
        description="Race label to steer towards (a name of the face "
        "extractor's race head, case-insensitive).",
    )
    keep_race: bool = Field(
        default=True,
        description="With no race named: keep the race the thumbnail shows, as the race "
        "reader reads it, a soft target the search steers toward but never rejects a face "
        "for. Off: the search takes the race from the generator, as plain PULSE does.",
    )
    attributes: dict[str, Literal[0, 1]] = Field(
        default_factory=dict,
        description="Attribute targets, name -> wanted value (0 absent, 1 present); written "
        "Name=0|1 on the command line and in the API form.",
    )
    identity_weight: float | None = Field(
        default=None,
        ge=0,
        le=MAX_WEIGHT,
        allow_inf_nan=False,
        description="Weight of keeping the reference's identity. Omitted: the engine's.",
    )
    race_weight: float | None = Field(
        default=None,
        ge=0,
        le=MAX_WEIGHT,
        allow_inf_nan=False,
        description="Weight of the race objective toward a named race (a race kept from the "
        "thumbnail has its own, lower weight). Omitted: the engine's.",
    )
    attr_weight: float | None = Field(
        default=None,
        ge=0,
        le=MAX_WEIGHT,
        allow_inf_nan=False,
        description="Weight of the attribute objectives. Omitted: the engine's.",
    )
    eps: float | None = Field(
        default=None,
        gt=0,
        le=MAX_EPS,
        allow_inf_nan=False,
        description="Downscaling MSE at which a face counts as matching the thumbnail. "
        "Omitted: the generator's manifest setting, else the engine's.",
    )
    views: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VIEWS,
        description="Views F sees of each candidate when steering (race, attributes, "
        "reference), averaged: more views steer by what survives shifts, scaling, rotation, "
        "mirroring and blur, at that many times F's cost. Omitted: the engine's (1).",
    )

    mode: Literal["auto", "thumbnail", "photo"] = Field(
        default="auto",
        description="thumbnail: the image is one face framed like FFHQ (non-square images "
        "are centre-cropped); photo: faces are detected anywhere in it, aligned, upscaled "
        "and pasted back into an enlarged copy; auto: thumbnail when the longer side is at "
        "most LIKENESS_THUMBNAIL_MAX_SIDE (64) pixels, else photo.",
    )
    faces: str = Field(
        default="all",
        max_length=200,
        pattern=r"^\s*(all|largest|\d+(\s*,\s*\d+)*)\s*$",
        description="Photo mode: which detected faces to upscale: all, largest, or face "
        "indices (largest face first, from 0) such as 0,2. Targets apply to each of them.",
    )


def bounds(name: str) -> tuple[float | None, float | None, bool]:
    """(low, high, low_open) of a request field, as its model states them."""
    prop = UpscaleRequest.model_json_schema()["properties"][name]
    number = next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), prop)
    if "exclusiveMinimum" in number:
        return number["exclusiveMinimum"], number.get("maximum"), True
    return number.get("minimum"), number.get("maximum"), False


class OutOfRange(LikenessError):
    status = 422

    def __init__(self, name: str, value: object, low: object, high: object) -> None:
        super().__init__("out_of_range", f"{name} must be between {low} and {high}; got {value}.")


def _number(value: float | None) -> object:
    return int(value) if value is not None and value == int(value) else value


def out_of_range(
    name: str, value: object, low: float | None = None, high: float | None = None
) -> OutOfRange:
    """The 422 for ``value`` outside the model's bounds (or the narrower ``low``/``high``)."""
    model_low, model_high, low_open = bounds(name)
    low = model_low if low is None else low
    high = model_high if high is None else high
    return OutOfRange(
        name, value, f"{_number(low)} (exclusive)" if low_open else _number(low), _number(high)
    )


_CHOICES = {
    "mode": "auto, thumbnail or photo",
    "faces": "all, largest or face indices such as 0,2",
}


def validate_request(values: dict[str, Any]) -> UpscaleRequest:
    """The request from parsed values; a value outside its bounds is a 422 that names it."""
    try:
        return UpscaleRequest.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err.get("loc") else ""
            if name in ("mode", "faces"):
                raise LikenessError(
                    f"invalid_{name}",
                    f"{name} must be {_CHOICES[name]}; got {values.get(name)!r}.",
                    status=422,
                ) from None
            if name in UpscaleRequest.model_fields and name not in ("race", "attributes"):
                raise out_of_range(name, values.get(name)) from None
        raise LikenessError(
            "invalid_request", f"Invalid request: {exc.errors()[0]['msg']}.", status=422
        ) from None


def choose_seed() -> int:
    """A seed for a request that gave none; recorded, so the result can be reproduced."""
    return secrets.randbelow(2**31)


def settle(request: UpscaleRequest, settings: Settings, *, capped: bool = True) -> UpscaleRequest:
    """Steps and restarts from the settings where the request has none. ``capped`` (the
    API): also within the settings' limits, a service's own caps inside the model's
    bounds; the command line has the model's bounds only."""
    limits = (
        ("steps", request.steps, settings.steps_min, settings.steps_max),
        ("restarts", request.restarts, settings.restarts_min, settings.restarts_max),
    )
    for name, given, low, high in limits if capped else ():
        if given is not None and not low <= given <= high:
            raise out_of_range(name, given, low, high)
    return request.model_copy(
        update={
            "steps": request.steps if request.steps is not None else settings.steps_default,
            "restarts": (
                request.restarts if request.restarts is not None else settings.restarts_default
            ),
        }
    )
