"""Quality of a face generator; prints one JSON object.

    python bench/generator_quality.py --weights weights/generator.pt \
        --out docs/bench/generator_quality.json

- face rate: MTCNN finds a face with probability >= 0.95 in N random samples,
  and those samples' sharpness (below) as a share of held-out photos';
- FD: Fréchet distance between MobileFaceNet embeddings (MTCNN-aligned crops)
  of N samples and of N real held-out CelebA-HQ photos (val + test people);
- search fit: fraction of held-out people's 16x16 thumbnails (bicubic from
  128 px, one photo per person) for which a 100-step, 4-restart search finds a
  candidate within eps = 2e-3;
- upscale: how upscales compare with a plain bicubic enlargement of the same
  16x16 thumbnails, on held-out people (``likeness evaluate``'s samples, searches
  and cache, at --steps/--restarts and the generator's manifest search settings;
  --eps and --geocross-weight apply to the fit only):
  sharpness (mean Sobel gradient of the luminance at 128 px) and grain (what a
  5x5 blur takes from the middle of the face) of photos, outputs and
  enlargements of --celeba people (--celeba-search: kept, the upscale's
  default, or none); identity carried: cosine distance, in the
  attribute judge's pooled features, from output and from enlargement to the
  person's other photo (and from the photo itself: the floor); race carried: the
  race judge's accuracy on --utkface photos, enlargements and the outputs of
  each --utkface-searches: none (plain PULSE), kept (the default: the race the
  race reader sees in the thumbnail kept) and race (the race objective with the
  true race); per search, acceptance, downscale MSE and seconds per thumbnail.
  --grid draws thumbnail, bicubic, ours,
  ours with the kept race and with the race objective, and the photo for the
  first people of each set:

    python bench/generator_quality.py --weights weights/generator.pt \
        --skip face fd fit --celeba 64 --utkface 64 --grid docs/upscale_grid.png

- reconstruction (with --checkpoint, a vae training checkpoint): the race
  judge's accuracy on the autoencoder's reconstructions of the --utkface
  held-out photos (the encoder's mean code, decoded) against the photos', and
  their sharpness: how much race the decoder renders when it is handed the
  code, no search in between:

    python bench/generator_quality.py --weights weights/generator.pt \
        --skip face fd fit upscale --utkface 128 \
        --checkpoint training_state/generator/checkpoint.pt

Needs ../shared (the photos and the MobileFaceNet); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import Tensor

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES
from worker.engine.face.extractor import FaceExtractor
from worker.engine.objectives import ObjectiveWeights
from worker.engine.search import pull_eps
from worker.evaluation.config import THUMBNAIL, EvalConfig
from worker.evaluation.figures import to_pixel_array
from worker.evaluation.measures import judge_features, race_predictions
from worker.evaluation.models import Models, load_models
from worker.evaluation.plots import GridRow, qualitative_grid
from worker.evaluation.run import landmark_cache
from worker.evaluation.samples import Samples, celeba_samples, utkface_samples
from worker.evaluation.searches import (
    KEPT,
    NONE,
    RACE,
    Outputs,
    Strategy,
    run_strategy,
    search_config,
)
from worker.pipeline import load_search_model
from worker.training.generator.state import load_autoencoder
from worker.training.generator.vae import reconstruct
from worker.training.generator_quality import (
    FACE_PROBABILITY,
    bicubic_upscale,
    face_probabilities,
    grain,
    held_out_photos,
    photo_embeddings,
    sample_fd,
    samples,
    search_fit,
    sharpness,
)
from worker.training.generator_ship import checked_search, search_pairs

GRID_ROWS = 8  # people per set in --grid
GRID_COLUMNS = ("bicubic", "ours", "ours, race kept", "ours, race objective", "photo")
SEARCHES = {s.name: s for s in (NONE, KEPT, RACE)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--weights",
        required=True,
        help="generator: a checkpoint (g_ema.pt) or a manifest name / bundled file, "
        "whose manifest search settings then apply",
    )
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument(
        "--face-weights", type=Path, default=Path("../shared/weights/mobilefacenet_casia_068.ckpt")
    )
    p.add_argument("--face-samples", type=int, default=1000)
    p.add_argument("--fd-samples", type=int, default=5000)
    p.add_argument("--fit-people", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--eps", type=float, default=2e-3)
    p.add_argument(
        "--geocross-weight",
        type=float,
        default=None,
        help="default: the generator's manifest setting, else PULSE's 0.05",
    )
    p.add_argument("--batch", type=int, default=8, help="thumbnails per search batch")
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a search setting over the generator's manifest ones (SearchConfig "
        "fields, e.g. geocross_weight=0.01), for a --weights file without them",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["face", "fd", "fit", "upscale"])
    p.add_argument(
        "--celeba",
        type=int,
        default=64,
        help="upscale: held-out CelebA-HQ people with two photos (0: none)",
    )
    p.add_argument(
        "--utkface",
        type=int,
        default=64,
        help="upscale and reconstruction: race-balanced held-out UTKFace people (0: none)",
    )
    p.add_argument(
        "--celeba-search",
        default=KEPT.name,
        choices=[NONE.name, KEPT.name],
        help="upscale: the search the --celeba people get, whose outputs the sharpness and "
        "identity measure (default: kept, the upscale's default; none: plain PULSE)",
    )
    p.add_argument(
        "--utkface-searches",
        nargs="+",
        default=list(SEARCHES),
        choices=list(SEARCHES),
        help="upscale: the searches the --utkface people get (default: all three)",
    )
    p.add_argument(
        "--kept-race-weight",
        type=non_negative,
        default=None,
        help="upscale: weight of the kept race in the kept searches (default: the "
        "objectives' default)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("runs/eval-cache"),
        help="upscale: search results per batch (likeness evaluate's format)",
    )
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="upscale: also draw a PNG of the first people (thumbnail, bicubic, each search)",
    )
    p.add_argument(
        "--grid-photos",
        action="store_true",
        help="upscale: add the held-out photo to the grid, for looking at here; "
        "such a grid stays out of the repository (it shows the data sets)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="reconstruction: a vae training checkpoint (or its committed parts); the race "
        "judge on its reconstructions of the --utkface held-out photos",
    )
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded, _ = load_search_model(args.weights, torch.device("cpu"))
        loaded.search_defaults = search_settings(loaded.search_defaults, args.search)
    except LikenessError as e:
        raise SystemExit(e.message) from None
    G, fit = loaded.generator, loaded.mapping_fit
    face = FaceExtractor.mobilefacenet(args.face_weights).eval()
    report: dict = {
        "weights": str(args.weights),
        "sha256": loaded.sha256,
        "config": G.config.model_dump(mode="json"),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    started = time.monotonic()
    # the bars on stderr: stdout is the JSON alone, for `> file` and pipes
    with Progress(console=Console(stderr=True)) as bar:
        if "face" not in args.skip:
            task = bar.add_task("face rate", total=args.face_samples)
            probs, sharp = [], []
            for images in samples(G, args.face_samples, seed=args.seed):
                probs.append(face_probabilities(images))
                sharp.append(sharpness(images))
                bar.advance(task, len(images))
            p = torch.cat(probs)
            report["face_rate"] = {
                "value": float((p >= FACE_PROBABILITY).float().mean()),
                "samples": len(p),
                "threshold": FACE_PROBABILITY,
                "mean_probability": float(p.mean()),
            }
            # the prior's own sharpness: what training moves first, no search needed
            photos = held_out_photos(
                args.data_root / "celebahq", args.face_samples, one_per_person=True
            )
            sample_mean = float(torch.cat(sharp).mean())
            photo_mean = float(sharpness(photos).mean())
            report["sample_sharpness"] = {
                "samples": sample_mean,
                "photos": photo_mean,
                "over_photos": ratio(sample_mean, photo_mean),
                "n": len(p),
                "photos_n": len(photos),
            }
        if "fd" not in args.skip:
            real_photos = held_out_photos(
                args.data_root / "celebahq", args.fd_samples, one_per_person=False
            )
            task = bar.add_task("FD: photos", total=len(real_photos))
            real = photo_embeddings(face, real_photos, progress=lambda n: bar.advance(task, n))
            task = bar.add_task("FD: samples", total=args.fd_samples)
            fd = sample_fd(
                G,
                face,
                real,
                args.fd_samples,
                seed=args.seed + 1,
                progress=lambda n: bar.advance(task, n),
            )
            report["fd"] = {
                "value": fd,
                "samples": args.fd_samples,
                "photos": len(real_photos),
                "embedding": "MobileFaceNet 128-d, L2-normalised, MTCNN-aligned",
            }
        if "fit" not in args.skip:
            photos = held_out_photos(
                args.data_root / "celebahq", args.fit_people, one_per_person=True
            )
            task = bar.add_task("search fit", total=len(photos))
            config = loaded.search_config(
                steps=args.steps,
                restarts=args.restarts,
                eps=args.eps,
                seed=args.seed,
                geocross_weight=args.geocross_weight,
            )
            t0 = time.monotonic()
            out = search_fit(
                G,
                fit,
                photos,
                config=config,
                batch=args.batch,
                progress=lambda n: bar.advance(task, n),
            )
            mse = torch.tensor(out["mse"])
            faces = torch.tensor(out["face_probability"])
            report["search_fit"] = {
                "value": float(torch.tensor(out["accepted"]).float().mean()),
                "people": len(photos),
                "steps": args.steps,
                "restarts": args.restarts,
                "eps": args.eps,
                "fit_eps": pull_eps(config),
                "geocross_weight": config.geocross_weight,
                "mse_median": float(mse.median()),
                "mse_p90": float(mse.quantile(0.9)),
                "output_face_rate": float((faces >= FACE_PROBABILITY).float().mean()),
                "seconds_per_thumbnail": (time.monotonic() - t0) / len(photos),
                "per_photo": {k: out[k] for k in ("mse", "accepted", "face_probability")},
            }
        if "upscale" not in args.skip:
            report["upscale"] = upscale_section(args, bar)
        if args.checkpoint is not None:
            report["reconstruction"] = reconstruction_section(args)
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a weight >= 0, got {text}")
    return value


def search_settings(base: dict[str, Any], given: list[str]) -> dict[str, Any]:
    """``--search`` on top of the manifest's settings, checked as set-search checks them."""
    return checked_search(base, search_pairs(given))


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        data_root=args.data_root,
        f0=args.face_weights,
        cache=args.cache,
        weights=args.weights,
        celeba=max(args.celeba, 2),
        utkface=max(args.utkface, 1),
        steps=args.steps,
        restarts=args.restarts,
        batch=args.batch,
        seed=args.seed,
        device="cpu",
        threads=args.threads or None,
    )


