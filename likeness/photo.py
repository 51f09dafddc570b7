"""Photo mode's geometry, torch-free: faces found anywhere in a photo are warped into
the generator's FFHQ frame, and the upscaled faces are warped back into an enlarged
copy of the photo.

Coordinates here are continuous: (0, 0) is the top-left corner of an image and
pixel ``i`` covers ``[i, i + 1)``, the convention PIL's ``Image.transform`` samples
in. Transforms are 2×3 matrices ``M`` with ``dst = M[:, :2] @ src + M[:, 2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from likeness.errors import LikenessError
from likeness.face_detect import MIN_FACE_SIZE, MTCNN_OFFSET, Detections, SharedDetector
from likeness.images import valid_thumbnail_sizes
from likeness.settings import Settings

# Where the five landmarks (eyes, nose, mouth corners, in image order) sit in a centred
# FFHQ / CelebA-HQ framed face, the framing the generator draws and the search matches,
# as fractions of (width, height) in continuous coordinates. Obtained once as the mean
# MTCNN landmarks over the first 2,000 images (sorted by name) of CelebA-HQ at 128×128,
# all detected; per-coordinate standard deviation 0.006-0.035 of the image size.
FFHQ_FRAME_LANDMARKS: tuple[tuple[float, float], ...] = (
    (0.3773, 0.4755),
    (0.6261, 0.4758),
    (0.4983, 0.6309),
    (0.3884, 0.7311),
    (0.6137, 0.7308),
)

# The pasted region of the frame: an ellipse about the face (centre, radii as fractions
# of the frame), faded out over FEATHER of the frame so no seam shows. The frame's
# corners are the generator's background, never the photo's: they are not pasted.
MASK_CENTRE = (0.5, 0.56)
MASK_RADII = (0.36, 0.42)
FEATHER = 0.1
# Colour matching may stretch a channel's spread this much at most either way.
MAX_STD_RATIO = 1.5

FacesSpec = str  # "all", "largest" or comma-separated face indices such as "0,2"


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transforms (Umeyama 1991) taking ``src`` onto ``dst``.

    src: (B, N, 2), dst: (B, N, 2) or (N, 2). Returns (B, 2, 3) float64 matrices:
    rotation, uniform scale and translation, never a reflection.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.broadcast_to(np.asarray(dst, dtype=np.float64), src.shape)
    n = src.shape[1]
    mu_s, mu_d = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.transpose(0, 2, 1) @ sc / n  # (B, 2, 2)
    u, sig, vt = np.linalg.svd(cov)
    # Flip the last singular direction when the best orthogonal map would be a reflection.
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    d = np.where(d == 0, 1.0, d)
    diag = np.stack([np.ones_like(d), d], axis=1)  # (B, 2)
    rot = u @ (diag[:, :, None] * np.eye(2)) @ vt
    var_s = (sc**2).sum((1, 2)) / n
    scale = (sig * diag).sum(1) / np.maximum(var_s, 1e-12)
    lin = scale[:, None, None] * rot
    trans = mu_d.transpose(0, 2, 1) - lin @ mu_s.transpose(0, 2, 1)  # (B, 2, 1)
    out: np.ndarray = np.concatenate([lin, trans], axis=2)
    return out


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of one 2×3 affine matrix."""
    lin_inv = np.linalg.inv(m[:, :2])
    out: np.ndarray = np.concatenate([lin_inv, -lin_inv @ m[:, 2:]], axis=1)
    return out


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine map ``outer ∘ inner`` (first ``inner``, then ``outer``)."""
    out: np.ndarray = np.concatenate(
        [outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], axis=1
    )
    return out


def scaling(factor: float) -> np.ndarray:
    return np.array([[factor, 0.0, 0.0], [0.0, factor, 0.0]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (..., 2) through the 2×3 map ``m``."""
    out: np.ndarray = points @ m[:, :2].T + m[:, 2]
    return out


def frame_points(side: float) -> np.ndarray:
    """The FFHQ frame's five landmarks in a ``side``-pixel square, continuous coordinates."""
    return np.asarray(FFHQ_FRAME_LANDMARKS, dtype=np.float64) * side


