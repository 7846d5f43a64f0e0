"""Model registry and loading: each artifact folder verified, loaded and given its batch worker.

A bad folder is logged and skipped, the others serve; `Registry.get` picks the requested model.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from app.bank import BankState, LiveBank
from app.batching import BatchWorker
from app.config import Settings
from app.errors import ApiError
from app.index import build_index_over, resolve_index
from app.logs import fields
from app.loop_batching import LoopBatcher
from app.metrics import Metrics
from app.predictor import Predictor
from app.runtimes import resolve_runtime, resolve_serving_device
from training import conformal, knn
from training.artifact import ENCODER_ONNX, MANIFEST, Artifact, ArtifactError, load_artifact
from training.evaluate import KnnModel

log = logging.getLogger("app.registry")

_CLASS_ID = re.compile(r"[0-9]{1,9}")
SETUP_TIMEOUT_S = 300.0  # building one model's runtime + index (ONNX session, faiss GPU upload)


@dataclass
class ServedModel:
    """One loaded artifact and everything that serves it."""

    name: str  # the artifact folder name: what requests say in `model`
    artifact: Artifact
    knn_model: KnnModel  # torch encoder + bank on `device`, for attacks
    worker: BatchWorker
    device: str
    runtime: str
    index: str
    p_table: list[float] | None = None  # conformal p-value per nonconformity 0..k (None: no calibration)
    live: LiveBank | None = None  # the bank as served now: shipped + added examples (app.bank)
    # /classify and example embeddings batched on the event loop (SATML_LOOP_BATCHING, CPU); None: the worker
    loop_batcher: LoopBatcher | None = None

    def __post_init__(self) -> None:
        if self.p_table is None and self.artifact.calibration is not None:
            self.p_table = conformal.p_value_table(self.artifact.calibration, self.artifact.k)

    @property
    def classes(self) -> list[str]:
        return self.artifact.classes if self.live is None else list(self.live.state.classes)

    @property
    def bank_size(self) -> int:
        return int(self.artifact.bank.shape[0]) if self.live is None else self.live.state.size

    @property
    def embed_dim(self) -> int:
        return int(self.artifact.bank.shape[1])

    @property
    def input_size(self) -> int:
        return self.artifact.input_size

    @property
    def manifest(self) -> dict[str, Any]:
        return self.artifact.manifest

    def class_id(self, target: str) -> int:
        """A class given by name or by id -> id; ApiError 422 when it is neither."""
        if target in self.classes:
            return self.classes.index(target)
        digits = target.strip()
        # ASCII digits only, and few: str.isdigit() also takes "\u00b2" and 5,000-digit numbers, which int() refuses
        if _CLASS_ID.fullmatch(digits):
            i = int(digits)
            if 0 <= i < len(self.classes):
                return i
        shown = target if len(target) <= 64 else f"{target[:64]}..."
        raise ApiError(422, "invalid_parameters", f"target {shown!r} is not a class of model {self.name!r} "
                       f"(names {self.classes} or ids 0..{len(self.classes) - 1})")


MAX_INPUT_SIZE = 1024  # pixels per side: far above any shipped model, low enough to bound decode output


def check_served_fields(art: Artifact) -> None:
    """The manifest fields serving reads, checked once at load: ArtifactError instead of a KeyError/TypeError
    on the first request (or at start-up, outside the caught exceptions)."""
    where = art.path / MANIFEST
    try:
        size, k, metric = art.input_size, art.k, art.metric
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{where}: missing or invalid input.size / knn.k / knn.metric ({e!r})") from e
    if not 1 <= size <= MAX_INPUT_SIZE:
        raise ArtifactError(f"{where}: input.size must be in [1, {MAX_INPUT_SIZE}], got {size}")
    if not 1 <= k <= art.bank.shape[0]:
        raise ArtifactError(f"{where}: knn.k must be in [1, {art.bank.shape[0]}] (bank size), got {k}")
    if metric not in ("l2", "cosine"):
        raise ArtifactError(f"{where}: knn.metric must be 'l2' or 'cosine', got {metric!r}")
    classes = art.manifest.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        raise ArtifactError(f"{where}: classes must be a list of distinct non-empty names")


def load_served_model(folder: Path, settings: Settings, device: torch.device, metrics: Metrics,
                      others_busy: Callable[[], bool] = lambda: True,
                      on_death: Callable[[str], None] | None = None) -> ServedModel:
    """Verify + load one artifact and start its batching worker; ArtifactError/RuntimeError when it cannot serve.

    Named apart from `training.robustness.load_model`, which loads an artifact as a model under test."""
    art = load_artifact(folder, device)
    check_served_fields(art)
    name = folder.name
    runtime = resolve_runtime(settings.runtime, folder, device)
    if runtime == "onnxruntime" and not (folder / ENCODER_ONNX).is_file():
        raise ArtifactError(f"{folder}: runtime onnxruntime requested but the artifact has no {ENCODER_ONNX}")
    metric = cast(knn.Metric, art.metric)
    spec = settings.index_spec(*art.bank.shape)  # the index type by bank size when SATML_INDEX_TYPE=auto
    index_kind = resolve_index(settings.index, device, spec.type)
    live = LiveBank(name, art, index_kind, settings.vote or art.spec.knn.vote,
                    lambda kind, bank, labels, n, rule: build_index_over(kind, bank, labels, n, art.k, metric, rule,
                                                                        spec),
                    settings.state_dir)
    live.replay()  # the overlay of added examples, if any and sound (else logged, shipped bank only)
    predictor = Predictor(art, folder, runtime, device, index_kind, live, spec, settings.threads_per_process(),
                          settings.small_batch_limit(), fused_vote=settings.fused_vote, lone_spin=settings.lone_spin,
                          others_busy=others_busy)

    batch_size = metrics.batch_size.labels(name)
    batch_latency = metrics.batch_latency.labels(name)
    images = metrics.images.labels(name)
    depth = metrics.queue_depth.labels(name)

    def on_batch(n: int, seconds: float) -> None:
        batch_size.observe(n)
        batch_latency.observe(seconds)
        images.inc(n)

    helper = predictor.setup_helper if settings.second_lane and predictor.two_lanes() else None
    worker = BatchWorker(name, predictor.setup, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                         max_queue=settings.max_queue_images, on_batch=on_batch, on_queue=depth.set, helper=helper,
                         helper_min_images=settings.second_lane_min_images, on_death=on_death)
    try:
        worker.start(timeout=SETUP_TIMEOUT_S)
    except BaseException:
        worker.close(timeout=1)
        raise
    st = live.state
    knn_model = KnnModel(art.encoder, st.bank, st.labels, len(st.classes), art.k, metric)
    loop_batcher = None
    if settings.batches_on_loop() and device.type == "cpu" and worker.predict is not None:
        loop_batcher = LoopBatcher(name, worker.predict, max_batch=settings.max_batch,
                                   max_queue=settings.max_queue_images, on_batch=on_batch, on_queue=depth.set)
    served = ServedModel(name, art, knn_model, worker, str(device), predictor.runtime_name, index_kind, live=live,
                         loop_batcher=loop_batcher)

    def attack_bank(new: BankState) -> None:  # /attack differentiates the bank as served
        served.knn_model = KnnModel(art.encoder, new.bank, new.labels, len(new.classes), art.k, metric)

    live.on_swap.append(attack_bank)
    return served


@dataclass
class Registry:
    """The models this process serves, and the artifact folders it refused (folder -> reason)."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    def get(self, name: str | None) -> ServedModel:
        """The named model, or the default one; ApiError 404 (503 when nothing is loaded)."""
        if not self.models:
            raise ApiError(503, "not_ready", "no model is loaded")
        key = name or self.default
        if key is None or key not in self.models:
            shown = key if key is None or len(key) <= 64 else f"{key[:64]}..."  # never echo a huge name
            raise ApiError(404, "model_not_found",
                           f"unknown model {shown!r}; available: {', '.join(sorted(self.models))}")
        return self.models[key]

    def close_loop_batchers(self) -> None:
        """Fail what waits for a batch on the event loop (call it on the loop, before `close`)."""
        for m in self.models.values():
            if m.loop_batcher is not None:
                m.loop_batcher.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker at once, then wait for them all within one `timeout` (not one per model)."""
        for m in self.models.values():
            m.worker.stop()
        deadline = time.monotonic() + timeout
        for m in self.models.values():
            m.worker.close(max(deadline - time.monotonic(), 0.0))

    def worker_states(self, stuck_after_s: float, metrics: Metrics | None = None) -> dict[str, str]:
        """Each model's batch worker state (see `BatchWorker.state`), also set in the metrics when given."""
        states = {name: m.worker.state(stuck_after_s) for name, m in self.models.items()}
        if metrics is not None:
            for name, state in states.items():
                metrics.worker_healthy.labels(name).set(1 if state == "ok" else 0)
        return states


