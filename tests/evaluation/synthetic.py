"""A data root in ../shared's format and tiny random networks, for `likeness evaluate` tests.

Photos are crops of scikit-image's astronaut (bundled with it, no download):
MTCNN finds her face, so UTKFace's re-framing path runs as on real chips.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from likeness.labels import CELEBA_ATTRIBUTES, UTKFACE_RACES
from likeness.splits import split_of
from tests.tiny_models import random_extractor
from worker.engine.checkpoints import save_generator
from worker.engine.face.export import export
from worker.engine.face.mobilefacenet import MobileFaceNet
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping
from worker.training.judges import JudgeNet, save_judge

SMALL_JUDGE = (8, 8, 16, 16)


def keys_in(split: str, count: int, form: str) -> list[str]:
    """The first ``count`` keys ``form.format(i)`` that likeness/splits.py puts in ``split``."""
    found = [form.format(i) for i in range(10_000) if split_of(form.format(i)) == split]
    return found[:count]


def face(i: int, tight: bool) -> np.ndarray:
    """A 128-px astronaut photo, shifted and tinted per ``i``; ``tight``: face fills it."""
    image = Image.fromarray(data.astronaut())
    side = 180 if tight else 240
    x, y = 140 - side // 4 + 6 * (i % 4), 40 - side // 8 + 5 * (i % 3)
    crop = np.asarray(image.crop((x, y, x + side, y + side)).resize((128, 128)), np.float32)
    tint = np.array([1.0 - 0.05 * (i % 3), 1.0, 1.0 - 0.05 * (i % 2)], np.float32)
    return (crop * tint).clip(0, 255).astype(np.uint8)


def write_set(root: Path, images: dict[str, np.ndarray], rows: list[dict[str, object]]) -> None:
    """images.zip (WebP members, stored) and labels.csv, as in ../shared/README.md."""
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "images.zip", "w", compression=zipfile.ZIP_STORED) as zf:
        for name, pixels in images.items():
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="WEBP", lossless=True)
            zf.writestr(name, buf.getvalue())
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_data_root(root: Path, people: int, utk_per_race: int) -> None:
    """celebahq/: ``people`` held-out people with 2 photos, one held-out person with a single
    photo (not usable for pairs), one training person; utkface/: ``utk_per_race`` held-out
    images per race, plus one training image."""
    rng = np.random.default_rng(0)
    images: dict[str, np.ndarray] = {}
    rows: list[dict[str, object]] = []
    test_ids = keys_in("test", people + 1, "{}")
    ids = [
        *[(p, 2) for p in test_ids[:people]],
        (test_ids[people], 1),
        (keys_in("train", 1, "{}")[0], 2),
    ]
    for person, count in ids:
        for _ in range(count):
            name = f"{len(images):05d}.webp"
            images[name] = face(len(images), tight=False)
            attrs = {a: int(rng.integers(2)) for a in CELEBA_ATTRIBUTES}
            rows.append(
                {"file": name, "identity": person, "celeba_file": f"{name[:5]}.jpg", **attrs}
            )
    write_set(root / "celebahq", images, rows)

    images, rows = {}, []
    for race in range(len(UTKFACE_RACES)):
        form = "30_0_" + str(race) + "_{}.webp"
        for name in keys_in("test", utk_per_race, form) + keys_in("train", 1, form)[:1]:
            images[name] = face(len(images), tight=True)
            rows.append({"file": name, "age": 30, "gender": 0, "race": race})
    write_set(root / "utkface", images, rows)


@dataclass
class TinyWeights:
    generator: Path
    extractor: Path
    f0: Path
    race_judge: Path
    attribute_judge: Path

    def options(self) -> list[str]:
        return [
            "--weights",
            str(self.generator),
            "--extractor",
            str(self.extractor),
            "--f0",
            str(self.f0),
            "--race-judge",
            str(self.race_judge),
            "--attribute-judge",
            str(self.attribute_judge),
        ]


def write_tiny_weights(d: Path) -> TinyWeights:
    """A 32-px generator with its mapping fit, F (random MobileFaceNet with heads), F0 (a
    random MobileFaceNet checkpoint in the pretrained file's layout) and two judges."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(d / "g.pt", g, mapping_fit=fit_mapping(g, samples=2000, batch=1000))
    export(random_extractor(), d / "f.pt", metrics={})
    torch.save({"epoch": 0, "net_state_dict": MobileFaceNet().state_dict()}, d / "f0.ckpt")
    save_judge(JudgeNet(UTKFACE_RACES, SMALL_JUDGE), "race", d / "race.pt", {})
    save_judge(JudgeNet(CELEBA_ATTRIBUTES, SMALL_JUDGE), "attributes", d / "attrs.pt", {})
    return TinyWeights(d / "g.pt", d / "f.pt", d / "f0.ckpt", d / "race.pt", d / "attrs.pt")