def mtcnn_to_continuous(landmarks: np.ndarray) -> np.ndarray:
    """MTCNN's landmarks (1-based pixel centres) in continuous coordinates."""
    return np.asarray(landmarks, dtype=np.float64) - MTCNN_OFFSET + 0.5


def unit_frame_transform(landmarks: np.ndarray) -> np.ndarray:
    """The photo → unit FFHQ frame (side 1) similarity of one face's five landmarks
    (continuous photo coordinates)."""
    m: np.ndarray = estimate_similarity(landmarks[None], frame_points(1.0))[0]
    return m


def frame_side(to_unit: np.ndarray) -> float:
    """How many photo pixels the FFHQ frame of a face spans: the face's own resolution."""
    return float(1.0 / np.sqrt(abs(np.linalg.det(to_unit[:, :2]))))


def warp(
    image: np.ndarray,
    out_to_in: np.ndarray,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """Sample ``image`` (H, W, C) uint8 or float32 into ``size`` = (width, height); each
    output point ``p`` takes the input at ``out_to_in(p)``; outside the input is zero."""
    data = tuple(float(v) for v in out_to_in.reshape(-1))
    if image.dtype == np.uint8:
        pil = Image.fromarray(image)
        return np.asarray(pil.transform(size, Image.Transform.AFFINE, data, resample))
    # Float images (masks) one channel at a time, in PIL's 32-bit float mode.
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), "F").transform(
                size, Image.Transform.AFFINE, data, resample
            )
        )
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=2)


def frame_crop(pixels: np.ndarray, to_unit: np.ndarray, size: int) -> np.ndarray:
    """The face warped into a ``size``-pixel FFHQ frame.

    The warp runs at the face's own resolution (PIL's affine warp does not antialias),
    then one antialiased bicubic resize brings it to ``size``: the same operator the
    search downscales with.
    """
    native = max(size, round(frame_side(to_unit)))
    crop = warp(pixels, invert_affine(compose(scaling(native), to_unit)), (native, native))
    if native == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))


