"""The upscale form, derived from the one request model: a form field per model field,
described and bounded as the model says, so the API cannot drift from the CLI."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Form

from likeness.request import UpscaleRequest, bounds

# What a field means on the wire where the model's own words are not enough.
_API_NOTES = {
    "steps": "Within LIKENESS_STEPS_MIN..LIKENESS_STEPS_MAX (default 1..1000); omitted: "
    "LIKENESS_STEPS_DEFAULT (100).",
    "restarts": "Within LIKENESS_RESTARTS_MIN..LIKENESS_RESTARTS_MAX (default 1..32); "
    "omitted: LIKENESS_RESTARTS_DEFAULT (4).",
    "race": "Default label set: White, Black, Asian, Indian, Others.",
}
_WIRE_TYPES = {"integer": int, "number": float, "string": str, "boolean": bool}


def _wire_type(name: str) -> type:
    prop = UpscaleRequest.model_json_schema()["properties"][name]
    kinds = [p.get("type") for p in prop.get("anyOf", [prop])]
    return next(_WIRE_TYPES[k] for k in kinds if k in _WIRE_TYPES)


def _description(name: str) -> str:
    text = UpscaleRequest.model_fields[name].description or ""
    if name in ("race", "attributes"):
        return " ".join(filter(None, (text, _API_NOTES.get(name))))
    low, high, low_open = bounds(name)
    if low is not None and high is not None:
        text += f" Range {'(' if low_open else '['}{low:g}, {high:g}]."
    return " ".join(filter(None, (text, _API_NOTES.get(name))))


def _parameters() -> list[inspect.Parameter]:
    params = []
    for name in UpscaleRequest.model_fields:
        if name == "attributes":
            # The form repeats one field per target, as the CLI repeats --attr.
            params.append(
                inspect.Parameter(
                    "attribute",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[
                        list[str] | None,
                        Form(
                            description="Wanted attribute as Name=0 or Name=1 (CelebA names "
                            "such as Smiling, Eyeglasses, Male; Name:1 is read too). Repeat the "
                            "field for several."
                        ),
                    ],
                )
            )
            continue
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_wire_type(name) | None, Form(description=_description(name))],
            )
        )
    return params


async def _read(**fields: Any) -> dict[str, Any]:
    # Bounds are checked by the model afterwards, so a value out of range is a 422
    # out_of_range that names the field, not a generic validation error.
    values = {name: value for name, value in fields.items() if value is not None}
    values["attributes"] = values.pop("attribute", [])
    return values


_read.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]

request_form: Callable[..., Awaitable[dict[str, Any]]] = _read
