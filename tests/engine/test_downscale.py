from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from worker.engine.downscale import downscale, downscale_factor, resample_through, resize_matrix


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


def test_resample_through_blurs_each_image_to_its_own_side(astronaut: np.ndarray) -> None:
    x = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(128, 96), mode="area")
    batch = x.repeat(3, 1, 1, 1)
    out = resample_through(batch, [128, 48, 16])
    assert out.shape == batch.shape and torch.equal(out[0], x[0]), "at full size: untouched"
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # each image as if alone, and the smaller side keeps less of the original
    assert torch.allclose(out[2], resample_through(x, [16])[0], atol=1e-6)
    # what is left is the small image's content (bicubic up and down again blurs it a little)
    kept = (downscale(out[2:3], (16, 12)) - downscale(x, (16, 12))).abs().mean()
    assert float(kept) < 0.04
    errors = [float((out[i] - x[0]).abs().mean()) for i in (1, 2)]
    assert 0 < errors[0] < errors[1]
    with pytest.raises(ValueError, match="one side per image"):
        resample_through(batch, [16])
