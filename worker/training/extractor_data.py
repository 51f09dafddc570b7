"""Data for ``train-extractor``: aligned face crops with identity, race or
attribute targets, plus synthetic stand-ins for smoke runs.

MTCNN runs once per image: its landmarks are cached in the run directory, and
each epoch only re-warps the 128 px image with them (a cheap ``grid_sample``),
through the same ``align_faces`` path that search and evaluation use.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from likeness.splits import Split, members, read_rows, unit_hash
from worker.engine.face.alignment import (
    Template,
    align_faces,
    detect_landmarks,
    fallback_landmarks,
)
from worker.engine.face.heads import CELEBA_ATTRIBUTES

Item = tuple[Tensor, Tensor]  # (crop [3, h, w] in [0, 1], target)


def read_image(zf: zipfile.ZipFile, name: str) -> Tensor:
    """A zip member as [3, H, W] RGB in [0, 1]."""
    with zf.open(name) as f:
        image = Image.open(io.BytesIO(f.read())).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def cached_landmarks(
    zip_path: Path, names: Sequence[str], cache: Path, batch: int = 64
) -> tuple[Tensor, Tensor]:
    """(landmarks [N, 5, 2], detected [N]) for ``names``, detected once and kept in ``cache``.

    The cache is keyed by member name, so a cache built for one split serves
    any subset of it; it is rewritten atomically only when names are missing.
    """
    known: dict[str, tuple[Tensor, bool]] = {}
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        for n, lm, d in zip(saved["names"], saved["landmarks"], saved["detected"], strict=True):
            known[n] = (lm, bool(d))
    missing = [n for n in names if n not in known]
    if missing:
        with zipfile.ZipFile(zip_path) as zf:
            for start in range(0, len(missing), batch):
                chunk = missing[start : start + batch]
                lms, det, _ = detect_landmarks(torch.stack([read_image(zf, n) for n in chunk]))
                for n, lm, d in zip(chunk, lms, det, strict=True):
                    known[n] = (lm.cpu(), bool(d))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        all_names = sorted(known)
        torch.save(
            {
                "names": all_names,
                "landmarks": torch.stack([known[n][0] for n in all_names]),
                "detected": torch.tensor([known[n][1] for n in all_names]),
            },
            tmp,
        )
        os.replace(tmp, cache)
    return (
        torch.stack([known[n][0] for n in names]),
        torch.tensor([known[n][1] for n in names], dtype=torch.bool),
    )


class AlignedFaces(Dataset[Item]):
    """Zip members warped onto ``template`` with cached landmarks.

    With ``mirror`` indices ``>= len(names)`` are the flipped crops: a flip that
    is a function of the index keeps the data order a pure function of the sampler.
    """

    def __init__(
        self,
        zip_path: Path,
        names: Sequence[str],
        targets: Tensor,
        landmarks: Tensor,
        template: Template,
        mirror: bool = False,
    ) -> None:
        if not (len(names) == len(targets) == len(landmarks)):
            raise ValueError("names, targets and landmarks differ in length")
        self.zip_path, self.names, self.targets = zip_path, list(names), targets
        self.landmarks, self.template, self.mirror = landmarks, template, mirror
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.names) * (2 if self.mirror else 1)

    def __getitem__(self, index: int) -> Item:
        base, flip = index % len(self.names), index >= len(self.names)
        image = self.photo(base)
        crop = align_faces(image[None], self.template, self.landmarks[base : base + 1]).crops[0]
        return (crop.flip(-1) if flip else crop), self.targets[base]

    def photo(self, index: int) -> Tensor:
        """The whole image behind item ``index`` (unaligned, never mirrored): [3, H, W]."""
        if self._zip is None or self._pid != os.getpid():  # one handle per worker process
            self._zip, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return read_image(self._zip, self.names[index % len(self.names)])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"], state["_pid"] = None, -1
        return state


def subset(names: list[str], limit: int | None, key: dict[str, str] | None = None) -> list[str]:
    """At most ``limit`` names, a hash-ordered (so unbiased, yet fixed) choice.

    With ``key`` (name → identity) whole people are kept together, so a
    capped identity set still has pairs to learn from.
    """
    if limit is None or len(names) <= limit:
        return names

    def order(n: str) -> tuple[float, str]:
        return (unit_hash(key[n] if key else n, "subset"), n)

    kept = set(sorted(names, key=order)[:limit])
    return [n for n in names if n in kept]


# Sets already aligned to the FFHQ frame (CelebA-HQ was built that way): their
# faces use the frame's fixed landmarks instead of MTCNN. That is also how the
# search aligns generated faces, so F learns on crops framed like the ones it
# steers; MTCNN's landmarks on CelebA-HQ differ from the fixed ones by 0.6-3.5%
# of the image size (alignment.FFHQ_FRAME_LANDMARKS).
FFHQ_FRAMED_SETS = frozenset({"celebahq"})


def _aligned(
    root: Path, names: list[str], targets: Tensor, template: Template, cache_dir: Path, mirror: bool
) -> AlignedFaces:
    zip_path = root / "images.zip"
    if root.name in FFHQ_FRAMED_SETS:
        with zipfile.ZipFile(zip_path) as zf:
            height, width = read_image(zf, names[0]).shape[1:] if names else (128, 128)
        lms = fallback_landmarks(len(names), height, width)
    else:
        lms, _ = cached_landmarks(zip_path, names, cache_dir / f"landmarks_{root.name}.pt")
    return AlignedFaces(zip_path, names, targets, lms, template, mirror)


def identity_faces(
    roots: Sequence[Path],
    split: Split,
    template: Template,
    cache_dir: Path,
    mirror: bool = False,
    min_images: int = 2,
    limit: int | None = None,
) -> tuple[AlignedFaces, ...]:
    """One identity-labelled set per root (CelebA-HQ, LFW), class ids contiguous across them.

    People with fewer than ``min_images`` photos are dropped: a class with one
    sample only teaches ArcFace to memorise that photo.
    """
    sets, offset = [], 0
    for root in roots:
        rows = {r["file"]: r for r in read_rows(root / "labels.csv")}
        names = members(root / "labels.csv", split)
        counts: dict[str, int] = {}
        for n in names:
            counts[rows[n]["identity"]] = counts.get(rows[n]["identity"], 0) + 1
        names = [n for n in names if counts[rows[n]["identity"]] >= min_images]
        names = subset(names, limit, {n: rows[n]["identity"] for n in names})
        ids = sorted({rows[n]["identity"] for n in names})
        index = {p: offset + i for i, p in enumerate(ids)}
        targets = torch.tensor([index[rows[n]["identity"]] for n in names], dtype=torch.long)
        sets.append(_aligned(root, names, targets, template, cache_dir, mirror))
        offset += len(ids)
    return tuple(sets)


def race_faces(
    root: Path,
    split: Split,
    template: Template,
    cache_dir: Path,
    mirror: bool = False,
    limit: int | None = None,
) -> AlignedFaces:
    rows = {r["file"]: r for r in read_rows(root / "labels.csv")}
    names = subset(members(root / "labels.csv", split), limit)
    targets = torch.tensor([int(rows[n]["race"]) for n in names], dtype=torch.long)
    return _aligned(root, names, targets, template, cache_dir, mirror)


def attribute_faces(
    root: Path,
    split: Split,
    template: Template,
    cache_dir: Path,
    mirror: bool = False,
    limit: int | None = None,
) -> AlignedFaces:
    rows = {r["file"]: r for r in read_rows(root / "labels.csv")}
    names = subset(members(root / "labels.csv", split), limit)
    targets = torch.tensor([[float(rows[n][a]) for a in CELEBA_ATTRIBUTES] for n in names])
    return _aligned(root, names, targets, template, cache_dir, mirror)


def num_classes(sets: Sequence[AlignedFaces]) -> int:
    return max(int(s.targets.max()) for s in sets) + 1


class SyntheticFaces(Dataset[Item]):
    """Blob images whose pattern depends on a class, for smoke runs and tests.

    ``kind`` picks the target: "identity"/"race" give a class id, "attributes"
    a 0/1 vector derived from the class (so the heads have something learnable).
    Every item is a pure function of (seed, index).
    """

    def __init__(
        self,
        kind: str,
        count: int,
        classes: int,
        template: Template,
        seed: int = 0,
        attributes: int = len(CELEBA_ATTRIBUTES),
    ) -> None:
        self.kind, self.count, self.classes, self.seed = kind, count, classes, seed
        self.height, self.width, self.attributes = template.height, template.width, attributes
        self.targets = self._targets()

    def _targets(self) -> Tensor:
        cls = torch.arange(self.count) % self.classes
        if self.kind != "attributes":
            return cls
        bits = torch.Generator().manual_seed(self.seed + 7)
        table = (torch.rand(self.classes, self.attributes, generator=bits) < 0.3).float()
        return table[cls]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Item:
        return self._render(index, self.height, self.width), self.targets[index]

    def photo(self, index: int, size: int = 64) -> Tensor:
        """Item ``index``'s pattern as a square ``size``-px "photo" [3, size, size], the
        stand-in for a CelebA-HQ image in the lookalike stage."""
        return self._render(index, size, size)

    def _render(self, index: int, height: int, width: int) -> Tensor:
        cls = index % self.classes
        base = torch.Generator().manual_seed(self.seed * 1_000_003 + cls)
        noise = torch.Generator().manual_seed(self.seed * 7_919 + 104_729 + index)
        pattern = torch.rand(3, 8, 8, generator=base)
        x = torch.nn.functional.interpolate(
            pattern[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        return (x + 0.1 * torch.randn(x.shape, generator=noise)).clamp(0, 1)
