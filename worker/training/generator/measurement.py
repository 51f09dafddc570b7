"""Learning from the measured pixels only (AmbientGAN, Bora et al. 2018).

A framed UTKFace chip is mostly invented background: only about 30% (16–47% over
80 chips) of the 128-px FFHQ frame came from the chip, the rest is ``soft_pad``'s blur.
A generator trained on such images as they are learns to draw faces in blurry
surroundings, and its D cannot object: blurry surroundings are real for every
framed chip. So every image comes with a mask (1 where it was photographed),
and

- the reconstruction terms count the measured pixels only, and
- D sees every image *measured*: a fake through the mask of the real of its
  batch index, a real through its own, each keeping its pixels where the mask
  is 1 and showing a plain background made from them (``fill_background``)
  where it is 0.

Reals are measured too, not shown with their stored margins: those were made by
``soft_pad`` in the chip's own geometry, which the trainer does not know, and
``fill_background`` only imitates them (they differ by 0.21 on average in
[-1, 1] over 40 framed chips; a flat mean colour differs by 0.25). D would tell
a fake from a real by that difference alone, and push G to bend the face to
change a background it cannot draw. One operator for both leaves D only the
measured pixels to judge.

With all-valid masks (CelebA-HQ photos, synthetic images, zips built before
masks were stored) both are exactly what they were without.
"""

from __future__ import annotations

from torch import Tensor

from worker.engine.face.ffhq_frame import fill_background


def measure(images: Tensor, mask: Tensor) -> Tensor:
    """(N, 3, S, S) images seen through (N, 1, S, S) masks: their pixels where the mask is
    1, a background made from those where it is 0. Identical to ``images`` for masks of
    ones; where a mask is 0, independent of the image's own pixels there."""
    filled = mask * images + (1 - mask) * fill_background(images, mask)
    return filled.to(images.dtype)


def measured_mean(error: Tensor, mask: Tensor) -> Tensor:
    """The mean of (N, C, H, W) ``error`` over the measured pixels of (N, 1, H, W) ``mask``,
    for an error that is already 0 where nothing was measured."""
    return error.sum() / (mask.sum() * error.shape[1]).clamp_min(1e-8)
