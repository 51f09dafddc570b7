"""Joint training of the face extractor F with its race and attribute heads
(PAPER.md §3, Eq. 10 without the Siamese stage): ``L = L_arc + L_race + L_attr``.

Each step draws one batch from each of the three data sets in turn (identity,
race, attributes) and sums their losses, so every loss moves F on every step.
Data order comes from ``StepSampler`` and dropout from the global RNG, whose
state the checkpoint keeps: a resumed run takes exactly the steps it would
have taken uninterrupted.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from likeness.errors import LikenessError
from worker.engine.face import mobilefacenet
from worker.engine.face.alignment import SPHEREFACE_112x96, Template
from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.heads import UTKFACE_RACES, AttributeHead, RaceHead
from worker.training.gan import (
    MetricMeans,
    StopSignal,
    _atomic_torch_save,
    rng_state,
    set_rng_state,
)
from worker.training.images_zip import StepSampler

CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_NAME = "extractor.pt"
LOG_NAME = "log.jsonl"
EXPORT_FORMAT = "likeness-face-extractor/1"
DEFAULT_WEIGHTS = Path("../shared/weights/mobilefacenet_casia_068.ckpt")
DATA_ROOT = Path("../shared/data")
Item = tuple[Tensor, Tensor]


class ExtractorConfig(BaseModel):
    """Everything a run needs; saved in every checkpoint."""

    out: str = "runs/extractor"
    weights: str | None = Field(str(DEFAULT_WEIGHTS), description="pretrained MobileFaceNet")
    data_root: str | None = Field(str(DATA_ROOT), description="None: synthetic data (smoke)")
    use_lfw: bool = False
    max_images: int | None = Field(None, description="cap per data set and split (quick runs)")
    steps: int = 20_000
    batch: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 5e-4
    arc_scale: float = 64.0
    arc_margin: float = 0.5
    easy_margin: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    max_minutes: float | None = None
    checkpoint_minutes: float = 10.0
    export_fp16: bool = False
    eval_limit: int = 2_000
    # synthetic sizes (smoke)
    synthetic_count: int = 64
    synthetic_classes: int = 8

    @classmethod
    def smoke(cls, **overrides: Any) -> ExtractorConfig:
        base: dict[str, Any] = dict(weights=None, data_root=None, steps=4, batch=8,
                                    eval_limit=32, checkpoint_minutes=1e9)
        return cls(**(base | overrides))


# Fields that may change when resuming; the rest must match the checkpoint.
RUN_FIELDS = ("out", "steps", "device", "workers", "max_minutes", "checkpoint_minutes",
              "export_fp16", "eval_limit")


# ---------------------------------------------------------------- losses


class ArcFace(nn.Module):
    """Additive angular margin (Deng et al. 2019) as in insightface's ArcFace.

    Returns the scaled logits ``s·cos(θ_j + m·[j = y])`` for cross-entropy.
    Past θ = π − m, cos(θ + m) would stop decreasing in θ, so insightface
    swaps in ``cos θ − m·sin m`` there (or, with ``easy_margin``, no margin
    at all for θ > π/2) to keep the target logit monotonic.
    """

    def __init__(self, in_dim: int, classes: int, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.scale, self.margin, self.easy_margin = scale, margin, easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight, dim=1))
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.th, phi, cos - self.mm)
        target = F.one_hot(labels, cos.shape[1]).bool()
        return torch.where(target, phi, cos) * self.scale


def attribute_pos_weight(targets: Tensor, max_weight: float = 100.0) -> Tensor:
    """Inverse class frequency for BCE: ``n_negative / n_positive`` per attribute.

    A rare attribute's positives then weigh as much in total as its negatives,
    which stops the head from predicting the majority label (paper: mAP 54% → 81%).
    """
    pos = targets.float().sum(0)
    neg = targets.shape[0] - pos
    return (neg / pos.clamp_min(1.0)).clamp(1.0 / max_weight, max_weight)


# ---------------------------------------------------------------- model and state


class ExtractorModel(nn.Module):
    def __init__(self, extractor: FaceExtractor, arcface: ArcFace) -> None:
        super().__init__()
        self.extractor, self.arcface = extractor, arcface


def build_model(config: ExtractorConfig, classes: int) -> ExtractorModel:
    if config.weights is not None:
        if not Path(config.weights).is_file():
            raise LikenessError("weights_not_found", f"no such checkpoint: {config.weights}",
                                status=404)
        backbone = mobilefacenet.load_mobilefacenet(config.weights)
    else:  # smoke runs: no pretrained weights needed
        backbone = mobilefacenet.MobileFaceNet()
    dim = int(backbone.embedding_dim)
    extractor = FaceExtractor(backbone, SPHEREFACE_112x96, mobilefacenet.MEAN,
                              mobilefacenet.STD, race_head=RaceHead(dim, UTKFACE_RACES),
                              attribute_head=AttributeHead(dim))
    arc = ArcFace(dim, classes, config.arc_scale, config.arc_margin, config.easy_margin)
    return ExtractorModel(extractor, arc)


def build_optimizer(config: ExtractorConfig, model: ExtractorModel) -> torch.optim.Optimizer:
    # The pretrained backbone moves slowly; the fresh heads and class centres fast.
    fresh = [*model.arcface.parameters(), *model.extractor.race_head.parameters(),
             *model.extractor.attribute_head.parameters()]
    groups = [{"params": list(model.extractor.backbone.parameters()), "lr": config.lr},
              {"params": fresh, "lr": config.head_lr}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)
    # Adam: no L2 decay, which its per-weight scaling would distort (weight_decay is for SGD).
    return torch.optim.Adam(groups, weight_decay=0.0)


@dataclass
class Data:
    identity: Dataset
    race: Dataset
    attributes: Dataset
    eval_identity: Dataset
    eval_race: Dataset
    eval_attributes: Dataset
    classes: int


def make_data(config: ExtractorConfig) -> Data:
    from worker.training import extractor_data as d

    t: Template = SPHEREFACE_112x96
    if config.data_root is None:
        n, k, s = config.synthetic_count, config.synthetic_classes, config.seed
        return Data(d.SyntheticFaces("identity", n, k, t, s), d.SyntheticFaces("race", n, 5, t, s),
                    d.SyntheticFaces("attributes", n, k, t, s),
                    d.SyntheticFaces("identity", n // 2, k, t, s + 1),
                    d.SyntheticFaces("race", n // 2, 5, t, s + 1),
                    d.SyntheticFaces("attributes", n // 2, k, t, s), classes=k)
    root, cache = Path(config.data_root), Path(config.out) / "cache"
    for name in ("celebahq", "utkface") + (("lfw",) if config.use_lfw else ()):
        if not (root / name / "images.zip").is_file():
            raise LikenessError("data_not_found", f"no {name}/images.zip under {root}", status=404)
    id_roots = [root / "celebahq"] + ([root / "lfw"] if config.use_lfw else [])
    cap, held = config.max_images, min(config.max_images or config.eval_limit, config.eval_limit)
    id_sets = d.identity_faces(id_roots, "train", t, cache, mirror=True, limit=cap)
    identity = torch.utils.data.ConcatDataset(id_sets)
    return Data(identity, d.race_faces(root / "utkface", "train", t, cache, True, cap),
                d.attribute_faces(root / "celebahq", "train", t, cache, True, cap),
                d.identity_faces([root / "celebahq"], "test", t, cache, limit=held)[0],
                d.race_faces(root / "utkface", "test", t, cache, limit=held),
                d.attribute_faces(root / "celebahq", "test", t, cache, limit=held),
                classes=d.num_classes(id_sets))


def dataset_targets(dataset: Dataset) -> Tensor:
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.cat([dataset_targets(s) for s in dataset.datasets])
    return dataset.targets  # type: ignore[attr-defined]


@dataclass
class TrainState:
    config: ExtractorConfig
    model: ExtractorModel
    opt: torch.optim.Optimizer
    pos_weight: Tensor
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0


def losses(state: TrainState, batches: tuple[Item, Item, Item]) -> dict[str, Tensor]:
    (xi, yi), (xr, yr), (xa, ya) = batches
    ext = state.model.extractor
    arc = F.cross_entropy(state.model.arcface(ext.crop_features(xi), yi), yi)
    race = F.cross_entropy(ext.race_head(ext.crop_features(xr)), yr)
    attr = F.binary_cross_entropy_with_logits(
        ext.attribute_head(ext.crop_features(xa)), ya, pos_weight=state.pos_weight)
    return {"loss_arc": arc, "loss_race": race, "loss_attr": attr}


def train_step(state: TrainState, batches: tuple[Item, Item, Item]) -> dict[str, float]:
    state.model.train()
    parts = losses(state, batches)
    total = sum(parts.values())
    state.opt.zero_grad(set_to_none=True)
    total.backward()  # type: ignore[union-attr]
    state.opt.step()
    state.step += 1
    return {k: float(v.detach()) for k, v in parts.items()} | {"loss": float(total.detach())}



def stream(config: ExtractorConfig, dataset: Dataset, start_step: int, seed: int,
           device: torch.device) -> Iterator[Item]:
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    batch = min(config.batch, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch, drop_last=True, num_workers=workers,
                        sampler=StepSampler(len(dataset), seed, start=start_step * batch),  # type: ignore[arg-type]
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: TrainState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({
        "model": state.model.state_dict(), "opt": state.opt.state_dict(),
        "pos_weight": state.pos_weight.cpu(), "step": state.step,
        "classes": state.model.arcface.weight.shape[0], "train_seconds": state.train_seconds,
        "rng": rng_state(), "train_config": state.config.model_dump(mode="json"),
    }, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LikenessError("checkpoint_not_found", f"no such checkpoint: {path}",
                            status=404) from None
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(ckpt, dict) or "train_config" not in ckpt or "pos_weight" not in ckpt:
        raise LikenessError("bad_checkpoint", f"{path} is not a train-extractor checkpoint")
    return ckpt


# ---------------------------------------------------------------- evaluation


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Non-interpolated AP (as sklearn's): mean precision at each positive's rank."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = labels[order].float()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def _predict(ext: FaceExtractor, dataset: Dataset, limit: int, device: torch.device,
             fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    n = min(limit, len(dataset))  # type: ignore[arg-type]
    # An evenly spaced subset: deterministic and not biased to the first names.
    idx = torch.linspace(0, len(dataset) - 1, n).long().unique().tolist()  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=64)
    outs, ys = [], []
    for x, y in loader:
        outs.append(fn(ext.crop_features(x.to(device))).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def same_diff_pairs(identities: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Index pairs [P, 2]: consecutive photos of each person (same) and as many
    random pairs of different people (diff)."""
    same = []
    for person in identities.unique():
        where = (identities == person).nonzero().flatten()
        same += [(int(a), int(b)) for a, b in zip(where[:-1], where[1:], strict=True)]
    g = torch.Generator().manual_seed(seed)
    diff: list[tuple[int, int]] = []
    n = len(identities)
    for _ in range(20 * max(len(same), 1)):
        if len(diff) >= len(same) or n < 2:
            break
        a, b = torch.randint(n, (2,), generator=g).tolist()
        if identities[a] != identities[b]:
            diff.append((a, b))
    return (torch.tensor(same, dtype=torch.long).view(-1, 2),
            torch.tensor(diff, dtype=torch.long).view(-1, 2))


