"""The weights manifest (weights/manifest.json): what ships, what it is, where it came from.

Torch-free, so the API can read label lists and model names from it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from likeness.errors import LikenessError
from likeness.settings import BUNDLED_WEIGHTS_DIR, get_settings

# The manifest that ships with the code; LIKENESS_WEIGHTS_DIR may point elsewhere.
BUNDLED_MANIFEST_PATH = BUNDLED_WEIGHTS_DIR / "manifest.json"


def default_manifest(path: Path | None = None) -> Path:
    """``path``, else the settings' manifest (in LIKENESS_WEIGHTS_DIR): the one place every
    process (API, worker, CLI, training) learns where the weights are."""
    return path if path is not None else get_settings().manifest_path


def manifest_in(folder: Path | None = None) -> Path:
    """The manifest in ``folder`` (a command's --into), else the settings' manifest."""
    return default_manifest(folder / "manifest.json" if folder is not None else None)


class WeightsEntry(BaseModel):
    name: str = Field(description="short name used with --weights")
    kind: str = Field(description="generator | extractor | detector | judge | race-reader")
    file: str = Field(description="path relative to the manifest's folder (or absolute)")
    sha256: str
    default: bool = Field(False, description="the default of its kind")
    config: dict[str, Any] = Field(default_factory=dict, description="architecture config")
    provenance: dict[str, Any] = Field(default_factory=dict, description="data, steps, device")
    metrics: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any] = Field(
        default_factory=dict,
        description="generators: search settings measured to suit this model (SearchConfig "
        "fields, e.g. geocross_weight); every search starts from them, explicit options win",
    )


class Manifest(BaseModel):
    version: int = 1
    models: list[WeightsEntry] = Field(default_factory=list)


def json_safe(value: Any) -> Any:
    """NaN and infinities → None, through dicts and lists: manifests and reports are
    strict JSON, which ``json.dumps`` would not write for NaN (e.g. the AP of an
    attribute no held-out face has)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: Path | None = None) -> Manifest:
    path = default_manifest(path)
    if not path.is_file():
        return Manifest()
    return Manifest.model_validate(json.loads(path.read_text()))


def save_manifest(manifest: Manifest, path: Path | None = None) -> None:
    path = default_manifest(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    data = manifest.model_dump()
    for entry in data["models"]:
        if not entry["search"]:  # only generators have search settings
            del entry["search"]
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def register(entry: WeightsEntry, manifest_path: Path | None = None) -> Manifest:
    """Add ``entry`` to the manifest, replacing one of the same name in its place (a new
    version replaces the old, never sits beside it); a default entry unsets its kind's
    others."""
    manifest = load_manifest(manifest_path)
    names = [e.name for e in manifest.models]
    models = [entry if e.name == entry.name else e for e in manifest.models]
    if entry.name not in names:
        models.append(entry)
    if entry.default:
        models = [
            e.model_copy(update={"default": False})
            if e.kind == entry.kind and e is not entry
            else e
            for e in models
        ]
    manifest.models = models
    save_manifest(manifest, manifest_path)
    return manifest


def verified_sha256(path: Path, entry: WeightsEntry | None) -> str:
    """``path``'s sha256. A file the manifest lists (``entry``; None: a file named by path)
    must be on disk and match it: either failure is a clear error, not a traceback or a
    model loaded from the wrong bytes."""
    if entry is not None and not path.is_file():
        raise LikenessError(
            "weights_not_found",
            f"{path} is listed in the weights manifest but missing (re-checkout weights/)",
            status=404,
        )
    sha = sha256_file(path)
    if entry is not None and sha != entry.sha256:
        raise LikenessError(
            "weights_corrupt", f"{path} does not match its manifest sha256 (re-checkout weights/)"
        )
    return sha


def entry_path(entry: WeightsEntry, manifest_path: Path | None = None) -> Path:
    p = Path(entry.file)
    return p if p.is_absolute() else default_manifest(manifest_path).parent / p


def resolve_weights(
    spec: str | None, kind: str, manifest_path: Path | None = None
) -> tuple[Path, WeightsEntry | None]:
    """``spec`` is a manifest name, a file path, or None for the default of ``kind``."""
    manifest_path = default_manifest(manifest_path)
    manifest = load_manifest(manifest_path)
    of_kind = [e for e in manifest.models if e.kind == kind]
    if spec is None:
        defaults = [e for e in of_kind if e.default] or of_kind[:1]
        if not defaults:
            raise LikenessError(
                "no_default_weights",
                f"no {kind} weights are bundled in {manifest_path.parent}; "
                f"pass --weights PATH to a checkpoint",
            )
        return entry_path(defaults[0], manifest_path), defaults[0]
    for e in of_kind:
        if e.name == spec:
            return entry_path(e, manifest_path), e
    p = Path(spec).expanduser()
    if p.is_file():
        # A bundled file named by its path is still that entry (sha256, search settings).
        for e in of_kind:
            if entry_path(e, manifest_path).resolve() == p.resolve():
                return p, e
        return p, None
    names = ", ".join(e.name for e in of_kind) or "none bundled"
    raise LikenessError(
        "weights_not_found",
        f"'{spec}' is neither a file nor a {kind} in the manifest ({names})",
        status=404,
    )
