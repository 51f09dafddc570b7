"""Held-out photos, their 16×16 thumbnails and per-thumbnail seeds.

Who is evaluated is a pure function of the data (the "test" split of
likeness/splits.py, then a fixed hash order), never of ``--seed``: changing the
seed re-runs the searches on the same people.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from likeness.errors import LikenessError
from likeness.splits import (
    ORDER_SALT,
    members,
    race_balanced_order,
    read_rows,
    require_set,
    unit_hash,
)
from worker.engine.downscale import downscale
from worker.engine.face.ffhq_frame import to_ffhq_frame
from worker.evaluation.config import TABLE3_ATTRIBUTES
from worker.training.extractor_data import cached_landmarks, read_image


@dataclass
class Samples:
    """N held-out photos I, with their labels and, where the data set has one, a reference:
    another photo of the same person, which the identity objective steers toward (never
    I itself: that would hand the search the answer).

    Every photo is in the FFHQ frame the generator draws (CelebA-HQ already is;
    UTKFace chips are re-framed), so photos and outputs align alike: with the
    frame's fixed landmarks.
    """

    dataset: str  # "celebahq" or "utkface"
    names: list[str]  # zip member of each photo I
    reference_names: list[str | None]  # another photo I' of the person, None if there is none
    identities: list[str]  # CelebA person id; UTKFace: the file (each image its own person)
    photos: Tensor  # (N, 3, S, S) in [0, 1]
    references: list[Tensor | None]  # (3, S, S) in [0, 1] per row, None without a photo I'
    thumbnails: np.ndarray  # (N, t, t, 3) uint8: bicubic downscale of the photos
    seeds: list[int]  # one per thumbnail, shared by every strategy
    labels: np.ndarray  # CelebA-HQ: (N, 5) 0/1 of TABLE3_ATTRIBUTES; UTKFace: (N,) race index
    skipped: int = 0  # UTKFace images passed over because MTCNN found no face

    def __len__(self) -> int:
        return len(self.names)

    @property
    def with_reference(self) -> list[int]:
        """The rows whose person has a second photo: the only ones the identity rows use."""
        return [i for i, r in enumerate(self.references) if r is not None]

    def subset(self, rows: Sequence[int]) -> Samples:
        """These rows only, in this order."""
        rows = list(rows)
        return Samples(
            dataset=self.dataset,
            names=[self.names[i] for i in rows],
            reference_names=[self.reference_names[i] for i in rows],
            identities=[self.identities[i] for i in rows],
            photos=self.photos[rows],
            references=[self.references[i] for i in rows],
            thumbnails=self.thumbnails[rows],
            seeds=[self.seeds[i] for i in rows],
            labels=self.labels[rows],
            skipped=self.skipped,
        )

    def reference_photos(self, rows: Sequence[int]) -> Tensor:
        """(len(rows), 3, S, S): the reference photos of ``rows`` (each must have one)."""
        refs = [self.references[i] for i in rows]
        if any(r is None for r in refs):
            raise ValueError("a row without a second photo of its person has no reference")
        return torch.stack([r for r in refs if r is not None])


def thumbnail_seed(seed: int, dataset: str, name: str) -> int:
    """The search seed of one thumbnail: the same for every strategy (a fair comparison)."""
    digest = hashlib.sha256(f"{seed}:{dataset}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def make_thumbnails(photos: Tensor, size: int) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] → (N, size, size, 3) uint8 with the search's own bicubic
    operator, rounded to 8 bits as a thumbnail file would be."""
    small = downscale(photos, size)
    return small.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def read_images(zip_path: Path, names: list[str]) -> Tensor:
    with zipfile.ZipFile(zip_path) as zf:
        return torch.stack([read_image(zf, n) for n in names])


