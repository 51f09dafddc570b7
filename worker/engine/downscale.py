"""The one downscaling operator: antialiased bicubic (a = -0.5), as PIL does it.

Written as two small matrices (rows, then columns) built with PIL's own
support and normalisation rules, so ``D(x) = A_h @ x @ A_w^T`` is separable,
differentiable, batched, device-agnostic, and agrees with
``PIL.Image.resize(..., BICUBIC)`` up to PIL's 8-bit rounding.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

BICUBIC_A = -0.5
_SUPPORT = 2.0


def _cubic(x: float, a: float = BICUBIC_A) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def _resize_matrix_cpu(in_size: int, out_size: int) -> Tensor:
    """(out, in) weights of PIL's bicubic resampling along one axis (float64)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # widen the kernel when shrinking: the antialiasing
    support = _SUPPORT * filter_scale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [_cubic((x - center + 0.5) / filter_scale) for x in range(lo, hi)]
        total = sum(w)
        m[i, lo:hi] = torch.tensor(w, dtype=torch.float64) / total
    return m


@lru_cache(maxsize=64)
def resize_matrix(
    in_size: int,
    out_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The (out, in) matrix on ``device``, cached: the search downscales every step,
    and a fresh host-to-GPU copy each time would make the host wait for the GPU."""
    # A normal tensor even when first asked for under inference_mode: it is shared.
    with torch.inference_mode(False):
        return _resize_matrix_cpu(in_size, out_size).to(device=device, dtype=dtype)


def downscale(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bicubic-resize (B, C, H, W) images in [0, 1] to ``size`` (antialiased when shrinking).

    Columns first, then rows, clamping to [0, 1] after each pass: PIL stores
    the intermediate and the final image in 8 bits, and without those clamps
    the cubic's overshoot at sharp edges differs from PIL by up to ~10/255.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, _, h, w = images.shape
    a_h = resize_matrix(h, out_h, images.device, images.dtype)
    a_w = resize_matrix(w, out_w, images.device, images.dtype)
    return (a_h @ (images @ a_w.t()).clamp(0.0, 1.0)).clamp(0.0, 1.0)


def downscale_factor(resolution: int, thumb_size: int) -> int:
    """The integer factor between the generator's output and a thumbnail."""
    factor = resolution / thumb_size
    if factor != math.floor(factor) or factor < 2:
        raise ValueError(
            f"a {thumb_size}px thumbnail does not divide {resolution}px by an integer >= 2"
        )
    return int(factor)
