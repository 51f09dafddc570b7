from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from worker.engine.downscale import downscale, downscale_factor, resize_matrix


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.mark.parametrize("size", [16, 32, 64, 128, 100, 256])
def test_matches_pil_bicubic_on_a_natural_image(astronaut: np.ndarray, size: int) -> None:
    pil = np.asarray(Image.fromarray(astronaut).resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(astronaut).permute(2, 0, 1)[None].double() / 255
    ours = downscale(x, size)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours * 255 - pil).max() <= 2.0


def test_rows_sum_to_one_and_support_widens_with_the_factor() -> None:
    for factor in (2, 4, 8, 16):
        m = resize_matrix(16 * factor, 16, dtype=torch.float64)
        torch.testing.assert_close(m.sum(1), torch.ones(16, dtype=torch.float64))
        # antialiased: an interior output pixel reads 4 * factor input pixels
        assert int((m[8] != 0).sum()) == 4 * factor


def test_a_constant_image_stays_constant() -> None:
    x = torch.full((2, 3, 128, 128), 0.3)
    torch.testing.assert_close(downscale(x, 16), torch.full((2, 3, 16, 16), 0.3))


def test_differentiable() -> None:
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64) * 0.5 + 0.25  # away from the clamp
    assert torch.autograd.gradcheck(lambda t: downscale(t, 4), (x.requires_grad_(),))


def test_factor() -> None:
    assert downscale_factor(128, 16) == 8
    with pytest.raises(ValueError):
        downscale_factor(128, 48)
    with pytest.raises(ValueError):
        downscale_factor(128, 128)
