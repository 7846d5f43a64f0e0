"""`satml`: every subcommand explains every option, and train -> bank -> export -> evaluate runs end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.conftest import TINY_ENCODER
from training.artifact import load_artifact, verify_artifact
from training.cli import build_parser, main
from training.config import TrainConfig

SUBCOMMANDS = ("train", "bank", "export", "evaluate")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_console_script_help() -> None:
    """The installed entry point (pyproject [project.scripts]) runs and lists the subcommands."""
    script = Path(sys.executable).parent / "satml"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in SUBCOMMANDS)


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    assert out.startswith("usage: satml") and all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_explains_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([command, "--help"], capsys)
    assert out.startswith(f"usage: satml {command}")
    for action in _subparsers()[command]._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings} has no help"
        assert action.option_strings[-1] in out
    # each default is stated once, by the formatter (help lines rejoined where argparse wrapped them)
    assert not any(line.count("(default:") > 1 for line in out.replace("\n                        ", " ").splitlines())


def test_train_exposes_every_config_field() -> None:
    parser = _subparsers()["train"]
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in fields(TrainConfig):
        if f.name != "extra":
            assert "--" + f.name.replace("_", "-") in flags, f.name
    defaults = vars(parser.parse_args([]))
    assert {k: defaults[k] for k in ("method", "epochs", "optimizer", "progress")} == {
        "method": "ssl", "epochs": TrainConfig.epochs, "optimizer": "sgd", "progress": True}


@pytest.mark.parametrize("flag", ["--method", "--optimizer", "--attack", "--keep"])
def test_literal_options_reject_typos(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", flag, "bogus"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_library_errors_exit_2_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--artifact", str(tmp_path / "nope"), "--data", str(tmp_path), "--device", "cpu"]) == 2
    assert main(["train", "--data", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().out == ""  # no JSON result on failure


def test_train_bank_export_evaluate_smoke(tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    data, run, art = str(tiny_cifar), tmp_path / "run", tmp_path / "artifact"
    common = ["--data", data, "--device", "cpu"]
    tiny = ["--arch", TINY_ENCODER["arch"], "--width", str(TINY_ENCODER["width"]),
            "--proj-dim", str(TINY_ENCODER["proj_dim"])]

    def run_json(argv: list[str]) -> dict:
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    trained = run_json(["train", "--method", "supervised", "--run-dir", str(run), *tiny, "--epochs", "1",
                        "--batch-size", "16", "--val-size", "16", "--knn-k", "5", "--no-progress", *common])
    assert trained["finished"] and trained["step"] == 4 and Path(trained["checkpoint"]).is_file()

    bank = run_json(["bank", "--checkpoint", trained["checkpoint"], "--out", str(tmp_path / "bank.safetensors"),
                     "--val-size", "16", *common])
    assert bank["size"] == 64 and bank["dim"] == 8 * TINY_ENCODER["width"]
    stored = load_file(tmp_path / "bank.safetensors")
    assert stored["embeddings"].shape == (64, bank["dim"]) and stored["labels"].shape == (64,)

    exported = run_json(["export", "--checkpoint", trained["checkpoint"], "--out", str(art), "--name", "tiny",
                         "--val-size", "16", "--k", "5", "--n-robust", "4", "--steps", "2", *common])
    manifest = verify_artifact(art)
    assert manifest.training and manifest.metrics and manifest.metrics.robust
    assert manifest.name == "tiny" and manifest.knn.k == 5 and manifest.bank_size == 64
    assert manifest.training.method == "supervised" and manifest.training.steps == 4
    assert manifest.metrics.clean_n == 16 and manifest.metrics.robust[0].n == 4
    assert exported["metrics"]["clean_acc"] == manifest.metrics.clean_acc
    assert load_artifact(art).bank.shape == (64, bank["dim"])

    evaluated = run_json(["evaluate", "--artifact", str(art), "--n-robust", "4", "--steps", "2", *common])
    # the shipped (fp16) bank is what export evaluated: the same numbers come back
    assert evaluated["clean_acc"] == manifest.metrics.clean_acc
    assert evaluated["robust"][0]["acc"] == manifest.metrics.robust[0].acc


def _train_tiny_supervised(run_dir: Path, common: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """One epoch of the tiny supervised encoder into `run_dir` (16 validation images held out): a checkpoint to
    export."""
    tiny = ["--arch", TINY_ENCODER["arch"], "--width", str(TINY_ENCODER["width"]),
            "--proj-dim", str(TINY_ENCODER["proj_dim"])]
    assert main(["train", "--method", "supervised", "--run-dir", str(run_dir), *tiny, "--epochs", "1",
                 "--batch-size", "16", "--val-size", "16", "--knn-k", "5", "--no-progress", *common]) == 0
    capsys.readouterr()


def test_export_bank_mirror_adds_the_mirrored_images(tiny_cifar: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--bank-mirror`: the bank's second half is the served encoder's embedding of the same images mirrored,
    same labels; the manifest counts images (bank_size) and views, so the split rebuilds still check out."""
    import torch

    from training.calibrate import calibrate_artifact
    from training.data import load_dataset, mirrored, recorded_validation
    from training.knn import embed

    common = ["--data", str(tiny_cifar), "--device", "cpu"]
    _train_tiny_supervised(tmp_path / "run", common, capsys)
    art_dir = tmp_path / "mirror"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(art_dir),
                 "--name", "m", "--k", "5", "--n-robust", "0", "--reduce-dim", "8", "--bank-mirror", *common]) == 0
    manifest = verify_artifact(art_dir)
    assert manifest.bank_size == 64 and manifest.bank_views == 2
    art = load_artifact(art_dir)
    assert art.bank.shape[0] == 128 and torch.equal(art.bank_labels[:64], art.bank_labels[64:])
    train = load_dataset(str(tiny_cifar), "train")
    flipped = embed(art.encoder, mirrored(train.images[:64]))
    torch.testing.assert_close(art.bank[64:], flipped.half().float(), atol=2e-3, rtol=0)
    assert not torch.equal(art.bank[:64], art.bank[64:])
    hp = manifest.training.hyperparameters if manifest.training else None
    val = recorded_validation(hp, train, manifest.bank_images(art.bank.shape[0]), "mirror")
    assert val is not None and len(val) == 16
    assert calibrate_artifact(art_dir, tiny_cifar)["n"] == 16  # the split checks against 64 images, not 128 rows
    assert "mirror images" in (art_dir / "card.md").read_text()