def bench_weights(args: argparse.Namespace) -> ObjectiveWeights:
    """The objectives' defaults, but for --kept-race-weight."""
    given = {} if args.kept_race_weight is None else {"kept_race": args.kept_race_weight}
    return ObjectiveWeights(**given)


def upscale_section(args: argparse.Namespace, bar: Progress) -> dict[str, Any]:
    """Upscales against a plain bicubic enlargement of the same thumbnails (see above)."""
    config = eval_config(args)
    models = load_models(config, torch.device("cpu"))
    models.generator.search_defaults = search_settings(
        models.generator.search_defaults, args.search
    )
    sets: dict[str, Samples] = {}
    if args.celeba:
        sets["celebahq"] = celeba_samples(
            args.data_root / "celebahq", args.celeba, THUMBNAIL, args.seed
        )
    if args.utkface:
        sets["utkface"] = utkface_samples(
            args.data_root / "utkface", args.utkface, THUMBNAIL, args.seed, landmark_cache(config)
        )
    plan = [(s, SEARCHES[args.celeba_search]) for s in sets.values() if s.dataset == "celebahq"] + [
        (s, SEARCHES[name])
        for s in sets.values()
        if s.dataset == "utkface"
        for name in args.utkface_searches
    ]
    weights = bench_weights(args)
    outputs = search_all(models, plan, weights, args, bar)
    bicubic = {k: bicubic_upscale(s.thumbnails, models.resolution) for k, s in sets.items()}
    report: dict[str, Any] = {
        "models": {
            w.role: {"name": w.name, "sha256": w.sha256}
            for w in [*models.weights, models.race_reader_weights]
            if w is not None and (w.role != "race reader" or any(st is KEPT for _, st in plan))
        },
        "search": search_config(models, args.steps, args.restarts).model_dump(mode="json"),
        "batch": args.batch,
        "searches": {f"{d}/{s}": search_scores(out) for (d, s), out in outputs.items()},
    }
    if "celebahq" in sets:
        celeba, ours = sets["celebahq"], outputs["celebahq", args.celeba_search]
        report["sharpness"] = sharpness_scores(celeba, ours, bicubic["celebahq"])
        report["identity"] = identity_scores(models, celeba, ours, bicubic["celebahq"])
        report["sharpness"]["search"] = report["identity"]["search"] = args.celeba_search
        if args.celeba_search == KEPT.name:  # the manifest keeps sections, not the report
            kept = weights.kept_race
            report["sharpness"]["kept_race_weight"] = report["identity"]["kept_race_weight"] = kept
    if "utkface" in sets:
        searched = {name: outputs["utkface", name] for name in args.utkface_searches}
        report["race"] = race_scores(models, sets["utkface"], bicubic["utkface"], searched)
        if KEPT.name in args.utkface_searches:
            report["race"]["kept_race_weight"] = weights.kept_race
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        columns = GRID_COLUMNS if args.grid_photos else GRID_COLUMNS[:-1]
        qualitative_grid(grid_rows(sets, bicubic, outputs, args.grid_photos), columns, args.grid)
        report["grid"] = str(args.grid)
    return report


