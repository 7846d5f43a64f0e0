"""Your own data, end to end (issue 15, part 2): the README tutorial on a tiny slice of scikit-learn's digits.

An image folder written by `training.digits` -> `satml train` -> `satml export` -> the FastAPI app ->
`/classify` answers with the folder's class names. Also the CLI's clear errors (one sentence naming the
file or class, exit status 2) for the ways a user's folder goes wrong.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.digits import write_digits

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn (dev extra) ships the digits")
pytestmark = pytest.mark.usefixtures("one_thread")

PER_CLASS = 5  # 10 digits x 5 = 50 images; the split holds 1 of each out, 40 train
TINY = ["--arch", "cnn8", "--width", "4", "--proj-dim", "16"]


@needs_sklearn
def test_write_digits_is_a_class_folder(tmp_path: Path) -> None:
    written = write_digits(tmp_path, size=8, per_class=2)
    assert written == {str(d): 2 for d in range(10)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(d) for d in range(10)]
    img = Image.open(next((tmp_path / "7").iterdir()))
    assert img.size == (8, 8) and img.mode == "L" and np.asarray(img).max() > 200  # 0..16 scaled to 0..255
    assert Image.open(next(iter(sorted((tmp_path / "3").iterdir())))).size == (8, 8)
    write_digits(tmp_path / "big", size=16, per_class=1)
    assert Image.open(next((tmp_path / "big" / "0").iterdir())).size == (16, 16)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@needs_sklearn
def test_image_folder_train_export_serve_classify(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    data, run, art = tmp_path / "digits", tmp_path / "run", tmp_path / "artifacts" / "digits"
    write_digits(data, size=8, per_class=PER_CLASS)
    trained = _run(["train", "--method", "ssl", "--data", str(data), "--run-dir", str(run), *TINY, "--epochs", "1",
                    "--batch-size", "16", "--knn-k", "5", "--device", "cpu", "--no-progress"], capsys)
    assert trained["finished"] and trained["step"] == 40 // 16  # 10 held out: one per class
    assert 0.0 <= trained["val_knn_acc"] <= 1.0
    # k = 1: a bank image's nearest neighbour is itself, so /classify must answer its own folder's name
    exported = _run(["export", "--checkpoint", trained["checkpoint"], "--data", str(data), "--out", str(art),
                     "--name", "digits", "--dataset", "sklearn-digits", "--k", "1", "--n-robust", "4", "--steps", "2",
                     "--device", "cpu"], capsys)
    assert exported["metrics"]["eval_split"] == "validation" and exported["metrics"]["clean_n"] == 10
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["classes"] == [str(d) for d in range(10)] and manifest["input"]["size"] == 8
    assert manifest["bank_size"] == 40 and manifest["training"]["hyperparameters"]["val_size"] is None
    assert "10 validation" in (art / "card.md").read_text()

    for field in Settings.model_fields:  # the developer's shell must not steer the app
        monkeypatch.delenv(f"SATML_{field.upper()}", raising=False)
    from training.data import SplitSpec, load_split

    bank, val = load_split(data, SplitSpec())
    assert val is not None
    picks = [int(np.flatnonzero(bank.labels == d)[0]) for d in (0, 3, 7, 9)]
    with TestClient(create_app(Settings(artifacts_dir=art.parent, default_model="digits"))) as client:
        assert client.get("/health/ready").status_code == 200
        assert client.get("/models/digits").json()["classes"] == [str(d) for d in range(10)]
        files = []
        for i in picks:
            buf = tmp_path / f"{i}.png"
            Image.fromarray(bank.images[i]).save(buf)
            files.append(("files", (buf.name, buf.read_bytes(), "image/png")))
        r = client.post("/classify", files=files)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["results"]] == ["0", "3", "7", "9"]


def _folder(root: Path, sizes: dict[str, list[int]]) -> Path:
    for cls, side_list in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, side in enumerate(side_list):
            Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize(("make", "match"), [
    (lambda r: (_folder(r, {"a": [8, 8]}), (r / "empty").mkdir()), r"empty: class folder holds no images"),
    (lambda r: (_folder(r, {"a": [8, 8], "b": [8]}), (r / "b" / "bad.png").write_bytes(b"nope")),
     r"b/bad\.png: not a readable image"),
    (lambda r: _folder(r, {"a": [8, 8], "b": [8, 6]}), r"b/1\.png: size 6x6 differs from 8x8 of .*a/0\.png"),
    (lambda r: _folder(r, {"a": [8, 8, 8], "b": [8]}), r"class 'b' has 1 image\(s\): too few"),
], ids=["empty_class", "unreadable", "mixed_sizes", "class_too_small"])
def test_folder_errors_are_one_sentence_and_exit_2(tmp_path: Path, make, match: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    make(tmp_path / "data")
    with caplog.at_level(logging.ERROR, logger="satml"):
        assert main(["train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), *TINY,
                     "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().out == ""
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().count("\n") == 0
    assert re.search(match, caplog.records[0].getMessage())
