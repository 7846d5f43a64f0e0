"""The encoder and the exact k-NN majority vote as one onnxruntime graph (issue 17).

On a CPU the batch worker is the busiest thread under load; with the encoder in onnxruntime and the search and vote
in torch it makes ~10 GIL-releasing calls per batch, each a point where it waits for the event loop's thread to
hand the GIL back. Appending the search (the same formula as `training.knn.knn_search`: ||b||^2 - 2 q.b, or q.b of
normalised vectors) and the vote (`training.knn.vote`: counts, ties to the nearest tied neighbour) to the encoder's
graph makes a batch one call. Only the float rounding of the product can differ from the torch path, as it already
does between that path's layouts. Only for the bank as shipped with the majority vote: a bank with added examples
or another vote goes through `app.index`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from training.artifact import ENCODER_ONNX, Artifact, onnx_session

if TYPE_CHECKING:
    import onnx

PRED, COUNTS = "knn_pred", "knn_counts"


def vote_graph(bank: Tensor, labels: Tensor, num_classes: int, k: int, metric: str, embedding: str,
               like: onnx.ModelProto) -> onnx.ModelProto:
    """A model from embeddings [B, D] (input `embedding`) to pred [B] and counts [B, C] (int64), with `like`'s
    opset and IR version (so that `compose.merge_models` accepts the pair)."""
    from onnx import TensorProto, helper, numpy_helper  # the cpu / gpu extras' (a torch-runtime server needs none)

    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (bank size), got {k}")
    b = bank.detach().float().cpu()
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nodes = []
    if metric == "l2":  # rank by ||b||^2 - 2 q.b, smallest first
        nodes += [helper.make_node("MatMul", [embedding, const("knn_bank_t", b.t().contiguous().numpy())], ["knn_qb"]),
                  helper.make_node("Mul", ["knn_qb", const("knn_minus2", np.float32(-2))], ["knn_qb2"]),
                  helper.make_node("Add", ["knn_qb2", const("knn_bank_sq", b.pow(2).sum(1).numpy())], ["knn_score"]),
                  helper.make_node("TopK", ["knn_score", const("knn_k", np.array([k], np.int64))],
                                   ["knn_top", "knn_idx"], largest=0, sorted=1)]
    elif metric == "cosine":  # rank by q.b of the normalised vectors, largest first
        unit = torch.nn.functional.normalize(b, dim=1)
        nodes += [helper.make_node("LpNormalization", [embedding], ["knn_qn"], axis=1, p=2),
                  helper.make_node("MatMul", ["knn_qn", const("knn_bank_t", unit.t().contiguous().numpy())],
                                   ["knn_score"]),
                  helper.make_node("TopK", ["knn_score", const("knn_k", np.array([k], np.int64))],
                                   ["knn_top", "knn_idx"], largest=1, sorted=1)]
    else:
        raise ValueError(f"metric must be l2 or cosine, got {metric!r}")
    nodes += [
        helper.make_node("Gather", [const("knn_labels", labels.long().cpu().numpy()), "knn_idx"], ["knn_nl"]),
        helper.make_node("OneHot", ["knn_nl", const("knn_depth", np.array(num_classes, np.int64)),
                                    const("knn_onoff", np.array([0, 1], np.int64))], ["knn_onehot"], axis=-1),
        helper.make_node("ReduceSum", ["knn_onehot", const("knn_axis1", np.array([1], np.int64))], [COUNTS],
                         keepdims=0),
        # ties go to the class of the nearest neighbour among the tied classes (knn.vote)
        helper.make_node("ReduceMax", [COUNTS], ["knn_max"], axes=[1], keepdims=1),
        helper.make_node("Equal", [COUNTS, "knn_max"], ["knn_tied"]),
        helper.make_node("GatherElements", ["knn_tied", "knn_nl"], ["knn_is_tied"], axis=1),
        helper.make_node("Where", ["knn_is_tied", const("knn_rank", np.arange(k, dtype=np.int64)),
                                   const("knn_k_scalar", np.array(k, np.int64))], ["knn_pos"]),
        helper.make_node("ArgMin", ["knn_pos"], ["knn_first"], axis=1, keepdims=1),
        helper.make_node("GatherElements", ["knn_nl", "knn_first"], ["knn_pred2"], axis=1),
        helper.make_node("Squeeze", ["knn_pred2", "knn_axis1"], [PRED]),
    ]
    dim = b.shape[1]
    graph = helper.make_graph(
        nodes, "knn_vote", [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(PRED, TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info(COUNTS, TensorProto.INT64, ["batch", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    return model


def fused_model(folder: Path, art: Artifact) -> onnx.ModelProto:
    """The artifact folder's encoder.onnx (its external data read) with the vote over the artifact's shipped bank
    (its k and metric) appended: images -> embeddings, pred, counts."""
    import onnx
    from onnx import compose

    encoder = onnx.load(str(folder / ENCODER_ONNX))
    (out,) = [o.name for o in encoder.graph.output]
    vote = vote_graph(art.bank, art.bank_labels, art.num_classes, art.k, art.metric, out, encoder)
    return compose.merge_models(encoder, vote, io_map=[(out, out)], outputs=[out, PRED, COUNTS])


class FusedOnnx:
    """One onnxruntime session of the fused model (CPU): images [n, 3, S, S] -> (pred [n], counts [n, C], z [n, D])."""

    def __init__(self, model: onnx.ModelProto | bytes, threads: int | None = None, spin: bool = False) -> None:
        # bytes: a graph serialised once for several sessions (~10 MB for the default, three sessions per model)
        data = model if isinstance(model, bytes) else model.SerializeToString()
        self.session = onnx_session(data, ["CPUExecutionProvider"], threads, spin)
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def embed(self, x: Tensor) -> Tensor:
        """The embeddings alone (the vote computed and dropped: for a bank that is no longer the shipped one)."""
        return self(x)[2]

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, pred, counts = self.session.run(self.outputs, {self.input_name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(pred), torch.from_numpy(counts), torch.from_numpy(z)