def reconstruction_section(args: argparse.Namespace) -> dict[str, Any]:
    """The race judge on a training checkpoint's reconstructions of held-out UTKFace photos:
    how much race the decoder renders when it is handed the code, no search in between."""
    if args.utkface < 1:
        raise SystemExit("--checkpoint reconstructs --utkface photos: give --utkface N > 0")
    try:  # a bad checkpoint fails before the judges load and the photos are framed
        E, G, kimg = load_autoencoder(args.checkpoint, torch.device("cpu"))
    except LikenessError as e:
        raise SystemExit(e.message) from None
    config = eval_config(args)
    models = load_models(config, torch.device("cpu"))
    utk = utkface_samples(
        args.data_root / "utkface", args.utkface, THUMBNAIL, args.seed, landmark_cache(config)
    )
    if G.config.resolution != utk.photos.shape[-1]:
        raise SystemExit(
            f"{args.checkpoint} draws {G.config.resolution} px faces; the photos are "
            f"{utk.photos.shape[-1]} px"
        )
    rebuilt = reconstruct(E, G, utk.photos)

    def accuracy(images: Tensor) -> float:
        return race_accuracy(models, utk, images)

    photos_sharp, rebuilt_sharp = (float(sharpness(x).mean()) for x in (utk.photos, rebuilt))
    return {
        "checkpoint": str(args.checkpoint),
        "kimg": round(kimg, 3),
        "people": len(utk),
        "race": {"photos": accuracy(utk.photos), "reconstructions": accuracy(rebuilt)},
        "sharpness": {
            "photos": photos_sharp,
            "reconstructions": rebuilt_sharp,
            "over_photos": ratio(rebuilt_sharp, photos_sharp),
        },
    }


