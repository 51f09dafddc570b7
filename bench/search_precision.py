"""Does a faster way of running the search find the same faces? Prints one JSON object.

    python bench/search_precision.py --utkface 64 --celeba 64 --threads 2 \
        --candidate precision=bf16 --out docs/bench/search_precision.json

Runs the same held-out thumbnails, seeds and objectives twice: as fp32 eager
(the reference) and with the candidate's search settings (``--candidate``,
SearchConfig fields: ``precision=bf16``, ``compile=default``, ...). The plain
search and the race objective (the person's own race) run on UTKFace
thumbnails, the plain search and the attribute objective (Table 3's five
attributes, the photo's values) on CelebA-HQ thumbnails, as in ``likeness
evaluate``. Per thumbnail it keeps acceptance (eps and constraints), the best
downscale MSE, the steered term at the chosen step and F's and the race judge's
readings, and reports each as reference mean, candidate mean and the paired
difference with its 95% interval: a setting keeps quality when every interval
is narrow and holds 0 or a difference too small to matter. It also reruns the
first candidate batch with the same seed and checks the pixels are identical.

Needs ../shared (the photos, F0's checkpoint); nothing here is a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.evaluation.config import THUMBNAIL, EvalConfig  # noqa: E402
from worker.evaluation.measures import race_predictions  # noqa: E402
from worker.evaluation.models import load_models  # noqa: E402
from worker.evaluation.run import landmark_cache  # noqa: E402
from worker.evaluation.samples import Samples, celeba_samples, utkface_samples  # noqa: E402
from worker.evaluation.searches import ATTRIBUTES, NONE, RACE, run_strategy  # noqa: E402
from worker.training.generator_ship import checked_search, search_pairs  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from steering import f_attributes, f_race  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument(
        "--f0", type=Path, default=Path("../shared/weights/mobilefacenet_casia_068.ckpt")
    )
    p.add_argument("--utkface", type=int, default=64)
    p.add_argument("--celeba", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="thumbnails per candidate search")
    p.add_argument(
        "--reference-batch", type=int, default=4, help="thumbnails per fp32 search (its best)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/evaluate/cache"))
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a search setting of the candidate (repeatable), e.g. precision=bf16",
    )
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def paired(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    d = candidate.astype(float) - reference.astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {
        "reference": float(reference.mean()),
        "candidate": float(candidate.mean()),
        "difference": float(d.mean()),
        "ci95": [float(d.mean() - half), float(d.mean() + half)],
    }


def head(samples: Samples, n: int) -> Samples:
    """The first n thumbnails of a sample set, with their seeds and labels."""
    cut = ("names", "reference_names", "identities", "photos", "references", "thumbnails")
    fields = {name: getattr(samples, name)[:n] for name in (*cut, "seeds", "labels")}
    return dataclasses.replace(samples, **fields)


def per_image(models: Any, out: Any, samples: Any, kind: str) -> dict[str, np.ndarray]:
    values = {
        "accepted": np.asarray(out.accepted, dtype=float),
        "downscale_mse": np.asarray(out.mse, dtype=float),
    }
    steered = [name for name in out.reports[0]["terms"] if name not in ("downscale", "geocross")]
    for name in steered:
        values[f"term_{name}"] = np.array([r["terms"][name] for r in out.reports])
    if kind == "utkface":
        values["f_race_correct"] = (f_race(models, out.images) == samples.labels).astype(float)
        judge = race_predictions(models.race_judge, out.images)
        values["judge_race_correct"] = (judge == samples.labels).astype(float)
    else:
        agree = f_attributes(models, out.images) == samples.labels
        values["f_attributes_correct"] = agree.mean(1).astype(float)
    return values


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(
        data_root=args.data_root,
        f0=args.f0,
        cache=args.cache,
        celeba=max(args.celeba, 2),
        utkface=max(args.utkface, 1),
        steps=args.steps,
        restarts=args.restarts,
        batch=args.batch,
        seed=args.seed,
        device="cpu",
        threads=args.threads or None,
    )
    models = load_models(config, torch.device("cpu"))
    base = dict(models.generator.search_defaults)
    settings = {
        "reference": checked_search(base, {"precision": "fp32", "compile": "off"}),
        "candidate": checked_search(base, search_pairs(args.candidate)),
    }
    sets = []
    if args.utkface:
        utk = utkface_samples(
            args.data_root / "utkface", args.utkface, THUMBNAIL, args.seed, landmark_cache(config)
        )
        sets += [("utkface", utk, NONE), ("utkface", utk, RACE)]
    if args.celeba:
        celeba = celeba_samples(args.data_root / "celebahq", args.celeba, THUMBNAIL, args.seed)
        sets += [("celebahq", celeba, NONE), ("celebahq", celeba, ATTRIBUTES)]

    def run(which: str, samples: Any, strategy: Any, cache: Path) -> Any:
        models.generator.search_defaults = settings[which]
        batch = args.reference_batch if which == "reference" else args.batch
        return run_strategy(models, samples, strategy, args.steps, args.restarts, batch, cache)

    results: dict[str, Any] = {}
    seconds: dict[str, float] = {"reference": 0.0, "candidate": 0.0}
    for kind, samples, strategy in sets:
        outs = {}
        for which in ("reference", "candidate"):
            outs[which] = run(which, samples, strategy, args.cache)
            seconds[which] += outs[which].search_seconds
            print(kind, strategy.name, which, f"{outs[which].search_seconds:.0f} s", flush=True)
        ref = per_image(models, outs["reference"], samples, kind)
        cand = per_image(models, outs["candidate"], samples, kind)
        results[f"{kind}/{strategy.name}"] = {
            "n": len(samples),
            **{name: paired(ref[name], cand[name]) for name in ref if name in cand},
            "max_pixel_difference": int(
                (outs["reference"].images - outs["candidate"].images).abs().max() * 255 + 0.5
            ),
        }
    # The same seed on the same device and setting gives the same pixels: rerun the first
    # candidate batch without the cache.
    kind, samples, strategy = sets[0]
    first = run("candidate", samples, strategy, args.cache).images[: args.batch]
    with tempfile.TemporaryDirectory() as fresh:
        again = run("candidate", head(samples, args.batch), strategy, Path(fresh))
    report = {
        "bench": "search_precision",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "generator": {"name": models.weights[0].name, "sha256": models.generator.sha256},
        "reference": settings["reference"],
        "candidate": settings["candidate"],
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "restarts": args.restarts,
        "batch": {"reference": args.reference_batch, "candidate": args.batch},
        "search_seconds": seconds,
        "reproducible": bool(torch.equal(first, again.images)),
        "results": results,
        "command": shlex.join(["python", "bench/search_precision.py", *sys.argv[1:]]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
