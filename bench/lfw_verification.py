"""LFW face verification with the pretrained MobileFaceNet through our alignment.

Builds 6,000 seeded pairs (3,000 same-identity, 3,000 different) from
../shared/data/lfw, embeds each image once (with its mirror concatenated),
and reports 10-fold accuracy with the angle threshold picked on the other
nine folds. Prints one JSON object.

    python bench/lfw_verification.py             # MTCNN + similarity alignment
    python bench/lfw_verification.py --no-align  # a fixed centre crop instead
    python bench/lfw_verification.py --split test --pairs 2000                    # F0
    python bench/lfw_verification.py --split test --pairs 2000 \
        --extractor weights/extractor.pt                                          # F

F was trained on LFW's training people (train-extractor --lfw), so compare
F with F0 on `--split test`: the people our split holds out.

Folds are random splits of the pairs, not the official people-disjoint
View 2 folds (those are not reproducible from this copy of LFW).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from likeness.splits import split_of  # noqa: E402
from worker.engine.face.alignment import warp_affine  # noqa: E402
from worker.engine.face.export import load_export  # noqa: E402
from worker.engine.face.extractor import FaceExtractor, angle  # noqa: E402
from worker.engine.face.verification import best_angle_threshold, threshold_accuracy  # noqa: E402

SHARED = ROOT.parent / "shared"


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
        same.add(tuple(sorted((files[i], files[j]))))
    diff: set[tuple[str, str]] = set()
    while len(diff) < n_diff:
        a, b = rng.choice(len(everyone), size=2, replace=False)
        fa, fb = identities[everyone[a]], identities[everyone[b]]
        diff.add(tuple(sorted((fa[rng.integers(len(fa))], fb[rng.integers(len(fb))]))))
    return [(a, b, True) for a, b in sorted(same)] + [(a, b, False) for a, b in sorted(diff)]


def load_images(zf: zipfile.ZipFile, names: list[str]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def center_crops(images: torch.Tensor, height: int, width: int, scale: float) -> torch.Tensor:
    """The central (scale·height) × (scale·width) region resized to height × width."""
    b, _, h, w = images.shape
    m = torch.tensor(
        [
            [scale, 0.0, (w - 1) / 2 - scale * (width - 1) / 2],
            [0.0, scale, (h - 1) / 2 - scale * (height - 1) / 2],
        ]
    ).expand(b, 2, 3)
    return warp_affine(images, m, height, width)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data" / "lfw")
    p.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "mobilefacenet_casia_068.ckpt"
    )
    p.add_argument(
        "--extractor",
        type=Path,
        help="an F export of train-extractor (e.g. weights/extractor.pt) instead of --weights",
    )
    p.add_argument(
        "--split",
        choices=["all", "train", "val", "test"],
        default="all",
        help="only the people of this part of likeness/splits.py's identity split",
    )
    p.add_argument("--pairs", type=int, default=6000, help="total, half same and half different")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-align", action="store_true", help="centre crop instead of MTCNN alignment")
    p.add_argument("--crop-scale", type=float, default=1.0, help="--no-align: input px per crop px")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    start = time.time()
    with open(args.data / "labels.csv", newline="") as f:
        identities: dict[str, list[str]] = defaultdict(list)
        for row in csv.DictReader(f):
            if args.split == "all" or split_of(row["identity"]) == args.split:
                identities[row["identity"]].append(row["file"])
    pairs = make_pairs(identities, args.pairs // 2, args.pairs - args.pairs // 2, args.seed)
    names = sorted({n for a, b, _ in pairs for n in (a, b)})

    if args.extractor is not None:
        model = load_export(args.extractor).eval()
    else:
        model = FaceExtractor.mobilefacenet(args.weights).eval()
    tpl = model.template
    embeddings, detected = [], []
    with zipfile.ZipFile(args.data / "images.zip") as zf, torch.no_grad():
        for i in range(0, len(names), args.batch_size):
            images = load_images(zf, names[i : i + args.batch_size])
            if args.no_align:
                crops = center_crops(images, tpl.height, tpl.width, args.crop_scale)
                detected.append(torch.zeros(len(images), dtype=torch.bool))
            else:
                aligned = model.align(images)
                crops = aligned.crops
                detected.append(aligned.detected)
            embeddings.append(model.embed_crops(crops, flip=True))
            print(f"\r{i + len(images)}/{len(names)} images", end="", file=sys.stderr)
    print(file=sys.stderr)
    index = {n: i for i, n in enumerate(names)}
    emb = torch.cat(embeddings)
    ia = torch.tensor([index[a] for a, _, _ in pairs])
    ib = torch.tensor([index[b] for _, b, _ in pairs])
    angles = angle(emb[ia], emb[ib], degrees=True).numpy().astype(np.float64)
    same = np.array([s for _, _, s in pairs])
    accs, thresholds = ten_fold(angles, same, args.seed)

    print(
        json.dumps(
            {
                "mode": "center_crop" if args.no_align else "mtcnn_aligned",
                "model": str(args.extractor or args.weights),
                "split": args.split,
                "accuracy_mean": round(float(np.mean(accs)), 4),
                "accuracy_std": round(float(np.std(accs)), 4),
                "n_pairs": len(pairs),
                "n_images": len(names),
                "detected_fraction": round(float(torch.cat(detected).float().mean()), 4),
                "threshold_angle_deg": round(float(np.mean(thresholds)), 2),
                "seconds": round(time.time() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