@torch.no_grad()
def evaluate(ext: FaceExtractor, data: Data, limit: int, device: torch.device) -> dict[str, Any]:
    """Race top-1, attribute mAP and Same/Diff angles (degrees) on held-out people."""
    was_training = ext.training
    ext.eval()
    race_logits, race_y = _predict(ext, data.eval_race, limit, device, ext.race_head)
    attr_logits, attr_y = _predict(ext, data.eval_attributes, limit, device, ext.attribute_head)
    emb, ids = _predict(ext, data.eval_identity, limit, device, lambda f: f)
    aps = [average_precision(attr_logits[:, j], attr_y[:, j]) for j in range(attr_y.shape[1])]
    valid = [a for a in aps if not math.isnan(a)]
    same, diff = same_diff_pairs(ids)

    def stats(pairs: Tensor) -> dict[str, float]:
        if len(pairs) == 0:
            return {"mean": float("nan"), "sd": float("nan"), "pairs": 0}
        a = angle(emb[pairs[:, 0]], emb[pairs[:, 1]], degrees=True)
        return {"mean": float(a.mean()), "sd": float(a.std(unbiased=False)), "pairs": len(pairs)}

    ext.train(was_training)
    return {
        "race_top1": float((race_logits.argmax(1) == race_y).float().mean()),
        "attribute_map": float(np.mean(valid)) if valid else float("nan"),
        "attribute_ap": {n: ap for n, ap in zip(ext.attribute_head.labels, aps, strict=True)},
        "angle_same": stats(same), "angle_diff": stats(diff),
        "samples": {"race": len(race_y), "attributes": len(attr_y), "identity": len(ids)},
    }


