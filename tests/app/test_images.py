"""Image decoding policy: formats from bytes, every mode to RGB, size limits before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.errors import ApiError
from app.images import decode_image, encode_png, to_model_input, to_rgb
from tests.app.corpus import CORPUS, save

MAX = 4_000_000


def status(data: bytes, max_pixels: int = MAX) -> tuple[int, str]:
    with pytest.raises(ApiError) as e:
        decode_image(data, max_pixels)
    return e.value.status, e.value.code


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_supported_formats(fmt: str) -> None:
    im = decode_image(save(Image.new("RGB", (40, 30), (200, 30, 30)), fmt), MAX)
    assert im.mode == "RGB" and im.size == (40, 30)
    r, g, b = im.getpixel((5, 5))
    assert r > 150 and g < 80 and b < 80


def test_format_from_bytes_not_name() -> None:
    assert decode_image(save(Image.new("RGB", (4, 4)), "BMP"), MAX, filename="photo.png").size == (4, 4)


def test_rgba_over_white() -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(save(im, "PNG"), MAX)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


def test_la_and_palette_transparency() -> None:
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(save(la, "PNG"), MAX).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = decode_image(save(p, "PNG", transparency=0), MAX)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled() -> None:
    a = np.array([[0, 32896], [65535, 65535]], dtype=np.uint16)
    out = decode_image(save(Image.fromarray(a), "PNG"), MAX)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((0, 1)) == (255, 255, 255)


def test_cmyk_jpeg() -> None:
    out = decode_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), MAX)
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["1", "L", "P"])
def test_other_modes(mode: str) -> None:
    out = decode_image(save(Image.new(mode, (3, 3)), "PNG"), MAX)
    assert out.mode == "RGB" and out.size == (3, 3)


def test_integer_and_float_grey_ranges() -> None:
    """No accepted format stores 32-bit int or float pixels, but Pillow may hand us I/F: test `to_rgb`."""
    eight_bit = to_rgb(Image.fromarray(np.array([[0, 200]], dtype=np.int32)))
    assert eight_bit.getpixel((1, 0)) == (200, 200, 200)
    sixteen = to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    assert sixteen.getpixel((1, 0)) == (255, 255, 255)
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)))
    assert unit.getpixel((1, 0)) == (128, 128, 128)
    wild = to_rgb(Image.fromarray(np.array([[-10.0, 990.0, np.nan]], dtype=np.float32)))
    assert wild.getpixel((0, 0)) == (0, 0, 0) and wild.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation() -> None:
    im = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    out = decode_image(save(im, "JPEG", exif=exif), MAX)
    assert out.size == (20, 40)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, _, b = decode_image(buf.getvalue(), MAX).getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus(name: str) -> None:
    make, _, expected, code = CORPUS[name]
    if expected == 200:
        assert decode_image(make(), MAX).mode == "RGB"
    else:
        assert status(make()) == (expected, code)


def test_pixel_limit_is_configurable() -> None:
    data = save(Image.new("RGB", (100, 100)), "PNG")
    assert status(data, max_pixels=9999)[0] == 413
    assert decode_image(data, max_pixels=10000).size == (100, 100)


def test_resize_policy() -> None:
    px = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    im = Image.fromarray(px)
    assert np.array_equal(to_model_input(im, 32), px)  # same size: pixel for pixel
    wide = Image.new("RGB", (90, 30), "red")
    out = to_model_input(wide, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out[..., 0] == 255).all()  # squashed, no crop


def test_png_round_trip() -> None:
    px = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(px)))), px)
