import math

import numpy as np
import pytest
import torch

from worker.engine.face.alignment import (
    ARCFACE_112,
    FFHQ_FRAME_LANDMARKS,
    SPHEREFACE_112x96,
    Template,
    align_faces,
    detect_landmarks,
    estimate_similarity,
    fallback_landmarks,
)
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.iresnet import get_backbone
from worker.engine.face.mobilefacenet import MobileFaceNet


def similarity(scale: float, degrees: float, tx: float, ty: float) -> torch.Tensor:
    r = math.radians(degrees)
    c, s = scale * math.cos(r), scale * math.sin(r)
    return torch.tensor([[c, -s, tx], [s, c, ty]])


def apply(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return pts @ m[:, :2].T + m[:, 2]


def blob_image(h: int, w: int, centre: torch.Tensor, sigma: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    d2 = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2)).expand(3, h, w).clone()


def centroid(channel: torch.Tensor) -> torch.Tensor:
    h, w = channel.shape
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    total = channel.sum()
    return torch.stack([(xs * channel).sum() / total, (ys * channel).sum() / total])


TRANSFORMS = [
    (1.0, 0.0, 0.0, 0.0),
    (2.3, 17.0, 40.0, -12.0),
    (0.6, -35.0, 10.0, 25.0),
    (4.5, 8.0, 100.0, 60.0),
]


def test_estimate_similarity_recovers_known_transform() -> None:
    tpl = SPHEREFACE_112x96.tensor()
    crop_to_image = torch.stack([similarity(*t) for t in TRANSFORMS])
    landmarks = torch.stack([apply(m, tpl) for m in crop_to_image])
    noisy = landmarks + 0.01 * torch.randn(
        landmarks.shape, generator=torch.Generator().manual_seed(0)
    )

    image_to_crop = estimate_similarity(noisy, tpl)

    for m_est, lm in zip(image_to_crop, landmarks, strict=True):
        assert torch.allclose(apply(m_est, lm), tpl, atol=0.05)
    # The recovered scale is the reciprocal of the one applied.
    scales = torch.linalg.det(image_to_crop[:, :, :2]).sqrt()
    expected = torch.tensor([1 / t[0] for t in TRANSFORMS])
    assert torch.allclose(scales, expected, rtol=1e-3)


def test_estimate_similarity_never_reflects() -> None:
    tpl = ARCFACE_112.tensor()
    mirrored = tpl * torch.tensor([-1.0, 1.0])
    m = estimate_similarity(mirrored[None], tpl)
    assert torch.linalg.det(m[0, :, :2]) > 0


@pytest.mark.parametrize("template", [SPHEREFACE_112x96, ARCFACE_112], ids=lambda t: t.name)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: f"scale{t[0]}")
def test_warp_places_marked_point_on_template(template: Template, transform: tuple) -> None:
    tpl = template.tensor()
    m = similarity(*transform)
    landmarks = apply(m, tpl)
    nose = landmarks[2]
    # Non-square canvas that holds the whole transformed crop.
    h, w = int(130 * transform[0] + 90), int(120 * transform[0] + 110)
    image = blob_image(h, w, nose, sigma=3.0 * transform[0])[None]

    aligned = align_faces(image, template, landmarks[None])

    assert aligned.crops.shape == (1, 3, template.height, template.width)
    assert bool(aligned.detected[0])
    found = centroid(aligned.crops[0, 0])
    assert torch.allclose(found, tpl[2], atol=0.35), (found, tpl[2])


