"""Untrusted image bytes -> RGB pixels for the model.

Policy (documented in the README):
- The format comes from the bytes, never from the declared content type. Accepted: PNG, JPEG, WebP,
  BMP, GIF; animated files (GIF, APNG, WebP) give their first frame. Other formats -> 415.
- The size in the header is checked before any pixel is decoded: width * height above `max_pixels`
  -> 413 (this also stops decompression bombs: a tiny file that claims a huge canvas).
- EXIF orientation is applied, so width/height are as a viewer shows the picture.
- Every mode becomes 8-bit RGB: transparency (RGBA, LA, P/L/RGB with a transparent colour) is
  composited over white; CMYK, palette, 1-bit and grey are converted; 16-bit and 32-bit integer
  grey (I;16, I) are scaled from their range (<= 255 as 8-bit, else 16-bit); float grey (F) in [0, 1]
  is taken as unit range, in [0, 255] as 8-bit, otherwise min-max scaled.
- Resize for the model: the whole image is squashed to size x size with antialiased bilinear
  resampling (no crop, aspect ratio not kept), matching how the training images were made
  (manifest `input.resize`). An image already size x size is used pixel for pixel.
- Memory: `decode_for_model` (what the server calls, in a decode worker thread) returns only the
  small model inputs (`Decoded`); the full-size image is dropped before it returns. Grey images
  (1-bit, 8-bit) are resized on one byte per pixel and only then made RGB (same pixels as resizing
  the RGB version); 16/32-bit and float grey are scaled in float32, in place.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ApiError

log = logging.getLogger("app.images")

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# leading bytes of the accepted formats: such a file that Pillow cannot open is corrupt (400), not foreign (415)
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _is_supported_signature(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(data: bytes, max_pixels: int, filename: str = "image") -> Image.Image:
    """Identify the format and check the header size; no pixel data is decoded yet."""
    if not data:
        raise ApiError(400, "empty_file", f"{filename}: the file is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"{filename}: {e}") from e
    except UnidentifiedImageError as e:
        if _is_supported_signature(data):
            raise ApiError(400, "undecodable_image", f"{filename}: corrupt image header") from e
        raise ApiError(415, "unsupported_image_type",
                       f"{filename}: not a PNG, JPEG, WebP, BMP or GIF image") from e
    except Exception as e:  # Pillow raises many types on hostile headers
        raise ApiError(400, "undecodable_image", f"{filename}: cannot read the image header") from e
    w, h = im.size
    if w < 1 or h < 1:
        raise ApiError(400, "undecodable_image", f"{filename}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large", f"{filename}: {w}x{h} pixels exceeds the limit of {max_pixels}")
    return im


def _scale_grey(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L, by the value range rule in the module docstring.

    One float32 copy, scaled in place (float64 and temporaries would cost 8-24 bytes per pixel)."""
    a = np.array(im, dtype=np.float32)
    np.nan_to_num(a, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if im.mode == "F" and lo >= 0 and hi <= 1:
        a *= 255
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535 and im.mode != "F":
        a /= 257
    else:
        a -= lo
        a *= 255 / max(hi - lo, 1e-12)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8))


def _wide_grey(im: Image.Image) -> bool:
    """32-bit integer or float pixels (I, I;16, F): scaled to 8 bits by `_scale_grey` before anything else."""
    return im.mode.startswith("I") or im.mode == "F"


