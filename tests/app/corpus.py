"""Hostile and unusual uploads, each with the status the API must answer (shared by unit, API and uvicorn tests)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image


def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB, with one tiny IDAT: a header-size attack."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(
        b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side zeros: tens of KB on disk, side**2 pixels decoded."""
    row = b"\0" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("RGB", (8, 8), "red"), "JPEG"))
    i = data.index(b"\xff\xc0")  # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def sixteen_bit_png() -> bytes:
    return save(Image.fromarray(np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)), "PNG")


def palette_with_transparency() -> bytes:
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 230, 25, 25] + [0] * 762)
    p.paste(0, (0, 0, 8, 8))
    return save(p, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((230, 25, 25), (25, 25, 230))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def streamed_multipart(total: int, boundary: str = "zz", chunk: int = 100_000) -> Iterator[bytes]:
    """A valid multipart upload of `total` zero bytes, sent in chunks (no Content-Length: chunked encoding)."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
           "Content-Type: image/png\r\n\r\n").encode()
    for _ in range(total // chunk):
        yield b"\0" * chunk
    yield f"\r\n--{boundary}--\r\n".encode()


# name -> (bytes factory, declared content type, expected status, expected error code or None)
CORPUS: dict[str, tuple[Callable[[], bytes], str, int, str | None]] = {
    "zero_bytes": (lambda: b"", "image/png", 400, "empty_file"),
    "truncated_png": (lambda: save(Image.new("RGB", (64, 64), "red"), "PNG")[:60], "image/png", 400,
                      "undecodable_image"),
    "truncated_jpeg": (lambda: save(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300], "image/jpeg",
                       400, "undecodable_image"),
    "png_magic_then_garbage": (lambda: b"\x89PNG\r\n\x1a\ngarbage", "image/png", 400, "undecodable_image"),
    "text_as_image": (lambda: b"hello, I am text, not an image", "image/png", 415, "unsupported_image_type"),
    "tiff": (lambda: save(Image.new("RGB", (4, 4)), "TIFF"), "image/tiff", 415, "unsupported_image_type"),
    "bomb_past_pillow_limit": (lambda: png_bomb(16000), "image/png", 413, "image_too_large"),
    "bomb_past_our_limit": (lambda: png_bomb(8000), "image/png", 413, "image_too_large"),
    "png_header_20000": (lambda: png_header_only(20000, 20000), "image/png", 413, "image_too_large"),
    "jpeg_header_20000": (lambda: jpeg_with_header_size(20000, 20000), "image/jpeg", 413, "image_too_large"),
    "png_16_bit": (sixteen_bit_png, "image/png", 200, None),
    "cmyk_jpeg": (lambda: save(Image.new("CMYK", (32, 32), (0, 230, 230, 20)), "JPEG"), "image/jpeg", 200, None),
    "palette_transparency": (palette_with_transparency, "image/png", 200, None),
    "animated_gif": (animated_gif, "image/gif", 200, None),
    "webp_declared_png": (lambda: save(Image.new("RGB", (32, 32), (230, 25, 25)), "WEBP"), "image/png", 200, None),
}
