"""The face extractor's export file: F, its race and attribute heads and θ_t, written by
training and read by every search that steers through F."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from likeness.errors import LikenessError
from worker.engine.checkpoints import atomic_torch_save
from worker.engine.face.alignment import Template
from worker.engine.face.extractor import ARCHITECTURES, FaceExtractor
from worker.engine.face.heads import AttributeHead, RaceHead

EXPORT_FORMAT = "likeness-face-extractor/1"


def _cast(state: dict[str, Tensor], fp16: bool) -> dict[str, Tensor]:
    return {k: (v.half() if fp16 and v.is_floating_point() else v).cpu() for k, v in state.items()}


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def export(
    ext: FaceExtractor,
    path: Path,
    metrics: dict[str, Any],
    fp16: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """F + heads (+ θ_t when fitted) with everything a loader needs to use them unaided."""
    race, attrs = ext.race_head.to_checkpoint(), ext.attribute_head.to_checkpoint()
    race["state_dict"] = _cast(race["state_dict"], fp16)
    attrs["state_dict"] = _cast(attrs["state_dict"], fp16)
    t = ext.template
    threshold = {} if ext.threshold_deg is None else {"threshold_deg": float(ext.threshold_deg)}
    atomic_torch_save(
        {
            "format": EXPORT_FORMAT,
            "architecture": ext.architecture,
            "embedding_dim": ext.embedding_dim,
            "template": {
                "name": t.name,
                "height": t.height,
                "width": t.width,
                "points": [list(p) for p in t.points],
            },
            "normalisation": {"mean": ext.mean, "std": ext.std, "range": "[0, 1] RGB"},
            "backbone": _cast(ext.backbone.state_dict(), fp16),
            "race_head": race,
            "attribute_head": attrs,
            "dtype": "float16" if fp16 else "float32",
            **threshold,
            "metrics": json.loads(json.dumps(metrics)),
            **(extra or {}),
        },
        path,
    )


def read_export(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw contents of an ``export`` file, checked to be one."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise LikenessError("weights_not_found", f"no such file: {path}", status=404) from None
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != EXPORT_FORMAT:
        raise LikenessError("bad_checkpoint", f"{path} is not a {EXPORT_FORMAT} export")
    if ckpt.get("architecture", "mobilefacenet") not in ARCHITECTURES:
        raise LikenessError(
            "bad_checkpoint", f"{path} holds an unknown architecture {ckpt['architecture']!r}"
        )
    return ckpt


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> FaceExtractor:
    """F (float32, eval mode) with its heads and θ_t from an ``export`` file."""
    ckpt = read_export(path, map_location)
    arch = ARCHITECTURES[ckpt.get("architecture", "mobilefacenet")]
    backbone = arch.from_state_dict(_float32(ckpt["backbone"]))
    heads = {}
    for key, cls in (("race_head", RaceHead), ("attribute_head", AttributeHead)):
        h = dict(ckpt[key])
        h["state_dict"] = _float32(h["state_dict"])
        heads[key] = cls.from_checkpoint(h)
    t = ckpt["template"]
    template = Template(t["name"], t["height"], t["width"], tuple(tuple(p) for p in t["points"]))
    n = ckpt["normalisation"]
    return FaceExtractor(
        backbone.eval(),
        template,
        n["mean"],
        n["std"],
        threshold_deg=ckpt.get("threshold_deg"),
        **heads,
    ).eval()
