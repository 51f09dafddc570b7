"""F: alignment + backbone + normalisation + optional race/attribute heads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import iresnet, mobilefacenet
from .alignment import ARCFACE_112, AlignedFaces, SPHEREFACE_112x96, Template, align_faces
from .heads import AttributeHead, RaceHead


class FaceOutput(NamedTuple):
    embedding: Tensor  # [B, D] L2-normalised
    features: Tensor  # [B, D] raw backbone output, what the heads see
    detected: Tensor  # [B] bool
    race_logits: Tensor | None
    attribute_logits: Tensor | None


class FaceExtractor(nn.Module):
    """Maps [B, 3, H, W] RGB images in [0, 1] to face embeddings and head logits.

    ``mean``/``std`` are the backbone's input normalisation on [0, 1] crops.
    """

    def __init__(
        self,
        backbone: nn.Module,
        template: Template,
        mean: float,
        std: float,
        race_head: RaceHead | None = None,
        attribute_head: AttributeHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.template = template
        self.mean, self.std = mean, std
        self.race_head = race_head
        self.attribute_head = attribute_head

    @classmethod
    def mobilefacenet(cls, checkpoint: str | Path, **heads: nn.Module) -> FaceExtractor:
        backbone = mobilefacenet.load_mobilefacenet(checkpoint)
        return cls(backbone, SPHEREFACE_112x96, mobilefacenet.MEAN, mobilefacenet.STD, **heads)

    @classmethod
    def iresnet(cls, name: str = "r50", **heads: nn.Module) -> FaceExtractor:
        backbone = iresnet.get_backbone(name)
        return cls(backbone, ARCFACE_112, iresnet.MEAN, iresnet.STD, **heads)

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
        features = self.crop_features(aligned.crops)
        return FaceOutput(
            embedding=F.normalize(features, dim=1),
            features=features,
            detected=aligned.detected,
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