def public_reason(reason: str, folder: Path) -> str:
    """A skip reason fit for /health/ready: server paths shown relative to the artifacts folder, at most
    one line of 200 characters (the full text goes to the log)."""
    for prefix in {str(folder.resolve()), str(folder.absolute()), str(folder)}:
        reason = reason.replace(prefix, folder.name)
    reason = reason.splitlines()[0] if reason else "refused"
    return reason if len(reason) <= 200 else f"{reason[:200]}..."


def load_registry(settings: Settings, metrics: Metrics, others_busy: Callable[[], bool] = lambda: True,
                  on_death: Callable[[str], None] | None = None) -> Registry:
    """Load every artifact folder; a bad one is logged and skipped, the others serve. `others_busy`: whether
    requests other than the one computed are in progress (`InFlight.others`; a small batch runs on one thread
    only then); default: always, as without a server. `on_death(model)`: called when a model's batch worker
    dies (several server processes end the process: `app.main.end_this_process`)."""
    device = resolve_serving_device(settings.device)
    # a setting no bank can satisfy (SATML_INDEX=torch with an approximate type, faiss missing) fails start-up
    resolve_index(settings.index, device, "flat" if settings.index_type == "auto" else settings.index_type)
    reg = Registry()
    root = Path(settings.artifacts_dir)
    if not root.is_dir():
        log.error("artifacts folder not found", extra=fields(event="artifacts_missing", path=str(root)))
        return reg
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / MANIFEST).is_file():
            reg.skipped[folder.name] = f"no {MANIFEST}"
            log.warning("artifact skipped", extra=fields(event="artifact_skipped", model=folder.name,
                                                         path=str(folder), reason=f"no {MANIFEST}"))
            continue
        try:
            model = load_served_model(folder, settings, device, metrics, others_busy, on_death)
        except Exception as e:  # any fault of one artifact (corrupt safetensors, odd manifest) skips only it
            reason = str(e) if isinstance(e, ArtifactError) else f"{type(e).__name__}: {e}"
            reg.skipped[folder.name] = public_reason(reason, folder)
            log.error("artifact skipped", extra=fields(event="artifact_skipped", model=folder.name,
                                                       path=str(folder), reason=reason))
            continue
        reg.models[model.name] = model
        log.info("model loaded", extra=fields(event="model_loaded", model=model.name, device=model.device,
                                              runtime=model.runtime, index=model.index,
                                              classes=len(model.classes), bank=model.bank_size))
    if settings.default_model in reg.models:
        reg.default = settings.default_model
    elif reg.models:
        reg.default = next(iter(reg.models))
        log.warning("default model not loaded; using another", extra=fields(
            event="default_model_fallback", wanted=settings.default_model, using=reg.default))
    metrics.models_loaded.set(len(reg.models))
    metrics.models_skipped.set(len(reg.skipped))
    return reg