# ---------------------------------------------------------------- export


def export(ext: FaceExtractor, path: Path, metrics: dict[str, Any], fp16: bool = False,
           extra: dict[str, Any] | None = None) -> None:
    """F + heads with everything a loader needs to use them unaided."""
    def cast(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.half() if fp16 and v.is_floating_point() else v.cpu() for k, v in sd.items()}

    race, attrs = ext.race_head.to_checkpoint(), ext.attribute_head.to_checkpoint()
    race["state_dict"], attrs["state_dict"] = cast(race["state_dict"]), cast(attrs["state_dict"])
    t = ext.template
    _atomic_torch_save({
        "format": EXPORT_FORMAT, "architecture": "mobilefacenet",
        "embedding_dim": ext.embedding_dim,
        "template": {"name": t.name, "height": t.height, "width": t.width,
                     "points": [list(p) for p in t.points]},
        "normalisation": {"mean": ext.mean, "std": ext.std, "range": "[0, 1] RGB"},
        "backbone": cast(ext.backbone.state_dict()), "race_head": race, "attribute_head": attrs,
        "dtype": "float16" if fp16 else "float32",
        "metrics": json.loads(json.dumps(metrics)), **(extra or {}),
    }, path)


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> FaceExtractor:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format") != EXPORT_FORMAT:
        raise LikenessError("bad_checkpoint", f"{path} is not a {EXPORT_FORMAT} export")

    def to32(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    backbone = mobilefacenet.MobileFaceNet(ckpt["embedding_dim"])
    backbone.load_state_dict(to32(ckpt["backbone"]), strict=True)
    heads = {}
    for key, cls in (("race_head", RaceHead), ("attribute_head", AttributeHead)):
        h = dict(ckpt[key])
        h["state_dict"] = to32(h["state_dict"])
        heads[key] = cls.from_checkpoint(h)
    t = ckpt["template"]
    template = Template(t["name"], t["height"], t["width"], tuple(tuple(p) for p in t["points"]))
    n = ckpt["normalisation"]
    return FaceExtractor(backbone.eval(), template, n["mean"], n["std"], **heads).eval()


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    reason: str  # "done", "max_minutes" or "signal"
    checkpoint: Path
    export: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("train-extractor"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def resume_config(saved: ExtractorConfig, overrides: dict[str, Any]) -> ExtractorConfig:
    return saved.model_copy(update={k: v for k, v in overrides.items() if k in RUN_FIELDS})


def train(config: ExtractorConfig, *, resume: Path | None = None, progress: bool = True,
          evaluate_at_end: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume) until ``steps``, ``max_minutes`` or SIGTERM/SIGINT; always
    leaves a checkpoint, an export and a log line behind."""
    from worker.pipeline import pick_device

    device = pick_device(config.device)
    ckpt = read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        config = resume_config(ExtractorConfig(**ckpt["train_config"]), config.model_dump())
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    data = make_data(config)
    model = build_model(config, data.classes).to(device)
    pos_weight = (ckpt["pos_weight"] if ckpt is not None
                  else attribute_pos_weight(dataset_targets(data.attributes)))
    state = TrainState(config, model, build_optimizer(config, model), pos_weight.to(device), device)
    if ckpt is not None:
        if int(ckpt["classes"]) != data.classes:
            raise LikenessError("bad_checkpoint", "the data's identity classes changed since "
                                f"the checkpoint ({ckpt['classes']} → {data.classes})")
        model.load_state_dict(ckpt["model"])
        state.opt.load_state_dict(ckpt["opt"])
        state.step, state.train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
        set_rng_state(ckpt["rng"])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # Separate seeds so the three streams do not walk in lock-step.
    streams = [stream(config, ds, state.step, config.seed * 3 + i, device)
               for i, ds in enumerate((data.identity, data.race, data.attributes))]

    started = last_save = time.monotonic()
    means, metrics, reason = MetricMeans(), {}, "done"

    def checkpoint(why: str, final: bool = False) -> dict[str, Any]:
        nonlocal last_save
        state.train_seconds += time.monotonic() - last_save
        save_checkpoint(state, out / CHECKPOINT_NAME)
        entry: dict[str, Any] = {"step": state.step, "reason": why,
                                 "train_seconds": round(state.train_seconds, 1), **means.pop()}
        if final:
            rng = rng_state()  # evaluation must not perturb a later resume's draws
            result = (evaluate(model.extractor, data, config.eval_limit, device)
                      if evaluate_at_end else {})
            set_rng_state(rng)
            export(model.extractor, out / EXPORT_NAME, result, config.export_fp16,
                   {"train": {"step": state.step, "train_seconds": state.train_seconds,
                              "data": config.data_root or "synthetic", "use_lfw": config.use_lfw,
                              "init": config.weights}})
            entry["metrics"] = {k: v for k, v in result.items() if k != "attribute_ap"}
        with open(out / LOG_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        last_save = time.monotonic()
        return entry

    with StopSignal() as stop, progress_bar(progress) as bar:
        task = bar.add_task("train", total=config.steps, completed=state.step, status="")
        while state.step < config.steps:
            metrics = train_step(state, (next(streams[0]), next(streams[1]), next(streams[2])))
            means.add(metrics)
            if on_step is not None:
                on_step(state.step, metrics)
            bar.update(task, completed=state.step,
                       status=f"arc {metrics['loss_arc']:.3f} race {metrics['loss_race']:.3f} "
                       f"attr {metrics['loss_attr']:.3f}")
            elapsed = time.monotonic() - started
            if stop.received is not None:
                reason = "signal"
                break
            if config.max_minutes is not None and elapsed >= config.max_minutes * 60:
                reason = "max_minutes"
                break
            if (state.step < config.steps
                    and time.monotonic() - last_save >= config.checkpoint_minutes * 60):
                checkpoint("periodic")
        entry = checkpoint(reason, final=True)
    for s in streams:
        s.close()  # type: ignore[attr-defined]
    return TrainResult(step=state.step, reason=reason, checkpoint=out / CHECKPOINT_NAME,
                       export=out / EXPORT_NAME, metrics=entry.get("metrics", {}), last=metrics)

