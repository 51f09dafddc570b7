"""Put a trained face extractor into weights/: its export as float16, and a manifest
entry (the default extractor) saying what it is, how well it does and where it came from."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from likeness.errors import LikenessError
from likeness.manifest import WeightsEntry, default_manifest, json_safe, register, sha256_file
from worker.engine.face.export import export, load_export, read_export
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.iresnet import layers_of


def ship_extractor(
    export_path: Path,
    *,
    command: str,
    name: str = "extractor",
    manifest_path: Path | None = None,
    default: bool = True,
) -> WeightsEntry:
    """Write a train-extractor export as ``<name>.pt`` (float16) beside the manifest and
    register it, replacing an older file and entry of that name."""
    manifest_path = default_manifest(manifest_path)
    raw = read_export(export_path)
    if raw.get("threshold_deg") is None:
        raise LikenessError(
            "not_evaluated",
            f"{export_path} has no θ_t: it was written without "
            "the final evaluation, which shipping needs",
        )
    dest = manifest_path.parent / f"{name}.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    train = dict(raw.get("train", {}))
    export(load_export(export_path), dest, raw["metrics"], fp16=True, extra={"train": train})
    shipped = load_export(dest)  # what the worker will load: a bad file fails here, not there
    seconds = float(train.get("train_seconds", 0.0))
    entry = WeightsEntry(
        name=name,
        kind="extractor",
        file=dest.name,
        sha256=sha256_file(dest),
        default=default,
        config=extractor_config(shipped),
        metrics=json_safe(raw["metrics"]),
        provenance=json_safe(
            {
                "data": train.get("datasets"),
                "faces": train.get("faces"),
                "split": train.get("split"),
                "init": train.get("init"),
                "init_sha256": train.get("init_sha256"),
                "head_epochs": train.get("head_epochs"),
                "steps": train.get("step"),
                "minutes": round(seconds / 60, 1),
                "device": train.get("device"),
                "command": command,
                "source_sha256": sha256_file(export_path),
                "shipped_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "train_config": train.get("config"),
            }
        ),
    )
    register(entry, manifest_path)
    return entry


def extractor_config(ext: FaceExtractor) -> dict[str, Any]:
    """What the manifest says about F: the API reads the label names from it."""
    t = ext.template
    config: dict[str, Any] = {
        "architecture": ext.architecture,
        "embedding_dim": ext.embedding_dim,
        "input": {
            "height": t.height,
            "width": t.width,
            "template": t.name,
            "normalisation": {"mean": ext.mean, "std": ext.std, "range": "[0, 1] RGB"},
        },
        "threshold_deg": ext.threshold_deg,
        "race_labels": list(ext.race_head.labels) if ext.race_head is not None else [],
        "attribute_labels": (
            list(ext.attribute_head.labels) if ext.attribute_head is not None else []
        ),
        "dtype": "float16",
    }
    if ext.architecture == "iresnet":
        config["layers"] = list(layers_of(ext.backbone.state_dict()))
    return config
