from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from likeness.errors import InvalidImage
from likeness.images import decode_image, nearest_valid_size, prepare_thumbnail


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((32, 32), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_formats_decode_to_rgb(face: Image.Image, fmt: str) -> None:
    out = decode_image(encode(face, fmt))
    assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
    assert out.format == fmt
    # lossy formats stay close to the source
    assert np.abs(out.pixels.astype(int) - np.asarray(face).astype(int)).mean() < 12


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    px = decode_image(buf.getvalue()).pixels
    assert px[0, 0, 0] > 200 and px[0, 0, 2] < 50


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90° clockwise
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.pixels.shape == (20, 10, 3)
    assert out.pixels[2, 5].mean() > 200 and out.pixels[17, 5].mean() < 50  # white on top
    assert any("EXIF" in n for n in out.notes)


def test_grayscale_palette_and_alpha() -> None:
    gray = decode_image(encode(Image.new("L", (4, 4), 100), "PNG")).pixels
    assert (gray == 100).all()
    pal = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(decode_image(encode(pal, "PNG")).pixels[0, 0]) == (10, 200, 30)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red → white
    out = decode_image(encode(rgba, "PNG"))
    assert tuple(out.pixels[0, 0]) == (255, 255, 255)
    assert any("white" in n for n in out.notes)


def test_non_square_is_centre_cropped_and_size_snapped() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # the centre 20 columns are white
    out = prepare_thumbnail(encode(img, "PNG"), 128)
    assert out.size == 16  # 20 → nearest size dividing 128 by an integer >= 2
    assert out.pixels.min() > 200
    assert any("centre-cropped" in n for n in out.notes)
    assert any("resized 20x20 to 16x16" in n for n in out.notes)
    assert prepare_thumbnail(encode(Image.new("RGB", (16, 16)), "PNG"), 128).notes == []


def test_nearest_valid_size() -> None:
    assert nearest_valid_size(16, 128) == 16
    assert nearest_valid_size(24, 128) == 16
    assert nearest_valid_size(30, 128) == 32
    assert nearest_valid_size(500, 128) == 64
    assert nearest_valid_size(1, 1024) == 2


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb) without its pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "empty_file"),
        (b"hello, I am not an image", "not_an_image"),
        (png_header_only(20000, 20000), "image_too_large"),
    ],
)
def test_bad_input_has_a_code(payload: bytes, code: str) -> None:
    with pytest.raises(InvalidImage) as e:
        decode_image(payload)
    assert e.value.code == code and e.value.message


def test_truncated_image(face: Image.Image) -> None:
    whole = encode(face, "PNG")
    with pytest.raises(InvalidImage) as e:
        decode_image(whole[: len(whole) // 2])
    assert e.value.code == "truncated_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_max_side_shrinks_while_decoding_and_keeps_orientation(fmt: str) -> None:
    wide = Image.fromarray(data.astronaut()).resize((1200, 900))
    exif = wide.getexif()
    exif[0x0112] = 6  # stored rotated: shown 900 wide, 1200 tall
    out = decode_image(encode(wide, fmt, exif=exif), max_side=256)
    assert max(out.pixels.shape[:2]) <= 256
    assert out.pixels.shape[0] > out.pixels.shape[1]  # the rotation was still applied
    assert out.original_size == (1200, 900)
    assert decode_image(encode(wide, fmt), max_side=2000).pixels.shape == (900, 1200, 3)
