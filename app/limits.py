"""Size limits the API derives from the weights it serves.

A thumbnail is what the generator's output is downscaled to, so one larger than
a few times the generator's side cannot be upscaled by it: it is refused from
its header (413 image_too_large) before any pixel is decoded. Other uploads keep
their own caps (``max_pixels`` for reference photos, which are shrunk before the
face check), so a mode that takes larger photos sets its own limit beside these.
"""

from __future__ import annotations

import json
from pathlib import Path

from likeness.settings import Settings

# The bundled generator's side, assumed when the manifest names no default generator.
FALLBACK_GENERATOR_SIDE = 128
# No generator scale needs a thumbnail more than this many times its output's side.
THUMBNAIL_SIDE_FACTOR = 8


def default_generator_side(manifest_path: Path) -> int | None:
    """The ``resolution`` of the manifest's default generator, read as raw JSON."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    models = manifest.get("models", []) if isinstance(manifest, dict) else []
    for entry in models:
        if isinstance(entry, dict) and entry.get("kind") == "generator" and entry.get("default"):
            config = entry.get("config")
            side = config.get("resolution") if isinstance(config, dict) else None
            if isinstance(side, int) and side > 0:
                return side
    return None


def thumbnail_max_pixels(settings: Settings) -> int:
    """``settings.thumbnail_max_pixels``, else (8 x the default generator's side)^2;
    never more than ``settings.max_pixels``."""
    if settings.thumbnail_max_pixels is not None:
        limit = settings.thumbnail_max_pixels
    else:
        side = default_generator_side(settings.manifest_path) or FALLBACK_GENERATOR_SIDE
        limit = (THUMBNAIL_SIDE_FACTOR * side) ** 2
    return min(limit, settings.max_pixels)
