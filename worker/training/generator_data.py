"""A generator's training set drawn from more than CelebA-HQ: held-in CelebA-HQ photos
plus held-in UTKFace chips, race-balanced and warped into the FFHQ frame.

CelebA-HQ is mostly white faces, and a generator trained on it alone adds the
detail of white faces to every thumbnail (docs/bench/steering.json: the race
judge reads its plain outputs as less diverse than the thumbnails themselves).
UTKFace has the races CelebA-HQ lacks, but as tight chips: they are re-framed
exactly as ``likeness evaluate`` frames its held-out thumbnails.

Only the ``train`` split of likeness/splits.py is used, so the held-out people
that ``likeness evaluate`` scores are never drawn from.

About 70% of a framed chip is background the warp invented (``soft_pad``), so
each framed chip carries its validity mask as the WebP alpha channel (1 where
the pixel came from the chip): the trainer learns from the measured pixels only
(worker/training/generator/measurement.py). CelebA-HQ photos have no alpha: all
of them is real.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES
from likeness.splits import members, race_balanced_order, read_rows, require_set, unit_hash
from worker.engine.downscale import downscale
from worker.engine.face.ffhq_frame import ffhq_frame_mask, to_ffhq_frame
from worker.training.extractor_data import cached_landmarks, read_image

PROVENANCE_MEMBER = "provenance.json"
ORDER_SALT = "generator-data"
CHUNK = 64  # UTKFace chips detected and warped at a time
# provenance.json's "format": 2 since framed chips carry their validity mask as alpha
# (a zip without the field was built before: its chips' invented margins pass as real)
MIX_FORMAT = 2


@dataclass
class MixPlan:
    """Which held-in photos go in: CelebA-HQ names, and UTKFace names per race."""

    celeba: list[str]
    utkface: list[list[str]]  # one list per race, in UTKFACE_RACES order

    @property
    def total(self) -> int:
        return len(self.celeba) + sum(map(len, self.utkface))


@dataclass
class MixSummary:
    out: str
    size: int
    celeba: int
    utkface_per_race: dict[str, int]
    skipped_no_face: int  # UTKFace chips MTCNN found no face in (left out)
    seconds: float
    sources: dict[str, str] = field(default_factory=dict)
    format: int = MIX_FORMAT

    @property
    def images(self) -> int:
        return self.celeba + sum(self.utkface_per_race.values())


def plan_mix(data_root: Path, celeba: int, utkface_per_race: int) -> MixPlan:
    """Up to ``celeba`` held-in CelebA-HQ photos and ``utkface_per_race`` held-in UTKFace
    chips of each race, each in a fixed hash order (so a larger mix contains a smaller)."""
    celeba_root, utk_root = data_root / "celebahq", data_root / "utkface"
    names: list[str] = []
    if celeba > 0:
        require_set(celeba_root)
        held_in = members(celeba_root / "labels.csv", "train")
        names = sorted(held_in, key=lambda n: (unit_hash(n, ORDER_SALT), n))[:celeba]
    groups: list[list[str]] = [[] for _ in UTKFACE_RACES]
    if utkface_per_race > 0:
        require_set(utk_root)
        race = {r["file"]: int(r["race"]) for r in read_rows(utk_root / "labels.csv")}
        groups = [
            g[:utkface_per_race]
            for g in race_balanced_order(members(utk_root / "labels.csv", "train"), race)
        ]
    plan = MixPlan(names, groups)
    if plan.total == 0:
        raise LikenessError(
            "bad_data",
            "the mix is empty: ask for --celeba or "
            "--utkface-per-race above 0 (and check the data has a train split)",
        )
    return plan


def encode(image: torch.Tensor, size: int, mask: torch.Tensor | None = None) -> bytes:
    """(3, S, S) in [0, 1] → a ``size``-px lossless WebP (the trainer reads it as is),
    resized with the engine's bicubic (PIL's, as the trainer would resize it); a
    (1, S, S) ``mask`` in [0, 1] becomes its alpha channel."""
    if mask is not None:
        image = torch.cat([image, mask])
    if image.shape[-1] != size:
        image = downscale(image[None], size)[0]
    pixels = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    # exact: keep the colours where alpha is 0 (the encoder's input and the prior fit see them)
    Image.fromarray(pixels).save(buf, format="WEBP", lossless=True, exact=True)
    return buf.getvalue()


def write_framed(
    dst: zipfile.ZipFile,
    src: zipfile.ZipFile,
    src_path: Path,
    chunk: list[str],
    size: int,
    landmark_cache: Path,
) -> int:
    """Warp the chips of ``chunk`` in which MTCNN finds a face into the FFHQ frame and
    store them, with their validity masks, as ``utkface/<name>``; returns how many."""
    landmarks, found = cached_landmarks(src_path, chunk, landmark_cache)
    chosen = [i for i, ok in enumerate(found.tolist()) if ok]
    if not chosen:
        return 0
    chips = torch.stack([read_image(src, chunk[i]) for i in chosen])
    framed = to_ffhq_frame(chips, landmarks[chosen])
    masks = ffhq_frame_mask(chips, landmarks[chosen])
    for i, image, mask in zip(chosen, framed, masks, strict=True):
        dst.writestr(f"utkface/{chunk[i]}", encode(image, size, mask))
    return len(chosen)


def write_mix(
    data_root: Path,
    out: Path,
    plan: MixPlan,
    size: int,
    landmark_cache: Path,
    advance: Callable[[int], None] = lambda n: None,
) -> MixSummary:
    """Write ``plan`` as one zip of ``size``-px images in the FFHQ frame, members
    ``celebahq/<name>`` and ``utkface/<name>``, plus ``provenance.json``.

    The zip is built beside ``out`` and renamed into place when complete, so an
    interrupted run never leaves a half-written training set; MTCNN landmarks are
    cached, so a rerun does not detect again.
    """
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    kept = {race: 0 for race in UTKFACE_RACES}
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as dst:
            if plan.celeba:
                with zipfile.ZipFile(data_root / "celebahq" / "images.zip") as src:
                    for name in plan.celeba:
                        raw = src.read(name)
                        with Image.open(io.BytesIO(raw)) as image:
                            as_is = image.size == (size, size)
                        # photos already in the frame and at size are copied, not re-encoded
                        dst.writestr(
                            f"celebahq/{name}",
                            raw if as_is else encode(read_image(src, name), size),
                        )
                        advance(1)
            utk_zip = data_root / "utkface" / "images.zip"
            with zipfile.ZipFile(utk_zip) if any(plan.utkface) else nullcontext() as src:
                for race, group in zip(UTKFACE_RACES, plan.utkface, strict=True):
                    for at in range(0, len(group), CHUNK):
                        chunk = group[at : at + CHUNK]
                        kept[race] += write_framed(dst, src, utk_zip, chunk, size, landmark_cache)
                        advance(len(chunk))
            skipped = sum(map(len, plan.utkface)) - sum(kept.values())
            summary = MixSummary(
                out=str(out),
                size=size,
                celeba=len(plan.celeba),
                utkface_per_race=kept,
                skipped_no_face=skipped,
                seconds=round(time.monotonic() - start, 1),
                sources={
                    "celebahq": "train split of likeness/splits.py (salt likeness-v1)",
                    "utkface": "train split, race-balanced, MTCNN-located and warped "
                    "into the FFHQ frame (worker/engine/face/ffhq_frame.py)",
                },
            )
            dst.writestr(PROVENANCE_MEMBER, json.dumps(asdict(summary), indent=2))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance.json of a prepare-generator-data zip; None for any other file."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        if PROVENANCE_MEMBER not in zf.namelist():
            return None
        return json.loads(zf.read(PROVENANCE_MEMBER))


def built_without_masks(path: Path) -> bool:
    """Whether ``path`` is a prepare-generator-data zip from before validity masks that
    holds framed chips: it trains, but with the chips' invented margins taken as real."""
    made = read_provenance(path)
    if made is None:
        return False
    return made.get("format", 1) < MIX_FORMAT and sum(made["utkface_per_race"].values()) > 0
