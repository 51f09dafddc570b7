"""F: alignment + backbone + normalisation + optional race/attribute heads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import iresnet, mobilefacenet
from .alignment import ARCFACE_112, AlignedFaces, SPHEREFACE_112x96, Template, align_faces
from .heads import AttributeHead, RaceHead


@dataclass(frozen=True)
class Architecture:
    """What a backbone family needs besides its weights: the crop template and
    input normalisation it was trained with, and how to build it."""

    backbone: type[nn.Module]
    template: Template
    mean: float
    std: float
    load: Callable[[str | Path], nn.Module]  # a published checkpoint file
    from_state_dict: Callable[[dict[str, Tensor]], nn.Module]
    new: Callable[[], nn.Module]  # random initialisation (smoke runs, tests)


ARCHITECTURES: dict[str, Architecture] = {
    "mobilefacenet": Architecture(
        mobilefacenet.MobileFaceNet,
        SPHEREFACE_112x96,
        mobilefacenet.MEAN,
        mobilefacenet.STD,
        mobilefacenet.load_mobilefacenet,
        mobilefacenet.from_state_dict,
        mobilefacenet.MobileFaceNet,
    ),
    "iresnet": Architecture(
        iresnet.IResNet,
        ARCFACE_112,
        iresnet.MEAN,
        iresnet.STD,
        iresnet.load_iresnet,
        iresnet.from_state_dict,
        lambda: iresnet.get_backbone("r18"),
    ),
}


def architecture_of(backbone: nn.Module) -> str:
    """The ``ARCHITECTURES`` name of a backbone module."""
    for name, arch in ARCHITECTURES.items():
        if isinstance(backbone, arch.backbone):
            return name
    raise ValueError(f"{type(backbone).__name__} is none of {sorted(ARCHITECTURES)}")


class FaceOutput(NamedTuple):
    embedding: Tensor  # [B, D] L2-normalised
    features: Tensor  # [B, D] raw backbone output, what the heads see
    detected: Tensor  # [B] bool
    race_logits: Tensor | None
    attribute_logits: Tensor | None


class FaceExtractor(nn.Module):
    """Maps [B, 3, H, W] RGB images in [0, 1] to face embeddings and head logits.

    ``mean``/``std`` are the backbone's input normalisation on [0, 1] crops;
    ``threshold_deg`` is F's own verification angle θ_t, when it has been fitted.
    """

    def __init__(
        self,
        backbone: nn.Module,
        template: Template,
        mean: float,
        std: float,
        race_head: RaceHead | None = None,
        attribute_head: AttributeHead | None = None,
        threshold_deg: float | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.template = template
        self.mean, self.std = mean, std
        self.race_head = race_head
        self.attribute_head = attribute_head
        self.threshold_deg = threshold_deg

    @classmethod
    def with_backbone(
        cls,
        backbone: nn.Module,
        race_head: RaceHead | None = None,
        attribute_head: AttributeHead | None = None,
        threshold_deg: float | None = None,
    ) -> FaceExtractor:
        """F around ``backbone`` with its architecture's template and normalisation."""
        arch = ARCHITECTURES[architecture_of(backbone)]
        return cls(
            backbone, arch.template, arch.mean, arch.std, race_head, attribute_head, threshold_deg
        )

    @classmethod
    def mobilefacenet(
        cls,
        checkpoint: str | Path,
        race_head: RaceHead | None = None,
        attribute_head: AttributeHead | None = None,
    ) -> FaceExtractor:
        backbone = mobilefacenet.load_mobilefacenet(checkpoint)
        return cls.with_backbone(backbone, race_head, attribute_head)

    @classmethod
    def iresnet(
        cls,
        name: str = "r50",
        race_head: RaceHead | None = None,
        attribute_head: AttributeHead | None = None,
    ) -> FaceExtractor:
        return cls.with_backbone(iresnet.get_backbone(name), race_head, attribute_head)

    @property
    def architecture(self) -> str:
        return architecture_of(self.backbone)

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.embedding_dim)

    def align(self, images: Tensor, landmarks: Tensor | None = None) -> AlignedFaces:
        return align_faces(images, self.template, landmarks)

    def crop_features(self, crops: Tensor, flip: bool = False) -> Tensor:
        """Backbone features of already aligned [B, 3, h, w] crops in [0, 1].

        With ``flip`` the features of the mirrored crop are concatenated,
        doubling the dimension (test-time practice for verification).
        """
        x = (crops - self.mean) / self.std
        if not flip:
            return self.backbone(x)
        both = self.backbone(torch.cat([x, x.flip(-1)]))
        return torch.cat(both.chunk(2), dim=1)

    def embed_crops(self, crops: Tensor, flip: bool = False) -> Tensor:
        return F.normalize(self.crop_features(crops, flip), dim=1)

    def embed(self, images: Tensor, landmarks: Tensor | None = None, flip: bool = False) -> Tensor:
        """Align → backbone → L2-normalised embeddings [B, D] (or [B, 2D] with ``flip``)."""
        return self.embed_crops(self.align(images, landmarks).crops, flip)

    def forward(self, images: Tensor, landmarks: Tensor | None = None) -> FaceOutput:
        aligned = self.align(images, landmarks)
        return self.forward_crops(aligned.crops, aligned.detected)

    def forward_crops(self, crops: Tensor, detected: Tensor | None = None) -> FaceOutput:
        """Embeddings and head logits of already aligned [B, 3, h, w] crops in [0, 1]."""
        features = self.crop_features(crops)
        if detected is None:
            detected = torch.ones(crops.shape[0], dtype=torch.bool, device=crops.device)
        return FaceOutput(
            embedding=F.normalize(features, dim=1),
            features=features,
            detected=detected,
            race_logits=None if self.race_head is None else self.race_head(features),
            attribute_logits=None if self.attribute_head is None else self.attribute_head(features),
        )


def angle(a: Tensor, b: Tensor, degrees: bool = False) -> Tensor:
    """Angle between embeddings ``a`` and ``b`` ([..., D]) along the last dimension.

    The cosine is clamped just inside ±1 so the gradient of acos stays finite.
    """
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
    theta = torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return theta * (180.0 / math.pi) if degrees else theta
