"""F as trained: the pretrained backbone, the race and attribute heads, and the optimiser."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from likeness.errors import LikenessError
from worker.engine.face.extractor import ARCHITECTURES, FaceExtractor
from worker.engine.face.heads import UTKFACE_RACES, AttributeHead, RaceHead
from worker.training.extractor.config import ExtractorConfig
from worker.training.extractor.losses import ArcFace


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
        raise LikenessError(
            "weights_not_found", f"no such checkpoint: {config.weights}", status=404
        )
    try:
        return arch.load(config.weights)
    except Exception as e:  # torch and strict loading raise many types for a wrong file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LikenessError(
            "bad_checkpoint",
            f"{config.weights} is not a checkpoint of the "
            f"{config.architecture} architecture ({first})",
        ) from None


def build_model(config: ExtractorConfig, classes: int) -> ExtractorModel:
    backbone = load_backbone(config)
    dim = int(backbone.embedding_dim)
    extractor = FaceExtractor.with_backbone(
        backbone, race_head=RaceHead(dim, UTKFACE_RACES), attribute_head=AttributeHead(dim)
    )
    arc = ArcFace(dim, classes, config.arc_scale, config.arc_margin, config.easy_margin)
    return ExtractorModel(extractor, arc)


def fresh_parameters(model: ExtractorModel) -> list[nn.Parameter]:
    """The heads' and the class centres' parameters: what the pretrained weights lack."""
    return [
        *model.arcface.parameters(),
        *model.extractor.race_head.parameters(),
        *model.extractor.attribute_head.parameters(),
    ]


def build_optimizer(config: ExtractorConfig, model: ExtractorModel) -> torch.optim.Optimizer:
    # The pretrained backbone moves slowly; the fresh heads and class centres fast.
    groups = [
        {"params": list(model.extractor.backbone.parameters()), "lr": config.lr},
        {"params": fresh_parameters(model), "lr": config.head_lr},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)
    # Adam: no L2 decay, which its per-weight scaling would distort (weight_decay is for SGD).
    return torch.optim.Adam(groups, weight_decay=0.0)
