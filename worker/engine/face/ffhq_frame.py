"""The FFHQ frame the generator draws, and the warp of tight face crops into it.

Evaluation (held-out UTKFace thumbnails) and training data (UTKFace chips mixed
into a generator's training set) must frame faces the same way, or a generator
trained on one framing is searched with thumbnails of another. Most of such a
frame is invented background; ``ffhq_frame_mask`` says which part is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.face.alignment import Template, align_faces, fallback_landmarks


def ffhq_frame(size: int) -> Template:
    """The generator's framing as an alignment template of ``size`` × ``size`` pixels."""
    points = fallback_landmarks(1, size, size)[0].tolist()
    return Template(f"ffhq_frame_{size}", size, size, tuple((x, y) for x, y in points))


def background_blur(images: Tensor, f: int) -> Tensor:
    """A blur of (N, C, S, S) images about S/3 wide, run at 1/``f`` resolution (full-size
    boxes that wide are slow): two box filters are close enough to a Gaussian for a
    background."""
    side = images.shape[-1]
    blurred = F.avg_pool2d(images, f, ceil_mode=True)
    k = blurred.shape[-1] // 6 * 2 + 1
    for _ in range(2):
        blurred = F.avg_pool2d(blurred, k, stride=1, padding=k // 2, count_include_pad=False)
    return F.interpolate(blurred, size=(side, side), mode="bilinear", align_corners=False)


def soft_pad(images: Tensor, pad: int) -> Tensor:
    """Extend (N, 3, S, S) images by ``pad`` pixels a side with plain background.

    Edge pixels are repeated, then faded into a blur and, farther out, into the
    image's mean colour (FFHQ's own alignment pads this way): mirroring would put
    copies of the face into the margin, repeating alone would draw streaks.
    """
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    side = padded.shape[-1]
    i = torch.arange(side, dtype=images.dtype, device=images.device)
    # how far outside the original each row / column lies, as a fraction of pad
    out = ((pad - i).clamp_min(0) + (i - (side - 1 - pad)).clamp_min(0)) / pad
    far = torch.maximum(out.view(-1, 1), out.view(1, -1))
    blurred = background_blur(padded, max(1, pad // 16))
    mean = images.mean((2, 3), keepdim=True)
    padded = padded + (blurred - padded) * (3 * far).clamp(0, 1)
    return padded + (mean - padded) * far.clamp(0, 1)


def to_ffhq_frame(images: Tensor, landmarks: Tensor) -> Tensor:
    """Warp tight face crops into the FFHQ frame of the same size.

    UTKFace chips show the face about twice as large as the generator draws it,
    so their raw thumbnails are faces no latent downscales to (PULSE aligns its
    inputs to FFHQ for the same reason). The frame needs more background than a
    chip has: ``soft_pad`` invents a plain one.
    """
    size = images.shape[-1]
    return align_faces(soft_pad(images, size), ffhq_frame(size), landmarks + size).crops.clamp(0, 1)


def ffhq_frame_mask(images: Tensor, landmarks: Tensor) -> Tensor:
    """(N, 1, S, S): how much of each pixel of ``to_ffhq_frame(images, landmarks)`` came
    from the crop (1) rather than from ``soft_pad``'s invented background (0).

    A ones-image padded with zeros, warped by the same transform as the image.
    """
    n, _, size, _ = images.shape
    ones = F.pad(images.new_ones(n, 1, size, size), (size, size, size, size))
    return align_faces(ones, ffhq_frame(size), landmarks + size).crops.clamp(0, 1)


def fill_background(images: Tensor, mask: Tensor) -> Tensor:
    """A plain background made from (N, C, S, S) ``images`` where the (N, 1, S, S) ``mask``
    is 1, as ``soft_pad`` makes one around a crop: their colours spread by a wide blur,
    fading into their mean colour farther away.

    Differentiable, and a function of ``mask * images`` alone: what lies where the mask
    is 0 never reaches it.
    """
    known = images * mask
    f = max(1, images.shape[-1] // 48)
    weight = background_blur(mask, f)
    spread = background_blur(known, f) / weight.clamp_min(1e-6)  # a mean of known pixels
    mean = known.sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1e-6)
    # the blurred mask is about 1/2 at the known region's edge and falls to 0 far from it
    return mean + (spread - mean) * (2 * weight).clamp(0, 1)