def feathered_mask(side: int) -> np.ndarray:
    """The pasted region of a ``side``-pixel frame: 1 inside the ellipse, fading to 0."""
    c = (np.arange(side, dtype=np.float64) + 0.5) / side
    x = (c[None, :] - MASK_CENTRE[0]) / MASK_RADII[0]
    y = (c[:, None] - MASK_CENTRE[1]) / MASK_RADII[1]
    r = np.sqrt(x**2 + y**2)  # 1 on the ellipse
    feather = FEATHER / min(MASK_RADII)
    t = np.clip((1.0 - r) / feather, 0.0, 1.0)
    mask: np.ndarray = (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no kink
    return mask


def enlarge(pixels: np.ndarray, factor: int) -> np.ndarray:
    """The photo enlarged ``factor`` times by bicubic interpolation."""
    if factor == 1:
        return pixels.copy()
    h, w = pixels.shape[:2]
    return np.array(  # a writable copy: the faces are pasted into it
        Image.fromarray(pixels).resize((w * factor, h * factor), Image.Resampling.BICUBIC)
    )


@dataclass
class Pasted:
    """Where a face went: the box of the enlarged photo it touched (x0, y0, x1, y1)."""

    box: tuple[int, int, int, int]
    mask: np.ndarray  # (y1 - y0, x1 - x0) float32 weights of the pasted face
    colour_shift: list[float]  # per-channel mean change of the colour match


def paste_face(
    canvas: np.ndarray,
    face: np.ndarray,
    to_unit: np.ndarray,
    factor: int,
    *,
    match_colours: bool = True,
    feather: bool = True,
) -> Pasted:
    """Blend an upscaled face (R, R, 3) uint8 in its FFHQ frame into ``canvas`` (the
    photo enlarged ``factor`` times), in place: warped back with the inverse of the
    face's transform, faded in by a feathered mask, its colours matched to the ring of
    the canvas under the mask's fade (``feather`` False: a hard-edged paste, to compare)."""
    side = face.shape[0]
    big_to_frame = compose(scaling(side), compose(to_unit, scaling(1.0 / factor)))
    frame_to_big = invert_affine(big_to_frame)
    corners = apply(frame_to_big, np.array([[0, 0], [side, 0], [0, side], [side, side]], float))
    h, w = canvas.shape[:2]
    x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
    x1, y1 = min(w, int(np.ceil(corners[:, 0].max()))), min(h, int(np.ceil(corners[:, 1].max())))
    if x1 <= x0 or y1 <= y0:
        return Pasted((0, 0, 0, 0), np.zeros((0, 0), np.float32), [0.0, 0.0, 0.0])
    box_to_frame = compose(big_to_frame, np.array([[1.0, 0, x0], [0, 1.0, y0]]))
    size = (x1 - x0, y1 - y0)
    warped = warp(face, box_to_frame, size).astype(np.float32)
    mask = warp(feathered_mask(side)[..., None], box_to_frame, size, Image.Resampling.BILINEAR)
    mask = np.clip(mask[..., 0], 0.0, 1.0)
    if not feather:
        mask = (mask > 0).astype(np.float32)
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    shift = [0.0, 0.0, 0.0]
    ring = (mask > 0.05) & (mask < 0.95)
    if match_colours and ring.sum() >= 16:
        for c in range(3):
            f, p = warped[..., c][ring], region[..., c][ring]
            ratio = float(
                np.clip((p.std() + 1e-3) / (f.std() + 1e-3), 1 / MAX_STD_RATIO, MAX_STD_RATIO)
            )
            adjusted = (warped[..., c] - f.mean()) * ratio + p.mean()
            shift[c] = float(p.mean() - f.mean())
            warped[..., c] = adjusted
    blended = region + (warped - region) * mask[..., None]
    canvas[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Pasted((x0, y0, x1, y1), mask, shift)


@dataclass
class PhotoFace:
    """One detected face and what photo mode does with it."""

    index: int  # in the detector's order, largest first
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in photo pixels
    prob: float
    landmarks: np.ndarray  # (5, 2) continuous photo coordinates
    to_unit: np.ndarray  # (2, 3) photo → unit FFHQ frame
    side: float  # the frame's side in photo pixels: the face's own resolution
    thumbnail_size: int  # the search's thumbnail side for it
    usable: bool
    # Its frame spans more than the planner's fraction of the generator's side: faces=all
    # and faces=largest leave it as the enlarged photo's pixels.
    large: bool = False
    reason: str | None = None  # why it is not upscaled by default (or, chosen, why it is)
    chosen: bool = False

    def to_thumbnail(self) -> np.ndarray:
        """Photo → thumbnail frame (side ``thumbnail_size``) transform."""
        return compose(scaling(self.thumbnail_size), self.to_unit)

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "box": [round(v, 2) for v in self.box],
            "prob": round(self.prob, 4),
            "face_side": round(self.side, 2),
            "thumbnail_size": self.thumbnail_size,
            "usable": self.usable,
            "large": self.large,
            "reason": self.reason,
            "chosen": self.chosen,
            "landmarks": np.round(self.landmarks, 2).tolist(),
            "to_thumbnail": np.round(self.to_thumbnail(), 6).tolist(),
        }


@dataclass
class PhotoPlan:
    """The faces of a photo, which of them to upscale, and the detector's limits."""

    width: int
    height: int
    faces: list[PhotoFace]
    min_face_size: float  # the smallest face side the detector finds in this photo
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> list[PhotoFace]:
        return [f for f in self.faces if f.chosen]

    def describe(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "min_face_size": round(self.min_face_size, 1),
            "faces": [f.describe() for f in self.faces],
        }


def parse_faces(spec: FacesSpec) -> str | list[int]:
    """``all``, ``largest`` or the face indices of a comma-separated list."""
    text = spec.strip().lower()
    if text in ("all", "largest"):
        return text
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        indices = []
    if not indices or min(indices) < 0:
        raise LikenessError(
            "invalid_faces",
            f"faces must be all, largest or face indices such as 0,2; got {spec!r}.",
            status=422,
        )
    return sorted(set(indices))


def thumbnail_size_for(side: float, resolution: int) -> int:
    """The largest thumbnail side the generator upscales that is at most the face's own."""
    sizes = valid_thumbnail_sizes(resolution)
    fitting = [s for s in sizes if s <= side]
    return max(fitting) if fitting else min(sizes)


def detector_min_face(width: int, height: int, detect_max_side: int | None) -> float:
    """The smallest face side MTCNN finds in a photo it shrinks to ``detect_max_side``."""
    longest = max(width, height)
    shrink = detect_max_side / longest if detect_max_side and longest > detect_max_side else 1.0
    return MIN_FACE_SIZE / shrink


def large_face_reason(side: float, resolution: int, chosen: bool) -> str:
    """Why a face near or above the generator's side is left alone (or, when chosen by
    index, that it is upscaled all the same)."""
    why = (
        f"already {side:.0f} px; the generator draws {resolution} px faces, "
        "so upscaling would not add detail"
    )
    if chosen:
        return f"{why}; upscaled all the same because it was chosen by index"
    return f"{why}; left as the enlarged photo's pixels (choose it by index to upscale it)"


def plan_photo(
    detections: Detections,
    width: int,
    height: int,
    resolution: int,
    *,
    faces: FacesSpec = "all",
    max_faces: int,
    min_prob: float,
    detect_max_side: int | None,
    max_face_fraction: float = 0.5,
    listing: bool = False,
) -> PhotoPlan:
    """Which detected faces to upscale and how, or a LikenessError saying why none can be.

    A face is usable when the detector is sure of it (``min_prob``) and its box is at
    least MTCNN's smallest face; the others are listed with the reason, never guessed.
    ``all`` and ``largest`` also leave out *large* faces, whose frame spans more than
    ``max_face_fraction`` of the generator's side: the generator cannot enlarge them
    even 2x, and its face pasted over the photo's would be blurrier and less like the
    person than the photo's own pixels. Indices choose any usable face, large or not.
    ``listing`` plans ``all`` for a listing of the faces: no refusal but ``no_face``.
    """
    min_face = detector_min_face(width, height, detect_max_side)
    found: list[PhotoFace] = []
    for i in range(len(detections)):
        box = tuple(float(v) for v in detections.boxes[i])
        landmarks = mtcnn_to_continuous(detections.landmarks[i])
        to_unit = unit_frame_transform(landmarks)
        side = frame_side(to_unit)
        prob = float(detections.probs[i])
        reason = None
        box_side = min(box[2] - box[0], box[3] - box[1])
        if prob < min_prob:
            reason = f"detector confidence {prob:.2f} below {min_prob:g}"
        elif box_side < MIN_FACE_SIZE:
            reason = f"face box {box_side:.0f} px, under the detector's {MIN_FACE_SIZE} px"
        found.append(
            PhotoFace(
                index=i,
                box=(box[0], box[1], box[2], box[3]),
                prob=prob,
                landmarks=landmarks,
                to_unit=to_unit,
                side=side,
                thumbnail_size=thumbnail_size_for(side, resolution),
                usable=reason is None,
                reason=reason,
            )
        )
    plan = PhotoPlan(width, height, found, min_face)
    usable = [f for f in found if f.usable]
    for f in usable:
        f.large = f.side > max_face_fraction * resolution
        if f.large:
            f.reason = large_face_reason(f.side, resolution, chosen=False)
    if not usable:
        seen = f" ({len(found)} candidate(s) rejected: {found[0].reason})" if found else ""
        raise LikenessError(
            "no_face",
            f"no face was found in the {width}x{height} photo{seen}; the detector finds faces "
            f"at least {min_face:.0f} pixels wide in a photo of this size.",
            status=422,
        )
    wanted = "all" if listing else parse_faces(faces)
    small = [f for f in usable if not f.large]
    if not small and isinstance(wanted, str) and not listing:
        sides = ", ".join(f"{f.side:.0f}" for f in usable)
        raise LikenessError(
            "faces_too_large",
            f"every usable face of the {width}x{height} photo is already large: their frames "
            f"span {sides} px, more than {max_face_fraction:g} of the generator's "
            f"{resolution} px, so upscaling would not add detail. To upscale one all the same, "
            f"choose it by index (faces={usable[0].index} in the API, --faces "
            f"{usable[0].index} on the command line).",
            status=422,
        )
    chosen: list[PhotoFace]
    if wanted == "all":
        chosen = small
    elif wanted == "largest":
        chosen = small[:1]
    elif isinstance(wanted, list):
        by_index = {f.index: f for f in usable}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise LikenessError(
                "invalid_faces",
                f"face(s) {', '.join(map(str, missing))} are not usable faces of this photo; "
                f"usable: {', '.join(str(f.index) for f in usable)}.",
                status=422,
            )
        chosen = [by_index[i] for i in wanted]
    if len(chosen) > max_faces and not listing:
        raise LikenessError(
            "too_many_faces",
            f"{len(chosen)} faces were chosen in the photo; at most {max_faces} are upscaled "
            "per request: pick some with faces=largest or face indices such as 0,2.",
            status=422,
        )
    for f in chosen:
        f.chosen = True
        if f.large:
            f.reason = large_face_reason(f.side, resolution, chosen=True)
    return plan


def crops_for(pixels: np.ndarray, chosen: Sequence[PhotoFace]) -> list[np.ndarray]:
    """Each chosen face in its FFHQ frame at its thumbnail size."""
    return [frame_crop(pixels, f.to_unit, f.thumbnail_size) for f in chosen]


def output_factor(
    chosen: Sequence[PhotoFace], resolution: int, width: int, height: int, max_side: int
) -> int:
    """The least integer enlargement of the photo at which the smallest chosen face's
    upscaled resolution is used in full (its frame spans ``resolution`` pixels, or within
    5 % of it), within ``max_side``."""
    if not chosen:
        return 1
    wanted = math.ceil(resolution / min(f.side for f in chosen) * 0.95)
    cap = max(1, max_side // max(width, height))
    return int(max(1, min(wanted, cap)))


@dataclass
class Composite:
    pixels: np.ndarray  # the enlarged photo with the faces pasted in
    factor: int
    pasted: list[Pasted]


def composite(
    pixels: np.ndarray, chosen: Sequence[PhotoFace], upscaled: Sequence[np.ndarray], factor: int
) -> Composite:
    """The photo enlarged by ``factor`` with each upscaled face pasted back, smallest face
    last so that where boxes overlap the face that gained most stays on top."""
    canvas = enlarge(pixels, factor)
    order = sorted(range(len(chosen)), key=lambda k: -chosen[k].side)
    pasted: list[Pasted | None] = [None] * len(chosen)
    for k in order:
        pasted[k] = paste_face(canvas, upscaled[k], chosen[k].to_unit, factor)
    return Composite(canvas, factor, [p for p in pasted if p is not None])


def resolve_mode(mode: str, width: int, height: int, thumbnail_max_side: int) -> str:
    """``thumbnail`` or ``photo``: auto decides by the image's longer side."""
    if mode != "auto":
        return mode
    return "thumbnail" if max(width, height) <= thumbnail_max_side else "photo"


def plan_with_settings(
    pixels: np.ndarray,
    detector: SharedDetector,
    resolution: int,
    faces: FacesSpec,
    settings: Settings,
    *,
    listing: bool = False,
) -> PhotoPlan:
    """Detect the faces of a decoded photo and plan them with the settings' limits: the
    one way the CLI, the API and the worker choose a photo's faces. ``listing``: every
    face with what ``faces=all`` would choose, refused only when there is no face."""
    height, width = pixels.shape[:2]
    found = detector.detect(pixels, max_side=settings.photo_detect_max_side)
    return plan_photo(
        found,
        width,
        height,
        resolution,
        faces=faces,
        max_faces=settings.photo_max_faces,
        min_prob=settings.photo_min_face_prob,
        detect_max_side=settings.photo_detect_max_side,
        max_face_fraction=settings.photo_max_face_fraction,
        listing=listing,
    )
