"""Where do bright streaks in the eyes come from: the generator or the search? One JSON object.

    python bench/generator_artifacts.py --weights weights/generator.pt \
        --out docs/bench/generator_artifacts.json --grid docs/bench/generator_artifacts.png

The measures are the *eye highlight* and *eye darkness*: in the FFHQ frame
every face shares (eyes at fixed points), the mean of the brightest (darkest)
10% of luminance in two boxes around the eyes minus the median luminance of a
cheek box. A real eye is a dark iris and pupil in a white sclera, so held-out
photos set both levels; a pale smear where the eye should be has neither a
dark pupil nor a clean white, and reads as too little darkness. They are
coarse: the grid is the evidence, the numbers say whether a row moved.

Rows, each on the same faces:
- the generator's random samples as shipped (stored noise), with noise off,
  and with each to_rgb level's partial image (16, 32, 64 px … summed up to that
  level, upsampled): a streak already in a coarse level is the decoder's;
- searched outputs of held-out 16×16 thumbnails under the generator's search
  settings, with PULSE's GEOCROSS weight (0.05) and with no noise optimised:
  a streak that appears only here is the search's.

Needs ../shared (the photos); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from likeness.errors import LikenessError
from worker.engine.downscale import downscale
from worker.engine.face.alignment import FFHQ_FRAME_LANDMARKS
from worker.engine.generator import Generator
from worker.engine.search import run_search
from worker.pipeline import load_search_model
from worker.training.generator_quality import held_out_photos, luminance
from worker.training.generator_ship import checked_search, search_pairs

EYE_BOX = (0.07, 0.04)  # half width, half height of an eye box (fractions of the side)
CHEEK_BOX = ((0.30, 0.58), (0.40, 0.66))  # (x0, y0), (x1, y1): below the left eye
TOP_FRACTION = 0.10


def eye_contrast(images: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 3, S, S) in [0, 1], FFHQ-framed → (highlight, darkness), each (N,): the mean of
    the brightest and of the darkest 10% of the eye boxes' luminance, minus the cheek's
    median (see the module text)."""
    y = luminance(images.clamp(0, 1))[:, 0]
    s = y.shape[-1]
    eyes = []
    for cx, cy in FFHQ_FRAME_LANDMARKS[:2]:
        x0, x1 = int((cx - EYE_BOX[0]) * s), int((cx + EYE_BOX[0]) * s)
        y0, y1 = int((cy - EYE_BOX[1]) * s), int((cy + EYE_BOX[1]) * s)
        eyes.append(y[:, y0:y1, x0:x1].flatten(1))
    eye = torch.cat(eyes, 1)
    k = max(1, int(eye.shape[1] * TOP_FRACTION))
    top = eye.topk(k, dim=1).values.mean(1)
    bottom = eye.topk(k, dim=1, largest=False).values.mean(1)
    (a, b), (c, d) = CHEEK_BOX
    cheek = y[:, int(b * s) : int(d * s), int(a * s) : int(c * s)].flatten(1).median(1).values
    return top - cheek, bottom - cheek


@torch.no_grad()
def level_images(G: Generator, w_plus: Tensor, noise: list[Tensor]) -> list[Tensor]:
    """The image as summed up to each to_rgb level (4 px … full), upsampled to full size."""
    res = G.config.resolution
    out = G.input(w_plus.shape[0])
    out = G.conv1(out, w_plus[:, 0], noise[0])
    skip = G.to_rgb1(out, w_plus[:, 1])
    levels = [skip]
    i = 1
    for up_conv, conv, to_rgb, n1, n2 in zip(
        G.convs[::2], G.convs[1::2], G.to_rgbs, noise[1::2], noise[2::2], strict=True
    ):
        out = up_conv(out, w_plus[:, i], n1)
        out = conv(out, w_plus[:, i + 1], n2)
        skip = to_rgb(out, w_plus[:, i + 2], skip)
        levels.append(skip)
        i += 2
    return [
        (
            (
                F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
                if x.shape[-1] != res
                else x
            )
            + 1
        )
        .div(2)
        .clamp(0, 1)
        for x in levels
    ]


def summary(images: Tensor) -> dict[str, float]:
    highlight, darkness = eye_contrast(images)
    return {
        "highlight": float(highlight.mean()),
        "highlight_sd": float(highlight.std()),
        "darkness": float(darkness.mean()),
        "darkness_sd": float(darkness.std()),
        "n": len(images),
    }


def to_row(images: Tensor, columns: int) -> np.ndarray:
    x = images[:columns].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate(list(x), axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="search settings over the generator's manifest ones (a file without "
        "them: e.g. geocross_weight=0.01)",
    )
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--thumbnails", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--columns", type=int, default=8, help="faces per row of the grid")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--grid",
        type=Path,
        help="a PNG of the rows (the photos' row only with "
        "--grid-photos: images of the data sets stay out of the repository)",
    )
    p.add_argument("--grid-photos", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded, _ = load_search_model(args.weights, torch.device("cpu"))
    try:
        loaded.search_defaults = checked_search(loaded.search_defaults, search_pairs(args.search))
    except LikenessError as e:
        raise SystemExit(e.message) from None
    G, fit = loaded.generator, loaded.mapping_fit
    rows: dict[str, Tensor] = {}
    photos = held_out_photos(
        args.data_root / "celebahq", max(args.samples, args.thumbnails), one_per_person=True
    )
    rows["photos"] = photos[: args.samples]

    z = torch.randn(
        args.samples, G.config.style_dim, generator=torch.Generator().manual_seed(args.seed)
    )
    with torch.no_grad():
        w_plus = G.mapping(z).unsqueeze(1).expand(-1, G.n_latent, -1)
        stored = G.stored_noise()
        levels = level_images(G, w_plus, stored)
        rows["samples"] = levels[-1]
        rows["samples, noise off"] = (
            (G.synthesis(w_plus, [torch.zeros_like(n) for n in stored]) + 1).div(2).clamp(0, 1)
        )
    for k, level in enumerate(levels[:-1]):
        side = 4 * 2**k
        if side >= 16:  # coarser levels hold no eyes yet
            rows[f"samples, to_rgb up to {side} px"] = level

    thumbs = downscale(photos[: args.thumbnails], (16, 16))
    searches = {
        "search (generator's settings)": {},
        "search, GEOCROSS 0.05": {"geocross_weight": 0.05},
        "search, no noise optimised": {"trainable_noise": 0},
    }
    accepted: dict[str, float] = {}
    for name, change in searches.items():
        config = loaded.search_config(
            steps=args.steps, restarts=args.restarts, seed=args.seed, **change
        )
        result = run_search(G, fit, thumbs, config)
        rows[name] = result.images.float().clamp(0, 1)
        accepted[name] = float(result.accepted.float().mean())

    report = {
        "bench": "generator_artifacts",
        "weights": str(args.weights),
        "sha256": loaded.sha256,
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "measure": "eye highlight / darkness: mean of the brightest / darkest 10% of the "
        "luminance in the eye boxes minus the cheek's median luminance (FFHQ frame)",
        "rows": {name: summary(images) for name, images in rows.items()},
        "search_accepted": accepted,
        "steps": args.steps,
        "restarts": args.restarts,
        "seconds": round(time.perf_counter() - started, 1),
        "command": shlex.join(["python", "bench/generator_artifacts.py", *sys.argv[1:]]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.grid is not None:
        n = min(args.columns, args.thumbnails)
        shown = [images for name, images in rows.items() if name != "photos" or args.grid_photos]
        grid = np.concatenate([to_row(images, n) for images in shown], axis=0)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(args.grid)


if __name__ == "__main__":
    main()
