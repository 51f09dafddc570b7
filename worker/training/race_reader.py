"""Training the race reader on thumbnails of the generator's UTKFace faces.

The faces come from ``likeness prepare-generator-data``'s zip: UTKFace's train split,
race-balanced and already in the FFHQ frame the search's thumbnails are in. They are
downscaled to thumbnails by the search's own operator and rounded to 8 bits, as a
user's thumbnail is. A hash-chosen tenth of them is held out to score the reader.
"""

from __future__ import annotations

import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES
from likeness.splits import read_rows, unit_hash
from worker.engine.downscale import downscale
from worker.engine.face.race_reader import INPUT_SIZE, RaceReader
from worker.training.extractor_data import read_image

HELD_OUT = 0.1  # the share of faces scored, never trained on


@dataclass
class ReaderData:
    train_x: Tensor  # (N, 3, 16, 16) in [0, 1], 8-bit values
    train_y: Tensor  # (N,) race index
    test_x: Tensor
    test_y: Tensor


def thumbnail_faces(
    zip_path: Path, labels_csv: Path, log: Callable[[str], None] = print
) -> ReaderData:
    """The zip's ``utkface/`` faces as 16-px thumbnails with their races, split by a hash
    of the member name."""
    if not zip_path.is_file():
        raise LikenessError("data_not_found", f"no {zip_path}", status=404)
    if not labels_csv.is_file():
        raise LikenessError("data_not_found", f"no {labels_csv}", status=404)
    race = {Path(r["file"]).stem: int(r["race"]) for r in read_rows(labels_csv)}
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.startswith("utkface/") and not n.endswith("/")]
        names = [n for n in names if Path(n).stem in race]
        if not names:
            raise LikenessError(
                "data_not_found",
                f"{zip_path} holds no utkface/ faces listed in {labels_csv} (build it with "
                "likeness prepare-generator-data)",
                status=404,
            )
        thumbs, ys, held = [], [], []
        started = time.monotonic()
        for k, name in enumerate(names):
            image = read_image(zf, name)[None]
            thumbs.append((downscale(image, INPUT_SIZE)[0] * 255).round().clamp(0, 255) / 255)
            ys.append(race[Path(name).stem])
            held.append(unit_hash(name) < HELD_OUT)
            if (k + 1) % 2000 == 0:
                log(f"  {k + 1}/{len(names)} thumbnails ({time.monotonic() - started:.0f} s)")
    x, y, test = torch.stack(thumbs), torch.tensor(ys), torch.tensor(held)
    return ReaderData(x[~test], y[~test], x[test], y[test])


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Mirror, a pixel of shift (one per batch), and the exposure and colour casts that
    photos differ by."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    h, w = x.shape[-2:]
    dy, dx = (1 + int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")[..., dy : dy + h, dx : dx + w]
    gain = 1 + 0.1 * torch.randn(n, 1, 1, 1, generator=g)
    cast = 0.03 * torch.randn(n, 3, 1, 1, generator=g)
    return (x * gain + cast).clamp(0, 1)


@torch.no_grad()
def score(reader: RaceReader, x: Tensor, y: Tensor) -> dict[str, Any]:
    reader.eval()
    probs = torch.cat([reader.read(x[i : i + 512]) for i in range(0, len(x), 512)])
    hit = probs.argmax(1) == y
    per_class = {
        name: float(hit[y == c].float().mean())
        for c, name in enumerate(reader.labels)
        if (y == c).any()
    }
    # the mean probability of the true race: how strongly a right reading steers
    return {
        "top1": float(hit.float().mean()),
        "per_class": per_class,
        "mean_per_class": sum(per_class.values()) / max(len(per_class), 1),
        "true_race_probability": float(probs[torch.arange(len(y)), y].mean()),
        "test_images": len(y),
    }


def train_reader(
    data: ReaderData,
    epochs: int = 30,
    batch: int = 128,
    lr: float = 2e-3,
    width: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[RaceReader, dict[str, Any]]:
    """A race-balanced cross-entropy fit with a one-cycle schedule; held-out scores after."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    reader = RaceReader(UTKFACE_RACES, width)
    reader.mean.copy_(data.train_x.mean((0, 2, 3), keepdim=True))
    counts = torch.bincount(data.train_y, minlength=len(UTKFACE_RACES)).float()
    class_weight = len(data.train_y) / (len(counts) * counts.clamp_min(1))
    steps_per_epoch = math.ceil(len(data.train_x) / batch)
    opt = torch.optim.AdamW(reader.parameters(), lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    started = time.monotonic()
    for epoch in range(epochs):
        reader.train()
        order = torch.randperm(len(data.train_x), generator=g)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            logits = reader(augment(data.train_x[idx], g))
            loss = F.cross_entropy(logits, data.train_y[idx], class_weight, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            held = score(reader, data.test_x, data.test_y)
            log(
                f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}, held-out top-1 "
                f"{held['top1']:.3f} ({time.monotonic() - started:.0f} s)"
            )
    metrics = score(reader, data.test_x, data.test_y) | {
        "train_images": len(data.train_y),
        "epochs": epochs,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    return reader.eval(), metrics
