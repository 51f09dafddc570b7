"""Put a trained generator into weights/: the EMA generator (fp16), a fresh
mapping fit, and a manifest entry saying what it is and where it came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from likeness.errors import LikenessError
from likeness.manifest import (
    WeightsEntry,
    default_manifest,
    entry_path,
    load_manifest,
    register,
    sha256_file,
)
from worker.engine.checkpoints import load_generator, save_generator
from worker.engine.mapping_fit import fit_mapping
from worker.engine.search import SearchConfig
from worker.training.generator.config import CHECKPOINT_NAME, GENERATOR_NAME
from worker.training.generator.export import mean_w
from worker.training.generator.state import read_checkpoint
from worker.training.generator_data import read_provenance

# The search reads only this fit's mean and std; 100k samples pin them well.
FIT_SAMPLES = 100_000
# What bench/generator_quality.py measures and the manifest keeps.
QUALITY_MEASURES = ("face_rate", "fd", "search_fit", "upscale")
# what the manifest leaves in the report: per-photo values, the models, the search
# settings and batch, per-search timings, the grid's path
DETAIL_FIELDS = frozenset({"per_photo", "models", "search", "batch", "searches", "grid"})


def ship_generator(
    run: Path,
    *,
    quality: dict[str, Any] | None = None,
    name: str = "generator",
    manifest_path: Path | None = None,
    half: bool = True,
    default: bool = True,
) -> WeightsEntry:
    """``run`` is a train-generator folder (checkpoint.pt + g_ema.pt); ``quality``
    the JSON of bench/generator_quality.py for the shipped file, if measured.

    Shipping is deterministic (same run → same bytes), so the order is: ship,
    measure the shipped file, ship again with the measurement, which must name
    the shipped file's sha256."""
    manifest_path = default_manifest(manifest_path)
    ckpt_path, g_path = run / CHECKPOINT_NAME, run / GENERATOR_NAME
    for path in (ckpt_path, g_path):
        if not path.is_file():
            raise LikenessError("not_a_run", f"{run} is not a train-generator run: no {path.name}")
    train_config = read_checkpoint(ckpt_path)["train_config"]
    loaded = load_generator(g_path)
    G = loaded.generator
    if half:
        # fit and average what will be loaded: the fp16-rounded weights
        G.half().float()
    train = dict(_train_info(g_path))
    # before the file it started from (often dest itself) is overwritten
    warm_start = _warm_start_provenance(
        train_config.get("init_generator"), manifest_path, train_config
    )
    fit = fit_mapping(G, samples=FIT_SAMPLES, seed=int(train_config.get("seed", 0)))
    dest = manifest_path.parent / f"{name}.pt"
    sha = save_generator(
        dest,
        G,
        latent_avg=mean_w(G, FIT_SAMPLES),
        mapping_fit=fit,
        half=half,
        extra={"train": train},
    )
    if quality:
        _check_measured(quality, sha, dest)
    seconds = float(train.get("train_seconds", 0.0))
    entry = WeightsEntry(
        name=name,
        kind="generator",
        file=dest.name,
        sha256=sha,
        default=default,
        config=G.config.model_dump(mode="json") | {"dtype": "float16" if half else "float32"},
        provenance={
            "data": _data_provenance(train_config.get("data")),
            **warm_start,
            "objective": train_config.get("objective", "gan"),
            "kimg": round(float(train.get("kimg", 0.0)), 2),
            "steps": train.get("step"),
            "batch": train_config.get("batch"),
            "device_hours": round(seconds / 3600, 2),
            "device_hours_by_type": {
                k: round(float(v) / 3600, 2) for k, v in train.get("device_seconds", {}).items()
            },
            "train_config": train_config,
            "command": "likeness train-generator",
        },
        metrics=_metrics(quality) if quality else {},
    )
    register(entry, manifest_path)
    return entry


def add_quality(
    name: str, quality: dict[str, Any], *, manifest_path: Path | None = None
) -> WeightsEntry:
    """Put the measures of a report on an already shipped generator into its manifest
    entry (the run folder need not exist any more), beside the measures it has: a report
    of the search fit alone keeps the face rate and FD, one of the race alone keeps the
    sharpness. The report must have measured that file."""
    manifest_path = default_manifest(manifest_path)
    entry = _generator_entry(name, manifest_path)
    _check_measured(quality, entry.sha256, entry_path(entry, manifest_path))
    # measures from before they carried their own date get the entry's
    kept = {
        k: v | {"measured": v.get("measured", entry.metrics.get("measured"))}
        if k in QUALITY_MEASURES
        else v
        for k, v in entry.metrics.items()
    }
    fresh = _metrics(quality)
    if "upscale" in fresh and isinstance(kept.get("upscale"), dict):
        # a report on some of the sets (UTKFace alone, say) replaces those sections only;
        # the others keep the day they were measured
        old = kept["upscale"]
        fresh["upscale"] = {
            k: v | {"measured": v.get("measured", old.get("measured"))}
            for k, v in old.items()
            if isinstance(v, dict) and k not in fresh["upscale"]
        } | fresh["upscale"]
    updated = entry.model_copy(update={"metrics": kept | fresh})
    register(updated, manifest_path)
    return updated