def test_export_mirror_average_serves_the_mean_over_the_mirror_image(tiny_cifar: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--mirror-average`: the manifest records it, the loaded encoder and the ONNX graph both average over the
    mirror image (an image and its mirror image get the same embedding), the bank holds those embeddings and the
    PCA is fitted on them; the card says so."""
    import numpy as np
    import torch

    from training.artifact import onnx_session
    from training.data import load_dataset, mirrored
    from training.knn import embed

    common = ["--data", str(tiny_cifar), "--device", "cpu"]
    _train_tiny_supervised(tmp_path / "run", common, capsys)
    art_dir = tmp_path / "avg"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(art_dir),
                 "--name", "m", "--k", "5", "--n-robust", "0", "--reduce-dim", "8", "--mirror-average",
                 *common]) == 0
    manifest = verify_artifact(art_dir)
    assert manifest.encoder.mirror_average and manifest.encoder.reduce_dim == 8
    art = load_artifact(art_dir)
    assert art.encoder.cfg.mirror_average and art.bank.shape == (64, 8)
    images = load_dataset(str(tiny_cifar), "train").images[:64]
    ours, theirs = embed(art.encoder, images), embed(art.encoder, mirrored(images))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(art.bank, ours.half().float(), atol=2e-3, rtol=0)
    assert abs(float(art.bank.mean(0).abs().max())) < 1e-2  # the PCA was centred on the averaged embeddings
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float().div(255)
    sess = onnx_session(art_dir / "encoder.onnx", ["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x.numpy()})[0]
    got_mirror = sess.run(None, {name: np.ascontiguousarray(x.flip(3).numpy())})[0]
    np.testing.assert_allclose(got, ours[:4].numpy(), atol=1e-4)
    np.testing.assert_allclose(got_mirror, got, atol=1e-4)
    assert "averaged over the image and its mirror image" in (art_dir / "card.md").read_text()
