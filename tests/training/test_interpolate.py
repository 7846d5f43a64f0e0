"""Weight interpolation (`satml interpolate`): the mix itself, its refusals, and a real mix of two tiny runs that
validates as its endpoints at t = 0 and 1 and exports with its provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_train import tiny_config
from training.artifact import load_artifact
from training.checkpoint import encoder_from_checkpoint, load_checkpoint, served_weights
from training.cli import main
from training.interpolate import interpolate_checkpoints, interpolate_state
from training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "half": torch.randn(5, generator=g).half(),
            "count": torch.tensor(seed, dtype=torch.int64)}


def test_interpolate_state_is_the_weighted_mean_and_keeps_integer_counters_from_b() -> None:
    a, b = _state(1), _state(2)
    for t in (0.0, 0.25, 1.0):
        mix = interpolate_state(a, b, t)
        torch.testing.assert_close(mix["w"], (1 - t) * a["w"] + t * b["w"])
        assert mix["half"].dtype == torch.float16
        torch.testing.assert_close(mix["half"].float(), ((1 - t) * a["half"].float() + t * b["half"].float()).half()
                                   .float())
        assert mix["count"].item() == 2 and mix["count"].dtype == torch.int64
    assert torch.equal(interpolate_state(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate_state(a, b, 1.0)["w"],
                                                                                   b["w"])


@pytest.mark.parametrize(("change", "match"), [
    (lambda s: s.pop("w"), "different tensors"),
    (lambda s: s.update(w=torch.zeros(4, 3)), "shape"),
])
def test_interpolate_state_refuses_different_models(change: Any, match: str) -> None:
    b = _state(2)
    change(b)
    with pytest.raises(ValueError, match=match):
        interpolate_state(_state(1), b, 0.5)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan")])
def test_interpolate_state_refuses_a_weight_outside_0_1(t: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_state(_state(1), _state(2), t)


@pytest.fixture(scope="module")
def two_runs(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny pgd_at runs of one model, the second started from the first (a fine-tune, as issue 10's)."""
    root = tmp_path_factory.mktemp("runs")
    common = {"method": "pgd_at", "eps": 8 / 255, "alpha": 4 / 255, "ema_decay": 0.5}
    a = train(tiny_config(tiny_cifar, root / "a", **common))
    b = train(tiny_config(tiny_cifar, root / "b", init=a["checkpoint"], lr=0.5, seed=1, **common))
    return Path(a["checkpoint"]), Path(b["checkpoint"])


def _final(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_command_validates_the_mix_as_its_endpoints_at_t_0_and_1(two_runs: tuple[Path, Path], tiny_cifar: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_runs
    for t, end in ((0.0, a), (1.0, b)):
        out = tmp_path / f"t{t}"
        assert main(["interpolate", str(a), str(b), "--t", str(t), "--run-dir", str(out), "--data", str(tiny_cifar),
                     "--no-progress"]) == 0
        printed = json.loads(capsys.readouterr().out)
        record = _final(out)
        assert record == printed and record["final"] and record["interpolated"]["t"] == t
        # served weights (the EMA's) of the endpoint, validated exactly as its training run did
        assert record["val_knn_acc"] == _final(end.parent)["val_knn_acc"]
        mix = load_checkpoint(out / "checkpoint.pt")
        for k, v in served_weights(load_checkpoint(end)).items():  # BatchNorm's batch counters are B's
            assert torch.equal(mix["model"][k], v if v.is_floating_point() else served_weights(
                load_checkpoint(b))[k]), k
        assert "optimizer" not in mix and "ema" not in mix  # not resumable: it was not trained
        assert json.loads((out / "config.json").read_text()) == load_checkpoint(b)["config"]


def test_a_mix_between_differs_from_both_ends_and_exports_with_its_provenance(
        two_runs: tuple[Path, Path], tiny_cifar: Path, tmp_path: Path) -> None:
    a, b = two_runs
    assert main(["interpolate", str(a), str(b), "--t", "0.5", "--run-dir", str(tmp_path / "mix"), "--data",
                 str(tiny_cifar), "--eval-robust", "4", "--no-progress"]) == 0
    record = _final(tmp_path / "mix")
    assert 0 <= record["val_pgd10_acc"] <= 1 and len(record["interpolated"]["a_sha256"]) == 64
    mix = load_checkpoint(tmp_path / "mix" / "checkpoint.pt")
    wa, wb = served_weights(load_checkpoint(a)), served_weights(load_checkpoint(b))
    key = "head.weight"
    assert not torch.equal(wa[key], wb[key])
    torch.testing.assert_close(mix["model"][key], (wa[key] + wb[key]) / 2)
    encoder_from_checkpoint(mix)  # the encoder rebuilds from the mix alone
    assert main(["export", "--checkpoint", str(tmp_path / "mix" / "checkpoint.pt"), "--out", str(tmp_path / "art"),
                 "--name", "mix", "--data", str(tiny_cifar), "--k", "5", "--n-robust", "0"]) == 0
    hp = load_artifact(tmp_path / "art").manifest["training"]["hyperparameters"]
    assert hp["interpolated"]["t"] == 0.5 and hp["interpolated"]["b_sha256"] == record["interpolated"]["b_sha256"]


def test_the_command_refuses_two_different_encoders(two_runs: tuple[Path, Path], tiny_cifar: Path,
                                                    tmp_path: Path) -> None:
    a, _ = two_runs
    wide = train(tiny_config(tiny_cifar, tmp_path / "wide", method="pgd_at", eps=8 / 255, alpha=4 / 255, width=8))
    with pytest.raises(ValueError, match="different encoders"):
        interpolate_checkpoints(load_checkpoint(a), load_checkpoint(wide["checkpoint"]), 0.5)
    assert main(["interpolate", str(a), wide["checkpoint"], "--t", "0.5", "--run-dir", str(tmp_path / "x"),
                 "--data", str(tiny_cifar)]) == 2
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
