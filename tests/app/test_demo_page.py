"""The demo page (GET /) driven in real headless Chromium against a real uvicorn server.

One server on 127.0.0.1 (ephemeral port) over two tiny exported artifacts (`default`, `supervised`);
the page is used as a person would: upload two files, classify, pick a sample, attack with the other
model compared, upload a non-image and read the error. Screenshot: test-output/demo_page.png.

Needs Debian's `chromium` (or SATML_CHROMIUM=/path) and the `playwright` Python package (its own
browser download is not used); skipped with the reason when either is absent, nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.app.servers import wait_ready

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "app" / "static" / "samples"
SCREENSHOT = ROOT / "test-output" / "demo_page.png"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# the flags this sandboxed, offline machine needs (without the networking ones connections get refused)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
CALIBRATION_SCORES = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5])  # k = 5: nonconformity 0..5


def _chromium() -> str | None:
    for candidate in (os.environ.get("SATML_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed "
                               "(pip install playwright; the browser itself comes from Debian's chromium)")
CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install -y chromium, or set SATML_CHROMIUM)",
                allow_module_level=True)


def _export_tiny(folder: Path, name: str, method: str, seed: int) -> None:
    """A random resnet10 width-4 artifact with a 100-entry bank: enough to exercise every route."""
    from training.export import export_artifact
    from training.models import Encoder, EncoderConfig

    torch.manual_seed(seed)
    encoder = Encoder(EncoderConfig(arch="resnet10", width=4))
    bank = torch.nn.functional.normalize(torch.randn(100, encoder.cfg.embed_dim), dim=1)
    export_artifact(folder / name, encoder, bank, torch.arange(100) % 10, name=name, classes=CLASSES,
                    dataset="synthetic", k=5, onnx=False, description=f"tiny random {method} model for tests",
                    training={"method": method, "hyperparameters": {}, "epochs": 0, "seed": seed,
                              "code_version": "test"})


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn server in a thread, on a socket bound to 127.0.0.1:0."""
    import uvicorn

    from app.config import Settings
    from app.main import create_app

    artifacts = tmp_path_factory.mktemp("artifacts")
    _export_tiny(artifacts, "default", "sat", 0)
    _export_tiny(artifacts, "supervised", "supervised", 1)
    from training.calibrate import write_calibration  # default gets credibility; supervised stays without

    write_calibration(artifacts / "default", CALIBRATION_SCORES, {"n": len(CALIBRATION_SCORES), "split": "test"})
    settings = Settings(artifacts_dir=artifacts, default_model="default", log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(thread.is_alive, f"{url}/health/ready", timeout_s=60)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


class Browser:
    """The page under test and the console errors / uncaught exceptions it has reported."""

    def __init__(self, page) -> None:
        self.page, self.problems = page, []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[Browser]:
    """A fresh Chromium profile with the demo page open."""
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="satml-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        try:
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            b = Browser(pg)
            pg.goto(base_url + "/")
            yield b
        finally:
            context.close()


def _pct(share: float) -> str:
    """The page's percentage format (app.js `pct`)."""
    return f"{100 * share:.{0 if share >= 0.995 or share == 0 else 1}f} %"


def _samples() -> list[dict]:
    return json.loads((SAMPLES / "index.json").read_text())["samples"]


def test_page_loads_models_samples_and_is_labelled(browser: Browser) -> None:
    page = browser.page
    expect = sync_api.expect
    expect(page).to_have_title("Robust image classification - robust self-supervised k-NN demo")
    expect(page.locator("#attack-model option")).to_have_count(2)
    expect(page.locator("#classify-model")).to_have_value("default")
    expect(page.locator("#samples .sample")).to_have_count(len(_samples()))
    expect(page.locator("#compare-models input[value='supervised']")).to_be_checked()
    expect(page.locator("#server-status")).to_contain_text("ready")
    # every visible control has an accessible name, every image an alt attribute
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(e => e.offsetParent !== null)
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.outerHTML)""")
    assert unlabelled == []
    assert page.evaluate("() => [...document.images].filter(i => !i.hasAttribute('alt')).length") == 0


def test_upload_and_classify_matches_the_api(browser: Browser, base_url: str) -> None:
    page = browser.page
    expect = sync_api.expect
    files = [SAMPLES / s["file"] for s in _samples()[:2]]
    page.set_input_files("#file-input", [str(f) for f in files])
    expect(page.locator("#preview img")).to_have_count(2)
    page.fill("#top-k", "3")
    page.click("#classify-button")
    results = page.locator("#classify-results .result")
    expect(results).to_have_count(2)
    api = httpx.post(f"{base_url}/classify", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files],
                     data={"model": "default", "top_k": "3"}, timeout=30).json()
    for i, want in enumerate(api["results"]):
        card = results.nth(i)
        expect(card.locator(".prediction")).to_have_text(want["label"])
        expect(card.locator(".votes li")).to_have_count(len(want["votes"]))
        expect(card).to_contain_text(want["filename"])


def test_trust_line_and_abstention_match_the_api(browser: Browser, base_url: str) -> None:
    page = browser.page
    expect = sync_api.expect
    files = [SAMPLES / s["file"] for s in _samples()[:6]]
    parts = [("files", (f.name, f.read_bytes(), "image/png")) for f in files]
    page.set_input_files("#file-input", [str(f) for f in files])
    page.select_option("#classify-model", "default")
    page.fill("#min-credibility", "")
    page.click("#classify-button")
    cards = page.locator("#classify-results .result")
    expect(cards).to_have_count(len(files))
    plain = httpx.post(f"{base_url}/classify", files=parts, data={"model": "default"}, timeout=30).json()["results"]
    for i, want in enumerate(plain):  # the server's default threshold (0) abstains on nothing
        line = cards.nth(i).locator(".trust")
        expect(line).to_have_attribute("data-abstained", "false")
        expect(line).to_contain_text(f"credibility {_pct(want['credibility'])}")
    levels = sorted({r["credibility"] for r in plain})
    assert len(levels) > 1, f"the fixture should give several credibility levels, got {levels}"
    threshold = (levels[0] + levels[-1]) / 2  # some answers below it, some above
    page.fill("#min-credibility", f"{threshold:.4f}")
    with page.expect_response(lambda r: r.url.endswith("/classify")) as answer:
        page.click("#classify-button")
    assert answer.value.status == 200
    strict = httpx.post(f"{base_url}/classify", files=parts, data={"model": "default", "min_credibility": threshold},
                        timeout=30).json()["results"]
    assert {r["abstained"] for r in strict} == {True, False}
    for i, want in enumerate(strict):
        expect(cards.nth(i).locator(".trust")).to_have_attribute("data-abstained", str(want["abstained"]).lower())
        if want["abstained"]:
            expect(cards.nth(i).locator(".trust")).to_contain_text("abstained")
    page.fill("#min-credibility", "")
    page.select_option("#classify-model", "supervised")  # no calibration: no trust line at all
    with page.expect_response(lambda r: r.url.endswith("/classify")):
        page.click("#classify-button")
    expect(cards).to_have_count(len(files))
    expect(page.locator("#classify-results .trust")).to_have_count(0)


def test_attack_compares_models_and_shows_images(browser: Browser) -> None:
    page = browser.page
    expect = sync_api.expect
    page.click(".sample[data-file='0000_cat.png']")
    expect(page.locator("#preview-caption")).to_contain_text("true label: cat")
    page.click("#classify-button")  # so the screenshot shows a classification too
    expect(page.locator("#classify-results .result")).to_have_count(1)
    page.select_option("#method", "fgsm")
    expect(page.locator("#steps")).to_be_disabled()  # one-step attack: the steps field does not apply
    page.select_option("#method", "pgd")
    expect(page.locator("#steps")).to_be_enabled()
    page.fill("#eps", "8")  # range input: fill sets the value and fires input
    expect(page.locator("#eps-value")).to_have_text("8")
    page.fill("#steps", "3")
    page.click("#attack-button")
    columns = page.locator("#attack-results .attack-col")
    expect(columns).to_have_count(2)
    expect(columns.nth(0)).to_have_attribute("data-model", "default")
    expect(columns.nth(1)).to_have_attribute("data-model", "supervised")
    expect(page.locator("#attack-results table.transfer tbody tr")).to_have_count(1)
    for i in range(2):
        expect(columns.nth(i).locator("h3 .badge")).to_have_text(re.compile(r"^(fooled|held)$"))
        expect(columns.nth(i)).to_contain_text("L∞")
    # the adversarial images and perturbations decoded in the browser (base64 PNG at model size)
    sizes = page.evaluate("""() => [...document.querySelectorAll('#attack-results img.adv, #attack-results img.pert')]
        .map(i => [i.complete, i.naturalWidth, i.naturalHeight])""")
    assert sizes == [[True, 32, 32]] * 4
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_bad_upload_shows_the_server_error(browser: Browser, tmp_path: Path) -> None:
    page = browser.page
    expect = sync_api.expect
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not an image")
    page.set_input_files("#file-input", str(bad))
    page.click("#classify-button")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("415")
    expect(error).to_contain_text("notes.png")
    page.click("#error-close")
    expect(error).to_be_hidden()
    # the only browser-reported errors: the 415 response itself (Chromium logs failed fetches)
    unexpected = [p for p in browser.problems if "status of 415" not in p]
    assert unexpected == [], unexpected