def search_all(
    models: Models,
    plan: list[tuple[Samples, Strategy]],
    weights: ObjectiveWeights,
    args: argparse.Namespace,
    bar: Progress,
) -> dict[tuple[str, str], Outputs]:
    """Each (set, strategy) through evaluate's cached batched searches."""
    total = sum(-(-len(s) // args.batch) * args.steps for s, _ in plan)
    task = bar.add_task("upscale: searches", total=total)

    def on_progress(steps: int, status: str) -> None:
        bar.update(task, advance=steps, description=f"upscale: {status}")

    return {
        (s.dataset, strategy.name): run_strategy(
            models,
            s,
            strategy,
            args.steps,
            args.restarts,
            args.batch,
            args.cache,
            on_progress=on_progress,
            weights=weights,
        )
        for s, strategy in plan
    }


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def search_scores(out: Outputs) -> dict[str, Any]:
    n = len(out.accepted)
    scores: dict[str, Any] = {
        "n": n,
        "accepted": float(np.mean(out.accepted)),
        "mse_mean": float(np.mean(out.mse)),
        "seconds_per_thumbnail": out.search_seconds / n,
        "batches": out.batches,
        "cached_jobs": out.cached_jobs,
    }
    if out.cached_jobs:
        # a cached job keeps the seconds of the run that searched it, wherever that ran
        scores["note"] = (
            f"{out.cached_jobs} of {n} thumbnails came from the cache: "
            "their seconds are those of the run that searched them"
        )
    return scores


def sharpness_scores(celeba: Samples, plain: Outputs, bicubic: Tensor) -> dict[str, Any]:
    """Mean sharpness of photos, outputs and enlargements, ratios of the means; and the
    same for grain, since speckle raises sharpness as much as crisp features do."""
    images = {"photos": celeba.photos, "outputs": plain.images, "bicubic": bicubic}
    means = {name: float(sharpness(x).mean()) for name, x in images.items()}
    grains = {name: float(grain(x).mean()) for name, x in images.items()}
    return {
        **means,
        "outputs_over_photos": ratio(means["outputs"], means["photos"]),
        "bicubic_over_photos": ratio(means["bicubic"], means["photos"]),
        "grain": {
            **grains,
            "outputs_over_photos": ratio(grains["outputs"], grains["photos"]),
            "bicubic_over_photos": ratio(grains["bicubic"], grains["photos"]),
        },
        "n": len(celeba),
    }


def identity_scores(
    models: Models, celeba: Samples, plain: Outputs, bicubic: Tensor
) -> dict[str, Any]:
    """Cosine distance (1 - cos) to the person's other photo I' in an embedding the search
    never saw (neither F nor F0): does an upscale carry more of the person than a blur?"""
    judge = models.attribute_judge
    rows = celeba.with_reference  # people with a second photo I' only
    reference = judge_features(judge, celeba.reference_photos(rows))

    def distance(images: Tensor) -> Tensor:
        return 1 - F.cosine_similarity(judge_features(judge, images[rows]), reference, dim=1)

    ours, blurred, photos = distance(plain.images), distance(bicubic), distance(celeba.photos)
    return {
        "embedding": "attribute judge's pooled features, its 64-px ArcFace-aligned crops",
        "output_mean": float(ours.mean()),
        "bicubic_mean": float(blurred.mean()),
        "photo_mean": float(photos.mean()),  # the floor: the person's own photo I
        "output_closer_than_bicubic": float((ours < blurred).float().mean()),
        "n": len(rows),
    }


def race_accuracy(models: Models, utk: Samples, images: Tensor) -> float:
    """The share of ``images`` (one per --utkface person) the race judge reads right."""
    return float(np.mean(race_predictions(models.race_judge, images) == utk.labels))


def race_scores(
    models: Models, utk: Samples, bicubic: Tensor, searched: dict[str, Outputs]
) -> dict[str, Any]:
    """The race judge's accuracy on photos, enlargements and each search's outputs."""
    acc = {
        "photos": race_accuracy(models, utk, utk.photos),
        "bicubic": race_accuracy(models, utk, bicubic),
    } | {name: race_accuracy(models, utk, out.images) for name, out in searched.items()}
    return {
        "judge_accuracy": acc,
        "over_photos": {k: ratio(v, acc["photos"]) for k, v in acc.items() if k != "photos"},
        "n": len(utk),
        "skipped": utk.skipped,
    }


def grid_rows(
    sets: dict[str, Samples],
    bicubic: dict[str, Tensor],
    outputs: dict[tuple[str, str], Outputs],
    photos: bool,
) -> list[GridRow]:
    """The first GRID_ROWS people of each set, UTKFace first; a column a set's searches did
    not fill (the race objective's on CelebA-HQ, say) stays blank."""
    rows = []
    for dataset in ("utkface", "celebahq"):
        if dataset not in sets:
            continue
        samples = sets[dataset]
        for i in range(min(GRID_ROWS, len(samples))):
            images = {"bicubic": bicubic[dataset][i]}
            if photos:
                images["photo"] = samples.photos[i]
            for strategy, column in (
                (NONE, "ours"),
                (KEPT, "ours, race kept"),
                (RACE, "ours, race objective"),
            ):
                if (dataset, strategy.name) in outputs:
                    images[column] = outputs[dataset, strategy.name].images[i]
            label = (
                f"UTKFace #{i + 1} {UTKFACE_RACES[int(samples.labels[i])]}"
                if dataset == "utkface"
                else f"CelebA-HQ #{i + 1}"
            )
            rows.append(
                GridRow(
                    label, samples.thumbnails[i], {k: to_pixel_array(v) for k, v in images.items()}
                )
            )
    return rows


if __name__ == "__main__":
    main()
