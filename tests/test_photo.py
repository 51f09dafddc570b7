"""Photo mode's geometry on photos built at test time: faces found anywhere, aligned into
the FFHQ frame, pasted back without seams and without touching the rest of the photo."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from skimage import data

from likeness.errors import LikenessError
from likeness.face_detect import MIN_FACE_SIZE, Detections, OnnxMTCNN
from likeness.photo import (
    FFHQ_FRAME_LANDMARKS,
    PhotoPlan,
    apply,
    compose,
    composite,
    crops_for,
    enlarge,
    estimate_similarity,
    frame_points,
    invert_affine,
    mtcnn_to_continuous,
    output_factor,
    paste_face,
    plan_photo,
    resolve_mode,
    scaling,
    thumbnail_size_for,
    warp,
)

RESOLUTION = 128


@dataclass
class Placed:
    centre: tuple[float, float]
    side: int
    angle: float  # degrees, PIL's rotate: counter-clockwise on screen


def collage(seed: int = 1) -> tuple[np.ndarray, list[Placed]]:
    """Six LFW faces (skimage's lfw_subset) at random scales and tilts on a photo."""
    rng = np.random.default_rng(seed)
    faces = data.lfw_subset()
    canvas = Image.fromarray(data.coffee()).resize((480, 360))
    placed = []
    for k, (x, y) in enumerate([(20, 20), (180, 30), (330, 20), (40, 200), (200, 190), (350, 200)]):
        side, angle = int(rng.integers(50, 110)), float(rng.uniform(-25, 25))
        face = Image.fromarray((faces[k * 7] * 255).astype(np.uint8)).convert("RGB")
        face = face.resize((side, side), Image.Resampling.BICUBIC).convert("RGBA")
        face = face.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        canvas.paste(face, (x, y), face)
        placed.append(Placed((x + face.size[0] / 2, y + face.size[1] / 2), side, angle))
    return np.asarray(canvas.convert("RGB")), placed


@pytest.fixture(scope="module")
def detector() -> OnnxMTCNN:
    return OnnxMTCNN.from_manifest()


@pytest.fixture(scope="module")
def photo(detector: OnnxMTCNN) -> tuple[np.ndarray, list[Placed], PhotoPlan]:
    """The collage with every face chosen by index: the geometry holds for large faces too."""
    pixels, placed = collage()
    h, w = pixels.shape[:2]
    found = detector.detect(pixels, max_side=2048)
    every = ",".join(str(i) for i in range(len(found)))
    plan = plan_photo(
        found, w, h, RESOLUTION, faces=every, max_faces=8, min_prob=0.7, detect_max_side=2048
    )
    return pixels, placed, plan


def group_photo() -> np.ndarray:
    """A group photo: five small LFW faces (frames of about 40-60 px, boxes just over the
    detector's 20 px) and one large face, on a photo."""
    faces = data.lfw_subset()
    canvas = Image.fromarray(data.coffee()).resize((480, 360))
    # (LFW face, top-left corner, side, tilt in degrees)
    spots = [
        (0, (20, 40), 30, 8),
        (20, (110, 30), 30, -10),
        (18, (200, 50), 34, 0),
        (27, (300, 40), 28, 12),
        (36, (390, 60), 32, -6),
        (45, (150, 160), 110, 5),
    ]
    for k, (x, y), side, angle in spots:
        face = Image.fromarray((faces[k] * 255).astype(np.uint8)).convert("RGB")
        face = face.resize((side, side), Image.Resampling.LANCZOS).convert("RGBA")
        face = face.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        canvas.paste(face, (x, y), face)
    return np.asarray(canvas.convert("RGB"))


@pytest.fixture(scope="module")
def group(detector: OnnxMTCNN) -> tuple[np.ndarray, Detections]:
    pixels = group_photo()
    return pixels, detector.detect(pixels, max_side=2048)


def angle_of(m: np.ndarray) -> float:
    return math.degrees(math.atan2(m[1, 0], m[0, 0]))


def test_similarity_fit_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (3, 5, 2))
    a = math.radians(30)
    true = np.array(
        [[2 * math.cos(a), -2 * math.sin(a), 5], [2 * math.sin(a), 2 * math.cos(a), -7]]
    )
    m = estimate_similarity(src, apply(true, src))
    assert np.allclose(m, true, atol=1e-9)
    assert np.allclose(compose(invert_affine(true), true), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_the_warp_samples_in_pixel_corner_coordinates() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    same = warp(pixels, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (30, 20))
    assert np.array_equal(same, pixels)
    shifted = warp(pixels, np.array([[1.0, 0, 3], [0, 1.0, 2]]), (30, 20))
    assert np.array_equal(shifted[:-2, :-3], pixels[2:, 3:])


def test_every_face_is_found_and_aligned_to_the_ffhq_frame(
    detector: OnnxMTCNN, photo: tuple[np.ndarray, list[Placed], PhotoPlan]
) -> None:
    pixels, placed, plan = photo
    assert len(plan.chosen) == len(placed) == 6
    for p in placed:
        centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in plan.chosen]
        k = int(np.argmin([math.dist(c, p.centre) for c in centres]))
        face = plan.chosen[k]
        assert math.dist(centres[k], p.centre) < p.side / 3
        # The tilt is undone: the photo → frame rotation is the placed tilt (PIL turns
        # counter-clockwise on screen, which is clockwise in y-down coordinates).
        assert abs(angle_of(face.to_unit) - p.angle) < 6, (face.index, p)
        assert face.thumbnail_size <= face.side  # never more pixels than the face has
    # In the aligned crops the detector finds the landmarks where the FFHQ frame has
    # them, within a few pixels at the generator's side.
    crops = [
        np.asarray(Image.fromarray(c).resize((RESOLUTION,) * 2, Image.Resampling.BICUBIC))
        for c in crops_for(pixels, plan.chosen)
    ]
    for crop, face in zip(crops, plan.chosen, strict=True):
        found = detector.detect(crop)
        assert len(found) >= 1, face.index
        points = mtcnn_to_continuous(found.landmarks[0])
        error = np.abs(points - frame_points(RESOLUTION)).max()
        assert error < 6.0, (face.index, error)


