"""Model loading, runtimes and k-NN backends: every combination gives the training library's answer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.index import resolve_index
from app.metrics import Metrics
from app.predictor import unpack_output
from app.registry import load_registry
from app.responses import to_prediction
from app.runtimes import resolve_serving_device
from tests.app.conftest import make_settings
from tests.app.toy import CLASSES, K, export_toy, toy_images
from training import knn
from training.artifact import load_artifact


def reference(root: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    """Predictions straight from training.artifact + training.knn, one image at a time."""
    art = load_artifact(root / name)
    with torch.no_grad():
        return torch.cat([knn.knn_predict(art.encoder(xi[None]), art.bank, art.bank_labels, len(CLASSES), K)[0]
                          for xi in x])


def test_bad_artifacts_are_skipped_with_a_log_line(mixed_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.registry")
    reg = load_registry(make_settings(mixed_root), Metrics())
    try:
        assert sorted(reg.models) == ["default", "other"] and reg.default == "default"
        assert "sha256 mismatch" in reg.skipped["bad_sha"]
        assert "format_version 99" in reg.skipped["bad_version"]
        assert "manifest.json" in reg.skipped["not_an_artifact"]
        skipped = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "artifact_skipped"]
        assert {r.fields["model"] for r in skipped} == {"bad_sha", "bad_version", "not_an_artifact"}
        assert all(r.levelno >= logging.WARNING and r.fields["reason"] for r in skipped)
    finally:
        reg.close()


@pytest.mark.parametrize("runtime, index", [("torch", "faiss-cpu"), ("torch", "torch"), ("onnxruntime", "auto"),
                                            ("auto", "auto")])
def test_runtimes_and_indexes_agree_with_training_library(good_root: Path, runtime: str, index: str) -> None:
    reg = load_registry(make_settings(good_root, runtime=runtime, index=index, device="cpu"), Metrics())
    try:
        m = reg.get("default")
        # auto on a CPU: onnxruntime, as the toy artifact ships encoder.onnx
        assert m.runtime.startswith("onnxruntime" if runtime == "auto" else runtime)
        assert m.index == ("torch" if index == "auto" else index)
        images, labels = toy_images(4, seed=11)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred, out = m.worker.submit(x).result(30)
        counts, z = unpack_output(m, out)  # the worker returns the votes and the embeddings (issue 15)
        assert torch.allclose(z, knn.embed(m.artifact.encoder, images), atol=1e-4)
        assert torch.equal(pred, reference(good_root, "default", x))
        assert pred.tolist() == labels.tolist()  # the toy problem is separable
        assert counts.shape == (len(x), len(CLASSES)) and (counts.sum(1) == K).all()
    finally:
        reg.close()


@pytest.mark.parametrize("runtime, index", [("torch", "faiss-cpu"), ("torch", "torch"), ("onnxruntime", "torch")])
def test_a_reduced_embedding_artifact_serves_the_training_library_answers(tmp_path: Path, runtime: str, index: str
                                                                          ) -> None:
    """An artifact exported with a PCA baked into the encoder (`--reduce-dim`, 8 of 32 dimensions, not normalised
    again) loads under every runtime and index and answers what the training library answers."""
    export_toy(tmp_path / "default", seed=0, name="default", reduce_dim=8)
    reg = load_registry(make_settings(tmp_path, runtime=runtime, index=index, device="cpu"), Metrics())
    try:
        m = reg.get("default")
        assert m.embed_dim == 8 and m.runtime.startswith(runtime)
        images, labels = toy_images(4, seed=11)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred, out = m.worker.submit(x).result(30)
        _, z = unpack_output(m, out)
        assert z.shape == (len(x), 8) and torch.allclose(z, knn.embed(m.artifact.encoder, images), atol=1e-4)
        assert torch.equal(pred, reference(tmp_path, "default", x)) and pred.tolist() == labels.tolist()
    finally:
        reg.close()


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_mirror_averaged_artifact_serves_one_answer_for_an_image_and_its_mirror(tmp_path: Path, runtime: str
                                                                                 ) -> None:
    """An artifact exported with `--mirror-average` (and a PCA after it) serves under both runtimes what the training
    library answers, and the same embedding for an image and its mirror image (the server runs the averaged
    encoder, not the plain one)."""
    export_toy(tmp_path / "default", seed=0, name="default", reduce_dim=8, mirror_average=True)
    reg = load_registry(make_settings(tmp_path, runtime=runtime, index="torch", device="cpu"), Metrics())
    try:
        m = reg.get("default")
        assert m.artifact.encoder.cfg.mirror_average and m.runtime.startswith(runtime)
        images, labels = toy_images(4, seed=11)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred, out = m.worker.submit(x).result(30)
        _, z = unpack_output(m, out)
        _, out_mirror = m.worker.submit(x.flip(3).contiguous()).result(30)
        _, z_mirror = unpack_output(m, out_mirror)
        assert torch.allclose(z, knn.embed(m.artifact.encoder, images), atol=1e-4)
        assert torch.allclose(z_mirror, z, atol=1e-4)
        assert torch.equal(pred, reference(tmp_path, "default", x)) and pred.tolist() == labels.tolist()
    finally:
        reg.close()


@pytest.mark.parametrize("runtime, index", [("torch", "faiss-cpu"), ("onnxruntime", "auto")])
def test_an_artifact_with_adversarial_bank_rows_serves_the_whole_bank(tmp_path: Path, runtime: str, index: str
                                                                      ) -> None:
    """A bank with rows after its bank_size clean ones (`satml harden-bank`, manifest `bank_adversarial`) is served
    whole, under every runtime: the vote the training library computes over all its rows."""
    from safetensors.torch import save

    from training.artifact import BANK, update_artifact
    from training.manifest import BankAdversarial, Manifest

    export_toy(tmp_path / "default", seed=0, name="default")
    art = load_artifact(tmp_path / "default")
    n = int(art.bank.shape[0])
    images, labels = toy_images(2, seed=13)  # 2 per class
    q = len(images)
    # K rows on each query's own embedding, labelled with another class: served whole, the bank outvotes the truth
    extra = knn.embed(art.encoder, images).repeat_interleave(K, 0)
    wrong = torch.as_tensor((labels + 1) % len(CLASSES)).long()
    bank = torch.cat([art.bank, extra]).half()
    bank_labels = torch.cat([art.bank_labels, wrong.repeat_interleave(K)])

    def edit(m: Manifest) -> None:
        m.bank_adversarial = BankAdversarial(attack="pgd_ce", eps=8 / 255, steps=5, temperature=0.1, chunk=1000,
                                             attacked=n, rows=q * K)

    update_artifact(tmp_path / "default", edit, {BANK: save({"embeddings": bank, "labels": bank_labels})})
    reg = load_registry(make_settings(tmp_path, runtime=runtime, index=index, device="cpu"), Metrics())
    try:
        m = reg.get("default")
        assert m.bank_size == n + q * K and m.artifact.spec.bank_size == n
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred, out = m.worker.submit(x).result(30)
        counts, _ = unpack_output(m, out)
        assert pred.tolist() == wrong.tolist()  # the first n rows alone answer `labels` (the toy is separable)
        assert torch.equal(pred, reference(tmp_path, "default", x)) and (counts.sum(1) == K).all()
    finally:
        reg.close()


@pytest.mark.parametrize("index_type", ["ivf_flat", "hnsw"])
def test_approximate_index_types_serve_the_exact_answers_on_a_small_bank(good_root: Path, index_type: str) -> None:
    """SATML_INDEX_TYPE picks the faiss index (issue 16); auto then means faiss, and on the toy bank (every IVF cell
    searched, HNSW with a wide candidate list) the answers equal the exact search's."""
    settings = make_settings(good_root, index_type=index_type, index_nlist=4, index_nprobe=4, device="cpu")
    assert_faiss_serves_the_exact_answers(good_root, settings, seed=12)


