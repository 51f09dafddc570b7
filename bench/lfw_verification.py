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
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.face.alignment import warp_affine  # noqa: E402
from worker.engine.face.export import load_export  # noqa: E402
from worker.engine.face.extractor import FaceExtractor  # noqa: E402
from worker.training.lfw import align_pairs, verify  # noqa: E402

SHARED = ROOT.parent / "shared"


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
    if args.extractor is not None:
        model = load_export(args.extractor).eval()
    else:
        model = FaceExtractor.mobilefacenet(args.weights).eval()
    tpl = model.template

    def centre(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        crops = center_crops(images, tpl.height, tpl.width, args.crop_scale)
        return crops, torch.zeros(len(images), dtype=torch.bool)

    pairs = align_pairs(
        model,
        args.data,
        args.split,
        args.pairs,
        args.seed,
        crop=centre if args.no_align else None,
        on_progress=lambda done, n: print(f"\r{done}/{n} images", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    result = verify(model, pairs, args.seed)
    print(
        json.dumps(
            {
                "mode": "center_crop" if args.no_align else "mtcnn_aligned",
                "model": str(args.extractor or args.weights),
                "split": args.split,
                "accuracy_mean": round(result["accuracy"], 4),
                "accuracy_std": round(result["std"], 4),
                "n_pairs": result["pairs"],
                "n_images": len(pairs.crops),
                "detected_fraction": round(float(pairs.detected.float().mean()), 4),
                "threshold_angle_deg": round(result["threshold_deg"], 2),
                "seconds": round(time.time() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
