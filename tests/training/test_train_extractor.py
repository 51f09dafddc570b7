"""Fast checks of train-extractor: losses, splits, smoke training, resume, export."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from likeness.splits import SPLITS, members, split_of
from worker.engine.face.heads import CELEBA_ATTRIBUTES, UTKFACE_RACES
from worker.training.extractor import (
    ArcFace,
    ExtractorConfig,
    average_precision,
    load_export,
    train,
)
from worker.training.extractor import (
    attribute_pos_weight as pos_weight_of,
)


def test_arcface_margin_lowers_true_logit_and_has_finite_gradient() -> None:
    torch.manual_seed(0)
    arc = ArcFace(16, 5, scale=64.0, margin=0.5)
    x = torch.randn(8, 16, requires_grad=True)
    y = torch.arange(8) % 5
    logits = arc(x, y)
    plain = F.linear(F.normalize(x), F.normalize(arc.weight)) * 64.0
    true = logits.gather(1, y[:, None])
    assert (true < plain.gather(1, y[:, None])).all()
    others = torch.ones_like(logits, dtype=torch.bool).scatter(1, y[:, None], False)
    assert torch.allclose(logits[others], plain[others], atol=1e-4)
    F.cross_entropy(logits, y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(arc.weight.grad).all()


def test_arcface_gradient_finite_when_feature_equals_centre() -> None:
    arc = ArcFace(4, 2)
    x = arc.weight.detach()[:1].clone().requires_grad_(True)  # cos = 1 exactly
    F.cross_entropy(arc(x, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(x.grad).all()


def test_attribute_pos_weight_is_inverse_frequency() -> None:
    # attribute 0: 1 positive in 10 → 9; attribute 1: 5 in 10 → 1
    t = torch.zeros(10, 2)
    t[0, 0] = 1
    t[:5, 1] = 1
    assert torch.allclose(pos_weight_of(t), torch.tensor([9.0, 1.0]))


def test_average_precision() -> None:
    assert average_precision(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([1, 1, 0])) == 1.0
    assert average_precision(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 1, 1])) == \
        pytest.approx((1 / 2 + 2 / 3) / 2)


def test_splits_are_deterministic_and_disjoint_by_identity(tmp_path: Path) -> None:
    assert split_of("alice") == split_of("alice")
    counts = {s: 0 for s in SPLITS}
    for i in range(2000):
        counts[split_of(i)] += 1
    assert 1450 < counts["train"] < 1750 and counts["val"] > 120 and counts["test"] > 120
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "identity"])
        w.writerows([f"{i:05d}.webp", str(i % 97)] for i in range(600))
    ident = {f"{i:05d}.webp": str(i % 97) for i in range(600)}
    parts = {s: members(path, s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == 600
    people = {s: {ident[n] for n in parts[s]} for s in SPLITS}
    assert not people["train"] & people["val"] and not people["train"] & people["test"]
    assert not people["val"] & people["test"]
    assert parts == {s: members(path, s) for s in SPLITS}
    # No identity column (UTKFace): split by file name.
    bare = tmp_path / "bare.csv"
    bare.write_text("file,race\n" + "".join(f"{i}.webp,0\n" for i in range(50)))
    assert members(bare, "train") == [f"{i}.webp" for i in range(50)
                                      if split_of(f"{i}.webp") == "train"]


def _config(out: Path, steps: int) -> ExtractorConfig:
    return ExtractorConfig.smoke(out=str(out), steps=steps, batch=4, synthetic_count=16,
                                 synthetic_classes=4, eval_limit=8, device="cpu")


def test_smoke_training_resumes_exactly(tmp_path: Path) -> None:
    full: list[float] = []
    train(_config(tmp_path / "full", 3), progress=False, evaluate_at_end=False,
          on_step=lambda s, m: full.append(m["loss"]))
    first = train(_config(tmp_path / "split", 2), progress=False, evaluate_at_end=False)
    assert first.step == 2 and first.checkpoint.is_file()
    resumed: list[float] = []
    again = train(_config(tmp_path / "split", 3), resume=first.checkpoint, progress=False,
                  evaluate_at_end=False, on_step=lambda s, m: resumed.append(m["loss"]))
    assert again.step == 3
    assert resumed == full[2:]


def test_export_round_trips_labels_and_metrics(tmp_path: Path) -> None:
    result = train(_config(tmp_path, 1), progress=False)
    assert {"race_top1", "attribute_map", "angle_same", "angle_diff"} <= set(result.metrics)
    ext = load_export(result.export)
    assert ext.race_head.labels == UTKFACE_RACES
    assert ext.attribute_head.labels == CELEBA_ATTRIBUTES
    assert ext.template.name == "sphereface_112x96"
    saved = torch.load(result.export, weights_only=True)
    assert saved["metrics"]["race_top1"] == result.metrics["race_top1"]
    out = ext(torch.rand(2, 3, 128, 128), landmarks=torch.tensor(
        [[[45.0, 60], [83, 60], [64, 80], [50, 95], [78, 95]]] * 2))
    assert out.embedding.shape == (2, 128) and out.race_logits.shape == (2, 5)


def test_export_fp16_is_half_and_loads(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 1).model_copy(update={"export_fp16": True})
    result = train(cfg, progress=False, evaluate_at_end=False)
    saved = torch.load(result.export, weights_only=True)
    assert saved["dtype"] == "float16"
    assert next(iter(saved["backbone"].values())).dtype == torch.float16
    assert load_export(result.export).attribute_head.labels == CELEBA_ATTRIBUTES


SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.data
def test_real_splits_disjoint_and_landmarks_cached_once(tmp_path: Path) -> None:
    from likeness.splits import read_rows
    from worker.engine.face.alignment import SPHEREFACE_112x96
    from worker.training.extractor_data import AlignedFaces, cached_landmarks

    labels = SHARED_DATA / "celebahq" / "labels.csv"
    ident = {r["file"]: r["identity"] for r in read_rows(labels)}
    people = {s: {ident[n] for n in members(labels, s)} for s in SPLITS}
    assert not people["train"] & people["test"] and not people["val"] & people["test"]
    names = members(labels, "test")[:4]
    zip_path, cache = SHARED_DATA / "celebahq" / "images.zip", tmp_path / "lm.pt"
    lms, detected = cached_landmarks(zip_path, names, cache)
    assert detected.all() and cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again, _ = cached_landmarks(zip_path, names[:2], cache)  # served from the cache
    assert torch.equal(again, lms[:2]) and cache.stat().st_mtime_ns == stamp
    faces = AlignedFaces(zip_path, names, torch.zeros(4), lms, SPHEREFACE_112x96, mirror=True)
    crop, _ = faces[5]
    assert len(faces) == 8 and crop.shape == (3, 112, 96)
    assert torch.allclose(crop, faces[1][0].flip(-1))
