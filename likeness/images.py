"""Decoding user images into RGB arrays, torch-free (the API validates with it too).

Thumbnails are squared by a centre crop (the face is assumed centred, as in
FFHQ/CelebA-HQ framing), and snapped to a size that divides the generator's
resolution by an integer factor of at least 2.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from likeness.errors import InvalidImage

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class DecodedImage:
    """An RGB image (H, W, 3) uint8, plus what was done to get it."""

    pixels: np.ndarray
    original_size: tuple[int, int]  # (width, height) as stored in the file
    format: str
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> DecodedImage:
    """Decode bytes into RGB, honouring EXIF orientation; first frame of animations.

    Raises ``InvalidImage`` for empty, non-image, truncated or oversized input.
    The pixel limit is checked from the header, before any pixel is decoded.
    With ``max_side``, a larger image comes back shrunk by an integer factor to at
    most that side (a JPEG is decoded at reduced scale, never in full);
    ``original_size`` stays the file's.
    """
    if not data:
        raise InvalidImage("empty_file", "The uploaded file is empty.")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and only past 2x errors) on decompression bombs; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Typed as the base class: exif_transpose below may hand back a plain Image.
            img: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImage(
                    "image_too_large",
                    f"The image is {width}x{height} pixels; the limit is {max_pixels} pixels.",
                    status=413,
                )
            fmt = img.format or "unknown"
            img.seek(0)
            if max_side is not None and max(width, height) > max_side:
                # JPEG only: the decoder skips to the smallest 1/2, 1/4 or 1/8 scale
                # that is still at least the requested size.
                img.draft("RGB", (max_side, max_side))
            img.load()
            if max_side is not None and max(img.size) > max_side:
                reduced = img.reduce(-(-max(img.size) // max_side))
                reduced.info = img.info  # keeps the EXIF orientation applied below
                img = reduced
    except InvalidImage:
        raise
    except Image.DecompressionBombError:
        raise InvalidImage(
            "image_too_large",
            f"The image declares far more pixels than the limit of {max_pixels}.",
            status=413,
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(
            "not_an_image",
            f"The file is not an image in a supported format ({', '.join(FORMATS)}).",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise InvalidImage("truncated_image", "The image file is truncated or corrupt.") from None

    notes: list[str] = []
    rotated = ImageOps.exif_transpose(img)
    if rotated.size != img.size or rotated is not img:
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (None, 1):
            notes.append(f"applied EXIF orientation {orientation}")
    img = rotated
    return DecodedImage(
        pixels=np.asarray(_to_rgb(img, notes), dtype=np.uint8),
        original_size=(width, height),
        format=fmt,
        notes=notes,
    )


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Grayscale, palette and alpha to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("composited transparency on white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    notes.append(f"converted {img.mode} to RGB")
    return img.convert("RGB")


def center_crop_square(image: DecodedImage) -> DecodedImage:
    """Crop the centred square of the shorter side (the face is assumed centred)."""
    h, w = image.pixels.shape[:2]
    if h == w:
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image.pixels[top : top + side, left : left + side]
    notes = [*image.notes, f"centre-cropped {w}x{h} to {side}x{side}"]
    return DecodedImage(crop, image.original_size, image.format, notes)


def valid_thumbnail_sizes(resolution: int) -> list[int]:
    """Sizes s with resolution / s an integer >= 2, ascending."""
    return [resolution // k for k in range(resolution // 2, 1, -1) if resolution % k == 0]


def nearest_valid_size(size: int, resolution: int) -> int:
    sizes = valid_thumbnail_sizes(resolution)
    # Ties go to the smaller size: downscaling loses less than inventing pixels.
    return min(sizes, key=lambda s: (abs(s - size), s))


def prepare_thumbnail(
    data: bytes, resolution: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode, square and snap a thumbnail to a size the generator can upscale.

    Resizing uses PIL's antialiased bicubic, the same operator the search uses
    to downscale, so a thumbnail made by downscaling a face stays consistent.
    """
    image = center_crop_square(decode_image(data, max_pixels=max_pixels))
    size = image.size
    target = nearest_valid_size(size, resolution)
    if target == size:
        return image
    resized = Image.fromarray(image.pixels).resize((target, target), Image.Resampling.BICUBIC)
    notes = [
        *image.notes,
        f"resized {size}x{size} to {target}x{target} (the generator's "
        f"{resolution}px output must be an integer multiple >= 2 of the thumbnail)",
    ]
    return DecodedImage(np.asarray(resized), image.original_size, image.format, notes)