def test_batch_alignment_matches_single_images() -> None:
    tpl = ARCFACE_112.tensor()
    landmarks = torch.stack([apply(similarity(1.2, a, 30.0, 20.0), tpl) for a in (-10.0, 12.0)])
    images = torch.rand(2, 3, 190, 200, generator=torch.Generator().manual_seed(1))

    batch = align_faces(images, ARCFACE_112, landmarks).crops
    singles = torch.cat(
        [align_faces(images[i : i + 1], ARCFACE_112, landmarks[i : i + 1]).crops for i in range(2)]
    )

    assert torch.allclose(batch, singles, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize(
    "build",
    [
        lambda: FaceExtractor(MobileFaceNet(), SPHEREFACE_112x96, 0.5, 0.5),
        lambda: FaceExtractor(get_backbone("r18"), ARCFACE_112, 0.5, 0.5),
    ],
    ids=["mobilefacenet", "iresnet18"],
)
def test_gradient_reaches_input_through_alignment_and_backbone(build) -> None:
    model = build().eval()
    landmarks = apply(similarity(1.0, 5.0, 20.0, 10.0), model.template.tensor())[None].repeat(
        2, 1, 1
    )
    images = torch.rand(
        2, 3, 160, 150, generator=torch.Generator().manual_seed(2), requires_grad=True
    )

    emb = model.embed(images, landmarks)
    emb[:, 0].sum().backward()

    grad = images.grad
    assert grad is not None and torch.isfinite(grad).all()
    inside = grad[:, :, 20:120, 30:110].abs().sum((1, 2, 3))
    assert (inside > 0).all()
    # Pixels the warp never samples get no gradient.
    assert grad[:, :, 140:, :].abs().max() == 0


def test_fallback_landmarks_are_the_ffhq_frame() -> None:
    lm = fallback_landmarks(3, 256, 128)
    assert lm.shape == (3, 5, 2)
    frac = (lm[0] + 0.5) / torch.tensor([128.0, 256.0])
    assert torch.allclose(frac, torch.tensor(FFHQ_FRAME_LANDMARKS), atol=1e-6)
    # Eyes level and mirror-symmetric about the centre, mouth below nose below eyes.
    assert abs(FFHQ_FRAME_LANDMARKS[0][1] - FFHQ_FRAME_LANDMARKS[1][1]) < 0.01
    assert abs(FFHQ_FRAME_LANDMARKS[0][0] + FFHQ_FRAME_LANDMARKS[1][0] - 1.0) < 0.01
    assert FFHQ_FRAME_LANDMARKS[0][1] < FFHQ_FRAME_LANDMARKS[2][1] < FFHQ_FRAME_LANDMARKS[3][1]


@pytest.mark.parametrize("size", [8, 19, 32])
def test_tiny_images_fall_back_instead_of_failing(size: int) -> None:
    landmarks, detected, probs = detect_landmarks(torch.rand(2, 3, size, size))
    assert detected.tolist() == [False, False] and probs.tolist() == [0.0, 0.0]
    assert torch.allclose(landmarks, fallback_landmarks(2, size, size))
    crops = align_faces(torch.rand(2, 3, size, size), SPHEREFACE_112x96).crops
    assert crops.shape == (2, 3, 112, 96)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    return (
        torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1).float().div(255)
    )


def test_detection_finds_astronaut_face_and_falls_back_on_blank(astronaut: torch.Tensor) -> None:
    blank = torch.full_like(astronaut, 0.5)
    landmarks, detected, probs = detect_landmarks(torch.stack([astronaut, blank]))

    assert detected.tolist() == [True, False]
    assert probs[0] > 0.95 and probs[1] == 0
    le, re, nose, lm, rm = landmarks[0]
    # Eileen Collins' face sits around x 170-290, y 60-190 in the 512×512 image.
    for x, y in landmarks[0]:
        assert 170 < x < 290 and 60 < y < 190
    assert le[0] < re[0] and lm[0] < rm[0]
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
    assert 30 < torch.dist(le, re) < 70
    assert torch.allclose(landmarks[1], fallback_landmarks(1, 512, 512)[0])


def test_align_faces_detects_when_no_landmarks_given(astronaut: torch.Tensor) -> None:
    aligned = align_faces(astronaut[None], ARCFACE_112)
    assert aligned.detected.tolist() == [True]
    m = estimate_similarity(aligned.landmarks, ARCFACE_112.tensor())[0]
    # Real landmarks fit the template up to expression and pose (her wide smile
    # puts the mouth corners ~7 px out); a wrong detection would be far off.
    residual = (apply(m, aligned.landmarks[0]) - ARCFACE_112.tensor()).norm(dim=1)
    assert residual.max() < 10.0
    # The crop is a face, not background: skin tones in the centre.
    centre = aligned.crops[0, :, 50:80, 40:72].mean((1, 2))
    assert centre[0] > centre[2] and centre[0] > 0.4
