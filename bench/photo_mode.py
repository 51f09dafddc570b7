"""Photo mode on a photo with several small, tilted faces: the before/after picture of the
docs and a JSON of what happened to each face.

    python bench/photo_mode.py      # writes docs/photo_mode.png, docs/bench/photo_mode.json
    python bench/photo_mode.py --steps 20 --restarts 1 --out /tmp/p.png --json /tmp/p.json

The photo is built here from scaled and rotated copies of ``skimage.data.astronaut()``
on ``skimage.data.coffee()`` (no data-set faces). It runs the path ``likeness upscale
photo.png`` runs (the ONNX MTCNN, the FFHQ-frame alignment, one batched search per
thumbnail size, the paste-back) with the bundled generator on the CPU. The picture
shows the photo enlarged by bicubic interpolation beside the result, then for each face
its aligned thumbnail, that thumbnail enlarged by bicubic, and the upscaled face. The
JSON also gives how far the detector finds each aligned crop's landmarks from the FFHQ
frame's (pixels at the generator's side).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data

from likeness.face_detect import SharedDetector
from likeness.manifest import BUNDLED_MANIFEST_PATH
from likeness.photo import enlarge, frame_points, mtcnn_to_continuous, plan_with_settings
from likeness.request import UpscaleRequest
from likeness.settings import Settings
from worker.engine.speed import fastest_layout, fastest_precision
from worker.pipeline import load_search_model, resolve_search, upscale_photo

ROOT = Path(__file__).resolve().parents[1]
# (x, y) of the top-left corner, face width in pixels, tilt in degrees (counter-clockwise)
# The last is too small for the detector's 20-px faces: it is reported, not upscaled.
PLACEMENTS = [
    ((40, 220), 150, 14),
    ((430, 50), 110, -18),
    ((610, 330), 90, 6),
    ((250, 70), 70, -8),
    ((640, 60), 40, 0),
]


def build_photo() -> Image.Image:
    canvas = Image.fromarray(data.coffee()).resize((800, 600), Image.Resampling.LANCZOS)
    face = Image.fromarray(data.astronaut()).crop((120, 0, 340, 240))
    for (x, y), side, angle in PLACEMENTS:
        copy = face.resize((side, side * 240 // 220), Image.Resampling.LANCZOS).convert("RGBA")
        copy = copy.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        canvas.paste(copy, (x, y), copy)
    return canvas.convert("RGB")


def picture(photo: np.ndarray, result, factor: int, resolution: int) -> Image.Image:  # type: ignore[no-untyped-def]
    """Top: bicubic enlargement | result, shown 900 px wide each. Below, per face: its
    aligned thumbnail (pixels, then bicubic), the upscaled face, and the photo's region
    around it before and after, at the result's full resolution."""
    panel = 900
    before = Image.fromarray(enlarge(photo, factor))
    after = Image.fromarray(result.composite.pixels)
    w, h = before.size
    shown = (panel, round(h * panel / w))
    tile, gap, label_h = resolution, 6, 22
    rows = len(result.faces)
    out = Image.new(
        "RGB", (2 * panel + 10, shown[1] + label_h + rows * (tile + gap) + gap), "white"
    )
    out.paste(before.resize(shown, Image.Resampling.LANCZOS), (0, label_h))
    out.paste(after.resize(shown, Image.Resampling.LANCZOS), (panel + 10, label_h))
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), f"photo, bicubic x{factor}", fill="black")
    draw.text((panel + 14, 4), f"likeness photo mode x{factor}", fill="black")
    y = shown[1] + label_h + gap
    for face, upscaled, crop, pasted in zip(
        result.plan.chosen, result.faces, result.crops, result.composite.pasted, strict=True
    ):
        thumb = Image.fromarray(crop)
        x0, y0, x1, y1 = pasted.box
        side = max(x1 - x0, y1 - y0)
        region = (x0, y0, x0 + side, y0 + side)
        cells = [
            thumb.resize((tile, tile), Image.Resampling.NEAREST),
            thumb.resize((tile, tile), Image.Resampling.BICUBIC),
            Image.fromarray(upscaled.pixels),
            before.crop(region).resize((tile, tile), Image.Resampling.LANCZOS),
            after.crop(region).resize((tile, tile), Image.Resampling.LANCZOS),
        ]
        for k, cell in enumerate(cells):
            out.paste(cell, (4 + k * (tile + gap), y))
        accepted = "accepted" if upscaled.report["accepted"] else "not accepted"
        draw.text(
            (4 + len(cells) * (tile + gap), y + 4),
            f"face {face.index}: its frame spans {face.side:.0f} photo px;\n"
            f"searched as a {crop.shape[0]} px thumbnail (shown as pixels, bicubic),\n"
            f"upscaled to {tile} px; then the photo around it, bicubic and pasted.\n"
            f"downscale MSE {upscaled.report['downscale_mse']:.4f}, {accepted}",
            fill="black",
        )
        y += tile + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the settings' (100)")
    parser.add_argument("--restarts", type=int, default=None, help="default: the settings' (4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "photo_mode.png")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "photo_mode.json")
    args = parser.parse_args()

    settings = Settings()
    device = torch.device("cpu")
    photo = np.asarray(build_photo())
    model, name = load_search_model(None, device)
    resolution = model.generator.config.resolution
    detector = SharedDetector((settings.manifest_path, BUNDLED_MANIFEST_PATH))
    started = time.perf_counter()
    plan = plan_with_settings(photo, detector, resolution, "all", settings)
    detect_seconds = time.perf_counter() - started
    request = UpscaleRequest(
        steps=args.steps or settings.steps_default,
        restarts=args.restarts or settings.restarts_default,
        seed=args.seed,
    )
    precision = fastest_precision("auto", device)
    config = resolve_search(
        request,
        model,
        precision=precision,
        channels_last=fastest_layout(None, device, precision),
    )
    started = time.perf_counter()
    result = upscale_photo(
        model, photo, plan, config, seed=args.seed, max_side=settings.photo_output_max_side
    )
    seconds = time.perf_counter() - started

    # How well the crops sit in the FFHQ frame: the detector's landmarks in each aligned
    # crop (enlarged to the generator's side) against the frame's.
    frame_errors = []
    for crop in result.crops:
        big = np.asarray(
            Image.fromarray(crop).resize((resolution, resolution), Image.Resampling.BICUBIC)
        )
        found = detector.detect(big, max_side=None)
        if len(found):
            error = np.abs(mtcnn_to_continuous(found.landmarks[0]) - frame_points(resolution))
            frame_errors.append(round(float(error.max()), 2))
        else:
            frame_errors.append(None)

    report = result.report()
    summary = {
        "photo": report["photo"],
        "output": report["output"],
        "weights": name,
        "device": str(device),
        "precision": precision,
        "steps": config.steps,
        "restarts": config.restarts,
        "seed": args.seed,
        "detect_seconds": round(detect_seconds, 3),
        "search_and_paste_seconds": round(seconds, 2),
        "faces_placed": len(PLACEMENTS),
        "faces_found": len(plan.faces),
        "faces_not_usable": [
            {"index": f.index, "box": [round(v, 1) for v in f.box], "reason": f.reason}
            for f in plan.faces
            if not f.usable
        ],
        "faces": [
            {
                "index": f["index"],
                "box": f["box"],
                "face_side": f["face_side"],
                "thumbnail_size": f["thumbnail_size"],
                "accepted": f["result"]["accepted"],
                "downscale_mse": round(f["result"]["downscale_mse"], 5),
                "frame_landmark_error_px": err,
                "colour_shift": f["colour_shift"],
            }
            for f, err in zip(
                [f for f in report["faces"] if f["chosen"]], frame_errors, strict=True
            )
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture(photo, result, result.composite.factor, resolution).save(args.out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
