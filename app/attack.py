"""Live adversarial attacks: a bounded queue in front of `training.knn_attacks.craft` (DESIGN section 5).

Attacks run on their own small thread pool (`attack_concurrency` at once, `attack_queue` waiting,
more get 429 with Retry-After), each with a deadline (504 after `attack_timeout_s`), so they cannot
starve /classify, whose batches run on the models' batching threads. Predictions before and after
go through the same batching worker as /classify, on the 8-bit adversarial image that the response
carries as PNG, so uploading that PNG to /classify gives the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from prometheus_client import Gauge
from torch import Tensor

from app.batching import QueueFull, WorkerClosed
from app.errors import ApiError
from app.images import Decoded, encode_png
from app.inference import batch_tensor
from app.metrics import Metrics
from app.predictor import unpack_output
from app.registry import ServedModel
from app.responses import to_prediction
from app.schemas import AttackOutcome, Comparison, Prediction, Transfer
from training.knn_attacks import Surrogate, craft

log = logging.getLogger("app.attack")
T = TypeVar("T")
SEED = 0  # random start of PGD: the same request gives the same answer


class DeadlinePassed(Exception):
    """The attack's time budget ran out between two phases."""


@dataclass(frozen=True)
class AttackRequestSpec:
    """What one POST /attack runs, already validated against the settings (the suite's spec is
    `training.robustness.AttackSpec`; both select from `training.knn_attacks`)."""

    method: str
    eps: float  # L-inf radius, [0, 1] pixel units
    steps: int
    top_k: int
    target: str | None = None  # class name or id, resolved per model