def has_alpha(im: Image.Image) -> bool:
    """An alpha channel or a transparent colour (palette, grey or RGB `transparency`)."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def premultiplied(im: Image.Image) -> Image.Image:
    """An image with alpha -> RGBa (colour premultiplied by alpha). Compositing over white is then linear in the
    pixels (`over_white`), so it commutes with the resize and runs on the small image. Pillow's `convert` and
    `resize` release the GIL; `alpha_composite` does not: on a 40 MP RGBA upload it held the event loop for
    130-260 ms (benchmarks/results/reliability.md)."""
    if im.mode == "RGBa":
        return im
    return (im if im.mode == "RGBA" else im.convert("RGBA")).convert("RGBa")


def over_white(rgba_premultiplied: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] premultiplied RGBa -> uint8 [..., 3] RGB over opaque white: c + (255 - alpha), what alpha
    compositing over white gives (c * a / 255 + 255 * (1 - a / 255)), up to rounding. numpy releases the GIL."""
    c = rgba_premultiplied[..., :3].astype(np.int16)
    c += 255 - rgba_premultiplied[..., 3:4].astype(np.int16)
    return np.clip(c, 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (transparency over white)."""
    if _wide_grey(im):
        im = _scale_grey(im)
    if has_alpha(im):
        return Image.fromarray(over_white(np.asarray(premultiplied(im))))
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(im: Image.Image, filename: str = "image") -> Image.Image:
    """Decode the pixels of an opened image (first frame, EXIF orientation applied), in its own mode."""
    try:
        im.seek(0)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: the default copies the whole image when upright
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"{filename}: {e}") from e
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError, ...
        log.debug("undecodable image %s: %r", filename, e)
        raise ApiError(400, "undecodable_image", f"{filename}: the image data is truncated or corrupt") from e
    return im


def _converted(convert: Callable[[Image.Image], Image.Image], im: Image.Image, filename: str) -> Image.Image:
    """`convert(im)`, a mode Pillow cannot convert answered 415."""
    try:
        return convert(im)
    except ValueError as e:
        raise ApiError(415, "unsupported_image_type", f"{filename}: unsupported colour mode {im.mode}") from e


def decode_image(data: bytes, max_pixels: int, filename: str = "image") -> Image.Image:
    """Bytes -> RGB image (first frame, EXIF orientation applied); ApiError 400/413/415 on bad input."""
    return _converted(to_rgb, load_image(open_image(data, max_pixels, filename), filename), filename)


def to_model_input(im: Image.Image, size: int) -> np.ndarray:
    """RGB, 8-bit grey L or premultiplied RGBa image -> uint8 [size, size, 3]: whole image squashed to size x size,
    antialiased bilinear. Grey is resized first and then made RGB: the same pixels, a third of the memory; RGBa
    is resized first and then composited over white (`over_white`: compositing is linear, so it commutes with the
    resize, and no full-size composite is made)."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    if im.mode == "RGBa":
        return over_white(np.asarray(im))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class Decoded:
    """What the server keeps of one upload: its size as sent and the model inputs, never the full image."""

    width: int
    height: int
    pixels: dict[int, np.ndarray]  # input size -> uint8 [size, size, 3]


def shrink(im: Image.Image, sizes: Iterable[int], filename: str = "image") -> Decoded:
    """A decoded image (any mode) -> `Decoded` at each input size; the full-size image is not kept."""
    w, h = im.size
    if im.mode in ("1", "L") and "transparency" not in im.info:
        src = im.convert("L") if im.mode == "1" else im  # 1 byte per pixel instead of RGB's 4
    elif has_alpha(im) and not _wide_grey(im):
        src = _converted(premultiplied, im, filename)  # composited over white at the model's size (to_model_input)
    else:
        src = _converted(to_rgb, im, filename)
    return Decoded(w, h, {s: to_model_input(src, s) for s in sorted(set(sizes))})


def decode_opened(im: Image.Image, sizes: Iterable[int], filename: str = "image") -> Decoded:
    """An image from `open_image` (header read) -> `Decoded`; ApiError 400/415 on bad pixel data."""
    return shrink(load_image(im, filename), sizes, filename)


def decode_for_model(data: bytes, max_pixels: int, sizes: Iterable[int], filename: str = "image") -> Decoded:
    """Bytes -> `Decoded` (only the small model inputs); ApiError 400/413/415 on bad input."""
    return decode_opened(open_image(data, max_pixels, filename), sizes, filename)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
