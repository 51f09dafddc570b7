"""Joint training of the face extractor F with its race and attribute heads
(PAPER.md §3, Eq. 10): ``L_F = L_arc + L_siamese + L_race + L_attr``.

Two phases. First the heads and the ArcFace class centres are fitted on frozen
backbone features, computed once: fresh random heads would otherwise send
large, meaningless gradients into the pretrained backbone at the start of
joint training. Then every step draws one batch from each of the three data
sets in turn (identity, race, attributes) and sums their losses, so every loss
moves F on every step; BatchNorm keeps its pretrained running statistics.
Data order comes from ``StepSampler`` and dropout from the global RNG, whose
state the checkpoint keeps: a resumed run takes exactly the steps it would
have taken uninterrupted. At the end F's verification angle θ_t is fitted on
training people and scored on held-out ones.

The Siamese term comes from an optional last stage (``meta_epochs``, the
paper's Algorithms 1–2, ``lookalikes.py``): each meta-epoch makes lookalikes
with the search steered by the current F and its θ_t, then trains
``siamese_steps`` joint steps with ``L_siamese`` added, then measures F and
re-fits θ_t. The checkpoint records the meta-epoch and the step within it.
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
from likeness.splits import DEFAULT_SALT
from worker.engine.checkpoints import LoadedGenerator, atomic_torch_save
from worker.engine.downscale import downscale_factor
from worker.engine.face.alignment import Template
from worker.engine.face.export import export
from worker.engine.face.extractor import ARCHITECTURES, FaceExtractor, angle
from worker.engine.face.heads import UTKFACE_RACES, AttributeHead, RaceHead
from worker.engine.face.verification import best_angle_threshold, threshold_accuracy
from worker.engine.face.views import resample
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG, ObjectiveWeights
from worker.engine.search import SearchConfig
from worker.training import lookalikes as looks
from worker.training.gan import (
    MetricMeans,
    StopSignal,
    rng_state,
    set_rng_state,
)
from worker.training.images_zip import StepSampler

CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_NAME = "extractor.pt"
LOG_NAME = "log.jsonl"
DEFAULT_WEIGHTS = Path("../shared/weights/mobilefacenet_casia_068.ckpt")
DATA_ROOT = Path("../shared/data")
Item = tuple[Tensor, Tensor]


class ExtractorConfig(BaseModel):
    """Everything a run needs; saved in every checkpoint."""

    out: str = "runs/extractor"
    architecture: Literal["mobilefacenet", "iresnet"] = "mobilefacenet"
    weights: str | None = Field(str(DEFAULT_WEIGHTS), description="pretrained backbone: a "
                                "MobileFaceNet .ckpt or an arcface_torch IResNet state_dict; "
                                "None: random init (smoke)")
    data_root: str | None = Field(str(DATA_ROOT), description="None: synthetic data (smoke)")
    use_lfw: bool = False
    max_images: int | None = Field(None, description="cap per data set and split (quick runs)")
    steps: int = Field(20_000, ge=0, description="joint steps; 0: fit the heads only")
    head_epochs: int = Field(30, ge=0, description="epochs of the head fit on frozen "
                             "features before joint training; 0: skip it")
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
    # The generator's faces are blurrier than photos, and an F that reads blur as another
    # person or race steers the search to sharpen, which it cannot, instead of to the person.
    blur_fraction: float = Field(0.0, ge=0, le=1, description="share of each joint-training "
                                 "batch seen through a lower resolution first")
    blur_sides: tuple[int, int] = Field((20, 64), description="the lower resolution: the "
                                        "crop's longer edge in pixels, drawn uniformly")
    # the lookalike stage (PAPER.md §3 item 2), after the joint steps; 0 meta-epochs: off
    meta_epochs: int = Field(0, ge=0, description="generate lookalikes → train → regenerate "
                             "cycles (paper: 5)")
    lookalike_pairs: int = Field(24, ge=1, description="people (two photos each, so two "
                                 "searches) per meta-epoch")
    siamese_steps: int = Field(50, ge=0, description="joint steps with L_siamese per meta-epoch")
    siamese_batch: int = Field(16, ge=1, description="lookalikes (each with its photo and the "
                               "photo's mirror image) per step")
    siamese_weight: float = Field(1.0, ge=0, description="weight of L_siamese in L_F")
    generator: str | None = Field(None, description="the search's generator: manifest name or "
                                  "file; None: the manifest's default")
    search_steps: int = Field(50, ge=1, description="steps per lookalike search (PULSE: 100)")
    search_restarts: int = Field(SearchConfig.model_fields["restarts"].default, ge=1,
                                 description="restarts per lookalike search")
    lookalike_thumbnail: int = Field(16, ge=2, description="thumbnail side the photos are "
                                     "downscaled to")
    lookalike_batch: int = Field(8, ge=1, description="thumbnails per search batch")
    temperature_deg: float = Field(ObjectiveWeights.model_fields["temperature_deg"].default, gt=0,
                                   description="τ of the similarity score, in the search's "
                                   "identity objective and in L_siamese")
    # synthetic sizes (smoke)
    synthetic_count: int = 64
    synthetic_classes: int = 8

    @classmethod
    def smoke(cls, **overrides: Any) -> ExtractorConfig:
        base: dict[str, Any] = dict(weights=None, data_root=None, steps=4, head_epochs=2,
                                    batch=8, eval_limit=32, checkpoint_minutes=1e9)
        return cls(**(base | overrides))


# Fields that may change when resuming; the rest must match the checkpoint.
RUN_FIELDS = ("out", "steps", "device", "workers", "max_minutes", "checkpoint_minutes",
              "export_fp16", "eval_limit", "meta_epochs", "lookalike_pairs", "siamese_steps",
              "siamese_batch", "siamese_weight", "generator", "search_steps", "search_restarts",
              "lookalike_thumbnail", "lookalike_batch", "temperature_deg")


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


def load_backbone(config: ExtractorConfig) -> nn.Module:
    """The pretrained backbone, loaded with ``strict=True``; a random one without weights."""
    arch = ARCHITECTURES[config.architecture]
    if config.weights is None:  # smoke runs: no pretrained weights needed
        return arch.new()
    if not Path(config.weights).is_file():
        raise LikenessError("weights_not_found", f"no such checkpoint: {config.weights}",
                            status=404)
    try:
        return arch.load(config.weights)
    except Exception as e:  # torch and strict loading raise many types for a wrong file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LikenessError("bad_checkpoint", f"{config.weights} is not a checkpoint of the "
                            f"{config.architecture} architecture ({first})") from None


def build_model(config: ExtractorConfig, classes: int) -> ExtractorModel:
    backbone = load_backbone(config)
    dim = int(backbone.embedding_dim)
    extractor = FaceExtractor.with_backbone(backbone, race_head=RaceHead(dim, UTKFACE_RACES),
                                            attribute_head=AttributeHead(dim))
    arc = ArcFace(dim, classes, config.arc_scale, config.arc_margin, config.easy_margin)
    return ExtractorModel(extractor, arc)


def fresh_parameters(model: ExtractorModel) -> list[nn.Parameter]:
    """The heads' and the class centres' parameters: what the pretrained weights lack."""
    return [*model.arcface.parameters(), *model.extractor.race_head.parameters(),
            *model.extractor.attribute_head.parameters()]


def build_optimizer(config: ExtractorConfig, model: ExtractorModel) -> torch.optim.Optimizer:
    # The pretrained backbone moves slowly; the fresh heads and class centres fast.
    groups = [{"params": list(model.extractor.backbone.parameters()), "lr": config.lr},
              {"params": fresh_parameters(model), "lr": config.head_lr}]
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
    threshold_identity: Dataset  # training people, no mirror images: θ_t is fitted on them
    photos: Dataset  # CelebA-HQ training people, no mirror images: the lookalike stage's photos
    classes: int


def make_data(config: ExtractorConfig) -> Data:
    from worker.training import extractor_data as d

    t: Template = ARCHITECTURES[config.architecture].template
    if config.data_root is None:
        n, k, s = config.synthetic_count, config.synthetic_classes, config.seed
        identity: Dataset = d.SyntheticFaces("identity", n, k, t, s)
        return Data(identity, d.SyntheticFaces("race", n, 5, t, s),
                    d.SyntheticFaces("attributes", n, k, t, s),
                    d.SyntheticFaces("identity", n // 2, k, t, s + 1),
                    d.SyntheticFaces("race", n // 2, 5, t, s + 1),
                    d.SyntheticFaces("attributes", n // 2, k, t, s), identity, identity,
                    classes=k)
    root, cache = Path(config.data_root), Path(config.out) / "cache"
    for name in ("celebahq", "utkface") + (("lfw",) if config.use_lfw else ()):
        if not (root / name / "images.zip").is_file():
            raise LikenessError("data_not_found", f"no {name}/images.zip under {root}", status=404)
    id_roots = [root / "celebahq"] + ([root / "lfw"] if config.use_lfw else [])
    cap, held = config.max_images, min(config.max_images or config.eval_limit, config.eval_limit)
    id_sets = d.identity_faces(id_roots, "train", t, cache, mirror=True, limit=cap)
    identity = torch.utils.data.ConcatDataset(id_sets)
    # ``subset`` keeps people in one fixed order, so these are people the capped training
    # set holds too; CelebA-HQ only, like the held-out pairs that score θ_t.
    threshold_identity = d.identity_faces([root / "celebahq"], "train", t, cache, limit=held)[0]
    photos = d.identity_faces([root / "celebahq"], "train", t, cache, limit=cap)[0]
    return Data(identity, d.race_faces(root / "utkface", "train", t, cache, True, cap),
                d.attribute_faces(root / "celebahq", "train", t, cache, True, cap),
                d.identity_faces([root / "celebahq"], "test", t, cache, limit=held)[0],
                d.race_faces(root / "utkface", "test", t, cache, limit=held),
                d.attribute_faces(root / "celebahq", "test", t, cache, limit=held),
                threshold_identity, photos, classes=d.num_classes(id_sets))


def dataset_targets(dataset: Dataset) -> Tensor:
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.cat([dataset_targets(s) for s in dataset.datasets])
    return dataset.targets  # type: ignore[attr-defined]


def originals(dataset: Dataset) -> Dataset:
    """A training set without its mirror images (``AlignedFaces`` lists them after the
    originals): the head fit needs each face's features once, not twice."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.utils.data.ConcatDataset([originals(s) for s in dataset.datasets])
    if getattr(dataset, "mirror", False):
        return torch.utils.data.Subset(dataset, range(len(dataset) // 2))  # type: ignore[arg-type]
    return dataset


@dataclass
class TrainState:
    config: ExtractorConfig
    model: ExtractorModel
    opt: torch.optim.Optimizer
    pos_weight: Tensor
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0
    heads_fitted: bool = False
    meta_epoch: int = 0  # lookalike meta-epochs completed
    meta_step: int = 0  # Siamese steps taken in the current meta-epoch
    threshold_deg: float | None = None  # θ_t of the last measurement: L_siamese's and the search's
    meta_history: list[dict[str, Any]] = field(default_factory=list)  # one entry per measurement


def new_state(config: ExtractorConfig, data: Data, device: torch.device) -> TrainState:
    """A run's start: the model (pretrained backbone, fresh heads), its optimizer and the
    attribute weights of its training set."""
    model = build_model(config, data.classes).to(device)
    pos_weight = attribute_pos_weight(dataset_targets(data.attributes)).to(device)
    return TrainState(config, model, build_optimizer(config, model), pos_weight, device,
                      heads_fitted=config.head_epochs == 0)


def head_losses(state: TrainState, features: tuple[Item, Item, Item]) -> dict[str, Tensor]:
    """The three losses from backbone features and their targets (identity, race, attributes)."""
    (fi, yi), (fr, yr), (fa, ya) = features
    ext = state.model.extractor
    return {
        "loss_arc": F.cross_entropy(state.model.arcface(fi, yi), yi),
        "loss_race": F.cross_entropy(ext.race_head(fr), yr),
        "loss_attr": F.binary_cross_entropy_with_logits(ext.attribute_head(fa), ya,
                                                        pos_weight=state.pos_weight),
    }


def losses(state: TrainState, batches: tuple[Item, Item, Item],
           siamese: Item | None = None) -> dict[str, Tensor]:
    """The joint losses; with ``siamese`` (lookalikes, their photos) L_siamese too, weighted."""
    ext = state.model.extractor
    c = state.config
    (xi, yi), (xr, yr), (xa, ya) = batches
    if c.blur_fraction > 0 and state.model.training:
        xi, xr, xa = (blurred(x, c.blur_fraction, c.blur_sides) for x in (xi, xr, xa))
    parts = head_losses(state, ((ext.crop_features(xi), yi), (ext.crop_features(xr), yr),
                                (ext.crop_features(xa), ya)))
    if siamese is not None:
        if state.threshold_deg is None:
            raise ValueError("L_siamese needs θ_t: measure F before the Siamese steps")
        parts["loss_siamese"] = c.siamese_weight * looks.siamese_loss(
            ext, *siamese, state.threshold_deg, c.temperature_deg)
    return parts


def blurred(crops: Tensor, fraction: float, sides: tuple[int, int]) -> Tensor:
    """Each crop, with probability ``fraction``, resampled through a random lower resolution
    (the global RNG draws, so a resumed run blurs as it would have)."""
    chosen = torch.rand(crops.shape[0]) < fraction
    if not chosen.any():
        return crops
    longer = max(crops.shape[-2:])
    side = torch.randint(sides[0], sides[1] + 1, (crops.shape[0],))
    out = crops.clone()
    for i in chosen.nonzero().flatten().tolist():
        out[i] = resample(crops[i : i + 1], int(side[i]) / longer)[0]
    return out


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers normalise with, and keep, their running statistics; their affine
    weights still train. Our batches are small and mixed from three data sets: their
    statistics would be noisy and would overwrite the pretrained ones."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_step(state: TrainState, batches: tuple[Item, Item, Item],
               siamese: Item | None = None) -> dict[str, float]:
    state.model.train()
    freeze_batchnorm(state.model)
    parts = losses(state, batches, siamese)
    total = sum(parts.values())
    state.opt.zero_grad(set_to_none=True)
    total.backward()  # type: ignore[union-attr]
    state.opt.step()
    state.step += 1
    if siamese is not None:
        state.meta_step += 1
    return {k: float(v.detach()) for k, v in parts.items()} | {"loss": float(total.detach())}


def stream(config: ExtractorConfig, dataset: Dataset, start_step: int, seed: int,
           device: torch.device, batch: int | None = None) -> Iterator[Item]:
    """Endless batches (``config.batch`` unless given) from step ``start_step`` on."""
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    batch = min(batch or config.batch, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch, drop_last=True, num_workers=workers,
                        sampler=StepSampler(len(dataset), seed, start=start_step * batch),  # type: ignore[arg-type]
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---------------------------------------------------------------- head fit


def frozen_features(state: TrainState, data: Data) -> tuple[Item, Item, Item]:
    """Backbone features (no gradient, on the CPU) and targets of every training face,
    mirror images left out: identity, race, attributes."""
    ext = state.model.extractor
    ext.eval()
    identity, race, attributes = (
        _predict(ext, ds, len(ds), state.device, lambda f: f)  # type: ignore[arg-type]
        for ds in (originals(data.identity), originals(data.race), originals(data.attributes)))
    return identity, race, attributes


def _shuffled(n: int, batch: int, steps: int, g: torch.Generator) -> Tensor:
    """[steps, batch] indices into n items: shuffled passes, as many as the steps need."""
    passes = math.ceil(steps * batch / n)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
    return order[: steps * batch].view(steps, batch)


def fit_heads(state: TrainState, features: tuple[Item, Item, Item]) -> dict[str, Any]:
    """Fit the race and attribute heads and the ArcFace centres on frozen ``features`` for
    ``head_epochs`` epochs (an epoch: one pass over the largest set), with the joint
    phase's losses; the backbone is not touched. Returns the first and last epochs'
    mean losses."""
    config, device = state.config, state.device
    opt = torch.optim.Adam(fresh_parameters(state.model), lr=config.head_lr)
    g = torch.Generator().manual_seed(config.seed)
    sets = [(x.to(device), y.to(device)) for x, y in features]
    steps = math.ceil(max(len(y) for _, y in sets) / config.batch)
    state.model.train()  # the heads' dropout; the backbone does not run here
    epochs: list[dict[str, float]] = []
    for _ in range(config.head_epochs):
        orders = [_shuffled(len(y), config.batch, steps, g) for _, y in sets]
        means = MetricMeans()
        for k in range(steps):
            parts = head_losses(state, tuple((x[o[k]], y[o[k]])  # type: ignore[arg-type]
                                             for (x, y), o in zip(sets, orders, strict=True)))
            opt.zero_grad(set_to_none=True)
            sum(parts.values()).backward()  # type: ignore[union-attr]
            opt.step()
            means.add({name: float(v.detach()) for name, v in parts.items()})
        epochs.append(means.pop())
    return {"epochs": config.head_epochs, "steps_per_epoch": steps,
            "faces": {name: len(y) for name, (_, y) in zip(
                ("identity", "race", "attributes"), sets, strict=True)},
            "first_epoch": epochs[0] if epochs else {}, "last_epoch": epochs[-1] if epochs else {}}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: TrainState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({
        "model": state.model.state_dict(), "opt": state.opt.state_dict(),
        "pos_weight": state.pos_weight.cpu(), "step": state.step,
        "heads_fitted": state.heads_fitted, "meta_epoch": state.meta_epoch,
        "meta_step": state.meta_step, "threshold_deg": state.threshold_deg,
        "meta_history": state.meta_history,
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


def pair_angles(embeddings: Tensor, identities: Tensor) -> tuple[Tensor, Tensor]:
    """Angles (degrees) of the same-person and the different-person pairs of ``same_diff_pairs``."""
    def angles(pairs: Tensor) -> Tensor:
        return angle(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], degrees=True)

    same, diff = same_diff_pairs(identities)
    return angles(same), angles(diff)


def verification(fit: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """θ_t fitted on training people's (same, diff) angles, with its accuracy there and
    on held-out people's; None where a side has no pairs."""
    if min(len(a) for a in fit) == 0:
        return {"threshold_deg": None, "threshold_fit_accuracy": None, "threshold_accuracy": None}
    theta, fit_accuracy = best_angle_threshold(*fit)
    held = threshold_accuracy(*held_out, theta) if sum(len(a) for a in held_out) else None
    return {"threshold_deg": theta, "threshold_fit_accuracy": fit_accuracy,
            "threshold_accuracy": held,
            "threshold_pairs": {"fit": sum(len(a) for a in fit),
                                "held_out": sum(len(a) for a in held_out)}}


@torch.no_grad()
def evaluate(ext: FaceExtractor, data: Data, limit: int, device: torch.device) -> dict[str, Any]:
    """Race top-1, attribute mAP, Same/Diff angles (degrees) on held-out people, and θ_t
    (fitted on training people) with its held-out accuracy."""
    was_training = ext.training
    ext.eval()
    race_logits, race_y = _predict(ext, data.eval_race, limit, device, ext.race_head)
    attr_logits, attr_y = _predict(ext, data.eval_attributes, limit, device, ext.attribute_head)
    emb, ids = _predict(ext, data.eval_identity, limit, device, lambda f: f)
    fit_emb, fit_ids = _predict(ext, data.threshold_identity, limit, device, lambda f: f)
    aps = [average_precision(attr_logits[:, j], attr_y[:, j]) for j in range(attr_y.shape[1])]
    valid = [a for a in aps if not math.isnan(a)]
    same, diff = pair_angles(emb, ids)

    def stats(a: Tensor) -> dict[str, float]:
        if len(a) == 0:
            return {"mean": float("nan"), "sd": float("nan"), "pairs": 0}
        return {"mean": float(a.mean()), "sd": float(a.std(unbiased=False)), "pairs": len(a)}

    ext.train(was_training)
    return {
        "race_top1": float((race_logits.argmax(1) == race_y).float().mean()),
        "attribute_map": float(np.mean(valid)) if valid else float("nan"),
        "attribute_ap": {n: ap for n, ap in zip(ext.attribute_head.labels, aps, strict=True)},
        "angle_same": stats(same), "angle_diff": stats(diff),
        **verification(pair_angles(fit_emb, fit_ids), (same, diff)),
        "samples": {"race": len(race_y), "attributes": len(attr_y), "identity": len(ids),
                    "threshold_fit": len(fit_ids)},
    }


def train_info(state: TrainState, data: Data) -> dict[str, Any]:
    """Where an export came from: kept in it, and the manifest's provenance when shipped."""
    c = state.config
    sets: dict[str, Any] = (
        {"identity": ["celebahq"] + (["lfw"] if c.use_lfw else []), "race": ["utkface"],
         "attributes": ["celebahq"]} if c.data_root is not None else {"synthetic": True})
    return {
        "step": state.step, "train_seconds": state.train_seconds, "device": str(state.device),
        "data": c.data_root or "synthetic", "use_lfw": c.use_lfw, "init": c.weights,
        "architecture": c.architecture, "head_epochs": c.head_epochs,
        "meta_epochs": state.meta_epoch, "datasets": sets,
        "faces": {"identity": len(originals(data.identity)),  # type: ignore[arg-type]
                  "race": len(originals(data.race)),  # type: ignore[arg-type]
                  "attributes": len(originals(data.attributes))},  # type: ignore[arg-type]
        "split": f"train split of likeness/splits.py (salt {DEFAULT_SALT}, by identity); "
                 "metrics on held-out test people",
        "config": c.model_dump(mode="json"),
    }


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    reason: str  # "done", "max_minutes" or "signal"
    checkpoint: Path
    export: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    meta_history: list[dict[str, Any]] = field(default_factory=list)  # the lookalike stage's


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def resume_config(saved: ExtractorConfig, overrides: dict[str, Any]) -> ExtractorConfig:
    return saved.model_copy(update={k: v for k, v in overrides.items() if k in RUN_FIELDS})


def restore(state: TrainState, ckpt: dict[str, Any], data: Data) -> None:
    """``state`` as the checkpoint left it, global RNG included."""
    if int(ckpt["classes"]) != data.classes:
        raise LikenessError("bad_checkpoint", "the data's identity classes changed since "
                            f"the checkpoint ({ckpt['classes']} → {data.classes})")
    state.model.load_state_dict(ckpt["model"])
    state.opt.load_state_dict(ckpt["opt"])
    state.pos_weight = ckpt["pos_weight"].to(state.device)
    state.step, state.train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
    # Checkpoints from before the head fit existed were already training jointly.
    state.heads_fitted = bool(ckpt.get("heads_fitted", True))
    state.meta_epoch = int(ckpt.get("meta_epoch", 0))
    state.meta_step = int(ckpt.get("meta_step", 0))
    state.threshold_deg = ckpt.get("threshold_deg")
    state.meta_history = list(ckpt.get("meta_history", []))
    set_rng_state(ckpt["rng"])


def stage_generator(state: TrainState) -> LoadedGenerator | None:
    """The generator the lookalike searches run in, None when no meta-epoch is left;
    loaded at the start, so a missing one fails before hours of training."""
    from worker.pipeline import load_search_model

    c = state.config
    if state.meta_epoch >= c.meta_epochs:
        return None
    try:
        # Building the generator draws its random init: keep the run's RNG out of it, so a
        # run with the stage trains as one without it up to the stage.
        with torch.random.fork_rng(devices=[]):
            model, _ = load_search_model(c.generator, state.device)
    except LikenessError as e:
        if e.code != "no_default_weights":
            raise
        raise LikenessError("no_default_weights", "the lookalike stage (meta-epochs) searches "
                            "a generator and none is bundled in weights/: pass --generator "
                            "PATH (a checkpoint with a mapping fit)") from None
    try:
        downscale_factor(model.generator.config.resolution, c.lookalike_thumbnail)
    except ValueError as e:
        raise LikenessError("bad_option", f"lookalike thumbnail: {e}") from None
    return model


class Session:
    """One call of ``train``: the phases in order, with the checkpoint, log line and
    export each leaves behind, the stop rules and the progress bar."""

    def __init__(self, state: TrainState, data: Data, generator: LoadedGenerator | None,
                 stop: StopSignal, bar: Any, evaluate_at_end: bool,
                 on_step: Callable[[int, dict[str, float]], None] | None) -> None:
        self.state, self.data, self.generator = state, data, generator
        self.stop, self.bar = stop, bar
        self.config, self.out = state.config, Path(state.config.out)
        self.evaluate_at_end, self.on_step = evaluate_at_end, on_step
        # Separate seeds so the three streams do not walk in lock-step.
        self.streams = [stream(self.config, ds, state.step, self.config.seed * 3 + i, state.device)
                        for i, ds in enumerate((data.identity, data.race, data.attributes))]
        self.started = self.last_save = time.monotonic()
        self.means = MetricMeans()
        self.last: dict[str, float] = {}
        self.measured: tuple[int, dict[str, Any]] | None = None  # (step, evaluate's result)
        self.task = bar.add_task("train-extractor", total=self.config.steps,
                                 completed=state.step, status="")

    def close(self) -> None:
        for s in self.streams:
            s.close()  # type: ignore[attr-defined]

    def stopping(self) -> str:
        if self.stop.received is not None:
            return "signal"
        if self.config.max_minutes is not None and \
                time.monotonic() - self.started >= self.config.max_minutes * 60:
            return "max_minutes"
        return "done"

    def checkpoint(self, why: str, final: bool = False,
                   info: dict[str, Any] | None = None) -> dict[str, Any]:
        state, model = self.state, self.state.model
        state.train_seconds += time.monotonic() - self.last_save
        save_checkpoint(state, self.out / CHECKPOINT_NAME)
        entry: dict[str, Any] = {"step": state.step, "reason": why,
                                 "train_seconds": round(state.train_seconds, 1),
                                 **self.means.pop(), **(info or {})}
        if final:
            result = self.evaluation() if self.evaluate_at_end else {}
            model.extractor.threshold_deg = result.get("threshold_deg")
            if state.meta_history:  # the lookalike stage: before, and after each meta-epoch
                result = result | {"siamese": state.meta_history}
            export(model.extractor, self.out / EXPORT_NAME, result, self.config.export_fp16,
                   {"train": train_info(state, self.data)})
            entry["metrics"] = {k: v for k, v in result.items()
                                if k not in ("attribute_ap", "siamese")}
        with open(self.out / LOG_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.last_save = time.monotonic()
        return entry

    def evaluation(self) -> dict[str, Any]:
        """``evaluate`` of F now (the last measurement's when F has not changed since),
        leaving the global RNG as it was, for a later resume's draws."""
        state = self.state
        if self.measured is not None and self.measured[0] == state.step:
            return self.measured[1]
        rng = rng_state()
        result = evaluate(state.model.extractor, self.data, self.config.eval_limit, state.device)
        set_rng_state(rng)
        self.measured = (state.step, result)
        return result

    def step(self, siamese: Item | None = None) -> str:
        """One joint step (with L_siamese given lookalikes); returns why to stop, or "done"."""
        state = self.state
        if time.monotonic() - self.last_save >= self.config.checkpoint_minutes * 60:
            self.checkpoint("periodic")
        batches = (next(self.streams[0]), next(self.streams[1]), next(self.streams[2]))
        self.last = metrics = train_step(state, batches, siamese)
        self.means.add(metrics)
        if self.on_step is not None:
            self.on_step(state.step, metrics)
        status = " ".join(f"{name} {metrics['loss_' + name]:.3f}"
                          for name in ("arc", "race", "attr", "siamese")
                          if "loss_" + name in metrics)
        self.bar.update(self.task, completed=state.step, status=status)
        return self.stopping()

    def run(self) -> tuple[str, dict[str, Any]]:
        """Head fit (once), joint steps, the lookalike stage; then the final checkpoint."""
        state, config = self.state, self.config
        if not state.heads_fitted:
            self.bar.update(self.task, status=f"head fit ({config.head_epochs} epochs on "
                            "frozen features)")
            fit = fit_heads(state, frozen_features(state, self.data))
            state.heads_fitted = True
            self.checkpoint("heads", info={"head_fit": fit})
        reason = self.stopping()  # the head fit may have used up the session
        # Once the stage has begun, its steps count toward ``step``: no plain steps follow.
        while reason == "done" and state.step < config.steps and not state.meta_history:
            reason = self.step()
        if reason == "done" and state.meta_epoch < config.meta_epochs:
            reason = self.lookalike_stage()
        return reason, self.checkpoint(reason, final=True)

    # ------------------------------------------------------------ the lookalike stage

    def lookalike_stage(self) -> str:
        """Meta-epochs of generate → train → measure until ``meta_epochs`` or a stop."""
        state, config = self.state, self.config
        left = (config.meta_epochs - state.meta_epoch) * config.siamese_steps - state.meta_step
        self.bar.update(self.task, total=state.step + max(left, 0))
        if not state.meta_history:  # F before the stage; its θ_t steers the first searches
            self.measure(None)
        reason = self.stopping()
        while reason == "done" and state.meta_epoch < config.meta_epochs:
            made = self.lookalikes()
            if not made.complete:
                return self.stopping()
            pairs = looks.training_pairs(made, self.data.photos)
            seed = 1_000_003 * (state.meta_epoch + 1) + config.seed
            lookalike_stream = stream(config, pairs, state.meta_step, seed, state.device,
                                      config.siamese_batch)
            while reason == "done" and state.meta_step < config.siamese_steps:
                reason = self.step(next(lookalike_stream))
            lookalike_stream.close()  # type: ignore[attr-defined]
            if reason != "done":  # a resume measures, if this meta-epoch's steps are all done
                break
            state.meta_epoch, state.meta_step = state.meta_epoch + 1, 0
            self.measure((made, pairs))
            reason = self.stopping()
        return reason

    def lookalikes(self) -> looks.Lookalikes:
        """This meta-epoch's lookalikes: read back, or searched for (partial on a stop)."""
        state, config = self.state, self.config
        assert self.generator is not None and state.threshold_deg is not None
        k = state.meta_epoch
        settings = looks.LookalikeSettings(
            search=self.generator.search_config(steps=config.search_steps,
                                                restarts=config.search_restarts),
            objective=ObjectiveWeights(threshold_deg=state.threshold_deg,
                                       temperature_deg=config.temperature_deg),
            thumbnail=config.lookalike_thumbnail, batch=config.lookalike_batch)
        pairs = looks.choose_pairs(dataset_targets(self.data.photos), config.lookalike_pairs,
                                   config.seed, k)
        key = {"meta_epoch": k, "step": state.step - state.meta_step, "seed": config.seed,
               "pairs": pairs.tolist(), "generator": self.generator.sha256,
               "search": settings.search.model_dump(mode="json"),
               "objective": settings.objective.model_dump(mode="json"),
               "thumbnail": config.lookalike_thumbnail}
        task = self.bar.add_task("lookalikes", total=2 * len(pairs), status="")

        def progress(done: int, s: Any) -> None:
            rows = min(config.lookalike_batch, 2 * len(pairs) - done)
            self.bar.update(task, completed=done + rows * s.step / s.steps,
                            status=f"meta-epoch {k + 1}/{config.meta_epochs}: search step "
                            f"{s.step}/{s.steps}")

        rng = rng_state()  # searched or read back, the training after it draws alike
        made = looks.generate_lookalikes(
            state.model.extractor, self.generator, self.data.photos, pairs, settings,
            looks.lookalike_path(self.out, k), key, config.seed, progress,
            lambda: self.stopping() != "done")
        set_rng_state(rng)
        self.bar.update(task, completed=made.done, visible=False)
        return made

    def measure(self, made: tuple[looks.Lookalikes, looks.LookalikePairs] | None) -> None:
        """After ``meta_epoch`` meta-epochs (0: before the stage): F's held-out metrics, the
        re-fitted θ_t, the angles of the lookalikes just trained on; logged and checkpointed."""
        state = self.state
        result = self.evaluation()
        theta = result.get("threshold_deg")
        # θ_t needs same/different pairs of training people; synthetic sets always have them.
        state.threshold_deg = float(theta) if theta is not None else DEFAULT_THRESHOLD_DEG
        entry: dict[str, Any] = {
            "meta_epoch": state.meta_epoch, "step": state.step,
            "metrics": {k: v for k, v in result.items() if k != "attribute_ap"}}
        if made is not None:
            entry["lookalikes"] = looks.measure(state.model.extractor, made[1], made[0],
                                                state.threshold_deg)
        state.meta_history.append(entry)
        self.checkpoint("meta_epoch", info=entry)


def train(config: ExtractorConfig, *, resume: Path | None = None, progress: bool = True,
          evaluate_at_end: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Fit the heads (once), train jointly, then run the lookalike stage (or resume any
    of them) until done, ``max_minutes`` or SIGTERM/SIGINT; always leaves a checkpoint,
    an export and a log line behind. A SIGTERM during the head fit or an evaluation takes
    effect when it ends, during the lookalike searches at the next search step."""
    from worker.pipeline import pick_device

    device = pick_device(config.device)
    ckpt = read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        config = resume_config(ExtractorConfig(**ckpt["train_config"]), config.model_dump())
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    data = make_data(config)
    state = new_state(config, data, device)
    if ckpt is not None:
        restore(state, ckpt, data)
    generator = stage_generator(state)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    with StopSignal() as stop, progress_bar(progress) as bar:
        session = Session(state, data, generator, stop, bar, evaluate_at_end, on_step)
        try:
            reason, entry = session.run()
        finally:
            session.close()
    out = Path(config.out)
    return TrainResult(step=state.step, reason=reason, checkpoint=out / CHECKPOINT_NAME,
                       export=out / EXPORT_NAME, metrics=entry.get("metrics", {}),
                       last=session.last, meta_history=state.meta_history)