def assert_faiss_serves_the_exact_answers(root: Path, settings: Settings, seed: int) -> None:
    reg = load_registry(settings, Metrics())
    try:
        m = reg.get("default")
        assert m.index == "faiss-cpu"
        images, _ = toy_images(6, seed=seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred, _ = m.worker.submit(x).result(30)
        assert torch.equal(pred, reference(root, "default", x))
    finally:
        reg.close()


def test_auto_index_type_follows_the_bank_size(good_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SATML_INDEX_TYPE=auto (the default): exact search (torch on a CPU) for a bank up to knn.FLAT_MAX vectors,
    faiss' ivf_flat above; the toy bank crosses the line when the threshold is lowered."""
    reg = load_registry(make_settings(good_root, device="cpu"), Metrics())
    try:
        assert reg.get("default").index == "torch"
    finally:
        reg.close()
    monkeypatch.setattr(knn, "FLAT_MAX", 10)
    # every cell searched: exact answers from an ivf_flat index
    assert_faiss_serves_the_exact_answers(good_root, make_settings(good_root, device="cpu", index_nprobe=4096), 13)


def test_index_type_needs_a_faiss_backend() -> None:
    cpu = torch.device("cpu")
    assert resolve_index("auto", cpu, "ivf_pq") == "faiss-cpu"
    with pytest.raises(RuntimeError, match="faiss backend"):
        resolve_index("torch", cpu, "hnsw")
    with pytest.raises(RuntimeError, match="GPU HNSW"):
        resolve_index("faiss-gpu", cpu, "hnsw")


def test_onnx_runtime_needs_the_onnx_file(tmp_path: Path) -> None:
    export_toy(tmp_path / "default", 0, name="no-onnx", onnx=False)
    reg = load_registry(make_settings(tmp_path, runtime="onnxruntime"), Metrics())
    assert not reg.models and "encoder.onnx" in reg.skipped["default"]


def test_default_falls_back_to_a_loaded_model(good_root: Path) -> None:
    reg = load_registry(make_settings(good_root, default_model="missing"), Metrics())
    try:
        assert reg.default == "default" and reg.get(None).name == "default"
    finally:
        reg.close()


def test_missing_artifacts_dir_serves_nothing(tmp_path: Path) -> None:
    reg = load_registry(make_settings(tmp_path / "nope"), Metrics())
    assert not reg.models
    with pytest.raises(Exception, match="no model"):
        reg.get(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_explicit_gpu_choices_fail_loudly_without_a_gpu() -> None:
    assert resolve_serving_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_serving_device("cuda")
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        resolve_index("faiss-gpu", torch.device("cpu"))
    assert resolve_index("auto", torch.device("cpu")) == "torch"  # faster than faiss flat on a CPU


def test_vote_order_puts_prediction_first(good_root: Path) -> None:
    reg = load_registry(make_settings(good_root), Metrics())
    try:
        m = reg.get("default")
        p = to_prediction(m, 2, torch.tensor([2, 1, 2]), top_k=3)
        assert [v.class_id for v in p.votes] == [2, 0, 1]  # tie 2/2: the vote's winner first
        assert [v.share for v in p.votes] == [0.4, 0.4, 0.2] and p.label == CLASSES[2]
        assert len(to_prediction(m, 0, torch.tensor([5, 0, 0]), top_k=1).votes) == 1
    finally:
        reg.close()


@pytest.mark.parametrize("runtime, fused", [("torch", False), ("onnxruntime", False), ("onnxruntime", True)])
def test_small_batches_run_on_one_thread_with_the_same_answers(good_root: Path, runtime: str, fused: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SATML_SMALL_BATCH_MAX (issue 17): a batch of at most that many images runs on one intra-op thread (a
    one-thread onnxruntime session, torch's count set on the worker thread), a larger one on all of them; the
    answers are the training library's either way, with the vote in the onnxruntime graph (SATML_FUSED_VOTE) too."""
    import onnxruntime as ort

    import app.predictor
    from app.fused import FusedOnnx
    from app.runtimes import OnnxEmbed

    sessions: list[tuple[str, int, int]] = []  # (session kind, batch, onnxruntime session threads) per encoder run
    torch_threads: list[tuple[int, int]] = []  # (batch, torch threads on the worker thread) per k-NN vote
    real_session, real_call, real_pack = ort.InferenceSession, OnnxEmbed.__call__, app.predictor.pack_output

    def session(path: str, options: ort.SessionOptions, **kw: object) -> ort.InferenceSession:
        s = real_session(path, options, **kw)
        s.threads = options.intra_op_num_threads  # type: ignore[attr-defined]
        return s

    real_fused = FusedOnnx.__call__

    def call(self: OnnxEmbed, x: torch.Tensor) -> torch.Tensor:
        sessions.append(("encoder", len(x), self.session.threads))  # type: ignore[attr-defined]
        return real_call(self, x)

    def call_fused(self: FusedOnnx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sessions.append(("fused", len(x), self.session.threads))  # type: ignore[attr-defined]
        return real_fused(self, x)

    def pack(counts: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        torch_threads.append((len(z), torch.get_num_threads()))
        return real_pack(counts, z)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(OnnxEmbed, "__call__", call)
    monkeypatch.setattr(FusedOnnx, "__call__", call_fused)
    monkeypatch.setattr(app.predictor, "pack_output", pack)
    reg = load_registry(make_settings(good_root, runtime=runtime, index="torch", device="cpu", compute_threads=2,
                                      small_batch_max=4, fused_vote=fused), Metrics())
    try:
        m = reg.get("default")
        images, _ = toy_images(4, seed=13)  # 12 images
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        sessions.clear()
        torch_threads.clear()
        small, _ = m.worker.submit(x[:3]).result(30)
        large, _ = m.worker.submit(x).result(30)
        assert torch.equal(small, reference(good_root, "default", x[:3]))
        assert torch.equal(large, reference(good_root, "default", x))
        assert torch_threads == [(3, 1), (12, 2)]
        kind = "fused" if fused else "encoder"
        assert sessions == ([(kind, 3, 1), (kind, 12, 2)] if runtime == "onnxruntime" else [])
    finally:
        reg.close()


@pytest.mark.parametrize("lone_spin", [True, False])
def test_a_lone_request_takes_every_thread(good_root: Path, monkeypatch: pytest.MonkeyPatch, lone_spin: bool) -> None:
    """With no other request in progress (`others_busy` false: an idle server's one request), a small batch runs on
    all intra-op threads: the core the one-thread rule keeps for the event loop has nothing to do then. With
    `lone_spin` it runs on a session of its own whose threads spin between ops; a large batch never spins."""
    from app.fused import FusedOnnx

    seen: list[tuple[int, int, str]] = []
    real = FusedOnnx.__call__

    def call(self: FusedOnnx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        options = self.session.get_session_options()
        seen.append((len(x), options.intra_op_num_threads,
                     options.get_session_config_entry("session.intra_op.allow_spinning")))
        return real(self, x)

    monkeypatch.setattr(FusedOnnx, "__call__", call)
    busy = [False]
    reg = load_registry(make_settings(good_root, runtime="onnxruntime", index="torch", device="cpu",
                                      compute_threads=2, small_batch_max=4, lone_spin=lone_spin), Metrics(),
                        lambda: busy[0])
    try:
        worker = reg.get("default").worker
        seen.clear()
        x = torch.rand(3, 3, 32, 32)
        idle = worker.submit(x).result(30)[0]
        worker.submit(torch.rand(5, 3, 32, 32)).result(30)
        busy[0] = True
        loaded = worker.submit(x).result(30)[0]
        assert seen == [(3, 2, "1" if lone_spin else "0"), (5, 2, "0"), (3, 1, "0")] and torch.equal(idle, loaded)
    finally:
        reg.close()


def test_small_batch_max_zero_never_changes_the_thread_count(good_root: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    reg = load_registry(make_settings(good_root, runtime="onnxruntime", index="torch", device="cpu",
                                      compute_threads=2, small_batch_max=0), Metrics())
    try:
        pred, _ = reg.get("default").worker.submit(torch.rand(1, 3, 32, 32)).result(30)
        assert pred.shape == (1,) and calls == []
    finally:
        reg.close()


def test_without_the_onnx_package_the_vote_runs_in_torch(good_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A server install without `onnx` (SATML_FUSED_VOTE on, the default) serves through the separate encoder
    session and the torch vote, says so in the log, and answers the same."""
    import importlib.util

    import app.predictor

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))

    def no_fused(*args: object) -> None:
        raise AssertionError("the fused session must not be built without onnx")

    monkeypatch.setattr(app.predictor, "FusedOnnx", no_fused)
    with caplog.at_level(logging.WARNING, logger="app.predictor"):
        reg = load_registry(make_settings(good_root, runtime="onnxruntime", index="torch", device="cpu"), Metrics())
    try:
        m = reg.get("default")
        assert m.runtime == "onnxruntime (CPUExecutionProvider)"
        assert any("onnx package is not installed" in r.getMessage() for r in caplog.records)
        images, _ = toy_images(2, seed=17)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(m.worker.submit(x).result(30)[0], reference(good_root, "default", x))
    finally:
        reg.close()


@pytest.mark.parametrize("fused", [True, False])
def test_the_torch_index_waits_for_an_added_example_when_the_graph_votes(good_root: Path, tmp_path: Path,
                                                                         fused: bool) -> None:
    """With the vote in the onnxruntime graph (SATML_FUSED_VOTE) the torch index over the shipped bank (a transposed
    copy of it) is not built at load or by /classify; the first added example's bank gets one and votes with it."""
    reg = load_registry(make_settings(good_root, runtime="onnxruntime", index="torch", device="cpu",
                                      fused_vote=fused, state_dir=tmp_path), Metrics())
    try:
        m = reg.get("default")
        assert m.live is not None
        images, _ = toy_images(2, seed=3)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(m.worker.submit(x).result(30)[0], reference(good_root, "default", x))
        assert (m.live.state.index is None) is fused
        z = unpack_output(m, m.worker.submit(x[:1]).result(30)[1])[1]
        state, _ = m.live.add("extra", z, ["x.png"], ["0" * 64])
        assert state.index is not None and len(m.classes) == len(CLASSES) + 1
        pred, _ = m.worker.submit(x).result(30)
        assert pred.shape == (len(x),) and int(pred.max()) < len(m.classes)
    finally:
        reg.close()
