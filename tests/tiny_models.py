"""Small random networks that tests build the way the product's code expects them."""

from __future__ import annotations

from torch import nn

from worker.engine.face.alignment import SPHEREFACE_112x96
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.heads import AttributeHead, RaceHead
from worker.engine.face.mobilefacenet import MobileFaceNet


def random_extractor(backbone: nn.Module | None = None) -> FaceExtractor:
    """F with UTKFace race and CelebA attribute heads over a 128-d embedding, random
    weights (seed the caller's), in eval mode; a random MobileFaceNet unless ``backbone``."""
    return FaceExtractor(
        backbone if backbone is not None else MobileFaceNet(),
        SPHEREFACE_112x96,
        0.5,
        0.5,
        race_head=RaceHead(in_dim=128),
        attribute_head=AttributeHead(in_dim=128),
    ).eval()
