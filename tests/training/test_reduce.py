"""Export-time PCA of the embedding: exact on low-rank data, folded into the encoder so the served function, the
ONNX file and the bank agree, and carried through the artifact's manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import TINY_ENCODER
from training import knn
from training.artifact import ENCODER_ONNX, load_artifact, verify_artifact
from training.cli import main
from training.models import Encoder, EncoderConfig
from training.reduce import pca_map, reduce_encoder


def _dist(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # exact diagonal (no matmul rounding)


def test_pca_map_is_exact_on_data_in_a_low_dimensional_subspace() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=g)).Q  # [10, 3] orthonormal
    x = torch.randn(200, 3, generator=g) @ basis.T + torch.randn(10, generator=g)  # rank 3, shifted
    weight, bias, kept = pca_map(x, 3)
    assert weight.shape == (3, 10) and bias.shape == (3,)
    torch.testing.assert_close(weight @ weight.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal directions
    z = x @ weight.T + bias
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)  # centred
    torch.testing.assert_close(_dist(z), _dist(x), atol=1e-4, rtol=0)  # distances kept
    assert kept == pytest.approx(1.0, abs=1e-9)
    assert pca_map(x, 1)[2] < 1.0


def test_pca_map_orders_directions_by_variance_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.1])
    weight, _, kept = pca_map(x, 2)
    assert weight[0].abs().argmax() == 0 and weight[1].abs().argmax() == 1
    torch.testing.assert_close(pca_map(x, 2)[0], weight, atol=0, rtol=0)
    assert kept == pytest.approx(float((x.var(0)[:2]).sum() / x.var(0).sum()), rel=0.02)
    with pytest.raises(ValueError, match="dim"):
        pca_map(x, 5)


def test_reduced_encoder_serves_the_reduced_bank(tiny_encoder: Encoder) -> None:
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = tiny_encoder(images)
    reduced, bank, _ = reduce_encoder(tiny_encoder, emb, 6)
    assert reduced.cfg.reduce_dim == 6 and reduced.cfg.embed_dim == 6 and bank.shape == (40, 6)
    assert reduced.cfg.feature_dim == tiny_encoder.cfg.feature_dim
    with torch.no_grad():
        torch.testing.assert_close(reduced(images), bank, atol=1e-5, rtol=1e-5)
    # a lossless reduction (all directions) keeps every pairwise distance of the full embedding
    _, full_bank, kept = reduce_encoder(tiny_encoder, emb, min(emb.shape))
    assert kept == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(_dist(full_bank), _dist(emb), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="already reduced"):
        reduce_encoder(reduced, bank, 3)
    with pytest.raises(ValueError, match="reduce_dim"):
        EncoderConfig(**TINY_ENCODER, reduce_dim=8 * TINY_ENCODER["width"] + 1)


def test_export_reduce_dim_end_to_end(tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`satml export --reduce-dim`: the manifest, the weights, the ONNX file and the bank all carry the reduced
    embedding, and `evaluate` from the files alone reproduces the numbers export measured."""
    import json

    import onnxruntime as ort

    common = ["--data", str(tiny_cifar), "--device", "cpu"]
    tiny = ["--arch", TINY_ENCODER["arch"], "--width", str(TINY_ENCODER["width"]),
            "--proj-dim", str(TINY_ENCODER["proj_dim"])]
    assert main(["train", "--method", "supervised", "--run-dir", str(tmp_path / "run"), *tiny, "--epochs", "1",
                 "--batch-size", "16", "--val-size", "16", "--knn-k", "5", "--no-progress", *common]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    art = tmp_path / "art"
    assert main(["export", "--checkpoint", ckpt, "--out", str(art), "--name", "tiny", "--val-size", "16", "--k", "5",
                 "--n-robust", "4", "--steps", "2", "--reduce-dim", "5", *common]) == 0
    exported = json.loads(capsys.readouterr().out)
    manifest = verify_artifact(art)
    assert manifest.encoder.reduce_dim == 5 and manifest.encoder.embed_dim == 5
    assert manifest.encoder.normalize is False
    assert 0 < manifest.encoder.extra["reduce_explained_variance"] <= 1
    loaded = load_artifact(art)
    assert loaded.encoder.reduce is not None and loaded.bank.shape == (64, 5)
    assert set(load_file(art / "encoder.safetensors")) >= {"reduce.weight", "reduce.bias"}
    # the bank is the loaded encoder's embedding of the bank images (fp16 storage), and ONNX agrees with torch
    from training.data import load_split
    from training.export import split_of

    ds, _ = load_split(str(tiny_cifar), split_of(manifest.training.hyperparameters))
    emb = knn.embed(loaded.encoder, ds.images)
    torch.testing.assert_close(emb, loaded.bank, atol=2e-3, rtol=0)
    session = ort.InferenceSession(str(art / ENCODER_ONNX), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = loaded.encoder(x).numpy()
    out = session.run(None, {"images": x.numpy()})[0]
    assert out.shape == (3, 5) and np.abs(out - ref).max() < 1e-4
    assert main(["evaluate", "--artifact", str(art), "--n-robust", "4", "--steps", "2", *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["clean_acc"] == exported["metrics"]["clean_acc"]
    assert evaluated["robust"][0]["acc"] == exported["metrics"]["robust"][0]["acc"]