def set_search(
    name: str, settings: dict[str, str], *, clear: bool = False, manifest_path: Path | None = None
) -> WeightsEntry:
    """Store search settings (SearchConfig fields, values as text) measured to suit a
    generator in its manifest entry, on top of what it has unless ``clear``."""
    manifest_path = default_manifest(manifest_path)
    entry = _generator_entry(name, manifest_path)
    values = checked_search({} if clear else dict(entry.search), settings)
    updated = entry.model_copy(update={"search": values})
    register(updated, manifest_path)
    return updated


def search_pairs(items: list[str]) -> dict[str, str]:
    """``FIELD=VALUE`` words (as the command lines take them) → {field: value}; dashes in a
    field name read as underscores."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise LikenessError("bad_option", f"expected FIELD=VALUE, got '{item}'")
        pairs[key.replace("-", "_")] = value
    return pairs


def checked_search(base: dict[str, Any], settings: dict[str, str]) -> dict[str, Any]:
    """``base`` search settings with ``settings`` (SearchConfig fields, values as text) on
    top, checked and converted; unknown fields and bad values are errors."""
    from pydantic import ValidationError

    unknown = sorted(set(settings) - set(SearchConfig.model_fields))
    if unknown:
        raise LikenessError(
            "bad_option",
            f"not search settings: {', '.join(unknown)} (valid: "
            f"{', '.join(SearchConfig.model_fields)})",
        )
    merged = base | settings
    try:
        checked = SearchConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        raise LikenessError("bad_option", f"{first['loc'][0]}: {first['msg']}") from None
    return checked.model_dump(mode="json", include=set(merged))


def _generator_entry(name: str, manifest_path: Path) -> WeightsEntry:
    found = [
        e for e in load_manifest(manifest_path).models if e.name == name and e.kind == "generator"
    ]
    if not found:
        raise LikenessError("unknown_weights", f"no generator named {name!r} in {manifest_path}")
    return found[0]


def _check_measured(quality: dict[str, Any], sha: str, dest: Path) -> None:
    if quality.get("sha256") != sha:
        raise LikenessError(
            "quality_mismatch",
            f"the quality report measured a file with sha256 "
            f"{str(quality.get('sha256'))[:12]}…, not the shipped {sha[:12]}…: measure "
            f"{dest} with bench/generator_quality.py and pass that report",
        )


def _data_provenance(data: str | None) -> str | dict[str, Any]:
    """What the run trained on: a prepare-generator-data zip says so itself (its
    provenance.json); a data set's own zip is named by its folder."""
    if data is None:
        return "synthetic images (smoke run)"
    path = Path(str(data))
    made = read_provenance(path)
    if made is not None:
        # where and how fast it was built say nothing about the weights
        return {"built_by": "likeness prepare-generator-data"} | {
            k: v for k, v in made.items() if k not in ("out", "seconds")
        }
    return f"{path.parent.name} train split (likeness/splits.py, salt likeness-v1)"


def _warm_start_provenance(
    init: str | None, manifest_path: Path, train_config: dict[str, Any]
) -> dict[str, Any]:
    """A warm-started run inherits what its start had learned: name that file by its
    sha256 and keep its manifest provenance (the file itself is usually replaced)."""
    if init is None:
        return {}
    path = Path(str(init))
    if not path.is_file():
        return {"init_generator": {"file": str(init)}}
    sha = sha256_file(path)
    before = (
        [
            e
            for e in load_manifest(manifest_path).models
            if e.kind == "generator" and e.sha256 == sha
        ]
        if manifest_path.is_file()
        else []
    )
    if before and before[0].provenance.get("train_config") == train_config:
        # the start was overwritten by this very run's first ship (ship, measure, ship
        # again): what that ship recorded of the start still holds
        return {k: v for k, v in before[0].provenance.items() if k == "init_generator"}
    return {
        "init_generator": {"file": path.name, "sha256": sha}
        | ({"provenance": before[0].provenance} if before else {})
    }


def _train_info(g_path: Path) -> dict[str, Any]:
    import torch

    ckpt = torch.load(g_path, map_location="cpu", weights_only=True)
    return dict(ckpt.get("train", {}))


def _metrics(quality: dict[str, Any]) -> dict[str, Any]:
    """The manifest keeps the headline numbers (the upscale targets among them: sharpness,
    identity and race against bicubic), the sizes and the day they were measured."""
    date = quality.get("date")
    return {
        k: {f: v for f, v in quality[k].items() if f not in DETAIL_FIELDS} | {"measured": date}
        for k in QUALITY_MEASURES
        if k in quality
    } | {"measured": date}


def read_quality(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LikenessError("bad_quality", f"cannot read {path}: {e}") from None
