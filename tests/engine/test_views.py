"""Jittered views for the steering terms: plain first, seeded, batch-independent."""

from __future__ import annotations

import pytest
import torch
from skimage import data

from tests.tiny_models import random_extractor
from worker.engine.face.alignment import align_faces, fallback_landmarks
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.views import ViewSampler, move_landmarks, resample, view_crops
from worker.engine.objectives import ObjectiveWeights, build_targets, objective_loss


class TinyBackbone(torch.nn.Sequential):
    """A backbone that sees position and sharpness (a random MobileFaceNet barely
    moves with its input): 4×4 colour means through a linear map."""

    embedding_dim = 128

    def __init__(self) -> None:
        super().__init__(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 128)
        )


@pytest.fixture(scope="module")
def extractor() -> FaceExtractor:
    torch.manual_seed(0)
    return random_extractor(TinyBackbone())


def faces(n: int, size: int = 64) -> torch.Tensor:
    """Distinct real-photo crops (the astronaut, shifted per image), (n, 3, size, size)."""
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)
    crops = torch.stack([img[:, 20 + 9 * i : 220 + 9 * i, 150:350] for i in range(n)])
    return torch.nn.functional.interpolate(crops, size=(size, size), mode="area")


def test_the_first_view_is_plain_and_draws_are_seeded_and_vary() -> None:
    a, b = ViewSampler(4, 3, seed=1), ViewSampler(4, 3, seed=1)
    first, again = a.draw(), b.draw()
    assert torch.equal(first.geometry, again.geometry) and first.flip == again.flip
    assert torch.equal(first.geometry[0], torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3))
    assert first.flip[0] is False and first.sharpness[0] == 1.0
    assert not torch.equal(first.geometry[1:], a.draw().geometry[1:]), "each step draws anew"
    g = first.geometry[1:]
    assert (g[..., 0] - 1).abs().max() <= 0.06 and g[..., 2:].abs().max() <= 0.03
    assert all(0.5 <= s <= 1 for s in first.sharpness)


def test_moved_landmarks_follow_the_similarity() -> None:
    lm = fallback_landmarks(2, 64, 64)
    still = move_landmarks(lm, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2), 64, 64)
    assert torch.allclose(still, lm)
    shifted = move_landmarks(lm, torch.tensor([[1.0, 0.0, 0.1, -0.05]] * 2), 64, 64)
    assert torch.allclose(shifted - lm, torch.tensor([6.4, -3.2]).expand_as(lm), atol=1e-5)
    scaled = move_landmarks(lm, torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 2), 64, 64)
    centre = torch.tensor([31.5, 31.5])
    assert torch.allclose(scaled - centre, 2 * (lm - centre), atol=1e-5)


def test_resample_blurs_and_keeps_the_size() -> None:
    x = torch.rand(1, 3, 112, 96)
    assert resample(x, 1.0) is x
    y = resample(x, 0.5)
    assert y.shape == x.shape and y.std() < x.std()


def test_resample_through_a_smaller_size_keeps_less_and_stays_in_range() -> None:
    # what F's blur training and bench/steering.py use: a photo through 48 and 16 px
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(128, 96), mode="area")
    out = [resample(x, side / 128) for side in (128, 48, 16)]
    assert torch.equal(out[0], x), "at full size: untouched"
    assert all(float(y.min()) >= 0.0 and float(y.max()) <= 1.0 for y in out)
    # what is left is the small image's content
    small = torch.nn.functional.interpolate
    kept = small(out[2], size=(16, 12), mode="area") - small(x, size=(16, 12), mode="area")
    assert float(kept.abs().mean()) < 0.05  # bilinear up, area down again: a little blur
    errors = [float((y - x).abs().mean()) for y in out[1:]]
    assert 0 < errors[0] < errors[1]


def test_view_crops_put_the_plain_crop_first(extractor: FaceExtractor) -> None:
    images = faces(4)
    lm = fallback_landmarks(4, 64, 64)
    views = ViewSampler(3, 2, seed=0).draw()
    crops = view_crops(extractor, images, lm, views)
    assert crops.shape == (12, 3, 112, 96)
    assert torch.allclose(crops[:4], align_faces(images, extractor.template, lm).crops)
    assert not torch.allclose(crops[4:8], crops[:4])
    with pytest.raises(ValueError, match="restart"):
        view_crops(extractor, images[:3], lm[:3], views)


def test_viewed_terms_do_not_depend_on_the_batch(extractor: FaceExtractor) -> None:
    """A thumbnail's restarts see the same views alone or batched with others."""
    images = faces(4)  # 2 thumbnails x 2 restarts
    weights = ObjectiveWeights(views=3)
    targets = build_targets(
        extractor, ["Black", "Asian"], [{"Smiling": 1}, {}], [None, None], torch.device("cpu")
    )
    both = objective_loss(extractor, targets, weights, restarts=2)(images)
    alone = objective_loss(
        extractor,
        build_targets(extractor, ["Black"], [{"Smiling": 1}], [None], torch.device("cpu")),
        weights,
        restarts=2,
    )(images[:2])
    for name in ("race", "attributes"):
        assert torch.allclose(both.losses[name][:2], alone.losses[name], atol=1e-5)
    assert set(both.constraints) == {"race", "attributes"}
    plain = objective_loss(extractor, targets, ObjectiveWeights(views=1), restarts=2)(images)
    assert not torch.allclose(plain.losses["race"], both.losses["race"]), "views change it"


def test_viewed_terms_are_differentiable(extractor: FaceExtractor) -> None:
    images = faces(2).requires_grad_(True)
    targets = build_targets(extractor, ["White"], [{}], [None], torch.device("cpu"))
    terms = objective_loss(extractor, targets, ObjectiveWeights(views=4), restarts=2)(images)
    terms.losses["race"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
