"""Issue 13, defect 5: /attack checks its capacity before decoding, and an open /attack on a public
address is announced at start-up."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import httpx
import pytest

import app.images
from app.main import create_app, is_loopback
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


def test_full_attack_queue_is_429_before_the_image_is_decoded(good_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[int] = []
    real = app.images.load_image
    monkeypatch.setattr(app.images, "load_image", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    application = create_app(make_settings(good_root, attack_concurrency=1, attack_queue=0))
    gate = threading.Event()

    async def scenario():
        async with application.router.lifespan_context(application):
            attacks = application.state.attacks
            holder = asyncio.ensure_future(attacks.run(lambda _deadline: gate.wait(5)))  # takes the only slot
            await asyncio.sleep(0.05)
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as c:
                refused = await c.post("/attack", files={"file": ("x.png", GOOD, "image/png")}, data={"steps": "1"})
                decoded_while_full = len(loads)
                gate.set()
                await holder
                bad = await c.post("/attack", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nxx", "image/png")})
                active_after_bad = attacks.active
                ok = await c.post("/attack", files={"file": ("x.png", GOOD, "image/png")}, data={"steps": "1"})
                return refused, decoded_while_full, bad, active_after_bad, ok

    refused, decoded_while_full, bad, active_after_bad, ok = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "attack_queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert decoded_while_full == 0  # refused without touching the pixels
    assert bad.status_code == 400 and active_after_bad == 0  # a failed decode gives its slot back
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                 ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                                 ("192.168.1.4", False), ("example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("host", "api_key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "s3cret", False),
                                                         ("127.0.0.1", None, False)])
def test_open_attack_on_a_public_address_is_logged(good_root: Path, caplog: pytest.LogCaptureFixture,
                                                   host: str, api_key: str | None, warned: bool) -> None:
    caplog.set_level(logging.WARNING, logger="app.main")
    application = create_app(make_settings(good_root, host=host, api_key=api_key))

    async def scenario() -> None:
        async with application.router.lifespan_context(application):
            pass

    asyncio.run(scenario())
    records = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "attack_open"]
    assert len(records) == int(warned)
    if warned:
        assert records[0].levelno == logging.WARNING and "SATML_API_KEY" in records[0].getMessage()
        assert records[0].fields["host"] == host
