"""Face detection (MTCNN, five landmarks) and differentiable template alignment.

This is the one alignment path used by training, search and evaluation:
`align_faces` detects (or takes) five landmarks per image, fits a similarity
transform onto a recognition template and warps with `grid_sample`, so a loss
on the crop sends gradients back into the input image. Detection itself is
never differentiated: landmarks are treated as constants.

Coordinates are pixels with the centre of pixel ``i`` at ``i`` (the OpenCV
convention the ArcFace and SphereFace templates were defined in), ``(x, y)``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from likeness.face_detect import MTCNN_OFFSET
from likeness.photo import FFHQ_FRAME_LANDMARKS
from likeness.photo import estimate_similarity as estimate_similarity_np


@dataclass(frozen=True)
class Template:
    """Where the five landmarks (left eye, right eye, nose, left/right mouth
    corner, in image order: "left" is the viewer's left) go in an output crop
    of ``height`` × ``width`` pixels."""

    name: str
    height: int
    width: int
    points: tuple[tuple[float, float], ...]

    def tensor(self, device: torch.device | str | None = None) -> Tensor:
        return torch.tensor(self.points, dtype=torch.float32, device=device)


ARCFACE_112 = Template(
    name="arcface_112x112",
    height=112,
    width=112,
    points=(
        (38.2946, 51.6963),
        (73.5318, 51.5014),
        (56.0252, 71.7366),
        (41.5493, 92.3655),
        (70.7299, 92.2041),
    ),
)

# SphereFace / MobileFaceNet: the ArcFace template shifted 8 px left, 96 wide.
SPHEREFACE_112x96 = Template(
    name="sphereface_112x96",
    height=112,
    width=96,
    points=(
        (30.2946, 51.6963),
        (65.5318, 51.5014),
        (48.0252, 71.7366),
        (33.5493, 92.3655),
        (62.7299, 92.2041),
    ),
)

# Fallback when MTCNN finds no face: the FFHQ frame's landmarks (likeness.photo, which
# photo mode aligns with too). MTCNN_OFFSET: facenet-pytorch's +1 px landmark offset.


class AlignedFaces(NamedTuple):
    crops: Tensor  # [B, 3, template.height, template.width], same range as the input
    detected: Tensor  # [B] bool: False where the FFHQ-frame fallback was used
    landmarks: Tensor  # [B, 5, 2] landmarks in input pixels that were used


# --- detection ---------------------------------------------------------------

_MTCNN_CACHE: dict[str, torch.nn.Module] = {}
_MTCNN_LOCK = threading.Lock()


def get_mtcnn(device: torch.device | str = "cpu") -> torch.nn.Module:
    """facenet-pytorch's MTCNN with its bundled weights, built once per device."""
    key = str(torch.device(device))
    with _MTCNN_LOCK:
        if key not in _MTCNN_CACHE:
            # Imported here: facenet-pytorch pulls in torchvision, which callers
            # that only align with known landmarks should not pay for.
            from facenet_pytorch import MTCNN

            mtcnn = MTCNN(keep_all=True, select_largest=True, device=torch.device(device))
            mtcnn.eval()
            for p in mtcnn.parameters():
                p.requires_grad_(False)
            _MTCNN_CACHE[key] = mtcnn
        return _MTCNN_CACHE[key]


def fallback_landmarks(
    batch: int, height: int, width: int, device: torch.device | str | None = None
) -> Tensor:
    """The FFHQ-frame landmarks scaled to an image of ``height`` × ``width``: [B, 5, 2]."""
    frac = torch.tensor(FFHQ_FRAME_LANDMARKS, dtype=torch.float32, device=device)
    scale = torch.tensor([width, height], dtype=torch.float32, device=device)
    return (frac * scale - 0.5).expand(batch, 5, 2).clone()


@torch.no_grad()
def detect_landmarks(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Detect the largest face in each image.

    images: [B, 3, H, W] RGB in [0, 1]. Returns ``(landmarks [B, 5, 2],
    detected [B] bool, probs [B])`` on the images' device; images without a
    face get the FFHQ-frame fallback landmarks, ``detected=False``, prob 0.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    b, _, h, w = images.shape
    device = images.device
    mtcnn = get_mtcnn(device)
    landmarks = fallback_landmarks(b, h, w, device="cpu")
    detected = torch.zeros(b, dtype=torch.bool)
    probs = torch.zeros(b, dtype=torch.float32)
    if min(h, w) < mtcnn.min_face_size:
        # Below MTCNN's smallest face its image pyramid is empty (and it raises).
        return landmarks.to(device), detected.to(device), probs.to(device)

    # MTCNN wants channel-last 0..255 floats; one call runs the whole batch.
    hwc = (images.detach().float().clamp(0, 1) * 255.0).permute(0, 2, 3, 1).contiguous()
    _, batch_probs, batch_points = mtcnn.detect(hwc, landmarks=True)
    for i in range(b):
        points = batch_points[i]
        if points is None:
            continue
        # numpy 2 hands back object arrays; boxes are sorted largest first.
        pts = np.asarray(points, dtype=float).reshape(-1, 5, 2)[0]
        landmarks[i] = torch.from_numpy(pts).float() - MTCNN_OFFSET
        detected[i] = True
        probs[i] = float(np.asarray(batch_probs[i], dtype=float).reshape(-1)[0])
    return landmarks.to(device), detected.to(device), probs.to(device)


# --- similarity transform ----------------------------------------------------


def estimate_similarity(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity transform (Umeyama 1991) taking ``src`` onto ``dst``.

    src: [B, N, 2], dst: [B, N, 2] or [N, 2]. Returns [B, 2, 3] float32
    matrices ``M`` on ``src``'s device with ``dst ≈ M[:, :, :2] @ src + M[:, :, 2]``
    (rotation, uniform scale and translation; no reflection).
    """
    # Tiny 2×2 problems: float64 on the CPU is exact enough and works for every
    # backend (MPS has no float64, CUDA pays a launch per op).
    src64 = src.detach().to("cpu", torch.float64).numpy()
    dst64 = dst.detach().to("cpu", torch.float64).expand_as(src.detach().cpu()).numpy()
    m = torch.from_numpy(estimate_similarity_np(src64, dst64))
    return m.to(src.device, torch.float32)


def invert_affine(m: Tensor) -> Tensor:
    """Inverse of batched 2×3 affine matrices."""
    m64 = m.detach().to("cpu", torch.float64)
    lin_inv = torch.linalg.inv(m64[:, :, :2])
    return torch.cat([lin_inv, -lin_inv @ m64[:, :, 2:]], dim=2).to(m.device, m.dtype)


def _pixel_to_normalized(size_h: int, size_w: int) -> Tensor:
    """3×3 map from pixel coordinates to grid_sample's [-1, 1] (align_corners=False)."""
    return torch.tensor(
        [
            [2.0 / size_w, 0.0, 1.0 / size_w - 1.0],
            [0.0, 2.0 / size_h, 1.0 / size_h - 1.0],
            [0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )


def warp_affine(images: Tensor, crop_to_image: Tensor, height: int, width: int) -> Tensor:
    """Sample an ``height`` × ``width`` crop per image; differentiable w.r.t. ``images``.

    crop_to_image: [B, 2, 3] maps output (crop) pixel coordinates to input
    pixel coordinates. Outside the image is zero, as in OpenCV's warpAffine.
    """
    b, c, h, w = images.shape
    m = crop_to_image.detach().to("cpu", torch.float64)
    m3 = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=m.dtype).expand(b, 1, 3)], dim=1)
    theta = _pixel_to_normalized(h, w) @ m3 @ torch.linalg.inv(_pixel_to_normalized(height, width))
    theta = theta[:, :2].to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, c, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces(
    images: Tensor,
    template: Template,
    landmarks: Tensor | None = None,
    detected: Tensor | None = None,
) -> AlignedFaces:
    """Warp each image's face onto ``template``.

    images: [B, 3, H, W] RGB in [0, 1] (any device, may require grad).
    landmarks: optional [B, 5, 2] in input pixels (e.g. detected once on a
    reference and reused); when omitted they are detected with MTCNN.
    detected: optional [B] flags to pass through with given landmarks
    (default all True). Large inputs are first box-filtered by an integer
    factor so that the bilinear warp does not alias.
    """
    if landmarks is None:
        landmarks, detected, _ = detect_landmarks(images)
    elif detected is None:
        detected = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    landmarks = landmarks.detach().to(device=images.device, dtype=torch.float32)

    image_to_crop = estimate_similarity(landmarks, template.tensor(images.device))
    # Input pixels per crop pixel; the smallest in the batch bounds a shared pre-filter.
    scale = torch.linalg.det(image_to_crop[:, :, :2]).abs().sqrt()
    factor = max(1, math.floor(float((1.0 / scale).min())))
    source, used = images, landmarks
    if factor > 1:
        source = F.avg_pool2d(images, factor, ceil_mode=True)
        used = (landmarks + 0.5) / factor - 0.5
        image_to_crop = estimate_similarity(used, template.tensor(images.device))

    crops = warp_affine(source, invert_affine(image_to_crop), template.height, template.width)
    return AlignedFaces(crops=crops, detected=detected.to(images.device), landmarks=landmarks)
