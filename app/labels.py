"""Race and attribute names the API accepts, from the weights manifest when it has them.

The manifest is written by the training and import commands; until one ships
labelled heads, the names are UTKFace's five races and CelebA's 40 attributes,
which are what the default heads are trained on. Read as raw JSON (not through
``likeness.manifest``) so a manifest written by a newer version still loads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from likeness.labels import CELEBA_ATTRIBUTES, UTKFACE_RACES

DEFAULT_RACES = UTKFACE_RACES
DEFAULT_ATTRIBUTES = CELEBA_ATTRIBUTES

# Keys under which a manifest may list the names: top-level "labels", or the
# "config" of a model entry (the default entry of its kind wins).
_RACE_KEYS = ("races", "race_labels")
_ATTRIBUTE_KEYS = ("attributes", "attribute_labels")


@dataclass(frozen=True)
class Labels:
    races: tuple[str, ...] = DEFAULT_RACES
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    source: str = "defaults"


def _names(container: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, ...] | None:
    for key in keys:
        value = container.get(key)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
    return None


def labels_from_manifest(manifest: dict[str, Any], source: str) -> Labels:
    races: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    top = manifest.get("labels")
    if isinstance(top, dict):
        races, attributes = _names(top, _RACE_KEYS), _names(top, _ATTRIBUTE_KEYS)
    entries = [e for e in manifest.get("models", []) if isinstance(e, dict)]
    entries.sort(key=lambda e: not e.get("default", False))
    for entry in entries:
        config = entry.get("config")
        if isinstance(config, dict):
            races = races or _names(config, _RACE_KEYS)
            attributes = attributes or _names(config, _ATTRIBUTE_KEYS)
    if races is None and attributes is None:
        return Labels()
    return Labels(races or DEFAULT_RACES, attributes or DEFAULT_ATTRIBUTES, source)


@lru_cache(maxsize=4)
def _load(path: Path, mtime_ns: int) -> Labels:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return Labels()
    return labels_from_manifest(manifest, str(path)) if isinstance(manifest, dict) else Labels()


# The manifest's mtime is looked at no more often than this (a stat per request costs
# more than the rest of reading the labels).
RECHECK_SECONDS = 1.0
_checked: dict[Path, tuple[float, Labels]] = {}


def load_labels(manifest_path: Path) -> Labels:
    """Labels from the manifest, re-read within a second of the file changing; defaults
    without one."""
    now = time.monotonic()
    seen = _checked.get(manifest_path)
    if seen is not None and now - seen[0] < RECHECK_SECONDS:
        return seen[1]
    try:
        labels = _load(manifest_path, manifest_path.stat().st_mtime_ns)
    except OSError:
        labels = Labels()
    _checked[manifest_path] = (now, labels)
    return labels
