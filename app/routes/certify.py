"""POST /certify: randomized-smoothing prediction with a certified L2 radius (Cohen et al. 2019; issue 14).

The base classifier is the model exactly as /classify serves it (runtime, index, vote, live bank): the
n0 + n noisy copies go through the model's batching worker in chunks of `certify_chunk` (at most `max_batch`),
one chunk in flight per certification, so /classify batches interleave with them instead of waiting behind n
images (`benchmarks/certify_interplay.py` measures the delay a chunk adds).
The job runs on a pool of its own (`certify_concurrency` at once, `certify_queue` waiting, 429 beyond,
504 after `certify_timeout_s`), the admission control of /attack (`app.attack.AttackService`).
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, Field
from torch import Tensor

from app.attack import AttackService, DeadlinePassed
from app.batching import QueueFull
from app.config import Settings
from app.deps import DecoderDep, MetricsDep, RegistryDep, SettingsDep, require_api_key
from app.errors import ApiError, responses
from app.images import Decoded
from app.inference import batch_tensor
from app.registry import ServedModel
from training.certify import Certificate, Classifier, certify

router = APIRouter(tags=["certify"], dependencies=[Depends(require_api_key)])
SEED = 0  # the same request gives the same answer
QUEUE_FULL_PAUSE_S = 0.01  # a full /classify queue: wait this long and offer the chunk again (yield to /classify)


class CertifyResponse(BaseModel):
    model: str
    label: str | None = Field(description="the smoothed classifier's class; null when it abstained")
    class_id: int | None
    abstained: bool = Field(description="true when the Clopper-Pearson lower bound on pA is <= 1/2: no certificate")
    radius: float = Field(description="certified L2 radius in [0, 1] pixel units of the model input (the image "
                                      "after resizing to the model's size): no perturbation of smaller L2 norm "
                                      "changes the smoothed prediction, with probability >= 1 - alpha; 0 when "
                                      "abstained")
    p_lower: float = Field(description="(1 - alpha) Clopper-Pearson lower bound on the top class's probability "
                                       "under noise, from the n estimation samples")
    count: int = Field(description="estimation samples that voted for the selected class")
    sigma: float
    n: int
    n0: int
    alpha: float
    latency_ms: float


async def get_certifier(request: Request) -> AttackService:
    service = getattr(request.app.state, "certifier", None)
    if service is None:
        raise ApiError(503, "not_ready", "the certification service is not running")
    return service


class CertifyJob:
    """CERTIFY one decoded image against `model`'s batching worker, within a deadline (runs on a pool thread)."""

    def __init__(self, model: ServedModel, image: Decoded, *, sigma: float, n: int, n0: int, alpha: float,
                 request_timeout_s: float, chunk: int | None) -> None:
        self.model, self.image, self.request_timeout_s = model, image, request_timeout_s
        self.chunk = model.worker.max_batch if chunk is None else min(chunk, model.worker.max_batch)
        self.sigma, self.n, self.n0, self.alpha = sigma, n, n0, alpha

    def _classifier(self, deadline: float) -> Classifier:
        """f(x) for CERTIFY: one chunk through the worker at a time; DeadlinePassed once the budget is spent."""
        worker = self.model.worker

        def classify(x: Tensor) -> Tensor:
            while True:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise DeadlinePassed
                try:
                    future = worker.submit(x)
                    break
                except QueueFull:  # /classify traffic first: retry until the deadline rather than fail
                    time.sleep(min(QUEUE_FULL_PAUSE_S, wait))
            try:
                pred, _ = future.result(timeout=max(min(wait, self.request_timeout_s), 0.001))
            except (FutureTimeout, CancelledError) as e:
                future.cancel()
                raise DeadlinePassed from e
            return pred

        return classify

    def __call__(self, deadline: float) -> Certificate:
        x = batch_tensor([self.image.pixels[self.model.input_size]])[0]
        return certify(self._classifier(deadline), x, sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha,
                       generator=torch.Generator().manual_seed(SEED), num_classes=len(self.model.classes),
                       batch_size=self.chunk)


def check_bounds(sigma: float, n: int, n0: int, settings: Settings) -> None:
    """422 for parameters beyond the server's limits (the Form constraints already refuse <= 0)."""
    if sigma > settings.certify_max_sigma:
        raise ApiError(422, "invalid_parameters", f"sigma must be <= {settings.certify_max_sigma:g}, got {sigma:g}")
    if n > settings.certify_max_n:
        raise ApiError(422, "invalid_parameters", f"n must be <= {settings.certify_max_n}, got {n}")
    if n0 > settings.certify_max_n0:
        raise ApiError(422, "invalid_parameters", f"n0 must be <= {settings.certify_max_n0}, got {n0}")


CertifierDep = Annotated[AttackService, Depends(get_certifier)]


@router.post("/certify", response_model=CertifyResponse,
             responses=responses(400, 401, 404, 413, 415, 429, 503, 504))
async def certify_image(
    registry: RegistryDep,
    settings: SettingsDep,
    certifier: CertifierDep,
    decoder: DecoderDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="the image to certify")],
    model: Annotated[str | None, Form(description="model; default: the default model")] = None,
    sigma: Annotated[float, Form(gt=0, allow_inf_nan=False,
                                 description="noise std in [0, 1] pixel units, at most certify_max_sigma")] = 0.25,
    n: Annotated[int, Form(ge=1, description="estimation samples, at most certify_max_n")] = 1000,
    n0: Annotated[int, Form(ge=1, description="selection samples, at most certify_max_n0")] = 100,
    alpha: Annotated[float, Form(gt=0, lt=0.5, allow_inf_nan=False,
                                 description="failure probability of the certificate")] = 0.001,
) -> CertifyResponse:
    """Randomized smoothing (Cohen et al. 2019) over the model's k-NN vote: the class the vote gives most
    often under Gaussian noise N(0, sigma^2 I), and an L2 radius within which that answer provably cannot
    change (with probability >= 1 - alpha over the sampling), or `abstained` when the top class is not
    significantly above 1/2. Costs n0 + n classifications; queued: 429 with Retry-After when the queue is
    full, 504 past the server's time limit.
    """
    t0 = time.perf_counter()
    served = registry.get(model or None)
    check_bounds(sigma, n, n0, settings)
    try:
        slot = certifier.admit()  # capacity first: a full queue costs no decoding
    except ApiError:
        metrics.certifications.labels(served.name, "rejected").inc()
        raise
    try:
        [(_, image)] = await decoder.images([file], [served.input_size])
    except BaseException:
        slot.release()
        raise
    job = CertifyJob(served, image, sigma=sigma, n=n, n0=n0, alpha=alpha, request_timeout_s=settings.request_timeout_s,
                     chunk=settings.certify_chunk)
    try:
        c = await certifier.run(job, slot)
    except ApiError as e:
        metrics.certifications.labels(served.name, {429: "rejected", 504: "timeout"}.get(e.status, "error")).inc()
        raise
    metrics.certifications.labels(served.name, "abstained" if c.abstained else "certified").inc()
    classes = served.classes
    label = None if c.abstained or c.label >= len(classes) else classes[c.label]
    return CertifyResponse(model=served.name, label=label, class_id=None if c.abstained else c.label,
                           abstained=c.abstained, radius=c.radius, p_lower=c.p_lower, count=c.count, sigma=sigma,
                           n=n, n0=n0, alpha=alpha, latency_ms=(time.perf_counter() - t0) * 1000)