def celeba_samples(root: Path, count: int, thumbnail: int, seed: int) -> Samples:
    """``count`` held-out people in a fixed hash order: I is each one's first photo (by file
    name), the reference I' their second, None for the people with a single photo (they
    count for Table 3's no-control and attribute rows, not for the identity rows); the
    labels are I's five Table 3 attributes."""
    require_set(root)
    rows = {r["file"]: r for r in read_rows(root / "labels.csv")}
    photos_of: dict[str, list[str]] = defaultdict(list)
    for name in members(root / "labels.csv", "test"):
        photos_of[rows[name]["identity"]].append(name)
    people = sorted(photos_of, key=lambda p: (unit_hash(p, ORDER_SALT), p))[:count]
    names = [sorted(photos_of[p])[0] for p in people]
    refs: list[str | None] = [
        sorted(photos_of[p])[1] if len(photos_of[p]) > 1 else None for p in people
    ]
    with_second = sum(b is not None for b in refs)
    if with_second < 2:
        raise LikenessError(
            "data_not_found",
            f"only {with_second} of the first {len(people)} held-out people in {root} have a "
            "second photo; Table 1 needs at least 2 (ask for more with --celeba)",
            status=404,
        )
    missing = [a for a in TABLE3_ATTRIBUTES if a not in rows[names[0]]]
    if missing:
        raise LikenessError(
            "data_not_found",
            f"{root / 'labels.csv'} lacks the attribute columns {', '.join(missing)}",
            status=404,
        )
    photos = read_images(root / "images.zip", names)
    second = read_images(root / "images.zip", [b for b in refs if b is not None])
    it = iter(second)
    return Samples(
        dataset="celebahq",
        names=names,
        reference_names=refs,
        identities=people,
        photos=photos,
        references=[None if b is None else next(it) for b in refs],
        thumbnails=make_thumbnails(photos, thumbnail),
        seeds=[thumbnail_seed(seed, "celebahq", n) for n in names],
        labels=np.array([[int(rows[n][a]) for a in TABLE3_ATTRIBUTES] for n in names]),
    )


def utkface_samples(
    root: Path, count: int, thumbnail: int, seed: int, landmark_cache: Path
) -> Samples:
    """``count`` held-out UTKFace images, as race-balanced as the split allows (the paper
    used FairFace, which is balanced). UTKFace has no identities, so no image has a second
    photo of its person to serve as an identity reference: the identity rows skip them all.

    MTCNN locates the face once per image (cached by member name); images where it
    finds none are passed over, since they cannot be framed like the generator's faces.
    """
    require_set(root)
    rows = {r["file"]: r for r in read_rows(root / "labels.csv")}
    race = {n: int(r["race"]) for n, r in rows.items()}
    groups = race_balanced_order(members(root / "labels.csv", "test"), race)
    quota = [0] * len(groups)
    for _ in range(count):  # round robin over the races that still have images
        open_races = [r for r in range(len(groups)) if quota[r] < len(groups[r])]
        if not open_races:
            break
        quota[min(open_races, key=lambda r: quota[r])] += 1
    chosen: list[list[tuple[str, Tensor]]] = []
    skipped = 0
    for group, want in zip(groups, quota, strict=True):
        kept: list[tuple[str, Tensor]] = []
        start = 0
        while len(kept) < want and start < len(group):
            # a few spares per chunk: MTCNN misses a face now and then
            chunk = group[start : start + want - len(kept) + 2]
            start += len(chunk)
            lms, found = cached_landmarks(root / "images.zip", chunk, landmark_cache)
            for name, lm, ok in zip(chunk, lms, found, strict=True):
                if len(kept) == want:
                    break
                if bool(ok):
                    kept.append((name, lm))
                else:
                    skipped += 1
        chosen.append(kept)
    # interleave the races, so every batch and the grid's first rows mix them
    picked = [g[i] for i in range(max(map(len, chosen), default=0)) for g in chosen if i < len(g)]
    if not picked:
        raise LikenessError(
            "data_not_found",
            f"no held-out UTKFace image in {root} has a face MTCNN finds",
            status=404,
        )
    names = [n for n, _ in picked]
    photos = to_ffhq_frame(
        read_images(root / "images.zip", names), torch.stack([lm for _, lm in picked])
    )
    return Samples(
        dataset="utkface",
        names=names,
        reference_names=[None] * len(names),
        identities=list(names),
        photos=photos,
        references=[None] * len(names),
        thumbnails=make_thumbnails(photos, thumbnail),
        seeds=[thumbnail_seed(seed, "utkface", n) for n in names],
        labels=np.array([race[n] for n in names]),
        skipped=skipped,
    )
