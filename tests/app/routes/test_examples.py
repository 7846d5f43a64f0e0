"""POST/GET/DELETE /models/{name}/examples over the toy artifacts (issue 15): access, limits, a new class
learnt live and undone, persistence across a restart, a corrupt overlay, concurrent updates."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import CLASSES, SIZE, png, toy_images

KEY = "s3cret-key"


def yellow(n: int, seed: int) -> np.ndarray:
    """uint8 [n, S, S, 3] noisy yellow: a colour none of the toy classes has."""
    rng = np.random.default_rng(seed)
    x = np.clip(np.array([0.9, 0.85, 0.1])[None, None, None] + rng.uniform(-0.1, 0.1, (n, SIZE, SIZE, 3)), 0, 1)
    return (x * 255).round().astype(np.uint8)


def files(images: np.ndarray, prefix: str = "y") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{prefix}{i}.png", png(x), "image/png")) for i, x in enumerate(images)]


def labels_of(c: TestClient, images: np.ndarray) -> list[str]:
    r = c.post("/classify", files=files(images))
    assert r.status_code == 200, r.text
    return [res["label"] for res in r.json()["results"]]


def open_client(root: Path, state: Path, **kw: Any) -> TestClient:
    kw.setdefault("examples_open", True)
    return TestClient(create_app(make_settings(root, state_dir=state, **kw)), raise_server_exceptions=False)


@pytest.fixture
def live(good_root: Path, tmp_path: Path) -> Iterator[TestClient]:
    with open_client(good_root, tmp_path / "state") as c:
        yield c


def test_closed_without_a_key_unless_opened(good_root: Path, tmp_path: Path) -> None:
    with open_client(good_root, tmp_path, examples_open=False) as c:
        for r in (c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 0))),
                  c.get("/models/default/examples"), c.delete("/models/default/examples?label=red"),
                  c.delete("/models/default/examples/abc")):
            assert r.status_code == 403 and r.json()["error"]["code"] == "examples_closed", r.text
        assert not (tmp_path / "default").exists()


def test_api_key_guards_even_when_opened(good_root: Path, tmp_path: Path) -> None:
    with open_client(good_root, tmp_path, api_key=KEY) as c:
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 0)))
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = c.get("/models/default/examples", headers={"X-API-Key": "wrong"})
        assert r.status_code == 401
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 0)),
                   headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text


def test_no_state_dir_refuses_writes(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, examples_open=True))) as c:
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 0)))
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_state_dir"
        body = c.get("/models/default/examples").json()
        assert body["persistent"] is False and body["examples"] == [] and body["version"] == 0


def test_a_new_class_is_learnt_listed_and_undone(live: TestClient) -> None:
    queries = yellow(4, 99)
    assert "yellow" not in labels_of(live, queries)
    shots = yellow(6, 1)
    r = live.post("/models/default/examples", data={"label": "yellow"}, files=files(shots))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["new_class"] is True and body["class_id"] == len(CLASSES) and body["classes"] == len(CLASSES) + 1
    assert len(body["ids"]) == 6 == len(set(body["ids"])) and body["version"] == 1 and body["bank_size"] == 192 + 6
    assert labels_of(live, queries) == ["yellow"] * 4  # k = 5: 6 close examples win the majority vote
    images, y = toy_images(2, seed=5)
    assert labels_of(live, images) == [CLASSES[i] for i in y]  # the old classes still answer
    model = live.get("/models/default").json()
    assert model["classes"] == [*CLASSES, "yellow"] and model["bank_size"] == 198 and model["bank_version"] == 1
    assert live.get("/health/ready").json()["models"]["default"]["classes"] == 4
    r = live.post("/classify", files=files(queries[:1]), data={"top_k": "4"})
    assert r.status_code == 200 and r.json()["results"][0]["votes"][0] == {"label": "yellow", "class_id": 3,
                                                                          "share": 1.0}

    listed = live.get("/models/default/examples").json()
    assert listed["version"] == 1 and listed["shipped_size"] == 192 and listed["persistent"] is True
    assert [e["id"] for e in listed["examples"]] == body["ids"]
    assert [e["filename"] for e in listed["examples"]] == [f"y{i}.png" for i in range(6)]
    assert listed["examples"][0]["sha256"] == hashlib.sha256(png(shots[0])).hexdigest()
    assert listed["examples"][0]["label"] == "yellow" and listed["examples"][0]["time"].endswith("Z")
    assert live.get("/models/other/examples").json()["examples"] == []  # per model

    r = live.delete(f"/models/default/examples/{body['ids'][0]}")
    assert r.status_code == 200 and r.json() == {"model": "default", "ids": [body["ids"][0]], "version": 2,
                                                  "bank_size": 197}
    r = live.delete(f"/models/default/examples/{body['ids'][0]}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "example_not_found"
    r = live.delete("/models/default/examples", params={"label": "yellow"})
    assert r.status_code == 200 and sorted(r.json()["ids"]) == sorted(body["ids"][1:]) and r.json()["bank_size"] == 192
    assert "yellow" not in labels_of(live, queries)
    assert live.delete("/models/default/examples", params={"label": "yellow"}).status_code == 404
    assert live.delete("/models/default/examples").status_code == 422  # label is required


@pytest.mark.parametrize("vote", ["majority", "prior"])
def test_one_example_wins_under_the_prior_vote_only(good_root: Path, tmp_path: Path, vote: str) -> None:
    """k = 5 over 64 examples per toy class: one yellow example is at most 1 of 5 neighbours, never a majority;
    the prior vote weighs it by (64 / 1) ** 0.75 = 22.6, so it wins where it is a neighbour at all, while the
    old classes (whose neighbourhoods it is not in) keep their answers and the reported shares stay raw votes."""
    queries = yellow(4, 99)
    with open_client(good_root, tmp_path / vote, vote=vote) as c:
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 1)))
        assert r.status_code == 200, r.text
        got = labels_of(c, queries)
        if vote == "prior":
            assert got == ["yellow"] * 4
        else:
            assert "yellow" not in got
        images, y = toy_images(2, seed=5)
        assert labels_of(c, images) == [CLASSES[i] for i in y]
        r = c.post("/classify", files=files(queries[:1]), data={"top_k": "4"})
        shares = {v["label"]: v["share"] for v in r.json()["results"][0]["votes"]}
        assert shares["yellow"] == pytest.approx(0.2)  # 1 of k = 5, whichever class the vote picked


def test_examples_of_an_existing_class(live: TestClient) -> None:
    r = live.post("/models/default/examples", data={"label": "red"}, files=files(yellow(2, 3)))
    assert r.status_code == 200 and r.json()["class_id"] == 0 and r.json()["new_class"] is False
    assert live.get("/models/default").json()["classes"] == CLASSES


@pytest.mark.parametrize("label", ["", " yellow", "yellow ", "../etc", "a/b", "x" * 65, "caf\u00e9", "new\nline"])
def test_class_names_are_validated(live: TestClient, label: str) -> None:
    r = live.post("/models/default/examples", data={"label": label}, files=files(yellow(1, 0)))
    assert r.status_code == 422, r.text
    assert live.get("/models/default/examples").json()["examples"] == []


def test_bad_requests(good_root: Path, tmp_path: Path) -> None:
    with open_client(good_root, tmp_path, examples_max_per_request=3, examples_max_per_model=5) as c:
        r = c.post("/models/nope/examples", data={"label": "yellow"}, files=files(yellow(1, 0)))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(4, 0)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"
        r = c.post("/models/default/examples", data={"label": "yellow"},
                   files=[("files", ("x.png", b"not an image", "image/png"))])
        assert r.status_code == 415, r.text
        r = c.post("/models/default/examples", files=files(yellow(1, 0)))
        assert r.status_code == 422  # no label
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(3, 0)))
        assert r.status_code == 200
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(3, 1)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "bank_full"
        assert len(c.get("/models/default/examples").json()["examples"]) == 3  # nothing of the refused request


def test_restart_keeps_acknowledged_additions(good_root: Path, tmp_path: Path) -> None:
    with open_client(good_root, tmp_path) as c:
        ids = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(6, 1))).json()["ids"]
        c.post("/models/default/examples", data={"label": "typo"}, files=files(yellow(1, 2)))
        c.delete("/models/default/examples", params={"label": "typo"})
        c.delete(f"/models/default/examples/{ids[5]}")
    assert not list((tmp_path / "default").glob(".*tmp*"))  # no temp file left behind
    with open_client(good_root, tmp_path) as c:
        listed = c.get("/models/default/examples").json()
        assert [e["id"] for e in listed["examples"]] == ids[:5] and listed["version"] == 4
        assert listed["classes"] == [*CLASSES, "yellow"]  # "typo" has no example left: dropped at start-up
        assert labels_of(c, yellow(3, 7)) == ["yellow"] * 3
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(1, 3)))
        assert r.json()["version"] == 5 and r.json()["bank_size"] == 192 + 6
    # the overlay holds what the README says: a manifest with hashes and one safetensors file
    doc = json.loads((tmp_path / "default" / "overlay.json").read_text())
    assert doc["format_version"] == 1 and doc["version"] == 5 and len(doc["examples"]) == 6
    emb = tmp_path / "default" / doc["embeddings"]["file"]
    assert hashlib.sha256(emb.read_bytes()).hexdigest() == doc["embeddings"]["sha256"]
    assert [p.name for p in (tmp_path / "default").iterdir() if p.suffix == ".safetensors"] == [emb.name]


@pytest.mark.parametrize("damage", ["embeddings_byte", "manifest_json", "manifest_hash", "other_encoder"])
def test_corrupt_overlay_is_skipped_and_the_shipped_bank_serves(good_root: Path, tmp_path: Path, damage: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with open_client(good_root, tmp_path) as c:
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(6, 1)))
        assert r.status_code == 200
    folder = tmp_path / "default"
    doc = json.loads((folder / "overlay.json").read_text())
    if damage == "embeddings_byte":
        p = folder / doc["embeddings"]["file"]
        data = bytearray(p.read_bytes())
        data[-3] ^= 0x40
        p.write_bytes(bytes(data))
    elif damage == "manifest_json":
        (folder / "overlay.json").write_text((folder / "overlay.json").read_text()[:-40])
    elif damage == "manifest_hash":
        doc["embeddings"]["sha256"] = "0" * 64
        (folder / "overlay.json").write_text(json.dumps(doc))
    else:
        doc["artifact"]["encoder_sha256"] = "f" * 64
        (folder / "overlay.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR, logger="app.bank"), open_client(good_root, tmp_path) as c:
        skipped = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "overlay_skipped"]
        assert len(skipped) == 1 and skipped[0].fields["model"] == "default" and skipped[0].fields["reason"]
        assert c.get("/health/ready").status_code == 200
        listed = c.get("/models/default/examples").json()
        assert listed["examples"] == [] and listed["bank_size"] == 192 and listed["classes"] == CLASSES
        images, y = toy_images(2, seed=5)
        assert labels_of(c, images) == [CLASSES[i] for i in y]
        assert list(folder.glob("overlay.json.refused-*"))  # kept for inspection, out of the next save's way
        r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(2, 1)))
        assert r.status_code == 200 and r.json()["bank_size"] == 194


def test_concurrent_updates_are_serialised_and_classify_keeps_answering(good_root: Path, tmp_path: Path) -> None:
    application = create_app(make_settings(good_root, state_dir=tmp_path, examples_open=True))
    images, y = toy_images(2, seed=8)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        transport = httpx.ASGITransport(app=application)
        async with application.router.lifespan_context(application), \
                httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            adds = [c.post("/models/default/examples", data={"label": f"c{i % 3}"}, files=files(yellow(2, i)))
                    for i in range(9)]
            reads = [c.post("/classify", files=files(images)) for _ in range(9)]
            out = await asyncio.gather(*adds, *reads)
            final = await c.get("/models/default/examples")
            return [*out, final][:9], [*out[9:], final]

    adds, reads = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in adds + reads), [r.text for r in adds + reads if r.status_code != 200]
    assert sorted(r.json()["version"] for r in adds) == list(range(1, 10))  # one version per update, none lost
    assert sorted(r.json()["bank_size"] for r in adds) == list(range(194, 212, 2))
    final = reads[-1].json()
    assert len(final["examples"]) == 18 and final["classes"][:3] == CLASSES
    assert sorted(final["classes"][3:]) == ["c0", "c1", "c2"]
    for r in reads[:-1]:
        assert [res["label"] for res in r.json()["results"]] == [CLASSES[i] for i in y]


def test_a_failed_state_write_is_507_and_changes_nothing(live: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # a full disk (ENOSPC) while the overlay is written: the update is refused as a whole, nothing is published,
    # and the model keeps serving and accepts the same update once the disk has room again
    import errno

    import app.bank

    queries = yellow(4, 99)
    before = labels_of(live, queries)

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(app.bank, "write_atomic", disk_full)
        r = live.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(6, 1)))
        assert r.status_code == 507 and r.json()["error"]["code"] == "state_not_saved", r.text
        assert "No space left on device" in r.json()["error"]["message"]
        assert live.get("/models/default/examples").json()["examples"] == []
        assert live.get("/models/default").json()["bank_version"] == 0
        assert labels_of(live, queries) == before
    r = live.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(6, 1)))
    assert r.status_code == 200 and r.json()["version"] == 1
    ids = r.json()["ids"]
    with monkeypatch.context() as m:  # a removal that cannot be persisted is refused too
        m.setattr(app.bank, "write_atomic", disk_full)
        r = live.delete(f"/models/default/examples/{ids[0]}")
        assert r.status_code == 507 and r.json()["error"]["code"] == "state_not_saved"
    assert [e["id"] for e in live.get("/models/default/examples").json()["examples"]] == ids
    assert labels_of(live, queries) == ["yellow"] * 4
