"""64 parallel /classify requests, each with its own image, each get their own (unbatched) answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import CLASSES, K, png, toy_images
from training import knn
from training.artifact import load_artifact

N = 64


def unbatched(root: Path, images: torch.Tensor) -> list[tuple[str, list[float]]]:
    """(label, vote shares per class) for each image, one forward + k-NN at a time, straight from training/."""
    art = load_artifact(root / "default")
    out = []
    with torch.no_grad():
        for x in images:
            pred, counts = knn.knn_predict(art.encoder(x[None]), art.bank, art.bank_labels, len(CLASSES), K)
            out.append((CLASSES[int(pred[0])], (counts[0] / K).tolist()))
    return out


@pytest.mark.parametrize("loop_batching", ["off", "on"])
def test_parallel_requests_get_their_own_answers(good_root: Path, loop_batching: str) -> None:
    """Through the batch worker's thread and batched on the event loop (SATML_LOOP_BATCHING) alike."""
    images, labels = toy_images(N // 3 + 1, seed=41)
    images, labels = images[:N], labels[:N]
    expected = unbatched(good_root, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert [e[0] for e in expected] == [CLASSES[c] for c in labels]
    app = create_app(make_settings(good_root, max_wait_ms=20, max_batch=32, loop_batching=loop_batching))

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            assert (app.state.registry.models["default"].loop_batcher is not None) == (loop_batching == "on")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                return await asyncio.gather(*[
                    c.post("/classify", files={"file": (f"{i}.png", png(images[i]), "image/png")},
                           data={"top_k": str(len(CLASSES))})
                    for i in range(N)])

    responses = asyncio.run(scenario())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        [res] = r.json()["results"]
        assert res["filename"] == f"{i}.png" and res["label"] == expected[i][0]
        shares = {v["class_id"]: v["share"] for v in res["votes"]}
        assert [shares[c] for c in range(len(CLASSES))] == expected[i][1]
    metrics = app.state.metrics.registry
    batches = metrics.get_sample_value("satml_inference_batch_size_count", {"model": "default"})
    assert metrics.get_sample_value("satml_inference_batch_size_sum", {"model": "default"}) == N
    assert batches < N  # requests were batched together
