"""The FFHQ frame the generator draws, and the warp of tight face crops into it.

Evaluation (held-out UTKFace thumbnails) and training data (UTKFace chips mixed
into a generator's training set) must frame faces the same way, or a generator
trained on one framing is searched with thumbnails of another.
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
    # A blur about pad/2 wide, run at 1/f resolution (full-size boxes that wide are slow):
    # two box filters are close enough to a Gaussian for a background.
    f = max(1, pad // 16)
    blurred = F.avg_pool2d(padded, f, ceil_mode=True)
    k = blurred.shape[-1] // 6 * 2 + 1
    for _ in range(2):
        blurred = F.avg_pool2d(blurred, k, stride=1, padding=k // 2, count_include_pad=False)
    blurred = F.interpolate(blurred, size=(side, side), mode="bilinear", align_corners=False)
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
