"""`likeness upscale --race/--attr/--reference`: targets through F, names checked, reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from tests.commands.test_upscale_cli import likeness
from tests.tiny_models import random_extractor
from worker.engine.checkpoints import save_generator
from worker.engine.face.export import export
from worker.engine.generator import Generator, GeneratorConfig


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("targets")
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(d / "tiny.pt", g)
    assert likeness("weights", "fit-mapping", d / "tiny.pt", "--samples", "5000").returncode == 0
    export(random_extractor(), d / "f.pt", metrics={})
    astronaut = Image.fromarray(data.astronaut())
    astronaut.resize((16, 16), Image.Resampling.BICUBIC).save(d / "thumb.png")
    astronaut.crop((110, 20, 350, 260)).save(d / "face.jpg")
    Image.fromarray(data.coffee()).save(d / "coffee.jpg")
    return d


def run(d: Path, *extra: str):  # type: ignore[no-untyped-def]
    return likeness(
        "upscale",
        d / "thumb.png",
        "-o",
        d / "out.png",
        "--weights",
        d / "tiny.pt",
        "--extractor",
        d / "f.pt",
        "--steps",
        "3",
        "--restarts",
        "2",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--eps",
        "1.0",
        *extra,
    )


def test_targets_are_applied_and_reported(workdir: Path) -> None:
    r = run(
        workdir,
        "--race",
        "black",
        "--attr",
        "Smiling=1",
        "--attr",
        "eyeglasses=0",
        "--reference",
        workdir / "face.jpg",
        "--race-weight",
        "3",
    )
    assert r.returncode in (0, 3), r.stderr  # random heads may not reach the targets
    report = json.loads((workdir / "out.json").read_text())
    assert set(report["race_probabilities"]) == {"White", "Black", "Asian", "Indian", "Others"}
    assert set(report["attribute_probabilities"]) == {"Smiling", "Eyeglasses"}
    assert 0 <= report["angle_to_reference_deg"] <= 180
    assert set(report["terms"]) >= {"downscale", "geocross", "identity", "race", "attributes"}
    assert set(report["constraints"]) == {"race", "attributes"}
    held = all(c["held"] for c in report["constraints"].values())
    assert report["accepted"] == held, "eps=1 holds, so the constraints decide"
    if not held:
        assert r.returncode == 3 and "none meets the targets" in report["reason"]
    assert report["views"] == 1


def test_views_are_an_option_and_reported(workdir: Path) -> None:
    r = run(workdir, "--race", "Asian", "--views", "3")
    assert r.returncode in (0, 3), r.stderr
    assert json.loads((workdir / "out.json").read_text())["views"] == 3
    r = run(workdir, "--race", "Asian", "--views", "0")
    assert r.returncode == 2 and "views" in r.stderr


def test_unknown_names_and_bad_forms_fail_with_the_valid_ones(workdir: Path) -> None:
    r = run(workdir, "--race", "Martian")
    assert r.returncode == 2 and "Unknown race 'Martian'" in r.stderr and "Asian" in r.stderr
    r = run(workdir, "--attr", "Wings=1")
    assert r.returncode == 2 and "Unknown attribute 'Wings'" in r.stderr
    assert "Wearing_Lipstick" in r.stderr
    r = run(workdir, "--attr", "Smiling=2")
    assert r.returncode == 2 and "Name=0 or Name=1" in r.stderr
    r = run(workdir, "--reference", workdir / "coffee.jpg")
    assert r.returncode == 2 and "reference: no face" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_targets_needs_no_extractor(workdir: Path) -> None:
    r = likeness(
        "upscale",
        workdir / "thumb.png",
        "-o",
        workdir / "plain.png",
        "--weights",
        workdir / "tiny.pt",
        "--extractor",
        workdir / "missing.pt",
        "--steps",
        "2",
        "--restarts",
        "1",
        "--eps",
        "1.0",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "plain.json").read_text())
    assert "race_probabilities" not in report
    # the kept race is a default: without F it is left out, and the user is told
    assert "race is not kept" in r.stderr and "missing.pt" in r.stderr
    assert any("race is not kept" in n for n in report["notes"])


def test_the_thumbnails_race_is_kept_unless_turned_off(workdir: Path) -> None:
    r = run(workdir)
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "out.json").read_text())
    read = report["race_read_from_thumbnail"]
    assert set(read) == {"White", "Black", "Asian", "Indian", "Others"}
    assert sum(read.values()) == pytest.approx(1.0, abs=1e-3)
    assert report["terms"]["race"] >= 0 and "race" not in report.get("constraints", {})
    r = run(workdir, "--no-keep-race")
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "out.json").read_text())
    assert "race_read_from_thumbnail" not in report and "race" not in report["terms"]
    r = run(workdir, "--race", "Asian")
    report = json.loads((workdir / "out.json").read_text())
    assert "race_read_from_thumbnail" not in report, "a named race is not read"
    assert "race" in report["constraints"]