def test_the_frame_is_the_one_the_engine_aligns_to() -> None:
    # The FFHQ frame in pixel-centre coordinates, as the engine's fallback landmarks.
    frac = np.asarray(FFHQ_FRAME_LANDMARKS)
    assert np.allclose(frame_points(64) - 0.5, frac * 64 - 0.5)


def test_paste_back_is_seamless_and_leaves_pixels_outside_the_faces_untouched(
    photo: tuple[np.ndarray, list[Placed], PhotoPlan],
) -> None:
    pixels, _, plan = photo
    chosen = plan.chosen
    # Stand-ins for the upscaled faces: the crops enlarged, tinted so the colour match
    # has something to correct.
    upscaled = [
        np.clip(
            np.asarray(
                Image.fromarray(c).resize((RESOLUTION,) * 2, Image.Resampling.BICUBIC)
            ).astype(int)
            + [30, -20, 10],
            0,
            255,
        ).astype(np.uint8)
        for c in crops_for(pixels, chosen)
    ]
    factor = output_factor(chosen, RESOLUTION, *pixels.shape[1::-1], max_side=4096)
    smallest = min(f.side for f in chosen)
    assert factor >= 2 and (factor - 1) * smallest < 0.95 * RESOLUTION <= factor * smallest
    result = composite(pixels, chosen, upscaled, factor)
    base = enlarge(pixels, factor)
    assert (
        result.pixels.shape == base.shape == (pixels.shape[0] * factor, pixels.shape[1] * factor, 3)
    )

    covered = np.zeros(base.shape[:2], bool)
    for p in result.pasted:
        x0, y0, x1, y1 = p.box
        covered[y0:y1, x0:x1] |= p.mask > 0
    changed = np.abs(result.pixels.astype(int) - base).max(2) > 0
    assert changed.any() and not (changed & ~covered).any()  # outside the masks: untouched
    assert covered.mean() < 0.5

    # At the mask's edge the composite steps no more than the photo itself does there;
    # a hard-edged paste of the same faces steps far more.
    for p, face, up in zip(result.pasted, chosen, upscaled, strict=True):
        x0, y0, x1, y1 = p.box
        edge = (p.mask > 0.0) & (p.mask < 0.5)
        soft = np.abs(np.diff(result.pixels[y0:y1, x0:x1].astype(float), axis=1)).max(2)
        photo_step = np.abs(np.diff(base[y0:y1, x0:x1].astype(float), axis=1)).max(2)
        ring = edge[:, 1:]
        hard = base.copy()
        hard_box = paste_face(hard, up, face.to_unit, factor, match_colours=False, feather=False)
        hx0, hy0, hx1, hy1 = hard_box.box
        hard_step = np.abs(np.diff(hard[hy0:hy1, hx0:hx1].astype(float), axis=1)).max(2)
        hard_edge = hard_box.mask[:, 1:] != hard_box.mask[:, :-1]
        assert soft[ring].mean() <= photo_step[ring].mean() + 2.0, face.index
        assert hard_step[hard_edge].mean() > soft[ring].mean() + 15.0, face.index


