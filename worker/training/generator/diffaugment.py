"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to real
*and* generated images before D, so D cannot memorise a small data set while G
still gets gradients through the augmentation.

Every op draws its randomness from the global torch RNG (on the images'
device): a restored RNG state replays the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str) -> list[str]:
    """'color,translation,cutout' → its parts; '' or 'none' → no augmentation."""
    parts = [p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in parts if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    return parts


def _uniform(x: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """One draw per sample, shaped to broadcast over (C, H, W)."""
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (high - low) + low


def brightness(x: Tensor) -> Tensor:
    return x + _uniform(x, -0.5, 0.5)


def saturation(x: Tensor) -> Tensor:
    gray = x.mean(1, keepdim=True)
    return (x - gray) * _uniform(x, 0.0, 2.0) + gray


def contrast(x: Tensor) -> Tensor:
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ``ratio`` of its size, filling with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    # index into a zero-padded copy: differentiable, and one gather for the batch
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy + sy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx + sx).expand(b, h, w)
    padded = F.pad(x, (sx, sx, sy, sy))
    flat = rows * (w + 2 * sx) + cols  # (b, h, w) positions in the padded plane
    out = padded.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1))
    return out.view_as(x)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one square of ``ratio`` × size per image (it may overhang the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    top, left = cy - ch // 2, cx - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPS: dict[str, list[Callable[[Tensor], Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def diff_augment(x: Tensor, policy: str | list[str]) -> Tensor:
    """Apply the policy's ops in order; the identity when the policy is empty."""
    parts = parse_policy(policy) if isinstance(policy, str) else policy
    for part in parts:
        for op in OPS[part]:
            x = op(x)
    return x.contiguous()
