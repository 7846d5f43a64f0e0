"""Issue 13, defect 1: a per-request decoded-pixel budget, and only the small model input is kept.

A few-KB 1-bit PNG decodes to a huge canvas. `max_pixels` bounds one image; `max_request_pixels`
bounds the sum over a request (413 before any pixel is decoded), and each image is shrunk to the
model's input size inside the decode worker, so peak memory is about one full image, not all of them.
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.datastructures import UploadFile

import app.images
from app.deps import Decoder
from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import SIZE, png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


def bilevel_png(w: int, h: int) -> bytes:
    """A 1-bit PNG: a few KB on the wire, w * h pixels once decoded."""
    im = Image.new("1", (w, h), 0)
    im.paste(1, (0, 0, w // 2, h))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_request_over_the_pixel_budget_is_413_before_decoding(good_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = app.images.load_image
    monkeypatch.setattr(app.images, "load_image", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    data = bilevel_png(1000, 1000)  # 1 MP each, 5 of them: 5 MP > the 4 MP budget
    assert len(data) < 2000
    settings = make_settings(good_root, max_pixels=2_000_000, max_request_pixels=4_000_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post("/classify", files=[("files", (f"{i}.png", data, "image/png")) for i in range(5)])
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert set(r.json()) == {"error"} and err["code"] == "request_too_large"
        assert "5000000" in err["message"] and "4000000" in err["message"]
        assert loads == []  # rejected from the headers: no pixel was decoded
        # within the budget: served, with the original sizes reported
        r = c.post("/classify", files=[("files", (f"{i}.png", data, "image/png")) for i in range(4)])
        assert r.status_code == 200, r.text
        assert [(x["width"], x["height"]) for x in r.json()["results"]] == [(1000, 1000)] * 4
        r = c.post("/attack", files={"file": ("a.png", bilevel_png(3000, 2000), "image/png")}, data={"steps": "1"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
        assert c.post("/classify", files={"file": ("ok.png", GOOD, "image/png")}).status_code == 200


def test_decoder_keeps_only_the_model_input(good_root: Path) -> None:
    """What the decode worker hands back holds no full-size image: one uint8 [S, S, 3] array per input size."""
    application = create_app(make_settings(good_root))

    async def scenario() -> list:
        decoder = Decoder(application.state.settings, asyncio.Semaphore(2))
        uploads = [UploadFile(io.BytesIO(bilevel_png(640, 480)), filename="big.png"),
                   UploadFile(io.BytesIO(GOOD), filename="small.png")]
        return await decoder.images(uploads, [SIZE, 16])

    out = asyncio.run(scenario())
    assert [name for name, _ in out] == ["big.png", "small.png"]
    big, small = out[0][1], out[1][1]
    assert (big.width, big.height) == (640, 480) and (small.width, small.height) == (SIZE, SIZE)
    for d in (big, small):
        assert not any(isinstance(v, Image.Image) for v in vars(d).values())
        assert sorted(d.pixels) == [16, SIZE]
        assert all(p.dtype == np.uint8 and p.shape == (s, s, 3) for s, p in d.pixels.items())
    assert np.array_equal(small.pixels[SIZE], np.asarray(Image.open(io.BytesIO(GOOD)).convert("RGB")))
    # the half-white, half-black canvas squashed: left half white, right half black
    assert (big.pixels[SIZE][:, :15] == 255).all() and (big.pixels[SIZE][:, 17:] == 0).all()


@pytest.mark.parametrize("mode", ["1", "L"])
def test_grey_shrink_matches_the_rgb_path(mode: str) -> None:
    """Grey images are resized on one byte per pixel; the result equals resizing their RGB version."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (97, 131), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    decoded = app.images.decode_for_model(buf.getvalue(), 10**6, [SIZE])
    expected = app.images.to_model_input(im.convert("RGB"), SIZE)
    assert np.array_equal(decoded.pixels[SIZE], expected)


def _vm(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_of_the_worst_request_is_about_one_image(good_root: Path) -> None:
    """8 x 2 MP 1-bit PNGs (~1 KB each): kept decoded, they would hold 8 x 8 MB of RGB; shrunk one at a time,
    the request's peak stays under 3 full RGB images (24 MB) above the process's resident size."""
    n, side = 8, 1414  # 2 MP each, 16 MP in all = the budget: the worst request these settings accept
    data = bilevel_png(side, side)
    one_rgb = side * side * 4  # Pillow stores RGB as 4 bytes per pixel
    app_ = create_app(make_settings(good_root, max_pixels=2_000_000, max_request_pixels=16_000_000))

    async def scenario() -> tuple[int, int, httpx.Response]:
        async with app_.router.lifespan_context(app_):
            transport = httpx.ASGITransport(app=app_)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                files = [("files", (f"{i}.png", data, "image/png")) for i in range(n)]
                assert (await c.post("/classify", files=files[:1])).status_code == 200  # warm-up
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                base = _vm("VmRSS")
                r = await c.post("/classify", files=files)
                return base, _vm("VmHWM"), r

    base, peak, r = asyncio.run(scenario())
    assert r.status_code == 200 and len(r.json()["results"]) == n
    assert peak - base < 3 * one_rgb, f"peak {(peak - base) / 2**20:.1f} MiB above base for one request"
