"""Adversarial bank rows (`training.adversarial_bank`, `satml harden-bank`): which rows, their labels, the artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.colour_toy import colour_images, toy_model
from tests.training.test_cli import _train_tiny_supervised
from training import knn, knn_attacks
from training.adversarial_bank import HardenSpec, adversarial_rows, harden_artifact
from training.artifact import ArtifactError, load_artifact, verify_artifact
from training.cli import main
from training.evaluate import robust_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_the_flipped_images_embedded_and_labelled_with_their_own_label() -> None:
    """Exactly the images the attack flips give a row: the served encoder's embedding of the adversarial image, with
    the image's label; the same attack and seed per chunk as `robust_mask`, so the count is the attack's."""
    model = toy_model()
    images, labels = colour_images(40, seed=5)
    spec = HardenSpec(eps=0.2, steps=5, chunk=16)
    emb, row_labels, source = adversarial_rows(model, images, labels, spec)
    attack = knn_attacks.build("pgd_ce", model, knn_attacks.Budget(0.2, 5, None), knn_attacks.Surrogate(0.1))
    flipped, advs = [], []
    for i in range(0, 40, 16):
        ok, adv = robust_mask(model, images[i:i + 16], labels[i:i + 16], attack, seed=0, keep_adversarial=True)
        assert adv is not None
        flipped.append(np.nonzero(~ok)[0] + i)
        advs.append(adv[torch.as_tensor(~ok)])
    expected = np.concatenate(flipped)
    assert 0 < len(expected) < 40  # the radius flips some, not all: the test can tell a selection from none or all
    assert source.tolist() == expected.tolist()
    assert row_labels.tolist() == labels[expected].tolist()
    torch.testing.assert_close(emb, knn.embed(model.encoder, torch.cat(advs)), atol=1e-5, rtol=0)
    # each row sits in another class's vote: the adversarial image's embedding, not the clean one's
    assert not (model.predict(torch.cat(advs)) == row_labels).any()


def test_max_rows_keeps_the_first_flipped_rows_in_image_order() -> None:
    model = toy_model()
    images, labels = colour_images(40, seed=5)
    emb, row_labels, source = adversarial_rows(model, images, labels, HardenSpec(eps=0.2, steps=5, chunk=16))
    cap = len(source) // 2
    capped = adversarial_rows(model, images, labels, HardenSpec(eps=0.2, steps=5, chunk=16, max_rows=cap))
    assert cap > 0 and capped[2].tolist() == source[:cap].tolist()
    assert torch.equal(capped[0], emb[:cap]) and torch.equal(capped[1], row_labels[:cap])
    assert HardenSpec(max_rows=cap).record(attacked=40, rows=cap).max_rows == cap


def test_no_flip_no_rows() -> None:
    model = toy_model()
    images, labels = colour_images(12, seed=6)
    emb, row_labels, source = adversarial_rows(model, images, labels, HardenSpec(eps=0.01, steps=2))
    assert emb.shape == (0, model.bank.shape[1]) and row_labels.numel() == 0 and source.numel() == 0


def test_spec_refuses_nonsense() -> None:
    for bad in ({"eps": 0.0}, {"steps": 0}, {"temperature": 0.0}, {"chunk": 0}, {"max_rows": -1}):
        with pytest.raises(ValueError):
            HardenSpec(**bad)


def test_harden_bank_appends_rows_records_them_and_recalibrates(tiny_cifar: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`satml harden-bank`: a copy whose bank is the clean rows unchanged plus the flipped rows, the manifest's
    `bank_adversarial` saying how many of how many, the split rebuilds still counting images, the calibration
    recomputed over the new bank, the source artifact untouched; a second hardening and the wrong data refused."""
    common = ["--data", str(tiny_cifar), "--device", "cpu"]
    _train_tiny_supervised(tmp_path / "run", common, capsys)
    src = tmp_path / "art"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(src), "--name", "t",
                 "--k", "5", "--n-robust", "0", *common]) == 0
    assert main(["calibrate", str(src), "--data", str(tiny_cifar)]) == 0
    before = (src / "manifest.json").read_bytes()
    capsys.readouterr()
    out = tmp_path / "hard"
    from training import calibrate

    recalibrated: list[Path] = []
    real = calibrate.calibrate_artifact

    def spy(path: Path, *args: object, **kw: object) -> object:
        recalibrated.append(Path(path))
        return real(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(calibrate, "calibrate_artifact", spy)
    assert main(["harden-bank", str(src), "--out", str(out), "--eps", "0.25", "--steps", "3", "--max-rows", "40",
                 "--no-progress", *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (src / "manifest.json").read_bytes() == before
    old, new = load_artifact(src), load_artifact(out)
    record = verify_artifact(out).bank_adversarial
    assert record is not None and record.attacked == 64 and record.steps == 3 and record.attack == "pgd_ce"
    assert printed["bank_adversarial"]["rows"] == record.rows
    assert 0 < record.rows <= 40 and record.max_rows == 40 and new.bank.shape[0] == 64 + record.rows
    assert torch.equal(new.bank[:64], old.bank) and torch.equal(new.bank_labels[:64], old.bank_labels)
    assert new.spec.bank_size == 64 and new.spec.model_sha256 != old.spec.model_sha256
    assert new.spec.calibration is not None and new.spec.calibration.n == 16
    assert recalibrated == [out] and new.calibration is not None  # the votes over the new bank, re-hashed
    from training.evaluate import KnnModel
    from training.export import evaluate_model

    assert old.spec.metrics is not None and new.spec.metrics is not None
    again = evaluate_model(KnnModel.from_artifact(new), str(tiny_cifar), None, 0, 8 / 255, 10, progress=False)
    assert new.spec.metrics.clean_n == old.spec.metrics.clean_n == again["clean_n"]
    assert new.spec.metrics.clean_acc == again["clean_acc"]  # measured over the new bank, not copied
    assert f"plus {record.rows} adversarial rows" in (out / "card.md").read_text()
    with pytest.raises(ArtifactError, match="already holds"):
        harden_artifact(out, tiny_cifar, HardenSpec(steps=1))
    other = tmp_path / "other_data"
    shutil.copytree(tiny_cifar, other)
    batch = other / "cifar-10-batches-py" / "data_batch_1"
    from tests.training.test_data import _py2_pickle
    from training.data import _unpickle

    with batch.open("rb") as f:
        d = _unpickle(f, str(batch))
    d["labels"] = [(v + 1) % 10 for v in d["labels"]]  # same images, other labels: not the bank's data
    _py2_pickle({key.encode(): v for key, v in d.items()}, batch)
    with pytest.raises(ArtifactError, match="not the data"):
        harden_artifact(src, other, HardenSpec(steps=1))


def test_a_hand_made_artifact_without_a_split_is_refused(tiny_artifact: Path, tiny_cifar: Path) -> None:
    with pytest.raises(ArtifactError, match="records no training split"):
        harden_artifact(tiny_artifact, tiny_cifar, HardenSpec(steps=1))

