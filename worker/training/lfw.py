"""LFW verification on held-out people: ``bench/lfw_verification.py``'s measure, shared
with the lookalike stage, which must not cost F its accuracy on people it never saw.

Seeded pairs (half same person, half different) of LFW people, each image aligned
(MTCNN, five landmarks) onto F's template and embedded with its mirror image, and
10-fold accuracy with the angle threshold fitted on the other nine folds. Alignment
does not depend on F's weights, so a run aligns once and keeps the crops.
"""

from __future__ import annotations

import csv
import io
import pickle
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from likeness.splits import split_of
from worker.engine.checkpoints import atomic_torch_save
from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.verification import best_angle_threshold, threshold_accuracy

BATCH = 128


def make_pairs(
    identities: dict[str, list[str]], n_same: int, n_diff: int, seed: int
) -> list[tuple[str, str, bool]]:
    """Distinct unordered pairs: same-identity ones first, then different-identity ones."""
    rng = np.random.default_rng(seed)
    multi = sorted(k for k, v in identities.items() if len(v) >= 2)
    everyone = sorted(identities)
    same: set[tuple[str, str]] = set()
    while len(same) < n_same:
        files = identities[multi[rng.integers(len(multi))]]
        i, j = rng.choice(len(files), size=2, replace=False)
        same.add(tuple(sorted((files[i], files[j]))))  # type: ignore[arg-type]
    diff: set[tuple[str, str]] = set()
    while len(diff) < n_diff:
        a, b = rng.choice(len(everyone), size=2, replace=False)
        fa, fb = identities[everyone[a]], identities[everyone[b]]
        diff.add(tuple(sorted((fa[rng.integers(len(fa))], fb[rng.integers(len(fb))]))))  # type: ignore[arg-type]
    return [(a, b, True) for a, b in sorted(same)] + [(a, b, False) for a, b in sorted(diff)]


def people(root: Path, split: str) -> dict[str, list[str]]:
    """LFW's files per person, only the people of ``split`` of likeness/splits.py (or all)."""
    with open(root / "labels.csv", newline="") as f:
        identities: dict[str, list[str]] = defaultdict(list)
        for row in csv.DictReader(f):
            if split == "all" or split_of(row["identity"]) == split:
                identities[row["identity"]].append(row["file"])
    return identities


def load_images(zf: zipfile.ZipFile, names: list[str]) -> Tensor:
    arrays = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def ten_fold(angles: np.ndarray, same: np.ndarray, seed: int) -> tuple[list[float], list[float]]:
    """Accuracy on each fold of the threshold (same if angle <= t) fitted on the other nine."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(angles)), 10)
    accs, thresholds = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for i, f in enumerate(folds) if i != k])
        t, _ = best_angle_threshold(angles[train][same[train]], angles[train][~same[train]])
        accs.append(threshold_accuracy(angles[test][same[test]], angles[test][~same[test]], t))
        thresholds.append(t)
    return accs, thresholds


@dataclass
class LfwPairs:
    """Aligned crops (N, 3, H, W) in [0, 1] and the pairs (index a, index b, same) over them."""

    crops: Tensor
    a: Tensor
    b: Tensor
    same: Tensor
    detected: Tensor  # (N,) bool: MTCNN found the face (else a fallback alignment)


def align_pairs(
    extractor: FaceExtractor,
    root: Path,
    split: str,
    pairs: int,
    seed: int = 0,
    crop: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LfwPairs:
    """The pairs of ``split``'s people, their images aligned onto F's template (``crop``:
    another way to crop a batch, returning crops and detected flags)."""
    chosen = make_pairs(people(root, split), pairs // 2, pairs - pairs // 2, seed)
    names = sorted({n for a, b, _ in chosen for n in (a, b)})
    crops, detected = [], []
    with zipfile.ZipFile(root / "images.zip") as zf, torch.no_grad():
        for i in range(0, len(names), BATCH):
            images = load_images(zf, names[i : i + BATCH])
            if crop is None:
                aligned = extractor.align(images)
                c, d = aligned.crops, aligned.detected
            else:
                c, d = crop(images)
            crops.append(c)  # float, as aligned: 8 bits would move the accuracy
            detected.append(d)
            if on_progress is not None:
                on_progress(i + len(images), len(names))
    index = {n: i for i, n in enumerate(names)}
    return LfwPairs(
        torch.cat(crops),
        torch.tensor([index[a] for a, _, _ in chosen]),
        torch.tensor([index[b] for _, b, _ in chosen]),
        torch.tensor([s for _, _, s in chosen]),
        torch.cat(detected),
    )


def cached_pairs(extractor: FaceExtractor, root: Path, pairs: int, cache: Path) -> LfwPairs:
    """``align_pairs`` of the held-out (test) people, kept in ``cache`` (a run folder's:
    LFW crops are not to be committed)."""
    path = cache / f"lfw_test_{pairs}_{extractor.template.name}.pt"
    if path.is_file():
        try:
            return LfwPairs(**torch.load(path, weights_only=True))
        except (RuntimeError, EOFError, TypeError, pickle.UnpicklingError):
            pass  # a cache cut short by a crash: made again below
    made = align_pairs(extractor, root, "test", pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(made.__dict__, path)
    return made


@torch.no_grad()
def verify(extractor: FaceExtractor, pairs: LfwPairs, seed: int = 0) -> dict[str, Any]:
    """10-fold accuracy (mean, SD) and the mean fitted threshold, F in eval mode."""
    was_training = extractor.training
    extractor.eval()
    device = next(extractor.parameters()).device
    emb = torch.cat(
        [extractor.embed_crops(c.to(device), flip=True).cpu() for c in pairs.crops.split(BATCH)]
    )
    extractor.train(was_training)
    angles = angle(emb[pairs.a], emb[pairs.b], degrees=True).numpy().astype(np.float64)
    accs, thresholds = ten_fold(angles, pairs.same.numpy(), seed)
    return {
        "accuracy": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "threshold_deg": float(np.mean(thresholds)),
        "pairs": len(angles),
    }
