"""`likeness upscale` on a photo with several faces, on a tiny 32-px generator: for it every
face the detector finds is large (frames of 48-84 px, over half its side), so faces=all
refuses the photo, indices upscale the faces all the same, and a looser
LIKENESS_PHOTO_MAX_FACE_FRACTION makes some of them small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from likeness.photo import enlarge
from likeness.settings import get_settings
from tests.commands.test_upscale_cli import likeness
from worker.engine.checkpoints import save_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping


def astronaut_photo() -> Image.Image:
    """Three tilted copies of the astronaut's face, of different sizes, on a photo."""
    canvas = Image.fromarray(data.coffee()).resize((400, 300))
    face = Image.fromarray(data.astronaut()).crop((120, 0, 340, 240))
    for (x, y), side, angle in [((20, 30), 110, 12), ((220, 20), 80, -15), ((250, 170), 64, 0)]:
        copy = face.resize((side, side * 240 // 220), Image.Resampling.LANCZOS).convert("RGBA")
        copy = copy.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        canvas.paste(copy, (x, y), copy)
    return canvas.convert("RGB")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photo-cli")
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(d / "tiny.pt", g, mapping_fit=fit_mapping(g, 5000))
    astronaut_photo().save(d / "photo.png")
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "noise.png")
    return d


def run(workdir: Path, *extra: object, image: str = "photo.png", out: str = "out.png"):  # type: ignore[no-untyped-def]
    args = ["upscale", workdir / image, "-o", workdir / out, "--weights", workdir / "tiny.pt"]
    return likeness(*args, "--steps", "2", "--restarts", "1", "--seed", "3", "--eps", "1.0", *extra)


def test_every_face_of_a_photo_is_upscaled_and_pasted_back(workdir: Path) -> None:
    r = run(workdir, "--faces", "0,1,2")
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "out.json").read_text())
    assert report["mode"] == "photo" and report["accepted"] is True
    assert report["photo"] == {"width": 400, "height": 300}
    assert report["faces_chosen"] == [0, 1, 2] and len(report["faces"]) == 3
    factor = report["output"]["factor"]
    result = np.asarray(Image.open(workdir / "out.png"))
    assert result.shape == (300 * factor, 400 * factor, 3)
    for face in report["faces"]:
        assert face["result"]["accepted"] is True and face["thumbnail_size"] == 16
        assert face["large"] is True and "chosen by index" in face["reason"]
        assert len(face["to_thumbnail"]) == 2 and len(face["landmarks"]) == 5
        assert Image.open(face["output"]).size == (32, 32)
        assert Image.open(face["thumbnail"]).size == (16, 16)
        assert f"face {face['index']}: " in r.stderr
    # Pixels outside the pasted boxes are the (enlarged) photo's.
    photo = np.asarray(Image.open(workdir / "photo.png"))
    if factor == 1:
        outside = np.ones(photo.shape[:2], bool)
        for face in report["faces"]:
            x0, y0, x1, y1 = face["pasted_box"]
            outside[y0:y1, x0:x1] = False
        assert np.array_equal(result[outside], photo[outside])
        assert not np.array_equal(result, photo)
    first = (workdir / "out.png").read_bytes()
    assert run(workdir, "--faces", "0,1,2").returncode == 0
    assert (workdir / "out.png").read_bytes() == first  # same seed, same photo


def test_large_faces_are_left_as_the_photos_pixels(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Faces up to 2x the generator's 32 px count as small: faces 1 and 2 (frames of 61 and
    # 48 px) are upscaled, face 0 (84 px) keeps the enlarged photo's pixels.
    monkeypatch.setenv("LIKENESS_PHOTO_MAX_FACE_FRACTION", "2.0")
    get_settings.cache_clear()
    try:
        r = run(workdir, out="policy.png")
    finally:
        get_settings.cache_clear()
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "policy.json").read_text())
    assert report["faces_chosen"] == [1, 2]
    big = report["faces"][0]
    assert big["large"] is True and big["chosen"] is False and "result" not in big
    assert "already 84 px" in big["reason"] and "already 84 px" in r.stderr
    factor = report["output"]["factor"]
    result = np.asarray(Image.open(workdir / "policy.png"))
    base = enlarge(np.asarray(Image.open(workdir / "photo.png")), factor)
    untouched = np.ones(base.shape[:2], bool)
    for face in report["faces"][1:]:
        x0, y0, x1, y1 = face["pasted_box"]
        untouched[y0:y1, x0:x1] = False
    x1, y1, x2, y2 = (round(v * factor) for v in big["box"])
    inside = np.zeros_like(untouched)
    inside[y1:y2, x1:x2] = True
    assert (inside & untouched).sum() > 0.9 * inside.sum()
    assert np.array_equal(result[untouched], base[untouched])  # face 0 among them
    assert not np.array_equal(result, base)  # faces 1 and 2 were pasted


def test_faces_picks_and_no_align_keeps_the_thumbnail_path(workdir: Path) -> None:
    r = run(workdir, "--faces", "0", out="largest.png")
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "largest.json").read_text())
    assert report["faces_chosen"] == [0]
    assert [f["chosen"] for f in report["faces"]] == [True, False, False]

    r = run(workdir, "--no-align", out="aligned.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(workdir / "aligned.png").size == (32, 32)
    assert "centre-cropped" in json.dumps(json.loads((workdir / "aligned.json").read_text()))


def test_photos_that_cannot_work_are_refused(workdir: Path) -> None:
    r = run(workdir, image="noise.png", out="noise_out.png")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no face was found in the 160x120 photo" in r.stderr and "20 pixels" in r.stderr
    # Every face is over half the 32-px generator's side: all and largest refuse, naming
    # the sizes and how to force one.
    for spec in ("all", "largest"):
        r = run(workdir, "--faces", spec, out="large_out.png")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        text = " ".join(r.stderr.split())
        assert "already large" in text and "84, 61, 48 px" in text and "--faces 0" in text
    assert not (workdir / "large_out.png").exists()
    r = run(workdir, "--faces", "7")
    assert r.returncode == 2 and "not usable faces" in r.stderr
    r = run(workdir, "--faces", "some")
    assert r.returncode == 2 and "all, largest or face indices" in r.stderr
    r = run(workdir, "--no-align", "--mode", "photo")
    assert r.returncode == 2 and "--no-align" in r.stderr
