"""app.fused: the k-NN vote appended to the encoder's onnxruntime graph answers what training.knn answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from app.fused import COUNTS, PRED, FusedOnnx, fused_model, vote_graph
from app.runtimes import OnnxEmbed
from tests.app.toy import toy_images
from training import knn
from training.artifact import ENCODER_ONNX, load_artifact, onnx_session


def _like() -> onnx.ModelProto:
    return onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                  opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_the_vote_graph_gives_the_training_librarys_votes_ties_included(metric: str, k: int) -> None:
    """Three classes and an even k make tied counts common: they must go to the nearest tied neighbour's class."""
    g = torch.Generator().manual_seed(k)
    bank, query = torch.randn(300, 6, generator=g), torch.randn(200, 6, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    model = vote_graph(bank, labels, 3, k, metric, "z", _like())
    onnx.checker.check_model(model)
    session = onnx_session(model.SerializeToString(), ["CPUExecutionProvider"], 1)
    pred, counts = session.run([PRED, COUNTS], {"z": query.numpy()})
    want_pred, want_counts = knn.knn_predict(query, bank, labels, 3, k, metric)  # type: ignore[arg-type]
    assert np.array_equal(counts, want_counts.numpy()) and np.array_equal(pred, want_pred.numpy())
    if k == 4:  # the case the tie rule decides
        tied = (want_counts == want_counts.max(1, keepdim=True).values).sum(1) > 1
        assert tied.sum() >= 10


def test_the_vote_graph_refuses_what_it_cannot_do() -> None:
    bank, labels = torch.randn(5, 2), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be"):
        vote_graph(bank, labels, 1, 6, "l2", "z", _like())
    with pytest.raises(ValueError, match="metric"):
        vote_graph(bank, labels, 1, 2, "ip", "z", _like())


def test_the_fused_model_runs_the_encoder_and_the_vote_in_one_call(good_root: Path) -> None:
    folder = good_root / "default"
    art = load_artifact(folder, "cpu")
    fused = FusedOnnx(fused_model(folder, art), 1)
    images, labels = toy_images(5, seed=21)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pred, counts, z = fused(x)
    want_z = OnnxEmbed(folder / ENCODER_ONNX, torch.device("cpu"), 1)(x)
    want_pred, want_counts = knn.TorchKnn(art.bank, art.bank_labels, art.num_classes, art.k,
                                          art.metric).predict(want_z)  # type: ignore[arg-type]
    assert torch.allclose(z, want_z, atol=1e-6) and torch.equal(fused.embed(x), z)
    assert torch.equal(pred, want_pred) and torch.equal(counts, want_counts)
    assert pred.tolist() == labels.tolist() and pred.dtype == counts.dtype == torch.int64
