"""Issue 13, defect 2: no CPU-heavy work on the event loop.

The antialiased resize of full-size images runs in the decode worker, not in the async route, and
the `compare` field of /attack is de-duplicated in linear time ("a,a" is one model), so while a
heavy request runs, /health/live still answers at once.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from app.routes.attack import compare_models
from tests.app.conftest import make_settings
from tests.app.servers import wait_ready
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


class StubRegistry:
    def get(self, name: str | None) -> SimpleNamespace:
        return SimpleNamespace(name=name)


def names(models: list[SimpleNamespace]) -> list[str]:
    return [m.name for m in models]


def test_compare_is_deduplicated_in_order() -> None:
    main = SimpleNamespace(name="default")
    assert names(compare_models(StubRegistry(), main, ["a,a"])) == ["a"]
    assert names(compare_models(StubRegistry(), main, ["b, a", "a,b,,c", " default ", "c"])) == ["b", "a", "c"]
    assert compare_models(StubRegistry(), main, None) == [] and compare_models(StubRegistry(), main, [" , "]) == []


def test_compare_deduplication_is_linear() -> None:
    """Two fields of 60,000 distinct names each (quadratic: 3.6e9 comparisons, tens of seconds)."""
    main = SimpleNamespace(name="default")
    field = ",".join(f"m{i}" for i in range(60_000))
    t0 = time.perf_counter()
    out = compare_models(StubRegistry(), main, [field, field])
    assert time.perf_counter() - t0 < 1.0
    assert len(out) == 60_000


def test_huge_compare_fields_answer_404_fast_with_a_short_message(client) -> None:
    field = ",".join(f"model-{i}" for i in range(75_000))  # ~0.9 MB each (the multipart field limit is 1 MiB)
    t0 = time.perf_counter()
    r = client.post("/attack", files={"file": ("x.png", GOOD, "image/png")}, data={"compare": [field, field]})
    assert time.perf_counter() - t0 < 5.0
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.json()["error"]["message"]) < 300  # the unknown name is not echoed at full length
    r = client.post("/attack", files={"file": ("x.png", GOOD, "image/png")},
                    data={"compare": "x" * 100_000, "steps": "1"})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300


def bilevel_png(side: int) -> bytes:
    im = Image.new("1", (side, side), 0)
    im.paste(1, (0, 0, side // 2, side // 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(good_root: Path) -> Iterator[SimpleNamespace]:
    """A real uvicorn server in a thread on 127.0.0.1:<free port>: `url`, and `loop_thread` (its event loop)."""
    import uvicorn

    from app.main import create_app

    settings = make_settings(good_root, max_pixels=16_000_000, max_request_pixels=64_000_000, log_level="warning")
    # IPPROTO_TCP, or asyncio does not set TCP_NODELAY on accepted sockets (Nagle + delayed ACK: +40 ms per reply)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-loop")
    thread.start()
    wait_ready(thread.is_alive, f"{url}/health/ready", timeout_s=60, poll_s=0.05)
    try:
        yield SimpleNamespace(url=url, loop_thread=thread.name)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_resize_never_runs_on_the_event_loop(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resize of a full-size upload (whoever calls it) happens off the uvicorn event-loop thread."""
    threads: list[str] = []
    real = Image.Image.resize

    def spy(self: Image.Image, *args, **kwargs) -> Image.Image:
        if self.width * self.height >= 1_000_000:
            threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    r = httpx.post(f"{server.url}/classify", files=[("files", (f"{i}.png", bilevel_png(2000), "image/png"))
                                                    for i in range(2)], timeout=30)
    assert r.status_code == 200, r.text
    assert len(threads) == 2 and server.loop_thread not in threads, threads


def test_thumbnails_decode_on_the_loop_and_big_images_do_not(server: SimpleNamespace,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A request of a few tiny images skips the thread hop (it costs more than their decode); one image
    above INLINE_MAX_PIXELS in the same small request sends every image of it to the decode threads."""
    import app.deps

    threads: list[tuple[int, str]] = []

    def spy(real):
        def decode(*args, **kwargs):
            out = real(*args, **kwargs)
            threads.append((out.width, threading.current_thread().name))
            return out
        return decode

    for name in ("decode_for_model", "decode_opened"):  # bytes (decode threads) / opened on the loop (inline)
        monkeypatch.setattr(app.deps, name, spy(getattr(app.deps, name)))
    tiny = [("files", (f"{i}.png", bilevel_png(32), "image/png")) for i in range(3)]
    assert httpx.post(f"{server.url}/classify", files=tiny, timeout=30).status_code == 200
    assert threads == [(32, server.loop_thread)] * 3
    threads.clear()
    mixed = [*tiny[:1], ("files", ("big.png", bilevel_png(200), "image/png"))]
    assert httpx.post(f"{server.url}/classify", files=mixed, timeout=30).status_code == 200
    assert [w for w, _ in threads] == [32, 200] and all(t != server.loop_thread for _, t in threads), threads


def alpha_png(side: int, mode: str) -> bytes:
    """A side x side PNG with transparency: RGBA (half-transparent red) or a palette with a transparent index."""
    if mode == "RGBA":
        im = Image.new("RGBA", (side, side), (200, 30, 30, 128))
        kw = {}
    else:
        im = Image.new("P", (side, side), 0)
        im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        im.paste(1, (0, 0, side // 3, side))
        kw = {"transparency": 0}
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


HEAVY = {"1-bit": lambda: bilevel_png(4000), "RGBA": lambda: alpha_png(4000, "RGBA"),
         "palette+transparency": lambda: alpha_png(4000, "P")}


@pytest.mark.parametrize("kind", list(HEAVY))
def test_live_answers_fast_while_a_heavy_request_runs(server: SimpleNamespace, kind: str) -> None:
    """4 x 16 MP images in one request (a few KB on the wire); /health/live polled meanwhile. With transparency,
    Pillow's alpha_composite (which holds the GIL) once held one probe 130-440 ms on a 40 MP image; the decode now
    composites after the resize, on the premultiplied image (`app.images.premultiplied`)."""
    data = HEAVY[kind]()
    files = [("files", (f"{i}.png", data, "image/png")) for i in range(4)]

    def worst_probe() -> list[float]:
        result: dict[str, httpx.Response] = {}

        def heavy() -> None:
            result["r"] = httpx.post(f"{server.url}/classify", files=files, timeout=60)

        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health/live").status_code == 200  # connection open before the heavy request
            t = threading.Thread(target=heavy)
            t.start()
            latencies = []
            while t.is_alive() or not latencies:
                t0 = time.perf_counter()
                assert c.get("/health/live").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)
            t.join()
        assert result["r"].status_code == 200, result["r"].text
        assert len(latencies) >= 3, "the heavy request finished too fast to measure anything"
        return sorted(round(x * 1000, 1) for x in latencies)

    # before the fix, the 4 resizes on the loop held one probe ~170 ms (alpha_composite 130-440 ms) on every
    # request; now the worst is a few ms idle, 50 ms on a 2-core machine running two training jobs beside the suite,
    # and once 106 ms with the suite niced below a training job (one hiccup). A held loop fails both tries; a
    # scheduling hiccup on a loaded machine does not repeat
    tries = [worst_probe()]
    if tries[0][-1] >= 100:
        tries.append(worst_probe())
    assert tries[-1][-1] < 100, str([t[-8:] for t in tries])
