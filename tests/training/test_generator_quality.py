"""Generator quality's measures: sharpness, grain, the bicubic baseline, the judge's embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from likeness.labels import UTKFACE_RACES
from worker.evaluation.measures import judge_features, judge_logits
from worker.training.generator_quality import SHARPNESS_SIZE, bicubic_upscale, grain, sharpness
from worker.training.judges import JudgeNet

SMALL = (8, 8, 16, 16)  # judge widths: quick, and the pooled features have 16 channels


def checkerboard(side: int, cell: int) -> torch.Tensor:
    """(1, 3, side, side) black-and-white squares of ``cell`` px."""
    idx = torch.arange(side) // cell
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2).float()
    return board.expand(1, 3, side, side).clone()


def test_a_flat_image_has_no_sharpness() -> None:
    flat = torch.full((2, 3, SHARPNESS_SIZE, SHARPNESS_SIZE), 0.4)
    assert sharpness(flat).shape == (2,)
    torch.testing.assert_close(sharpness(flat), torch.zeros(2), atol=1e-6, rtol=0)


def test_a_checkerboard_is_sharper_than_its_blurred_copy() -> None:
    # squares finer than the blur: a mean gradient magnitude is close to the total
    # variation, which a blur keeps at an isolated edge and loses where edges merge
    board = checkerboard(SHARPNESS_SIZE, 4)
    blurred = F.avg_pool2d(board, 5, stride=1, padding=2, count_include_pad=False)
    sharp, soft = sharpness(torch.cat([board, blurred]))
    assert float(sharp) > 2 * float(soft) > 0


def test_images_are_measured_at_128_px() -> None:
    # 2-px squares at 256 px average to exactly the 1-px squares at 128 px
    assert torch.allclose(sharpness(checkerboard(256, 2)), sharpness(checkerboard(128, 1)))
    # 1-px squares at 256 px average to flat grey: measured at 256 px they would be the sharpest
    assert float(sharpness(checkerboard(256, 1))) == pytest.approx(0, abs=1e-6)
    # smaller images are enlarged first: the same squares, seen at twice the size
    assert float(sharpness(checkerboard(64, 4))) == pytest.approx(
        float(sharpness(checkerboard(128, 8))), rel=0.2
    )


def test_smooth_shading_has_no_grain_and_speckle_has() -> None:
    # a ramp (the blur keeps linear shading exactly) and flat grey: no grain
    ramp = (
        torch.linspace(0.2, 0.8, SHARPNESS_SIZE).view(1, 1, 1, -1).expand(1, 3, SHARPNESS_SIZE, -1)
    )
    flat = torch.full_like(ramp, 0.5)
    torch.testing.assert_close(grain(torch.cat([ramp, flat])), torch.zeros(2), atol=1e-6, rtol=0)
    # speckle on the ramp: grain grows with its amplitude
    noise = torch.randn(
        1, 1, SHARPNESS_SIZE, SHARPNESS_SIZE, generator=torch.Generator().manual_seed(0)
    )
    weak, strong = grain(torch.cat([ramp + 0.02 * noise, ramp + 0.08 * noise]))
    assert float(strong) == pytest.approx(4 * float(weak), rel=1e-3) and float(weak) > 0.01


def test_grain_reads_only_the_middle_of_the_face() -> None:
    # speckle in the outer quarter (hair, background) is left out; in the middle it counts
    noise = torch.rand(
        1, 3, SHARPNESS_SIZE, SHARPNESS_SIZE, generator=torch.Generator().manual_seed(1)
    )
    q = SHARPNESS_SIZE // 4
    border, middle = noise.clone(), noise.clone()
    border[..., q - 2 : -q + 2, q - 2 : -q + 2] = 0.5
    middle[..., : q - 2, :] = middle[..., -q + 2 :, :] = 0.5
    middle[..., : q - 2] = middle[..., -q + 2 :] = 0.5
    assert float(grain(border)) == pytest.approx(0, abs=1e-6)
    torch.testing.assert_close(grain(middle), grain(noise))
    # measured on the 128-px grid, like sharpness: a 2× copy of the image reads the same
    torch.testing.assert_close(grain(F.interpolate(noise, scale_factor=2.0)), grain(noise))


def test_bicubic_upscale_is_in_range_at_the_asked_size() -> None:
    rng = np.random.default_rng(0)
    thumbnails = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    big = bicubic_upscale(thumbnails, 128)
    assert big.shape == (3, 3, 128, 128) and big.dtype == torch.float32
    assert 0 <= float(big.min()) <= float(big.max()) <= 1
    # no new mean: it only interpolates between the thumbnail's pixels
    assert float(big.mean()) == pytest.approx(float(thumbnails.mean()) / 255, abs=0.02)


def test_judge_features_are_the_pooled_input_of_its_head() -> None:
    torch.manual_seed(0)
    judge = JudgeNet(UTKFACE_RACES, SMALL).eval()
    images = torch.rand(3, 3, 128, 128)
    features = judge_features(judge, images)
    assert features.shape == (3, SMALL[-1])
    # the same crops as judge_logits: its logits are the head of these features
    torch.testing.assert_close(judge.head(features), judge_logits(judge, images))
