"""Quality of a face generator (issue 3, deliverable 4); prints one JSON object.

    python bench/generator_quality.py --weights weights/generator.pt \
        --out docs/bench/generator_quality.json

- face rate: MTCNN finds a face with probability >= 0.95 in N random samples;
- FD: Fréchet distance between MobileFaceNet embeddings (MTCNN-aligned crops)
  of N samples and of N real held-out CelebA-HQ photos (val + test people);
- search fit: fraction of held-out people's 16x16 thumbnails (bicubic from
  128 px, one photo per person) for which a 100-step, 4-restart search finds a
  candidate within eps = 2e-3.

Needs ../shared (the photos and the MobileFaceNet); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.progress import Progress

from likeness.errors import LikenessError
from worker.engine.face.extractor import FaceExtractor
from worker.pipeline import load_search_model
from worker.training.generator_quality import (
    FACE_PROBABILITY,
    face_probabilities,
    held_out_photos,
    photo_embeddings,
    sample_fd,
    samples,
    search_fit,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="generator: a checkpoint (g_ema.pt) or a manifest name / bundled file, "
                        "whose manifest search settings then apply")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--face-weights", type=Path,
                   default=Path("../shared/weights/mobilefacenet_casia_068.ckpt"))
    p.add_argument("--face-samples", type=int, default=1000)
    p.add_argument("--fd-samples", type=int, default=5000)
    p.add_argument("--fit-people", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--eps", type=float, default=2e-3)
    p.add_argument("--geocross-weight", type=float, default=None,
                   help="default: the generator's manifest setting, else PULSE's 0.05")
    p.add_argument("--batch", type=int, default=8, help="thumbnails per search batch")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["face", "fd", "fit"])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded, _ = load_search_model(args.weights, torch.device("cpu"))
    except LikenessError as e:
        raise SystemExit(e.message) from None
    G, fit = loaded.generator, loaded.mapping_fit
    face = FaceExtractor.mobilefacenet(args.face_weights).eval()
    report: dict = {
        "weights": str(args.weights), "sha256": loaded.sha256,
        "config": G.config.model_dump(mode="json"), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    started = time.monotonic()
    with Progress() as bar:
        if "face" not in args.skip:
            task = bar.add_task("face rate", total=args.face_samples)
            probs = []
            for images in samples(G, args.face_samples, seed=args.seed):
                probs.append(face_probabilities(images))
                bar.advance(task, len(images))
            p = torch.cat(probs)
            report["face_rate"] = {"value": float((p >= FACE_PROBABILITY).float().mean()),
                                   "samples": len(p), "threshold": FACE_PROBABILITY,
                                   "mean_probability": float(p.mean())}
        if "fd" not in args.skip:
            real_photos = held_out_photos(args.data_root / "celebahq", args.fd_samples,
                                          one_per_person=False)
            task = bar.add_task("FD: photos", total=len(real_photos))
            real = photo_embeddings(face, real_photos, progress=lambda n: bar.advance(task, n))
            task = bar.add_task("FD: samples", total=args.fd_samples)
            fd = sample_fd(G, face, real, args.fd_samples, seed=args.seed + 1,
                           progress=lambda n: bar.advance(task, n))
            report["fd"] = {"value": fd, "samples": args.fd_samples, "photos": len(real_photos),
                            "embedding": "MobileFaceNet 128-d, L2-normalised, MTCNN-aligned"}
        if "fit" not in args.skip:
            photos = held_out_photos(args.data_root / "celebahq", args.fit_people,
                                     one_per_person=True)
            task = bar.add_task("search fit", total=len(photos))
            config = loaded.search_config(steps=args.steps, restarts=args.restarts,
                                          eps=args.eps, seed=args.seed,
                                          geocross_weight=args.geocross_weight)
            t0 = time.monotonic()
            out = search_fit(G, fit, photos, config=config, batch=args.batch,
                             progress=lambda n: bar.advance(task, n))
            mse = torch.tensor(out["mse"])
            faces = torch.tensor(out["face_probability"])
            report["search_fit"] = {
                "value": float(torch.tensor(out["accepted"]).float().mean()),
                "people": len(photos), "steps": args.steps, "restarts": args.restarts,
                "eps": args.eps, "geocross_weight": config.geocross_weight,
                "mse_median": float(mse.median()),
                "mse_p90": float(mse.quantile(0.9)),
                "output_face_rate": float((faces >= FACE_PROBABILITY).float().mean()),
                "seconds_per_thumbnail": (time.monotonic() - t0) / len(photos),
                "per_photo": {k: out[k] for k in ("mse", "accepted", "face_probability")}}
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
