"""``likeness train-race-reader`` and its training loop, on synthetic faces whose "race"
is a colour a 16-px thumbnail still shows."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.errors import LikenessError
from likeness.manifest import load_manifest, sha256_file
from tests.commands.test_upscale_cli import likeness
from worker.engine.face.race_reader import load_reader
from worker.training.race_reader import thumbnail_faces, train_reader

COLOURS = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60), (60, 200, 200)]


def synthetic_set(root: Path, per_race: int = 40) -> tuple[Path, Path]:
    """A generator-data-like zip (utkface/ members plus a celebahq/ one the reader
    skips) and a labels.csv; each face is noise around its race's colour."""
    rng = np.random.default_rng(0)
    rows = ["file,age,gender,race"]
    zip_path = root / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for race, colour in enumerate(COLOURS):
            for k in range(per_race):
                name = f"{20 + k}_0_{race}_{race:02d}{k:04d}.webp"
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, "WEBP", lossless=True)
                zf.writestr(f"utkface/{name}", buf.getvalue())
                rows.append(f"{name},{20 + k},0,{race}")
        zf.writestr("celebahq/0.webp", buf.getvalue())
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return zip_path, labels


def test_the_reader_learns_what_the_thumbnails_show(tmp_path: Path) -> None:
    zip_path, labels = synthetic_set(tmp_path)
    data = thumbnail_faces(zip_path, labels, log=lambda line: None)
    assert data.train_x.shape[1:] == (3, 16, 16)
    assert len(data.train_y) + len(data.test_y) == 5 * 40, "celebahq/ faces are left out"
    assert len(data.test_y) > 0
    assert (data.train_x * 255 - (data.train_x * 255).round()).abs().max() < 1e-4, "8-bit"
    reader, metrics = train_reader(data, epochs=6, batch=32, width=8, log=lambda line: None)
    assert metrics["top1"] >= 0.9, metrics
    assert metrics["train_images"] == len(data.train_y)


def test_bad_data_is_refused_with_its_path(tmp_path: Path) -> None:
    zip_path, labels = synthetic_set(tmp_path, per_race=2)
    with pytest.raises(LikenessError, match="no .*missing.zip"):
        thumbnail_faces(tmp_path / "missing.zip", labels)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("celebahq/0.webp", b"")
    with pytest.raises(LikenessError, match="no utkface/ faces"):
        thumbnail_faces(empty, labels)


def test_the_command_trains_and_registers_the_reader(tmp_path: Path) -> None:
    zip_path, labels = synthetic_set(tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    r = likeness(
        "train-race-reader",
        "--data",
        zip_path,
        "--labels",
        labels,
        "--epochs",
        "2",
        "--into",
        weights,
    )
    assert r.returncode == 0, r.stderr
    entry = next(e for e in load_manifest(weights / "manifest.json").models)
    assert entry.kind == "race-reader" and entry.default
    assert entry.sha256 == sha256_file(weights / "race_reader.pt")
    assert "held-out top-1" in r.stderr and entry.metrics["test_images"] > 0
    assert load_reader(weights / "race_reader.pt").labels == tuple(
        ["White", "Black", "Asian", "Indian", "Others"]
    )
    missing = likeness("train-race-reader", "--data", tmp_path / "nope.zip", "--labels", labels)
    assert missing.returncode != 0 and "nope.zip" in missing.stderr
