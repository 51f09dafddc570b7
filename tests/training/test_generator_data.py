"""`likeness prepare-generator-data`: held-in photos only, UTKFace framed like evaluation's,
with the mask of what the chip showed."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from likeness.errors import LikenessError
from likeness.splits import split_of
from tests.evaluation.synthetic import write_data_root
from worker.engine.downscale import downscale
from worker.engine.face.alignment import (
    detect_landmarks,
    estimate_similarity,
    fallback_landmarks,
    invert_affine,
)
from worker.engine.face.ffhq_frame import ffhq_frame, ffhq_frame_mask, to_ffhq_frame
from worker.training.extractor_data import read_image
from worker.training.generator_data import (
    PROVENANCE_MEMBER,
    built_without_masks,
    plan_mix,
    write_mix,
)
from worker.training.images_zip import ImagesZip

runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_data_root(root, people=2, utk_per_race=1)
    return root


def test_plan_takes_held_in_photos_only(data_root: Path) -> None:
    plan = plan_mix(data_root, celeba=100, utkface_per_race=100)
    # the synthetic set has one held-in person with two photos and one held-in chip a race
    assert len(plan.celeba) == 2
    assert [len(g) for g in plan.utkface] == [1, 1, 1, 1, 1]
    celeba_rows = (data_root / "celebahq" / "labels.csv").read_text().splitlines()[1:]
    identity = {line.split(",")[0]: line.split(",")[1] for line in celeba_rows}
    assert all(split_of(identity[n]) == "train" for n in plan.celeba)
    assert all(split_of(g[0]) == "train" for g in plan.utkface)
    assert plan_mix(data_root, celeba=1, utkface_per_race=0).total == 1


def test_an_empty_mix_is_an_error(data_root: Path) -> None:
    with pytest.raises(LikenessError, match="empty"):
        plan_mix(data_root, celeba=0, utkface_per_race=0)


def test_zip_holds_framed_faces_and_provenance(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mix" / "images.zip"
    plan = plan_mix(data_root, celeba=100, utkface_per_race=100)
    summary = write_mix(data_root, out, plan, size=64, landmark_cache=tmp_path / "lm.pt")
    assert summary.images == 7 and summary.skipped_no_face == 0
    assert not out.with_name(out.name + ".tmp").exists()
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
        provenance = json.loads(zf.read("provenance.json"))
        chip = plan.utkface[2][0]
        framed = read_image(zf, f"utkface/{chip}")
    assert len([n for n in names if n.startswith("celebahq/")]) == 2
    assert provenance["utkface_per_race"]["Asian"] == 1 and provenance["format"] == 2
    assert framed.shape == (3, 64, 64)
    # the chip is warped exactly as `likeness evaluate` warps its held-out chips
    with zipfile.ZipFile(data_root / "utkface" / "images.zip") as zf:
        original = read_image(zf, chip)[None]
    landmarks = detect_landmarks(original)[0]
    expected = downscale(to_ffhq_frame(original, landmarks), 64)[0]
    assert (framed - expected.clamp(0, 1)).abs().max() <= 1 / 255 + 1e-6
    # ... and its mask travels as the alpha channel; CelebA-HQ photos have none
    images = ImagesZip(out, 64, mirror=True)
    at = images.names.index(f"utkface/{chip}")
    image, mask = images[at]
    expected_mask = downscale(ffhq_frame_mask(original, landmarks), 64)[0]
    assert (mask - expected_mask).abs().max() <= 1 / 255 + 1e-6
    assert mask.min() == 0 and mask.max() == 1  # some of the frame is invented
    assert (image - (framed * 2 - 1)).abs().max() < 1e-6  # the colours under alpha 0 too
    flipped_image, flipped_mask = images[at + len(images.names)]
    assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))
    celeba = images.names.index(next(n for n in names if n.startswith("celebahq/")))
    assert torch.equal(images[celeba][1], torch.ones(1, 64, 64))
    # the tight chip (face fills it) shrinks into the generator's frame: more background
    assert not torch.allclose(
        framed,
        torch.nn.functional.interpolate(original, size=(64, 64), mode="bicubic", antialias=True)[
            0
        ].clamp(0, 1),
        atol=0.05,
    )


def test_chips_without_a_face_are_left_out(data_root: Path, tmp_path: Path) -> None:
    blank = plan_mix(data_root, celeba=0, utkface_per_race=5).utkface[1][0]
    root = tmp_path / "data"
    (root / "utkface").mkdir(parents=True)
    src = data_root / "utkface"
    (root / "utkface" / "labels.csv").write_bytes((src / "labels.csv").read_bytes())
    with (
        zipfile.ZipFile(src / "images.zip") as a,
        zipfile.ZipFile(root / "utkface" / "images.zip", "w") as b,
    ):
        for name in a.namelist():
            data = a.read(name)
            if name == blank:  # a flat grey chip: MTCNN finds nothing
                buf = io.BytesIO()
                Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(buf, "WEBP")
                data = buf.getvalue()
            b.writestr(name, data)
    summary = write_mix(root, tmp_path / "o.zip", plan_mix(root, 0, 5), 32, tmp_path / "lm.pt")
    assert summary.skipped_no_face == 1
    assert summary.utkface_per_race["Black"] == 0 and summary.images == 4
    assert f"utkface/{blank}" not in zipfile.ZipFile(tmp_path / "o.zip").namelist()


def test_cli_writes_a_zip_the_trainer_reads(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "images.zip"
    result = runner.invoke(
        app,
        [
            "prepare-generator-data",
            "--data-root",
            str(data_root),
            "--out",
            str(out),
            "--size",
            "32",
            "--cache",
            str(tmp_path / "lm.pt"),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "7 images" in result.output
    images = ImagesZip(out, 32)
    assert len(images) == 7 and images[0][0].shape == (3, 32, 32)
    missing = runner.invoke(
        app, ["prepare-generator-data", "--data-root", str(tmp_path / "nowhere"), "--out", str(out)]
    )
    assert missing.exit_code == 2 and "no " in missing.output


def test_frame_mask_is_one_on_the_chip_and_zero_on_the_invented_margin() -> None:
    # a chip whose face fills it (its landmarks spread twice as wide as the frame's)
    size = 48
    centre = torch.tensor([size / 2 - 0.5, size / 2 - 0.5])
    landmarks = (fallback_landmarks(1, size, size) - centre) * 2 + centre
    chip = torch.rand(1, 3, size, size)
    mask = ffhq_frame_mask(chip, landmarks)[0, 0]
    # where each frame pixel's centre came from, in chip pixels (the warp's own transform)
    frame_to_chip = invert_affine(estimate_similarity(landmarks, ffhq_frame(size).tensor()))[0]
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    src = frame_to_chip[:, :2] @ torch.stack([xx.flatten(), yy.flatten()]) + frame_to_chip[:, 2:]
    inside = ((src > 0.5) & (src < size - 1.5)).all(0).view(size, size)
    outside = ((src < -1.5) | (src > size + 0.5)).any(0).view(size, size)
    assert inside.any() and outside.any()
    assert torch.allclose(mask[inside], torch.tensor(1.0))
    assert torch.equal(mask[outside], torch.zeros(int(outside.sum())))
    assert 0.15 < float(mask.mean()) < 0.5  # most of the frame is invented


def test_an_old_mix_without_masks_is_told_apart(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "images.zip"
    write_mix(data_root, out, plan_mix(data_root, 1, 1), 32, tmp_path / "lm.pt")
    assert not built_without_masks(out)
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == PROVENANCE_MEMBER:
                made = json.loads(data)
                made.pop("format")
                data = json.dumps(made).encode()
            dst.writestr(name, data)
    assert built_without_masks(old)
    assert not built_without_masks(data_root / "utkface" / "images.zip")  # not a mix
    args = ["--smoke", "--data", str(old), "--resolution", "16", "--kimg", "0.004"]
    result = runner.invoke(
        app,
        ["train-generator", *args, "--channel-base", "128", "--device", "cpu"]
        + ["--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    assert "built before validity masks" in " ".join(result.output.split())  # (wrapped)