def test_a_photo_without_faces_is_refused_with_its_size_and_the_smallest_face(
    detector: OnnxMTCNN,
) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(LikenessError) as e:
        plan_photo(
            detector.detect(noise, max_side=2048),
            400,
            300,
            RESOLUTION,
            max_faces=8,
            min_prob=0.9,
            detect_max_side=2048,
        )
    assert e.value.code == "no_face" and e.value.status == 422
    assert "400x300" in e.value.message and f"{MIN_FACE_SIZE} pixels" in e.value.message
    # A photo shrunk for detection loses its smallest faces: the message says so.
    with pytest.raises(LikenessError) as e:
        plan_photo(
            detector.detect(noise, max_side=200),
            400,
            300,
            RESOLUTION,
            max_faces=8,
            min_prob=0.9,
            detect_max_side=200,
        )
    assert "at least 40 pixels" in e.value.message


def test_faces_are_chosen_and_limited(group: tuple[np.ndarray, Detections]) -> None:
    pixels, found = group
    h, w = pixels.shape[:2]

    def chosen(spec: str, max_faces: int = 8) -> list[int]:
        p = plan_photo(
            found, w, h, RESOLUTION, faces=spec, max_faces=max_faces, min_prob=0.9,
            detect_max_side=2048,
        )  # fmt: skip
        return [f.index for f in p.chosen]

    assert chosen("all") == [1, 2, 3, 4, 5]  # face 0 is large (see below)
    assert chosen("largest") == [1]
    assert chosen("4, 1") == [1, 4]
    with pytest.raises(LikenessError) as e:
        chosen("all", max_faces=3)
    assert e.value.code == "too_many_faces" and "at most 3" in e.value.message
    assert chosen("0,2", max_faces=2) == [0, 2]
    for bad in ("7", "one", "-1"):
        with pytest.raises(LikenessError) as e:
            chosen(bad)
        assert e.value.code == "invalid_faces"


def _detections(plan: PhotoPlan, keep: list[int] | None = None) -> Detections:
    """The plan's detections again (only the faces ``keep`` when given)."""
    faces = [f for f in plan.faces if keep is None or f.index in keep]
    return Detections(
        np.array([f.box for f in faces]),
        np.array([f.prob for f in faces]),
        np.array([f.landmarks + 1.0 - 0.5 for f in faces]),
    )


