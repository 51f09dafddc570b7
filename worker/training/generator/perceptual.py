"""A perceptual loss in a frozen face network's feature space: train-generator's sharpener.

Pixel losses average over what the code cannot decide (the exact eyelid line,
a glint, a strand of hair), so an autoencoder trained on them alone decodes
the mean of those possibilities: a blur, and where bright and dark details
disagree (eyes behind glasses or not) a pale streak. Matching the activations
of a network trained to tell faces apart instead asks for the same *edges and
parts* as the photo, which pixel averages do not have (Johnson et al. 2016;
LPIPS, Zhang et al. 2018, without its learned channel weights).

The network is the MobileFaceNet the identity term already loads, so nothing
new is fetched; the crop is its 112×96 template, placed by the FFHQ frame's
fixed landmarks with the same differentiable warp as the identity term: it
covers eyes, nose and mouth, where the artifacts are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.mobilefacenet import MobileFaceNet

# Bottleneck blocks whose outputs are matched, besides the stem (56×48, 28×24,
# 14×12 and 7×6 maps): fine edges to parts.
TAPS = (4, 5, 11, 14)


def face_feature_maps(face: FaceExtractor, images: Tensor) -> list[Tensor]:
    """Activations of FFHQ-framed faces in [-1, 1] at the stem and at ``TAPS``."""
    backbone = face.backbone
    if not isinstance(backbone, MobileFaceNet):
        raise TypeError("the perceptual loss reads MobileFaceNet's layers")
    b, _, h, w = images.shape
    crops = face.align((images + 1) / 2, fallback_landmarks(b, h, w, images.device)).crops
    x = backbone.dw_conv1(backbone.conv1((crops - face.mean) / face.std))
    maps = [x]
    for i, block in enumerate(backbone.blocks):
        x = block(x)
        if i in TAPS:
            maps.append(x)
    return maps


def _unit(x: Tensor) -> Tensor:
    # LPIPS's channel normalisation: every position's feature vector to unit length,
    # so each layer weighs the same whatever its activation scale
    return F.normalize(x, dim=1)


def perceptual_distance(face: FaceExtractor, fake: Tensor, real: Tensor) -> Tensor:
    """Mean over layers of the squared distance between unit feature vectors: (B,)."""
    with torch.no_grad():
        targets = face_feature_maps(face, real)
    terms = [
        (_unit(f) - _unit(t)).pow(2).sum(1).mean((1, 2))
        for f, t in zip(face_feature_maps(face, fake), targets, strict=True)
    ]
    return torch.stack(terms).mean(0)
