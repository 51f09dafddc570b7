"""train-extractor --ship: weights/extractor.pt (fp16) + its manifest entry, and the
CLI and the worker picking that default extractor (with its θ_t) up unasked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from likeness.errors import LikenessError
from likeness.manifest import WeightsEntry, load_manifest, register, sha256_file
from worker.engine.face.export import export, load_export
from worker.engine.face.heads import CELEBA_ATTRIBUTES, UTKFACE_RACES
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG
from worker.training.extractor.config import ExtractorConfig
from worker.training.extractor.loop import train
from worker.training.extractor_ship import ship_extractor

COMMAND = "likeness train-extractor --smoke --ship"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke run's export (float32, evaluated, with θ_t)."""
    out = tmp_path_factory.mktemp("run")
    config = ExtractorConfig.smoke(
        out=str(out),
        steps=1,
        batch=4,
        synthetic_count=16,
        synthetic_classes=4,
        eval_limit=8,
        device="cpu",
    )
    return train(config, progress=False).export


def _manifest_with_older_entries(weights: Path) -> Path:
    manifest = weights / "manifest.json"
    weights.mkdir()
    (weights / "extractor.pt").write_bytes(b"an older extractor")
    register(
        WeightsEntry(
            name="older-f", kind="extractor", file="older.pt", sha256="0" * 64, default=True
        ),
        manifest,
    )
    register(
        WeightsEntry(
            name="extractor",
            kind="extractor",
            file="extractor.pt",
            sha256=sha256_file(weights / "extractor.pt"),
        ),
        manifest,
    )
    register(
        WeightsEntry(name="g", kind="generator", file="g.pt", sha256="1" * 64, default=True),
        manifest,
    )
    return manifest


def test_ship_writes_a_loadable_fp16_file_whose_sha256_the_manifest_holds(
    run: Path, tmp_path: Path
) -> None:
    manifest = _manifest_with_older_entries(tmp_path / "weights")
    entry = ship_extractor(run, command=COMMAND, manifest_path=manifest)

    text = manifest.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))  # strict JSON
    models = {e.name: e for e in load_manifest(manifest).models}
    assert len(models) == len(load_manifest(manifest).models) == 3, "replaced, not added"
    shipped = models["extractor"]
    assert shipped == entry and shipped.kind == "extractor" and shipped.default
    assert not models["older-f"].default and models["g"].default, "one default per kind"
    path = tmp_path / "weights" / shipped.file
    assert shipped.file == "extractor.pt" and sha256_file(path) == shipped.sha256

    assert torch.load(path, weights_only=True)["dtype"] == "float16"
    ext, source = load_export(path), load_export(run)
    trained = torch.load(run, weights_only=True)
    assert ext.threshold_deg == source.threshold_deg == trained["metrics"]["threshold_deg"]
    c = shipped.config
    assert c["threshold_deg"] == ext.threshold_deg and c["architecture"] == "mobilefacenet"
    assert c["input"]["template"] == "sphereface_112x96" and c["input"]["normalisation"]["std"]
    assert c["race_labels"] == list(UTKFACE_RACES)
    assert c["attribute_labels"] == list(CELEBA_ATTRIBUTES)
    assert shipped.metrics["threshold_accuracy"] == trained["metrics"]["threshold_accuracy"]
    assert {"race_top1", "attribute_map", "angle_same"} <= set(shipped.metrics)
    p = shipped.provenance
    assert p["command"] == COMMAND and p["steps"] == 1 and p["device"] == "cpu"
    assert "likeness/splits.py" in p["split"] and p["data"] == {"synthetic": True}
    assert p["source_sha256"] == sha256_file(run) and p["minutes"] >= 0

    from app.labels import load_labels  # the API's race and attribute names come from it

    assert load_labels(manifest).races == UTKFACE_RACES


def test_ship_names_the_file_the_run_started_from(run: Path, tmp_path: Path) -> None:
    raw = torch.load(run, weights_only=True)
    raw["train"] |= {"init": "weights/extractor.pt", "init_sha256": "ab" * 32}
    torch.save(raw, tmp_path / "from_an_export.pt")
    manifest = _manifest_with_older_entries(tmp_path / "weights")
    entry = ship_extractor(tmp_path / "from_an_export.pt", command=COMMAND, manifest_path=manifest)
    assert entry.provenance["init"] == "weights/extractor.pt"
    assert entry.provenance["init_sha256"] == "ab" * 32  # the path now holds this new file


def test_ship_refuses_an_export_without_its_evaluation(run: Path, tmp_path: Path) -> None:
    ext = load_export(run)
    ext.threshold_deg = None
    export(ext, tmp_path / "unevaluated.pt", {})
    with pytest.raises(LikenessError, match="no θ_t") as e:
        ship_extractor(
            tmp_path / "unevaluated.pt",
            command=COMMAND,
            manifest_path=tmp_path / "weights" / "manifest.json",
        )
    assert e.value.code == "not_evaluated"


def test_cli_and_worker_use_the_default_extractor_and_its_threshold(
    run: Path, tmp_path: Path
) -> None:
    import worker.pipeline as pipeline
    from likeness.request import UpscaleRequest
    from likeness.settings import Settings
    from worker.process import load_worker_extractor

    manifest = tmp_path / "weights" / "manifest.json"
    theta = ship_extractor(run, command=COMMAND, manifest_path=manifest).config["threshold_deg"]
    cpu = torch.device("cpu")

    ext, threshold, name = pipeline.load_extractor(None, cpu, manifest)
    assert (threshold, name) == (theta, "extractor") and theta != DEFAULT_THRESHOLD_DEG
    request = UpscaleRequest(race="black", attributes={"smiling": 1})
    objective = pipeline.build_objective(
        ext,
        pipeline.objective_weights(request, threshold),
        [request.race],
        [request.attributes],
        [None],
    )
    assert objective.weights.threshold_deg == theta
    assert bool(objective.targets.has_race[0])
    settings = Settings(data_dir=tmp_path, weights_dir=manifest.parent)
    worker_ext, worker_threshold = load_worker_extractor(settings, cpu)
    assert worker_ext is not None and worker_threshold == theta

    # An export without θ_t (written before it was fitted) falls back to the default.
    ext.threshold_deg = None
    export(ext, tmp_path / "old.pt", {})
    assert pipeline.load_extractor(str(tmp_path / "old.pt"), cpu)[1] == DEFAULT_THRESHOLD_DEG

    with open(manifest.parent / "extractor.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(LikenessError, match="sha256") as e:
        pipeline.load_extractor(None, cpu, manifest)
    assert e.value.code == "weights_corrupt"
