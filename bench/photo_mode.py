"""Photo mode on what it is for, a photo with several small, tilted faces (plus one large
face, which it leaves alone): the before/after picture of the docs and a JSON of what
happened to each face.

    python bench/photo_mode.py      # writes docs/photo_mode.png, docs/bench/photo_mode.json
    python bench/photo_mode.py --steps 20 --restarts 1 --out /tmp/p.png --json /tmp/p.json

The photo is built here from scaled, tilted and mirrored copies of
``skimage.data.astronaut()`` on ``skimage.data.coffee()`` (no data-set faces): six small
faces, their frames 42-55 px (boxes just over the detector's 20 px), and one whose frame
spans 144 px, more than half the generator's 128 px. It runs the path ``likeness upscale
photo.png`` runs (the ONNX MTCNN, the FFHQ-frame alignment, the choice of faces, one
batched search per thumbnail size, the paste-back) with the bundled generator on the
CPU. The picture shows the photo enlarged by bicubic interpolation beside the result,
the small faces' corner of both at full size, then for each upscaled face its aligned
thumbnail (pixels, bicubic), the upscaled face and the photo around it before and after,
and last the large face, left as the enlarged photo's pixels. The JSON also gives how
far the detector finds each aligned crop's landmarks from the FFHQ frame's (pixels at
the generator's side).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from likeness.face_detect import SharedDetector
from likeness.manifest import BUNDLED_MANIFEST_PATH
from likeness.photo import enlarge, frame_points, mtcnn_to_continuous, plan_with_settings
from likeness.request import UpscaleRequest
from likeness.settings import Settings
from worker.engine.speed import fastest_layout, fastest_precision
from worker.pipeline import load_search_model, resolve_search, upscale_photo

ROOT = Path(__file__).resolve().parents[1]
FONT = ImageFont.load_default(size=15)
STRIP_HEIGHT = 420
# (x, y) of the top-left corner, width of the head crop in pixels, tilt in degrees
# (counter-clockwise), mirrored. The head crop is about 2.5 times the detector's box: the
# small faces' boxes are 21-28 px, their frames 42-55 px; the last face's frame is 144 px.
PLACEMENTS = [
    ((20, 30), 60, 10, False),
    ((130, 50), 56, -12, True),
    ((240, 20), 66, 0, False),
    ((350, 70), 58, 15, True),
    ((470, 30), 72, -6, False),
    ((60, 260), 62, -18, True),
    ((400, 210), 190, 6, False),
]


def build_photo() -> Image.Image:
    canvas = Image.fromarray(data.coffee()).resize((640, 480), Image.Resampling.LANCZOS)
    face = Image.fromarray(data.astronaut()).crop((120, 0, 340, 240))
    for (x, y), side, angle, mirrored in PLACEMENTS:
        copy = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else face
        copy = copy.resize((side, side * 240 // 220), Image.Resampling.LANCZOS).convert("RGBA")
        copy = copy.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        canvas.paste(copy, (x, y), copy)
    return canvas.convert("RGB")


def label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill="black", font=FONT)


def picture(photo: np.ndarray, result, factor: int, resolution: int) -> Image.Image:  # type: ignore[no-untyped-def]
    """Top: bicubic enlargement | result, shown 900 px wide each; then the small faces'
    corner of both at the result's full resolution. Below, per upscaled face: its aligned
    thumbnail (pixels, then bicubic), the upscaled face, and the photo's region around it
    before and after, at the result's full resolution; last, each face left out, as the
    result has it (the enlarged photo's pixels)."""
    panel = 900
    before = Image.fromarray(enlarge(photo, factor))
    after = Image.fromarray(result.composite.pixels)
    w, h = before.size
    shown = (panel, round(h * panel / w))
    tile, gap, label_h = resolution, 6, 24
    chosen = result.plan.chosen
    left_out = [f for f in result.plan.faces if not f.chosen]
    # A strip of the result about the small faces at full size (1:1 pixels), bicubic above
    # likeness: as wide as the picture, at most STRIP_HEIGHT tall from the topmost face.
    width = 2 * panel + 10
    x0 = max(0, min(int(f.box[0] * factor) - 40 for f in chosen))
    y0 = max(0, min(int(f.box[1] * factor) - 60 for f in chosen))
    y1 = min(h, y0 + STRIP_HEIGHT, max(int(f.box[3] * factor) + 60 for f in chosen))
    strip = (x0, y0, min(w, x0 + width), y1)
    strip_h = y1 - y0
    rows = len(chosen) + len(left_out)
    height = 3 * label_h + shown[1] + 2 * strip_h + gap + rows * (tile + gap) + gap
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    out.paste(before.resize(shown, Image.Resampling.LANCZOS), (0, label_h))
    out.paste(after.resize(shown, Image.Resampling.LANCZOS), (panel + 10, label_h))
    label(draw, (4, 4), f"photo, bicubic x{factor} (shrunk to fit)")
    label(draw, (panel + 14, 4), f"likeness photo mode x{factor} (shrunk to fit)")
    y = label_h + shown[1] + 4
    for name, image in ((f"bicubic x{factor}", before), (f"likeness x{factor}", after)):
        label(draw, (4, y), f"{name}, the small faces at full size (1:1 pixels)")
        out.paste(image.crop(strip), (0, y + label_h - 4))
        y += label_h + strip_h
    y += gap
    for face, upscaled, crop, pasted in zip(
        chosen, result.faces, result.crops, result.composite.pasted, strict=True
    ):
        thumb = Image.fromarray(crop)
        px0, py0, px1, py1 = pasted.box
        side = max(px1 - px0, py1 - py0)
        region = (px0, py0, px0 + side, py0 + side)
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
        label(
            draw,
            (4 + len(cells) * (tile + gap), y + 4),
            f"face {face.index}: its frame spans {face.side:.0f} photo px;\n"
            f"searched as a {crop.shape[0]} px thumbnail (shown as pixels, bicubic),\n"
            f"upscaled to {tile} px; then the photo around it, bicubic x{factor} "
            f"and pasted ({side} px shown at {tile}).\n"
            f"downscale MSE {upscaled.report['downscale_mse']:.4f}, {accepted} "
            f"(eps {upscaled.report['eps']:g})",
        )
        y += tile + gap
    for face in left_out:
        fx0, fy0, fx1, fy1 = (v * factor for v in face.box)
        side = round(max(fx1 - fx0, fy1 - fy0) * 1.4)
        cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
        region = (round(cx - side / 2), round(cy - side / 2))
        region_box = (*region, region[0] + side, region[1] + side)
        cell = after.crop(region_box).resize((tile, tile), Image.Resampling.LANCZOS)
        out.paste(cell, (4 + 4 * (tile + gap), y))  # under "pasted": the result's pixels
        reason = (face.reason or "").replace("; ", ";\n")
        label(draw, (4 + 5 * (tile + gap), y + 4), f"face {face.index}, not upscaled: {reason}")
        y += tile + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the settings' (100)")
    parser.add_argument("--restarts", type=int, default=None, help="default: the settings' (4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "photo_mode.png")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "photo_mode.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
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
    # Each batch's search time: faces that share a thumbnail size are searched together.
    batches: list[dict[str, float]] = []

    def on_group(size: int, count: int, index: int) -> None:
        batches.append({"size": size, "faces": count, "started": time.perf_counter()})

    def on_step(s) -> None:  # type: ignore[no-untyped-def]
        if s.step == s.steps:
            batches[-1]["seconds"] = round(time.perf_counter() - batches[-1].pop("started"), 2)

    started = time.perf_counter()
    result = upscale_photo(
        model,
        photo,
        plan,
        config,
        seed=args.seed,
        max_side=settings.photo_output_max_side,
        on_step=on_step,
        on_group=on_group,
    )
    seconds = time.perf_counter() - started
    batch_of = {b["size"]: b for b in batches}

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
        "threads": torch.get_num_threads(),
        "search_and_paste_seconds": round(seconds, 2),
        "batches": batches,
        "faces_placed": len(PLACEMENTS),
        "faces_found": len(plan.faces),
        "faces_left_out": [
            {
                "index": f.index,
                "box": [round(v, 1) for v in f.box],
                "face_side": round(f.side, 2),
                "usable": f.usable,
                "large": f.large,
                "reason": f.reason,
            }
            for f in plan.faces
            if not f.chosen
        ],
        "faces": [
            {
                "index": f["index"],
                "box": f["box"],
                "face_side": f["face_side"],
                "thumbnail_size": f["thumbnail_size"],
                "accepted": f["result"]["accepted"],
                "downscale_mse": round(f["result"]["downscale_mse"], 5),
                # The face's search ran in one batch with the others of its thumbnail size:
                # this is that batch's time.
                "search_seconds": batch_of[f["thumbnail_size"]]["seconds"],
                "batch_faces": batch_of[f["thumbnail_size"]]["faces"],
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
