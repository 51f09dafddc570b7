"""The head fit on frozen features, and one joint step over the three data sets."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from worker.engine.face.views import resample
from worker.training import lookalikes as looks
from worker.training.common import MetricMeans
from worker.training.extractor.config import ExtractorConfig, Item
from worker.training.extractor.data import Data, originals
from worker.training.extractor.measures import _predict
from worker.training.extractor.model import fresh_parameters
from worker.training.extractor.state import TrainState
from worker.training.images_zip import StepSampler


def head_losses(state: TrainState, features: tuple[Item, Item, Item]) -> dict[str, Tensor]:
    """The three losses from backbone features and their targets (identity, race, attributes)."""
    (fi, yi), (fr, yr), (fa, ya) = features
    ext = state.model.extractor
    return {
        "loss_arc": F.cross_entropy(state.model.arcface(fi, yi), yi),
        "loss_race": F.cross_entropy(ext.race_head(fr), yr),
        "loss_attr": F.binary_cross_entropy_with_logits(
            ext.attribute_head(fa), ya, pos_weight=state.pos_weight
        ),
    }


def losses(
    state: TrainState, batches: tuple[Item, Item, Item], siamese: Item | None = None
) -> dict[str, Tensor]:
    """The joint losses; with ``siamese`` (lookalikes, their photos) L_siamese too, weighted."""
    ext = state.model.extractor
    c = state.config
    (xi, yi), (xr, yr), (xa, ya) = batches
    if c.blur_fraction > 0 and state.model.training:
        xi, xr, xa = (blurred(x, c.blur_fraction, c.blur_sides) for x in (xi, xr, xa))
    parts = head_losses(
        state,
        ((ext.crop_features(xi), yi), (ext.crop_features(xr), yr), (ext.crop_features(xa), ya)),
    )
    if siamese is not None:
        if state.threshold_deg is None:
            raise ValueError("L_siamese needs θ_t: measure F before the Siamese steps")
        parts["loss_siamese"] = c.siamese_weight * looks.siamese_loss(
            ext, *siamese, state.threshold_deg, c.temperature_deg
        )
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


def train_step(
    state: TrainState, batches: tuple[Item, Item, Item], siamese: Item | None = None
) -> dict[str, float]:
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


def stream(
    config: ExtractorConfig,
    dataset: Dataset,
    start_step: int,
    seed: int,
    device: torch.device,
    batch: int | None = None,
) -> Iterator[Item]:
    """Endless batches (``config.batch`` unless given) from step ``start_step`` on."""
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    batch = min(batch or config.batch, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(
        dataset,
        batch_size=batch,
        drop_last=True,
        num_workers=workers,
        sampler=StepSampler(len(dataset), seed, start=start_step * batch),  # type: ignore[arg-type]
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def frozen_features(
    state: TrainState, data: Data, centres_only: bool = False
) -> tuple[Item, Item, Item]:
    """Backbone features (no gradient, on the CPU) and targets of every training face,
    mirror images left out: identity, race, attributes (``centres_only``: identity only,
    the others empty)."""
    ext = state.model.extractor
    ext.eval()
    sets = (originals(data.identity), originals(data.race), originals(data.attributes))
    features = [
        _predict(ext, ds, len(ds), state.device, lambda f: f)  # type: ignore[arg-type]
        for ds in sets[: 1 if centres_only else 3]
    ]
    none = (torch.zeros(0), torch.zeros(0))
    return features[0], (features + [none])[1], (features + [none, none])[2]


def _shuffled(n: int, batch: int, steps: int, g: torch.Generator) -> Tensor:
    """[steps, batch] indices into n items: shuffled passes, as many as the steps need."""
    passes = math.ceil(steps * batch / n)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
    return order[: steps * batch].view(steps, batch)


def fit_heads(
    state: TrainState, features: tuple[Item, Item, Item], centres_only: bool = False
) -> dict[str, Any]:
    """Fit the race and attribute heads and the ArcFace centres on frozen ``features`` for
    ``head_epochs`` epochs (an epoch: one pass over the largest set), with the joint
    phase's losses; the backbone is not touched. ``centres_only``: the ArcFace centres
    alone (F came with trained heads: an export has no centres). Returns the first and
    last epochs' mean losses."""
    config, device = state.config, state.device
    params = list(state.model.arcface.parameters()) if centres_only else None
    opt = torch.optim.Adam(params or fresh_parameters(state.model), lr=config.head_lr)
    g = torch.Generator().manual_seed(config.seed)
    sets = [(x.to(device), y.to(device)) for x, y in features]
    if centres_only:
        sets = sets[:1]
    steps = math.ceil(max(len(y) for _, y in sets) / config.batch)
    state.model.train()  # the heads' dropout; the backbone does not run here
    epochs: list[dict[str, float]] = []
    for _ in range(config.head_epochs):
        orders = [_shuffled(len(y), config.batch, steps, g) for _, y in sets]
        means = MetricMeans()
        for k in range(steps):
            batches = [(x[o[k]], y[o[k]]) for (x, y), o in zip(sets, orders, strict=True)]
            if centres_only:
                (x, y), arc = batches[0], state.model.arcface
                parts = {"loss_arc": F.cross_entropy(arc(x, y), y)}
            else:
                parts = head_losses(state, tuple(batches))  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            sum(parts.values()).backward()  # type: ignore[union-attr]
            opt.step()
            means.add({name: float(v.detach()) for name, v in parts.items()})
        epochs.append(means.pop())
    return {
        "epochs": config.head_epochs,
        "steps_per_epoch": steps,
        "faces": {
            name: len(y)
            for name, (_, y) in zip(("identity", "race", "attributes"), sets, strict=False)
        },
        "first_epoch": epochs[0] if epochs else {},
        "last_epoch": epochs[-1] if epochs else {},
    }