class AttackService:
    """Admission control + thread pool + timeout for attack jobs."""

    def __init__(self, concurrency: int, queue_size: int, timeout_s: float, metrics: Metrics, *,
                 kind: str = "attack", depth: Gauge | None = None) -> None:
        """`kind` names the jobs in error codes and messages ("certify" for POST /certify, which reuses this
        admission control on a pool of its own); `depth` is the gauge of jobs running or waiting."""
        self.concurrency, self.capacity, self.timeout_s = concurrency, concurrency + queue_size, timeout_s
        self.kind = kind
        self._depth = depth if depth is not None else metrics.attack_queue_depth
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=kind)
        self._lock = threading.Lock()
        self._active = 0  # running + waiting
        self._mean_s = 1.0  # running mean of job time, for Retry-After

    @property
    def active(self) -> int:
        return self._active

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: mean job time times the jobs ahead per worker."""
        wait = self._mean_s * max(self._active, 1) / self.concurrency
        return int(min(max(math.ceil(wait), 1), math.ceil(self.timeout_s)))

    def _release(self, _: Future[Any] | None = None) -> None:
        with self._lock:
            self._active -= 1
            self._depth.set(self._active)

    def admit(self) -> Slot:
        """Take a place (running or waiting) now, before the request's image is decoded; 429 when full."""
        with self._lock:
            if self._active >= self.capacity:
                raise ApiError(429, f"{self.kind}_queue_full",
                               f"{self._active} {self.kind} jobs running or waiting (limit {self.capacity}); "
                               "retry later",
                               headers={"Retry-After": str(self.retry_after())})
            self._active += 1
            self._depth.set(self._active)
        return Slot(self)

    def _timed(self, job: Callable[[float], T], deadline: float) -> T:
        t0 = time.monotonic()
        if t0 > deadline:
            raise DeadlinePassed
        try:
            return job(deadline)
        finally:
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)

    async def run(self, job: Callable[[float], T], slot: Slot | None = None) -> T:
        """Run `job(deadline)` on the pool in `slot` (from `admit`; taken here when None); ApiError 429 when
        full, 504 when the deadline passes. The slot is given back when the job's thread is done."""
        slot = slot or self.admit()
        deadline = time.monotonic() + self.timeout_s
        try:
            fut = self._executor.submit(self._timed, job, deadline)
        except RuntimeError as e:  # pool shut down
            slot.release()
            raise ApiError(503, "shutting_down", "the server is shutting down") from e
        fut.add_done_callback(lambda _: slot.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except (TimeoutError, DeadlinePassed) as e:
            raise ApiError(504, f"{self.kind}_timeout",
                           f"the {self.kind} job did not finish within {self.timeout_s:g} s") from e
        except WorkerClosed as e:
            raise ApiError(503, "shutting_down", "the server is shutting down") from e
        except QueueFull as e:
            raise ApiError(503, "overloaded", f"{e}; retry later", headers={"Retry-After": str(e.retry_after_s)}) from e

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Slot:
    """One place in an AttackService, held from admission until the job ends; `release` is idempotent."""

    def __init__(self, service: AttackService) -> None:
        self._service, self._held, self._lock = service, True, threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._service._release()


# --- the job (runs on an attack thread) ------------------------------------------------------------


def _b64_png(x: Tensor) -> str:
    """[1, 3, H, W] in [0, 1] -> base64 PNG (8-bit)."""
    return base64.b64encode(encode_png(pixels_of(x))).decode("ascii")


def _perturbation_png(delta: Tensor) -> str:
    """Perturbation amplified to the full range: grey is zero, black/white the largest -/+ change."""
    m = float(delta.abs().max())
    return _b64_png(0.5 + delta / (2 * m) if m > 0 else torch.full_like(delta, 0.5))


def quantize(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """x_adv on the 8-bit grid and still within eps of x (itself 8-bit): the PNG holds exactly what is scored."""
    base, limit = (x * 255).round(), math.floor(eps * 255 + 1e-6)
    q = torch.minimum(torch.maximum((x_adv * 255).round(), base - limit), base + limit).clamp(0, 255)
    return q / 255


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


class AttackJob:
    """Attack `model` on `image`, then show the perturbation to and attack each of `compare`."""

    def __init__(self, model: ServedModel, image: Decoded, spec: AttackRequestSpec, compare: list[ServedModel],
                 request_timeout_s: float) -> None:
        self.model, self.image, self.spec, self.compare = model, image, spec, compare
        self.request_timeout_s = request_timeout_s

    def _classify(self, m: ServedModel, x: Tensor, deadline: float) -> tuple[int, Prediction]:
        wait = max(min(deadline - time.monotonic(), self.request_timeout_s), 0.001)
        pred, out = m.worker.submit(x).result(timeout=wait)
        p, counts = int(pred[0]), unpack_output(m, out)[0]
        return p, to_prediction(m, p, counts[0], min(self.spec.top_k, len(m.classes)))

    @staticmethod
    def _check(deadline: float) -> None:
        if time.monotonic() > deadline:
            raise DeadlinePassed

    def attack(self, m: ServedModel, x: Tensor, deadline: float) -> tuple[AttackOutcome, Tensor]:
        """Craft against m's own clean prediction (or toward the target); returns the outcome and x_adv."""
        y, clean = self._classify(m, x, deadline)
        self._check(deadline)
        device = m.knn_model.bank.device
        target = None if self.spec.target is None else m.class_id(self.spec.target)
        # the surrogate the robustness suite found strongest for this model (manifest knn.surrogate), if any
        x_adv = craft(m.knn_model, x.to(device), torch.tensor([y], device=device), method=self.spec.method,
                      eps=self.spec.eps, steps=self.spec.steps,
                      surrogate=Surrogate.from_manifest(m.artifact.spec.knn.surrogate),
                      target=None if target is None else torch.tensor([target], device=device),
                      generator=torch.Generator(device=device).manual_seed(SEED)).cpu()
        x_adv = quantize(x, x_adv, self.spec.eps)
        self._check(deadline)
        y_adv, adversarial = self._classify(m, x_adv, deadline)
        delta = x_adv - x
        outcome = AttackOutcome(
            clean=clean, adversarial=adversarial,
            success=(y_adv == target) if target is not None else (y_adv != y),
            linf=float(delta.abs().max()), l2=float(delta.flatten().norm()),
            adversarial_png=_b64_png(x_adv), perturbation_png=_perturbation_png(delta))
        return outcome, x_adv

    def transfer(self, m: ServedModel, x: Tensor, x_adv: Tensor, deadline: float) -> Transfer:
        """The main model's perturbed image shown to m (resized to m's input when sizes differ)."""
        size = m.input_size
        y, clean = self._classify(m, _resize(x, size), deadline)
        y_adv, adversarial = self._classify(m, _resize(x_adv, size), deadline)
        target = None if self.spec.target is None else m.class_id(self.spec.target)
        return Transfer(clean=clean, adversarial=adversarial,
                        success=(y_adv == target) if target is not None else (y_adv != y))

    def __call__(self, deadline: float) -> tuple[AttackOutcome, list[Comparison]]:
        x = batch_tensor([self.image.pixels[self.model.input_size]])
        outcome, x_adv = self.attack(self.model, x, deadline)
        comparisons = []
        for m in self.compare:
            self._check(deadline)
            transfer = self.transfer(m, x, x_adv, deadline)
            self._check(deadline)
            other, _ = self.attack(m, batch_tensor([self.image.pixels[m.input_size]]), deadline)
            comparisons.append(Comparison(model=m.name, transfer=transfer, attack=other))
        return outcome, comparisons


def pixels_of(x: Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> uint8 [H, W, 3] (what the PNGs hold)."""
    return (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
