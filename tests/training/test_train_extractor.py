"""Fast checks of train-extractor: losses, splits, smoke training, resume, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from likeness.errors import LikenessError
from likeness.splits import SPLITS, members, split_of
from worker.engine.face.export import export, load_export
from worker.engine.face.heads import CELEBA_ATTRIBUTES, UTKFACE_RACES
from worker.engine.face.iresnet import get_backbone
from worker.training.extractor.config import ExtractorConfig
from worker.training.extractor.data import make_data
from worker.training.extractor.loop import train
from worker.training.extractor.losses import ArcFace
from worker.training.extractor.losses import attribute_pos_weight as pos_weight_of
from worker.training.extractor.measures import average_precision
from worker.training.extractor.model import build_model
from worker.training.extractor.state import new_state
from worker.training.extractor.steps import (
    blurred,
    fit_heads,
    frozen_features,
    head_losses,
    stream,
    train_step,
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
    assert average_precision(
        torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 1, 1])
    ) == pytest.approx((1 / 2 + 2 / 3) / 2)


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
    assert members(bare, "train") == [
        f"{i}.webp" for i in range(50) if split_of(f"{i}.webp") == "train"
    ]


def _config(out: Path, steps: int, blur_fraction: float = 0.0) -> ExtractorConfig:
    return ExtractorConfig.smoke(
        out=str(out),
        steps=steps,
        batch=4,
        synthetic_count=16,
        synthetic_classes=4,
        eval_limit=8,
        device="cpu",
        blur_fraction=blur_fraction,
    )


@pytest.mark.parametrize("blur", [0.0, 0.5], ids=["sharp", "half-blurred"])
def test_smoke_training_resumes_exactly_after_the_head_fit_and_mid_run(
    tmp_path: Path, blur: float
) -> None:
    full: list[float] = []
    train(
        _config(tmp_path / "full", 3, blur),
        progress=False,
        evaluate_at_end=False,
        on_step=lambda s, m: full.append(m["loss"]),
    )
    heads = train(_config(tmp_path / "split", 0, blur), progress=False, evaluate_at_end=False)
    assert heads.step == 0 and torch.load(heads.checkpoint, weights_only=True)["heads_fitted"]
    resumed: list[float] = []
    for steps in (2, 3):  # the first resume starts right after the head fit
        again = train(
            _config(tmp_path / "split", steps, blur),
            resume=heads.checkpoint,
            progress=False,
            evaluate_at_end=False,
            on_step=lambda s, m: resumed.append(m["loss"]),
        )
        assert again.step == steps
    assert resumed == full
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in log].count("heads") == 1, "a resumed run does not refit"
    fit = next(e["head_fit"] for e in log if e["reason"] == "heads")
    assert fit["epochs"] == 2 and fit["faces"] == {"identity": 16, "race": 16, "attributes": 16}


def test_blurred_resamples_the_chosen_share_of_a_batch_and_nothing_else() -> None:
    crops = torch.rand(64, 3, 112, 96)
    assert blurred(crops, 0.0, (20, 64)) is crops
    torch.manual_seed(0)
    out = blurred(crops, 0.5, (20, 64))
    changed = (out - crops).abs().flatten(1).amax(1) > 0
    assert 16 < int(changed.sum()) < 48, "about half the batch"

    # the chosen ones lost their finest detail: neighbouring pixels differ less
    def roughness(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))

    assert bool((roughness(out[changed]) < 0.5 * roughness(crops[changed])).all())
    torch.manual_seed(0)
    assert torch.equal(blurred(crops, 0.5, (20, 64)), out), "the global RNG decides"
    assert bool(((blurred(crops, 1.0, (20, 64)) - crops).abs().flatten(1).amax(1) > 0).all())


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _as_if_pretrained(ext: nn.Module, crops: torch.Tensor) -> None:
    """Give a random backbone BatchNorm statistics of the data, as a pretrained one has:
    with the initial ones (mean 0, var 1) its features all but vanish (norm ~1e-4)."""
    for m in _batchnorms(ext):
        m.reset_running_stats()
        m.momentum = None  # a plain average over what it sees
    ext.train()
    with torch.no_grad():
        ext.crop_features(crops)  # type: ignore[operator]


def test_head_fit_lowers_the_head_losses_and_leaves_the_backbone(tmp_path: Path) -> None:
    config = _config(tmp_path, 0).model_copy(update={"head_epochs": 20})
    torch.manual_seed(0)
    data = make_data(config)
    state = new_state(config, data, torch.device("cpu"))
    _as_if_pretrained(state.model.extractor, torch.stack([data.race[i][0] for i in range(16)]))
    backbone = {k: v.clone() for k, v in state.model.extractor.backbone.state_dict().items()}
    features = frozen_features(state, data)

    def evaluated() -> dict[str, float]:
        state.model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in head_losses(state, features).items()}

    before = evaluated()
    fit = fit_heads(state, features)
    after = evaluated()
    for name in before:
        assert after[name] < 0.3 * before[name], (name, before, after)
        assert fit["last_epoch"][name] < fit["first_epoch"][name]
    for k, v in state.model.extractor.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k


def test_joint_step_keeps_batchnorm_statistics_and_trains_its_weights(tmp_path: Path) -> None:
    config = _config(tmp_path, 1)
    torch.manual_seed(0)
    data = make_data(config)
    state = new_state(config, data, torch.device("cpu"))
    device = torch.device("cpu")
    batches = tuple(
        next(stream(config, ds, 0, i, device))
        for i, ds in enumerate((data.identity, data.race, data.attributes))
    )
    bns = _batchnorms(state.model)
    stats = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns
    ]
    weights = [m.weight.detach().clone() for m in bns]
    train_step(state, batches)  # type: ignore[arg-type]
    for m, (mean, var, count) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)
    assert sum(not torch.equal(m.weight, w) for m, w in zip(bns, weights, strict=True)) > 0.9 * len(
        bns
    ), "the affine weights still train"
    assert state.model.extractor.race_head.training, "dropout in the heads stays on"


def test_export_round_trips_labels_metrics_and_threshold(tmp_path: Path) -> None:
    result = train(_config(tmp_path, 1), progress=False)
    assert {"race_top1", "attribute_map", "angle_same", "angle_diff"} <= set(result.metrics)
    m = result.metrics
    assert 0 < m["threshold_deg"] < 180 and 0.5 <= m["threshold_fit_accuracy"] <= 1
    assert 0 <= m["threshold_accuracy"] <= 1 and m["threshold_pairs"]["held_out"] > 0
    ext = load_export(result.export)
    assert ext.threshold_deg == m["threshold_deg"]
    assert ext.race_head.labels == UTKFACE_RACES
    assert ext.attribute_head.labels == CELEBA_ATTRIBUTES
    assert ext.template.name == "sphereface_112x96"
    saved = torch.load(result.export, weights_only=True)
    assert saved["metrics"]["race_top1"] == result.metrics["race_top1"]
    out = ext(
        torch.rand(2, 3, 128, 128),
        landmarks=torch.tensor([[[45.0, 60], [83, 60], [64, 80], [50, 95], [78, 95]]] * 2),
    )
    assert out.embedding.shape == (2, 128) and out.race_logits.shape == (2, 5)


def test_export_fp16_is_half_and_loads(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 1).model_copy(update={"export_fp16": True})
    result = train(cfg, progress=False, evaluate_at_end=False)
    saved = torch.load(result.export, weights_only=True)
    assert saved["dtype"] == "float16"
    assert next(iter(saved["backbone"].values())).dtype == torch.float16
    assert load_export(result.export).attribute_head.labels == CELEBA_ATTRIBUTES


def test_iresnet_init_from_arcface_torch_weights_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = get_backbone("r18")  # arcface_torch's layout (tests/face/test_backbones.py)
    with torch.no_grad():  # off the init values, so a tensor that failed to load would show
        for v in reference.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1)
    torch.save(reference.state_dict(), tmp_path / "backbone.pth")  # as arcface_torch saves it
    config = ExtractorConfig.smoke(architecture="iresnet", weights=str(tmp_path / "backbone.pth"))
    ext = build_model(config, classes=4).extractor.eval()
    assert ext.architecture == "iresnet" and ext.template.name == "arcface_112x112"
    assert (ext.mean, ext.std) == (0.5, 0.5)
    for k, v in reference.state_dict().items():
        assert torch.equal(ext.backbone.state_dict()[k], v), k
    ext.threshold_deg = 61.5
    crops = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        want = ext.embed_crops(crops)
        for fp16, tol in ((False, 0.0), (True, 2e-2)):
            export(ext, tmp_path / "f.pt", {}, fp16=fp16)
            loaded = load_export(tmp_path / "f.pt")
            assert loaded.architecture == "iresnet" and loaded.template == ext.template
            assert loaded.threshold_deg == 61.5 and (loaded.mean, loaded.std) == (0.5, 0.5)
            assert (loaded.embed_crops(crops) - want).abs().max() <= tol
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(LikenessError, match="not a checkpoint of the iresnet architecture") as e:
        build_model(config.model_copy(update={"weights": str(tmp_path / "bad.pth")}), 4)
    assert e.value.code == "bad_checkpoint"


def test_cli_refuses_iresnet_without_weights() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["train-extractor", "--architecture", "iresnet"])
    assert r.exit_code == 2 and "needs --weights" in r.output


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
