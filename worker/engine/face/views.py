"""Jittered views of generated faces for the steering terms.

F is a CNN: a search that steers by its race or attribute head alone can
meet a target with pixel patterns that move F's logits in one exact crop and
mean nothing to any other observer (an adversarial example, not a face of
that race). Averaging each term over views that differ in position, scale,
rotation, mirroring and sharpness leaves the search only the changes that
survive all of them (an expectation over transformations).

The draws come from the sampler's own seeded generator and depend on the
restart index alone, never on the thumbnail: a thumbnail's search sees the
same views whatever else shares its batch, so batched jobs still give what
they would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .alignment import align_faces
from .extractor import FaceExtractor


@dataclass(frozen=True)
class Jitter:
    """How far a random view strays from the plain crop (uniform draws within ±)."""

    shift: float = 0.03  # of the image's size
    scale: float = 0.06  # relative
    rotation_deg: float = 5.0
    min_sharpness: float = 0.5  # the crop is resampled at this fraction of its size or more


@dataclass(frozen=True)
class Views:
    """One step's views: view 0 is the plain crop, views 1.. are jittered."""

    geometry: Tensor  # (V, K, 4): scale, rotation (rad), shift x, shift y (fraction of size)
    flip: tuple[bool, ...]  # (V,)
    sharpness: tuple[float, ...]  # (V,): 1 keeps the crop's resolution

    @property
    def count(self) -> int:
        return len(self.flip)


class ViewSampler:
    """Draws ``views`` views per call for ``restarts`` restarts from one seed."""

    def __init__(self, views: int, restarts: int, seed: int = 0, jitter: Jitter = Jitter()) -> None:
        if views < 1 or restarts < 1:
            raise ValueError("views and restarts must be at least 1")
        self.views, self.restarts, self.jitter = views, restarts, jitter
        self._rng = torch.Generator().manual_seed(seed)

    def draw(self) -> Views:
        v, k, j = self.views, self.restarts, self.jitter
        u = torch.rand(v, k, 4, generator=self._rng) * 2 - 1  # uniform in [-1, 1)
        geometry = torch.stack(
            [
                1 + j.scale * u[..., 0],
                math.radians(j.rotation_deg) * u[..., 1],
                j.shift * u[..., 2],
                j.shift * u[..., 3],
            ],
            -1,
        )
        geometry[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        flip = torch.rand(v, generator=self._rng) < 0.5
        sharp = j.min_sharpness + (1 - j.min_sharpness) * torch.rand(v, generator=self._rng)
        return Views(geometry, (False, *map(bool, flip[1:])), (1.0, *(float(s) for s in sharp[1:])))


def move_landmarks(landmarks: Tensor, geometry: Tensor, height: int, width: int) -> Tensor:
    """Landmarks (N, 5, 2) in pixels moved by a similarity per element (N, 4) about the
    image centre: aligning to the moved points shows the face moved the other way."""
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], device=landmarks.device)
    g = geometry.to(landmarks.device)
    s, a = g[:, 0, None], g[:, 1, None]
    cos, sin = s * torch.cos(a), s * torch.sin(a)
    x, y = (landmarks - centre).unbind(-1)
    moved = torch.stack([cos * x - sin * y, sin * x + cos * y], -1)
    shift = g[:, None, 2:] * torch.tensor([width, height], device=landmarks.device)
    return moved + centre + shift


def resample(crops: Tensor, sharpness: float) -> Tensor:
    """Down to ``sharpness`` of the size (area) and back up (bilinear): a blur."""
    if sharpness >= 1:
        return crops
    h, w = crops.shape[-2:]
    small = F.interpolate(
        crops, size=(max(1, round(h * sharpness)), max(1, round(w * sharpness))), mode="area"
    )
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def view_crops(extractor: FaceExtractor, images: Tensor, landmarks: Tensor, views: Views) -> Tensor:
    """F's crops of N = B·K images (element i·K + j is restart j) in every view:
    (V·N, 3, h, w), view-major."""
    n, _, h, w = images.shape
    k = views.geometry.shape[1]
    if n % k:
        raise ValueError(f"{n} images are not a whole number of {k}-restart blocks")
    out = []
    for v in range(views.count):
        moved = move_landmarks(landmarks, views.geometry[v].repeat(n // k, 1), h, w)
        crops = align_faces(images, extractor.template, moved).crops
        if views.flip[v]:
            crops = crops.flip(-1)
        out.append(resample(crops, views.sharpness[v]))
    return torch.cat(out)
