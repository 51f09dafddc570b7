"""The paper's F0 baseline: the pretrained MobileFaceNet, frozen, with MLP heads.

    python bench/extractor_baseline.py --out docs/bench/extractor_f0.json

On held-out people of our split (likeness/splits.py) it measures what the project
asks of F0: CelebA-HQ Same/Diff angles, race top-1 on UTKFace for an MLP on
frozen F0 features, and attribute mAP of an MLP trained with and without
inverse class frequency weights. Features are computed once and cached in
``--cache``; the heads train in seconds on them.

CelebA-HQ is aligned to FFHQ's frame, so its crops use the fixed FFHQ-frame
landmarks (no detection); UTKFace crops are framed differently and go
through MTCNN (capped by ``--utk-train`` / ``--utk-test`` for CPU time).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from likeness.splits import members, read_rows
from worker.engine.face.alignment import align_faces, detect_landmarks, fallback_landmarks
from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.heads import CELEBA_ATTRIBUTES, AttributeHead, RaceHead
from worker.training.extractor.losses import attribute_pos_weight
from worker.training.extractor.measures import average_precision, same_diff_pairs
from worker.training.extractor_data import subset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def load_images(zip_path: Path, names: list[str]) -> torch.Tensor:
    with zipfile.ZipFile(zip_path) as z:
        arrays = [
            torch.frombuffer(
                bytearray(Image.open(io.BytesIO(z.read(n))).convert("RGB").tobytes()),
                dtype=torch.uint8,
            ).view(128, 128, 3)
            for n in names
        ]
    return torch.stack(arrays).permute(0, 3, 1, 2)


@torch.no_grad()
def features(
    ext: FaceExtractor, images: torch.Tensor, detect: bool, batch: int = 128
) -> tuple[torch.Tensor, float]:
    """F0 features of each image and the fraction MTCNN found a face in (1.0 when fixed)."""
    out, found = [], 0
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 255
        if detect:
            lms, detected, _ = detect_landmarks(x)
            found += int(detected.sum())
        else:
            lms, detected = fallback_landmarks(len(x), 128, 128), None
            found += len(x)
        crops = align_faces(x, ext.template, lms, detected).crops
        out.append(ext.crop_features(crops))
    return torch.cat(out), found / max(len(images), 1)


def cached(cache: Path, name: str, make):  # type: ignore[no-untyped-def]
    path = cache / f"{name}.pt"
    if path.is_file():
        return torch.load(path)
    value = make()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def train_head(
    head: torch.nn.Module,
    x: torch.Tensor,
    loss_fn,
    epochs: int = 40,  # type: ignore[no-untyped-def]
    batch: int = 256,
    seed: int = 0,
) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            loss_fn(head(x[idx]), idx).backward()
            opt.step()
            sched.step()
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=SHARED / "weights/mobilefacenet_casia_068.ckpt")
    ap.add_argument("--data", type=Path, default=SHARED / "data")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs/extractor_baseline")
    ap.add_argument("--utk-train", type=int, default=6000)
    ap.add_argument("--utk-test", type=int, default=2000)
    ap.add_argument("--celeba-train", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads-out", type=Path, default=None, help="save the trained heads here")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    ext = FaceExtractor.mobilefacenet(args.weights).eval()

    celeba, utk = args.data / "celebahq", args.data / "utkface"
    c_rows = {r["file"]: r for r in read_rows(celeba / "labels.csv")}
    u_rows = {r["file"]: r for r in read_rows(utk / "labels.csv")}
    split_names = {
        ("celeba", s): subset(members(celeba / "labels.csv", s), limit)
        for s, limit in (("train", args.celeba_train), ("test", None))
    } | {
        ("utk", s): subset(members(utk / "labels.csv", s), limit)
        for s, limit in (("train", args.utk_train), ("test", args.utk_test))
    }

    feats, detect_rate = {}, {}
    for (dataset, split), names in split_names.items():
        root = celeba if dataset == "celeba" else utk
        feats[dataset, split], detect_rate[f"{dataset}_{split}"] = cached(
            args.cache,
            f"{dataset}_{split}_{len(names)}",
            lambda root=root, names=names, d=dataset: features(
                ext, load_images(root / "images.zip", names), detect=d == "utk"
            ),
        )
        print(f"{dataset} {split}: {len(names)} images, {time.time() - started:.0f} s", flush=True)

    # Same/Diff angles under F0 on held-out CelebA-HQ people.
    test_names = split_names["celeba", "test"]
    ids = torch.tensor([int(c_rows[n]["identity"]) for n in test_names])
    emb = F.normalize(feats["celeba", "test"], dim=1)
    same, diff = same_diff_pairs(ids)
    a_same = angle(emb[same[:, 0]], emb[same[:, 1]], degrees=True)
    a_diff = angle(emb[diff[:, 0]], emb[diff[:, 1]], degrees=True)

    # Race: MLP on frozen F0 features.
    y_race = {
        s: torch.tensor([int(u_rows[n]["race"]) for n in split_names["utk", s]])
        for s in ("train", "test")
    }
    race = train_head(
        RaceHead(in_dim=ext.embedding_dim),
        feats["utk", "train"],
        lambda logits, idx: F.cross_entropy(logits, y_race["train"][idx]),
    )
    with torch.no_grad():
        pred = race(feats["utk", "test"]).argmax(1)
    per_race = {
        name: float((pred[y_race["test"] == i] == i).float().mean())
        for i, name in enumerate(race.labels)
        if (y_race["test"] == i).any()
    }

    # Attributes: with and without inverse class frequency weights.
    y_attr = {
        s: torch.tensor(
            [[float(c_rows[n][a]) for a in CELEBA_ATTRIBUTES] for n in split_names["celeba", s]]
        )
        for s in ("train", "test")
    }
    pos_weight = attribute_pos_weight(y_attr["train"])
    attr_results, attr_heads = {}, {}
    for name, weight in (("plain_bce", None), ("inverse_frequency", pos_weight)):
        head = train_head(
            AttributeHead(in_dim=ext.embedding_dim),
            feats["celeba", "train"],
            lambda logits, idx, w=weight: F.binary_cross_entropy_with_logits(
                logits, y_attr["train"][idx], pos_weight=w
            ),
        )
        with torch.no_grad():
            scores = head(feats["celeba", "test"])
        aps = [average_precision(scores[:, j], y_attr["test"][:, j]) for j in range(40)]
        valid = [a for a in aps if a == a]
        attr_results[name] = {
            "mAP": sum(valid) / len(valid),
            "per_attribute_AP": dict(zip(CELEBA_ATTRIBUTES, aps, strict=True)),
        }
        attr_heads[name] = head

    result = {
        "what": "F0 = pretrained MobileFaceNet (CASIA), frozen; MLP heads on its 128-d features",
        "split": "likeness/splits.py salt likeness-v1 (identity-disjoint train/test)",
        "sizes": {f"{d}_{s}": len(n) for (d, s), n in split_names.items()},
        "mtcnn_detection_rate": detect_rate,
        "celeba_same_angle_deg": {
            "mean": float(a_same.mean()),
            "sd": float(a_same.std()),
            "pairs": len(a_same),
        },
        "celeba_diff_angle_deg": {
            "mean": float(a_diff.mean()),
            "sd": float(a_diff.std()),
            "pairs": len(a_diff),
        },
        "race_top1": float((pred == y_race["test"]).float().mean()),
        "race_top1_per_class": per_race,
        "attributes": attr_results,
        "seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}",
    }
    if args.heads_out is not None:
        torch.save(
            {
                "race": race.to_checkpoint(),
                "attributes": attr_heads["inverse_frequency"].to_checkpoint(),
            },
            args.heads_out,
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
