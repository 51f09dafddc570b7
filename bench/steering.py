"""Does steering by F survive to the independent judges? Prints one JSON object.

    python bench/steering.py --utkface 16 --celeba 16 --threads 2 \
        --variant plain: --variant views4:views=4 --out docs/bench/steering.json

For each variant of the objectives' settings (``ObjectiveWeights`` fields,
``name:field=value,field=value``), the race objective runs on held-out
UTKFace thumbnails and the attribute objective (Table 3's five attributes,
the photo's true values) on held-out CelebA-HQ thumbnails, as in
``likeness evaluate``; plain PULSE runs once as the baseline. Each output is
read twice: by F itself (its plain crop, what the search optimised) and by
the judges, which the search never sees. A wide gap between the two means the
search met F's target with changes that do not make the face that race or
attribute to anyone else. ``--identity N`` runs the identity objective through
F on N held-out people (reference I', another photo of the person) and reports
the angle to the photo I under F and F0: Table 1's Lookalike-Ours, with the
references' own angle (CelebA-Same) as the "photos" entry.

Needs ../shared (the photos, F0's checkpoint); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from likeness.labels import UTKFACE_RACES
from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.views import resample
from worker.engine.objectives import ObjectiveWeights
from worker.evaluation.config import TABLE3_ATTRIBUTES, THUMBNAIL, EvalConfig
from worker.evaluation.measures import (
    BATCH,
    angles_deg,
    attribute_predictions,
    embed,
    race_predictions,
)
from worker.evaluation.models import load_models
from worker.evaluation.run import landmark_cache
from worker.evaluation.samples import celeba_samples, utkface_samples
from worker.evaluation.searches import ATTRIBUTES, IDENTITY_F, NONE, RACE, run_strategy
from worker.training.generator_ship import checked_search, search_pairs


def parse_variant(text: str) -> tuple[str, ObjectiveWeights]:
    name, _, fields = text.partition(":")
    values = dict(item.split("=", 1) for item in fields.split(",") if item)
    return name, ObjectiveWeights(**values)  # pydantic converts and checks the values


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument(
        "--weights",
        default=None,
        help="generator: manifest name or file (default: the manifest's default)",
    )
    p.add_argument(
        "--extractor",
        default=None,
        help="F: manifest name or file (default: the manifest's default)",
    )
    p.add_argument(
        "--f0", type=Path, default=Path("../shared/weights/mobilefacenet_casia_068.ckpt")
    )
    p.add_argument("--utkface", type=int, default=16, help="held-out UTKFace thumbnails (0: none)")
    p.add_argument("--celeba", type=int, default=16, help="held-out CelebA-HQ thumbnails (0: none)")
    p.add_argument(
        "--identity",
        type=int,
        default=0,
        help="held-out CelebA-HQ people for the identity objective through F, "
        "reference I' (Table 1's Lookalike-Ours; 0: none)",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/evaluate/cache"))
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name:field=value,... (ObjectiveWeights); repeatable; default: plain:",
    )
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="search setting over the generator's own (as `likeness weights "
        "set-search` records for a bundled one), e.g. geocross_weight=0.01 "
        "for a --weights file; repeatable",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args()


@torch.no_grad()
def f_logits(models: Any, images: torch.Tensor, head: str) -> torch.Tensor:
    """F's race or attribute logits of FFHQ-framed images: its plain crop, as the
    search sees a candidate with one view."""
    out = []
    for chunk in images.split(BATCH):
        n, _, h, w = chunk.shape
        seen = models.f(chunk.to(models.device), fallback_landmarks(n, h, w, models.device))
        out.append(getattr(seen, f"{head}_logits").cpu())
    return torch.cat(out)


def f_race(models: Any, images: torch.Tensor) -> np.ndarray:
    return f_logits(models, images, "race").argmax(1).numpy()


def f_attributes(models: Any, images: torch.Tensor) -> np.ndarray:
    columns = [models.f.attribute_head.labels.index(a) for a in TABLE3_ATTRIBUTES]
    return (f_logits(models, images, "attribute")[:, columns] > 0).long().numpy()


def race_scores(models: Any, images: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
    judge = race_predictions(models.race_judge, images)
    seen_by_f = f_race(models, images)
    return {
        "judge_accuracy": float(np.mean(judge == labels)),
        "f_accuracy": float(np.mean(seen_by_f == labels)),
        "judge_per_race": {
            r: float(np.mean(judge[labels == i] == i))
            for i, r in enumerate(UTKFACE_RACES)
            if (labels == i).any()
        },
    }


def attribute_scores(models: Any, images: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
    judge = attribute_predictions(models.attribute_judge, images, TABLE3_ATTRIBUTES)
    seen_by_f = f_attributes(models, images)
    return {
        "judge_accuracy": float(np.mean(judge == labels)),
        "f_accuracy": float(np.mean(seen_by_f == labels)),
        "judge_per_attribute": {
            a: float(np.mean(judge[:, j] == labels[:, j])) for j, a in enumerate(TABLE3_ATTRIBUTES)
        },
    }


def identity_scores(
    models: Any, images: torch.Tensor, photos: torch.Tensor, references: torch.Tensor
) -> dict[str, Any]:
    """Angles under F (which the identity objective steers by) and under F0 (which it
    does not) between each image and the person's photo I, as Table 1 measures them,
    and under F to the reference I', which the objective pulls towards."""
    out: dict[str, Any] = {}
    for name, extractor in (("f", models.f), ("f0", models.f0)):
        a = angles_deg(embed(extractor, images), embed(extractor, photos))
        out[f"{name}_angle_mean"], out[f"{name}_angle_sd"] = float(a.mean()), float(a.std())
    out["f_reference_angle_mean"] = float(
        angles_deg(embed(models.f, images), embed(models.f, references)).mean()
    )
    return out


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["plain:"])]
    config = EvalConfig(
        data_root=args.data_root,
        f0=args.f0,
        cache=args.cache,
        weights=args.weights,
        extractor=args.extractor,
        celeba=max(args.celeba, args.identity, 2),
        utkface=max(args.utkface, 1),
        steps=args.steps,
        restarts=args.restarts,
        batch=args.batch,
        seed=args.seed,
        device="cpu",
        threads=args.threads or None,
    )
    models = load_models(config, torch.device("cpu"))
    models.generator.search_defaults = checked_search(
        models.generator.search_defaults, search_pairs(args.search)
    )
    sets = []
    if args.utkface:
        utk = utkface_samples(
            args.data_root / "utkface", args.utkface, THUMBNAIL, args.seed, landmark_cache(config)
        )
        sets.append((utk.dataset, utk, RACE, race_scores, utk.photos))
    if args.celeba:
        celeba = celeba_samples(args.data_root / "celebahq", args.celeba, THUMBNAIL, args.seed)
        sets.append((celeba.dataset, celeba, ATTRIBUTES, attribute_scores, celeba.photos))
    if args.identity:
        people = celeba_samples(args.data_root / "celebahq", args.identity, THUMBNAIL, args.seed)
        people = people.subset(people.with_reference)  # the identity objective needs an I'
        references = people.reference_photos(range(len(people)))
        # "photos" here are the references I': their angle to I is Table 1's CelebA-Same;
        # "photos_resampled" are I itself, blurred: what the generator's blur alone costs
        sets.append(
            (
                "identity",
                people,
                IDENTITY_F,
                lambda m, images, _labels, photos=people.photos, refs=references: identity_scores(
                    m, images, photos, refs
                ),
                references,
            )
        )
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for key, samples, strategy, score, real in sets:
        run = {"none": ObjectiveWeights()} | {name: w for name, w in variants}
        results[key] = {"n": len(samples), "strategy": strategy.name, "variants": {}}
        results[key]["photos"] = score(models, real, samples.labels)
        # How the judges read the same photos at the sharpness of a blurry generator's faces:
        # down to `side` px and back up, as the views and F's blur training do.
        results[key]["photos_resampled"] = {
            side: score(
                models, resample(samples.photos, side / samples.photos.shape[-1]), samples.labels
            )
            for side in (64, 32, 16)
        }
        for name, weights in run.items():
            out = run_strategy(
                models,
                samples,
                NONE if name == "none" else strategy,
                args.steps,
                args.restarts,
                args.batch,
                args.cache,
                weights=weights,
            )
            results[key]["variants"][name] = {
                "weights": weights.model_dump(exclude={"threshold_deg"}),
                **score(models, out.images, samples.labels),
                "accepted": float(np.mean(out.accepted)),
                "search_seconds": out.search_seconds,
            }
            print(name, key, json.dumps(results[key]["variants"][name]), flush=True)
    f_weights = next(w for w in models.weights if w.role == "F")
    report = {
        "bench": "steering",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "generator": {"name": models.weights[0].name, "sha256": models.generator.sha256},
        "extractor": {"name": f_weights.name, "sha256": f_weights.sha256},
        "search": dict(models.generator.search_defaults),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "restarts": args.restarts,
        "seconds": time.perf_counter() - started,
        "results": results,
        "command": shlex.join(["python", "bench/steering.py", *sys.argv[1:]]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
