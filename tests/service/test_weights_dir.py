"""LIKENESS_WEIGHTS_DIR decides which weights every process loads, the worker included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from likeness.manifest import WeightsEntry, register, resolve_weights, sha256_file
from likeness.settings import Settings, get_settings
from worker.process import load_worker_extractor, load_worker_generator

CPU = torch.device("cpu")


def weights_dir_with(generator: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(generator, folder / "mine.pt")
    register(
        WeightsEntry(
            name="mine",
            kind="generator",
            file="mine.pt",
            sha256=sha256_file(folder / "mine.pt"),
            default=True,
        ),
        folder / "manifest.json",
    )
    return folder


def test_the_worker_loads_the_default_generator_of_the_settings_weights_dir(
    tiny_weights: Path, tmp_path: Path
) -> None:
    folder = weights_dir_with(tiny_weights, tmp_path / "weights")
    model, name = load_worker_generator(Settings(weights_dir=folder, data_dir=tmp_path), CPU)
    assert name == "mine"
    assert model.sha256 == sha256_file(folder / "mine.pt")


def test_the_worker_loads_no_bundled_extractor_when_the_weights_dir_lists_none(
    tiny_weights: Path, tmp_path: Path
) -> None:
    folder = weights_dir_with(tiny_weights, tmp_path / "weights")
    extractor, _ = load_worker_extractor(Settings(weights_dir=folder, data_dir=tmp_path), CPU)
    assert extractor is None


def test_the_environment_variable_moves_every_default_manifest_lookup(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = weights_dir_with(tiny_weights, tmp_path / "weights")
    monkeypatch.setenv("LIKENESS_WEIGHTS_DIR", str(folder))
    get_settings.cache_clear()
    try:
        path, entry = resolve_weights(None, "generator")  # as the CLI's upscale finds it
    finally:
        get_settings.cache_clear()
    assert entry is not None and entry.name == "mine" and path == folder / "mine.pt"
