"""Command-line options of the upscale request, read off the one request model: the same
bounds and words as the API form."""

from __future__ import annotations

import re
from typing import Any

import typer

from likeness.request import UpscaleRequest, bounds


def request_option(name: str, *flags: str, help: str | None = None) -> Any:
    """A typer option for the request field ``name``, bounded and described as the model
    says (``help`` replaces the model's words where the shell needs others)."""
    low, high, low_open = bounds(name)
    words = UpscaleRequest.model_fields[name].description or ""
    # The model says "Omitted: X." for the API; the shell's one style is "(default: X)".
    words = re.sub(r"\s*Omitted: (.*)\.$", r" (default: \1)", words)
    return typer.Option(
        *flags,
        min=None if low_open else low,
        max=high,
        help=help or words,
        show_default=False,
    )
