"""The example thumbnails: skimage's astronaut photo (public domain, NASA), its face
found by MTCNN and warped into the FFHQ frame the generator draws, then downscaled
by the search's own operator to 16 and 32 px. Run from the repository root:

    python docs/examples/make.py

With ``--compare`` it also draws README's picture, astronaut_compare.png: the 16-px
thumbnail, its bicubic enlargement, ``likeness upscale`` of it (seed 1) with the
bundled generator and with the generator of an earlier weights folder (a copy of
weights/ from before, with its manifest's search settings), and the photo:

    python docs/examples/make.py --compare --previous old_weights/

A thumbnail framed tighter or looser than that frame asks the generator for a
face of another size, which it can only draw by leaving its faces behind (pale
streaks across the eyes, smeared mouths): frame inputs like these.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data

from worker.engine.downscale import downscale
from worker.engine.face.alignment import detect_landmarks
from worker.engine.face.ffhq_frame import to_ffhq_frame
from worker.pipeline import to_pixels

HERE = Path(__file__).parent
BUNDLED = HERE.parent.parent / "weights"
SIDE = 128  # the bundled generator's


def to_image(batch: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_pixels(batch)[0])


def upscaled(thumbnail: Path, out: Path, weights_dir: Path) -> Image.Image:
    env = dict(os.environ) | {"LIKENESS_WEIGHTS_DIR": str(weights_dir)}
    command = [sys.executable, "-m", "cli", "upscale", str(thumbnail), "--seed", "1"]
    command += ["-o", str(out)]
    subprocess.run(command, check=True, env=env)
    return Image.open(out).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def compare(framed: torch.Tensor, previous: Path) -> None:
    thumbnail = HERE / "astronaut_16.png"
    small = Image.open(thumbnail).convert("RGB")
    tiles = {
        "16x16 thumbnail": small.resize((SIDE, SIDE), Image.Resampling.NEAREST),
        "bicubic": small.resize((SIDE, SIDE), Image.Resampling.BICUBIC),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tiles["previous generator"] = upscaled(thumbnail, Path(tmp) / "prev.png", previous)
        tiles["likeness (seed 1)"] = upscaled(thumbnail, Path(tmp) / "ours.png", BUNDLED)
    tiles["the photo"] = to_image(downscale(framed, (SIDE, SIDE)))
    label, gap = 18, 5
    sheet = Image.new("RGB", (len(tiles) * (SIDE + gap) - gap, SIDE + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles.items()):
        x = i * (SIDE + gap)
        draw.text((x + 2, 2), name, fill="black")
        sheet.paste(tile, (x, label))
    sheet.save(HERE / "astronaut_compare.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="also draw the comparison")
    parser.add_argument("--previous", type=Path, help="the comparison's earlier weights folder")
    args = parser.parse_args()
    if args.compare != (args.previous is not None):
        parser.error("--compare and --previous go together")
    pixels = np.ascontiguousarray(data.astronaut())
    photo = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
    landmarks, found, _ = detect_landmarks(photo)
    if not bool(found[0]):
        sys.exit("MTCNN found no face")
    framed = to_ffhq_frame(photo, landmarks)
    for side in (16, 32):
        to_image(downscale(framed, (side, side))).save(HERE / f"astronaut_{side}.png")
    if args.compare:
        compare(framed, args.previous)


if __name__ == "__main__":
    main()
