"""What a model's batch worker runs: embed with the chosen runtime, vote over the live bank, pack the output.

The worker returns the votes and the embeddings together (`pack_output` / `unpack_output`), so that
POST .../examples embeds through the same worker and batches as /classify.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.bank import LiveBank
from app.batching import PredictFn, Votes
from app.fused import FusedOnnx, fused_model
from app.index import build_index
from app.runtimes import OnnxEmbed, TorchEmbed
from training import knn
from training.artifact import ENCODER_ONNX, Artifact

log = logging.getLogger("app.predictor")

if TYPE_CHECKING:
    from app.registry import ServedModel


@dataclass
class Predictor:
    """The `setup` of one model's `BatchWorker`: it runs on the worker thread, because CUDA and faiss GPU
    state live on the thread that made them."""

    art: Artifact
    folder: Path  # the artifact folder (encoder.onnx for the onnxruntime runtime)
    runtime: str  # "torch" or "onnxruntime", already resolved
    device: torch.device
    index_kind: str
    live: LiveBank
    index_spec: knn.IndexSpec | None = None  # the faiss index type (settings); None: flat
    threads: int | None = None  # onnxruntime intra-op threads (settings.threads_per_process)
    small_batch_max: int = 0  # CPU: batches of at most this many images run on one thread (settings)
    fused_vote: bool = False  # CPU onnxruntime: the vote in the encoder's graph for the shipped bank (settings)
    lone_spin: bool = False  # with fused_vote and small_batch_max: a lone request's run spins between ops (settings)
    # whether requests other than the one computed are in progress (app.middleware.InFlight.others): a small batch
    # takes one thread only then, leaving a core to the loop; an idle server's lone request gets every thread
    others_busy: Callable[[], bool] = lambda: True
    runtime_name: str = ""  # set by `setup`: "torch" or "onnxruntime (<provider>)"
    # set by `setup`: a one-thread embed the second lane can share (`setup_helper`); None: it builds its own
    _embed_one: Callable[[Tensor], Tensor] | None = None
    _fused_one: FusedOnnx | None = None  # set by `setup` with `fused_vote`: the one-thread fused session
    _fused_model: bytes | None = None  # set by `setup` with `fused_vote`: the graph, built and serialised once
    _helper_busy: threading.Event = field(default_factory=threading.Event)  # the second lane is running a batch

    def two_lanes(self) -> bool:
        """Whether a second batch lane can run here: a CPU with more than one intra-op thread."""
        return self.device.type == "cpu" and (self.threads or torch.get_num_threads()) > 1

    def fuses(self) -> bool:
        """Whether the vote runs in the encoder's onnxruntime graph (`fused_vote`): on a CPU, where the exact torch
        index is the one configured (an approximate faiss index is a choice the fused exact search would undo)."""
        wanted = (self.fused_vote and self.runtime == "onnxruntime" and self.device.type == "cpu"
                  and self.index_kind == "torch")
        if wanted and importlib.util.find_spec("onnx") is None:
            log.warning("SATML_FUSED_VOTE: the onnx package is not installed (it comes with the cpu extra), so the "
                        "k-NN vote runs in torch, one call per op instead of one per batch")
            return False
        return wanted

    def setup(self) -> PredictFn:
        """Build the runtime and the index, warm up once (a broken runtime fails now, not on a request)."""
        embed: Callable[[Tensor], Tensor]
        embed_small: Callable[[Tensor], Tensor]
        threads = self.threads or torch.get_num_threads()
        small_max = self.small_batch_max if self.two_lanes() else 0
        fused: FusedOnnx | None = None
        fused_small: FusedOnnx | None = None
        fused_lone: FusedOnnx | None = None
        if self.fuses():
            # serialised once: every session below and the helper lane's are built from the same bytes
            self._fused_model = model = fused_model(self.folder, self.art).SerializeToString()
            fused = FusedOnnx(model, self.threads)
            fused_small = FusedOnnx(model, 1) if small_max else fused
            # a small batch with nothing else in progress: every thread, spinning between ops while it runs (one
            # more session of the graph, ~10 MB for the default; none when small batches never go one-thread)
            fused_lone = FusedOnnx(model, self.threads, spin=True) if small_max and self.lone_spin else fused
            self._fused_one = fused_small if small_max else None
            embed, embed_small = fused.embed, fused_small.embed  # a bank with added examples votes in app.index
            self.runtime_name = "onnxruntime (CPUExecutionProvider)"
            log.info("k-NN vote in the onnxruntime graph (SATML_FUSED_VOTE) for the shipped bank of %s", self.folder)
        elif self.runtime == "onnxruntime":
            onnx = OnnxEmbed(self.folder / ENCODER_ONNX, self.device, self.threads)
            embed, self.runtime_name = onnx, onnx.name
            # onnxruntime fixes its threads per session: a second, one-thread session of the same model
            embed_small = OnnxEmbed(self.folder / ENCODER_ONNX, self.device, 1) if small_max else embed
            # a one-thread session runs on its caller's thread, so two lanes can share it side by side
            self._embed_one = embed_small if small_max else None
        else:
            embed = embed_small = self._embed_one = TorchEmbed(self.art.encoder, self.device)
            self.runtime_name = "torch"
        helper_busy, others_busy = self._helper_busy, self.others_busy
        live = self.live
        shipped = live.state
        if fused is None or not shipped_bank(live):
            if shipped_bank(live):  # the bank as shipped: the index the artifact describes
                shipped.index = build_index(self.index_kind, self.art, self.index_spec)
            live.index()  # built here, on the worker thread, if not yet (faiss GPU state lives on this thread)
        # else the fused graph votes over the shipped bank, and the torch index (a transposed copy of the bank,
        # 8.6 MB for the default) is built by `live.index()` on this thread only once an added example needs it

        def predict(x: Tensor) -> Votes:
            # beside a busy second lane each lane keeps to one thread (two batches on two cores, not three threads)
            small = (x.shape[0] <= small_max and others_busy()) or helper_busy.is_set()
            if small_max:  # torch's count is process-wide (a /attack running meanwhile follows it): set per batch
                torch.set_num_threads(1 if small else threads)
            one_call = fused_small if small else fused_lone if x.shape[0] <= small_max else fused
            if one_call is not None and shipped_bank(live):  # one call
                return fused_votes(one_call(x))
            return packed_votes(live, (embed_small if small else embed)(x))

        size = self.art.input_size
        predict(torch.zeros(1, 3, size, size))
        return predict

    def setup_helper(self) -> PredictFn:
        """The second lane's predict (on its own thread, after `setup`): the one-thread embed and the same live
        bank; lane 0 keeps to one thread while it runs."""
        if not self.runtime_name:
            raise RuntimeError("setup_helper needs setup to have run first")
        fused = self._fused_one
        if fused is None and self._fused_model is not None:
            fused = FusedOnnx(self._fused_model, 1)
        embed_one = fused.embed if fused is not None else (
            self._embed_one or OnnxEmbed(self.folder / ENCODER_ONNX, self.device, 1))
        live, busy = self.live, self._helper_busy
        # torch's count: set per batch only where lane 0 sets it per batch too (small_batch_max), so that a
        # process-wide 1 never outlives the batch
        per_batch = self.small_batch_max > 0

        def predict(x: Tensor) -> Votes:
            busy.set()
            if per_batch:
                torch.set_num_threads(1)
            try:
                if fused is not None and shipped_bank(live):
                    return fused_votes(fused(x))
                return packed_votes(live, embed_one(x))
            finally:
                busy.clear()

        return predict


def packed_votes(live: LiveBank, z: Tensor) -> Votes:
    """The live bank's vote for embeddings z, packed with them (one bank state per batch: app.bank's updates
    swap one reference; the embeddings ride along for POST .../examples)."""
    pred, counts = live.index()(z)
    return pred, pack_output(counts, z)


def shipped_bank(live: LiveBank) -> bool:
    """The bank the fused graph holds: the shipped one (no added examples) under the majority vote."""
    state = live.state
    return not state.examples and state.rule.majority


def fused_votes(out: tuple[Tensor, Tensor, Tensor]) -> Votes:
    """`FusedOnnx`'s (pred, counts, z) as the worker returns them (`pack_output`)."""
    pred, counts, z = out
    return pred, pack_output(counts, z)


def pack_output(counts: Tensor, z: Tensor) -> Tensor:
    """What the batch worker returns beside pred: [B, C + D] float, the votes then the embeddings (so that
    POST .../examples embeds through the same worker and batches as /classify; see `unpack_output`)."""
    return torch.cat([counts.to(z.dtype), z.cpu()], 1)


def unpack_output(model: ServedModel, out: Tensor) -> tuple[Tensor, Tensor]:
    """[B, C + D] from the worker -> (counts [B, C] int64, embeddings [B, D] float)."""
    d = model.embed_dim
    return out[:, :-d].round().long(), out[:, -d:]
