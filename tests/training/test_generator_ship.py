"""Measuring and shipping a trained generator: the quality measures
behave, and shipping writes a loadable fp16 file that the manifest describes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from likeness.errors import LikenessError
from likeness.manifest import load_manifest, resolve_weights, sha256_file
from worker.engine.checkpoints import load_generator
from worker.training.generator.config import TrainConfig
from worker.training.generator.loop import train
from worker.training.generator_quality import (
    face_probabilities,
    frechet_distance,
    samples,
    search_fit,
)
from worker.training.generator_ship import add_quality, set_search, ship_generator


def test_frechet_distance_of_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4I) in 3-d: |m|^2 + 3 * (1 + 4 - 2 * 2) = |m|^2 + 3
    b = rng.normal(size=(20_000, 3)) * 2 + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.05)


def test_face_probability_separates_a_face_from_noise() -> None:
    face = torch.from_numpy(data.astronaut()[:256, 100:356].copy()).permute(2, 0, 1) / 255
    noise = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    probs = face_probabilities(torch.stack([face, noise]))
    assert probs[0] >= 0.95 and probs[1] < 0.5


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    config = TrainConfig.smoke(
        resolution=32,
        channel_max=16,
        channel_base=256,
        style_dim=16,
        n_mlp=2,
        batch=4,
        total_kimg=0.008,
        objective="vae",
        synthetic_count=16,
        latent_avg_samples=256,
        out=out,
        device="cpu",
    )
    train(config, progress=False)
    return out


def test_ship_writes_fp16_generator_with_fit_and_manifest_entry(
    run_folder: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.json"
    entry = ship_generator(run_folder, manifest_path=manifest)
    path, found = resolve_weights(None, "generator", manifest)
    assert found == entry and path == tmp_path / "generator.pt"
    assert sha256_file(path) == entry.sha256
    assert entry.provenance["objective"] == "vae" and entry.provenance["kimg"] == 0.01
    raw = torch.load(path, weights_only=True)
    assert raw["g_ema"]["style.1.weight"].dtype == torch.float16
    loaded = load_generator(path)
    assert loaded.mapping_fit is not None and loaded.mapping_fit.samples == 100_000

    # shipping is deterministic, so a measurement of the shipped file can be attached
    again = ship_generator(
        run_folder,
        manifest_path=manifest,
        quality={"sha256": entry.sha256, "face_rate": {"value": 0.5}, "date": "2026-11-30"},
    )
    assert again.sha256 == entry.sha256
    assert again.metrics["face_rate"] == {"value": 0.5, "measured": "2026-11-30"}
    assert len(load_manifest(manifest).models) == 1  # replaced, not added beside
    with pytest.raises(LikenessError, match="measured a file"):
        ship_generator(run_folder, manifest_path=manifest, quality={"sha256": "0" * 64})

    # once the run folder is gone, a later measurement still lands on the shipped entry,
    # beside the measures it does not repeat
    measured = add_quality(
        "generator",
        {
            "sha256": entry.sha256,
            "fd": {"value": 1.5},
            "search_fit": {"value": 0.9, "per_photo": [0.1]},
            "upscale": {"sharpness": {"outputs_over_photos": 0.8}, "models": {}, "searches": {}},
            "date": "2026-12-01",
        },
        manifest_path=manifest,
    )
    assert measured.metrics == {
        "face_rate": {"value": 0.5, "measured": "2026-11-30"},
        "fd": {"value": 1.5, "measured": "2026-12-01"},
        "search_fit": {"value": 0.9, "measured": "2026-12-01"},
        "upscale": {"sharpness": {"outputs_over_photos": 0.8}, "measured": "2026-12-01"},
        "measured": "2026-12-01",
    }
    assert load_manifest(manifest).models[0].metrics == measured.metrics
    race_only = add_quality(
        "generator",
        {"sha256": entry.sha256, "upscale": {"race": {"n": 64}}, "date": "2026-12-02"},
        manifest_path=manifest,
    )
    assert race_only.metrics["upscale"] == {
        "sharpness": {"outputs_over_photos": 0.8, "measured": "2026-12-01"},
        "race": {"n": 64},
        "measured": "2026-12-02",
    }
    assert race_only.metrics["fd"] == measured.metrics["fd"]
    with pytest.raises(LikenessError, match="measured a file"):
        add_quality("generator", {"sha256": "0" * 64}, manifest_path=manifest)
    with pytest.raises(LikenessError, match="no generator named"):
        add_quality("nope", {"sha256": entry.sha256}, manifest_path=manifest)


def test_a_warm_started_run_on_prepared_data_says_both(run_folder: Path, tmp_path: Path) -> None:
    """Provenance of a run on a prepare-generator-data zip, warm-started from the
    shipped generator that it replaces: the mix's own summary and the start's sha256
    and provenance, kept although the file is overwritten."""
    import json
    import shutil
    import zipfile

    manifest = tmp_path / "weights" / "manifest.json"
    manifest.parent.mkdir()
    # fp32 here, so the second (fp16) ship's bytes differ from the file it overwrites
    first = ship_generator(run_folder, manifest_path=manifest, half=False)
    mix = tmp_path / "mix.zip"
    with zipfile.ZipFile(mix, "w") as zf:
        zf.writestr(
            "provenance.json",
            json.dumps(
                {
                    "size": 32,
                    "celeba": 3,
                    "utkface_per_race": {"Black": 2},
                    "skipped_no_face": 1,
                    "sources": {"celebahq": "train split"},
                    "seconds": 9.0,
                }
            ),
        )
    warm = tmp_path / "warm"
    shutil.copytree(run_folder, warm)
    ckpt = torch.load(warm / "checkpoint.pt", weights_only=True)
    ckpt["train_config"] |= {
        "data": str(mix),
        "init_generator": str(manifest.parent / "generator.pt"),
    }
    torch.save(ckpt, warm / "checkpoint.pt")

    second = ship_generator(warm, manifest_path=manifest).provenance
    assert second["data"] == {
        "built_by": "likeness prepare-generator-data",
        "size": 32,
        "celeba": 3,
        "utkface_per_race": {"Black": 2},
        "skipped_no_face": 1,
        "sources": {"celebahq": "train split"},
    }
    assert second["init_generator"] == {
        "file": "generator.pt",
        "sha256": first.sha256,
        "provenance": first.provenance,
    }
    assert "init_generator" not in first.provenance
    # ship, measure, ship again: the file it started from is now its own first ship
    again = ship_generator(warm, manifest_path=manifest).provenance
    assert again["init_generator"] == second["init_generator"]


def test_search_settings_go_into_the_entry_and_reach_every_search(
    run_folder: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.json"
    entry = ship_generator(run_folder, manifest_path=manifest)
    assert entry.search == {}
    stored = set_search("generator", {"geocross_weight": "0.02"}, manifest_path=manifest)
    assert stored.search == {"geocross_weight": 0.02}
    stored = set_search("generator", {"lr": "0.2"}, manifest_path=manifest)
    assert stored.search == {"geocross_weight": 0.02, "lr": 0.2}  # on top of what it had
    assert set_search("generator", {"lr": "0.3"}, clear=True, manifest_path=manifest).search == {
        "lr": 0.3
    }
    set_search("generator", {"geocross_weight": "0.02"}, clear=True, manifest_path=manifest)
    assert load_manifest(manifest).models[0].sha256 == entry.sha256  # the file is untouched
    with pytest.raises(LikenessError, match="not search settings: gocross"):
        set_search("generator", {"gocross": "1"}, manifest_path=manifest)
    with pytest.raises(LikenessError, match="geocross_weight"):
        set_search("generator", {"geocross_weight": "-1"}, manifest_path=manifest)
    with pytest.raises(LikenessError, match="no generator named"):
        set_search("nope", {"lr": "0.1"}, manifest_path=manifest)

    # named, or by its path, it is the entry
    for spec in ("generator", str(tmp_path / "generator.pt")):
        path, found = resolve_weights(spec, "generator", manifest)
        assert found is not None and found.search == {"geocross_weight": 0.02}
    # its settings apply to a search, and explicit options win
    model = load_generator(path)
    assert model.search_defaults == {} and model.search_config().geocross_weight == 0.05
    model.search_defaults = found.search
    assert model.search_config().geocross_weight == 0.02
    assert model.search_config(geocross_weight=0.1, steps=None).geocross_weight == 0.1
    assert model.search_config(steps=None).steps == 100  # None: not given


def test_search_fit_reports_one_result_per_photo(run_folder: Path) -> None:
    from worker.engine.search import SearchConfig

    loaded = load_generator(run_folder / "g_ema.pt")
    assert loaded.mapping_fit is not None
    photos = torch.cat(list(samples(loaded.generator, 3, seed=1)))
    out = search_fit(
        loaded.generator,
        loaded.mapping_fit,
        photos,
        thumb=8,
        config=SearchConfig(steps=2, restarts=2, seed=0),
        batch=2,
    )
    assert len(out["mse"]) == len(out["accepted"]) == len(out["face_probability"]) == 3
    assert all(0 <= p <= 1 for p in out["face_probability"])
    assert all(m >= 0 for m in out["mse"])
