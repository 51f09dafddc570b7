"""Command-line options of the upscale request, read off the one request model: the same
bounds and words as the API form."""

from __future__ import annotations

from typing import Any

import typer

from likeness.request import UpscaleRequest, bounds


def request_option(name: str, *flags: str, help: str | None = None) -> Any:
    """A typer option for the request field ``name``, bounded and described as the model
    says (``help`` replaces the model's words where the shell needs others)."""
    low, high, low_open = bounds(name)
    return typer.Option(
        *flags,
        min=None if low_open else low,
        max=high,
        help=help or UpscaleRequest.model_fields[name].description,
        show_default=False,
    )