def test_faces_the_generator_cannot_enlarge_are_left_alone_unless_chosen_by_index(
    group: tuple[np.ndarray, Detections],
) -> None:
    pixels, found = group
    h, w = pixels.shape[:2]

    def plan(spec: str = "all", **kw: object) -> PhotoPlan:
        args: dict = {"max_faces": 8, "min_prob": 0.9, "detect_max_side": 2048} | kw
        return plan_photo(found, w, h, RESOLUTION, faces=spec, **args)

    every = plan()
    assert len(every.faces) == 6 and all(f.usable for f in every.faces)
    big = every.faces[0]  # largest first
    small = every.faces[1:]
    # The small faces' frames are 40-60 px: the generator enlarges each at least 2x.
    assert all(38 <= f.side <= 64 and f.thumbnail_size == 32 for f in small), [
        f.side for f in small
    ]
    assert big.side > RESOLUTION / 2 and big.large and not big.chosen
    assert f"already {big.side:.0f} px" in (big.reason or "")
    assert f"{RESOLUTION} px faces" in (big.reason or "") and "by index" in (big.reason or "")
    assert [f.index for f in every.chosen] == [f.index for f in small]
    assert not any(f.large or f.reason for f in small)
    assert big.describe()["large"] is True and big.describe()["chosen"] is False
    # The output factor comes from the faces upscaled: the smallest small face reaches the
    # generator's side, which the large face's frame alone would not ask for.
    smallest = min(f.side for f in small)
    factor = output_factor(every.chosen, RESOLUTION, w, h, max_side=4096)
    assert factor == math.ceil(RESOLUTION / smallest * 0.95) >= 2
    assert [f.index for f in plan("largest").chosen] == [1]

    # Chosen by index, the large face is upscaled, and its reason says why.
    by_index = plan("0,2")
    assert [f.index for f in by_index.chosen] == [0, 2]
    assert by_index.faces[0].large and "upscaled all the same" in (by_index.faces[0].reason or "")
    only_big = plan("0")
    assert output_factor(only_big.chosen, RESOLUTION, w, h, max_side=4096) == max(
        1, math.ceil(RESOLUTION / big.side * 0.95)
    )
    # A looser fraction takes the large face into faces=all.
    loose = plan(max_face_fraction=big.side / RESOLUTION + 0.01)
    assert len(loose.chosen) == 6 and not loose.faces[0].large


def test_a_photo_of_large_faces_only_is_refused_with_their_sizes(
    group: tuple[np.ndarray, Detections],
) -> None:
    pixels, found = group
    h, w = pixels.shape[:2]
    every = plan_photo(found, w, h, RESOLUTION, max_faces=8, min_prob=0.9, detect_max_side=2048)
    large_only = _detections(every, keep=[0])
    for spec in ("all", "largest"):
        with pytest.raises(LikenessError) as e:
            plan_photo(
                large_only, w, h, RESOLUTION, faces=spec, max_faces=8, min_prob=0.9,
                detect_max_side=2048,
            )  # fmt: skip
        assert e.value.code == "faces_too_large" and e.value.status == 422
        assert f"{every.faces[0].side:.0f} px" in e.value.message
        assert f"{w}x{h}" in e.value.message and "--faces 0" in e.value.message
    forced = plan_photo(
        large_only, w, h, RESOLUTION, faces="0", max_faces=8, min_prob=0.9, detect_max_side=2048
    )
    assert [f.index for f in forced.chosen] == [0]
    # A listing (POST /faces) shows the face and what faces=all would do: nothing.
    listed = plan_photo(
        large_only, w, h, RESOLUTION, max_faces=8, min_prob=0.9, detect_max_side=2048,
        listing=True,
    )  # fmt: skip
    assert len(listed.faces) == 1 and not listed.chosen and listed.faces[0].large


def test_sizes_modes_and_factors() -> None:
    assert thumbnail_size_for(90.2, 128) == 64
    assert thumbnail_size_for(63.9, 128) == 32
    assert thumbnail_size_for(3.0, 128) == 2
    assert resolve_mode("auto", 64, 40, 64) == "thumbnail"
    assert resolve_mode("auto", 65, 40, 64) == "photo"
    assert resolve_mode("thumbnail", 4000, 3000, 64) == "thumbnail"
    assert scaling(2.0)[0, 0] == 2.0
