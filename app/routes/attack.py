"""POST /attack: craft an adversarial example live, optionally against several models."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, UploadFile

from app.attack import AttackJob, AttackRequestSpec
from app.deps import AttacksDep, DecoderDep, MetricsDep, RegistryDep, SettingsDep, require_api_key
from app.errors import ApiError, responses
from app.registry import Registry, ServedModel
from app.routes.classify import resolve_top_k
from app.schemas import AttackResponse, ClassRef

router = APIRouter(tags=["attack"], dependencies=[Depends(require_api_key)])
Method = Literal["fgsm", "pgd", "knn_pgd", "adaptive"]  # = training.knn_attacks.API_METHODS (a test checks)


def compare_models(registry: Registry, main: ServedModel, compare: list[str] | None) -> list[ServedModel]:
    """`compare` entries (repeated fields and/or comma-separated) -> models, without duplicates or `main`."""
    names: dict[str, None] = {}  # insertion-ordered set: linear however many names ("a,a" is one)
    for entry in compare or []:
        names.update((n, None) for n in map(str.strip, entry.split(",")) if n and n != main.name)
    return [registry.get(n) for n in names]


@router.post("/attack", response_model=AttackResponse,
             responses=responses(400, 401, 404, 413, 415, 429, 503, 504))
async def attack(
    registry: RegistryDep,
    settings: SettingsDep,
    attacks: AttacksDep,
    decoder: DecoderDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="the image to perturb")],
    model: Annotated[str | None, Form(description="model to attack; default: the default model")] = None,
    method: Annotated[Method, Form(description="fgsm | pgd | knn_pgd (the paper's guided attack) | adaptive "
                                               "(CW margin on the soft-kNN surrogate)")] = "pgd",
    eps: Annotated[float, Form(ge=0, allow_inf_nan=False,
                               description="L-inf radius in [0, 1] pixel units, at most the server's "
                                           "attack_max_eps (16/255 by default)")] = 8 / 255,
    steps: Annotated[int, Form(ge=1, description="gradient steps (ignored by fgsm), at most attack_max_steps")]
    = 10,
    target: Annotated[str | None, Form(description="class name or id for a targeted attack")] = None,
    compare: Annotated[list[str] | None, Form(description="other models: comma-separated and/or repeated")]
    = None,
    top_k: Annotated[int | None, Form(ge=1, description="vote shares per prediction (default 3)")] = None,
) -> AttackResponse:
    """Attack a model with an L-inf bounded perturbation and report whether its k-NN vote changed.

    The label attacked is the model's own clean prediction (or, with `target`, the attack pulls
    toward that class). Attacks are crafted on the differentiable soft-kNN surrogate (or the
    embedding, for knn_pgd) with the torch encoder and scored by the served hard vote. With
    `compare`, the same perturbed image is shown to each other model (transfer) and each is then
    attacked in turn with the same settings. Attacks are queued: 429 with Retry-After when the
    queue is full, 504 when one runs past the server's time limit.
    """
    t0 = time.perf_counter()
    served = registry.get(model or None)
    if eps > settings.attack_max_eps + 1e-9:
        limit = settings.attack_max_eps
        raise ApiError(422, "invalid_parameters", f"eps must be <= {limit:.6f} ({limit * 255:g}/255), got {eps}")
    if steps > settings.attack_max_steps:
        raise ApiError(422, "invalid_parameters", f"steps must be <= {settings.attack_max_steps}, got {steps}")
    others = compare_models(registry, served, compare)
    target = target.strip() if target and target.strip() else None
    target_ref = None
    if target is not None:
        for m in (served, *others):
            m.class_id(target)  # 422 now rather than after queueing
        tid = served.class_id(target)
        target_ref = ClassRef(label=served.classes[tid], class_id=tid)
    k = resolve_top_k(served, top_k)  # compared models get min(k, their classes)
    steps = 1 if method == "fgsm" else steps
    try:
        slot = attacks.admit()  # capacity first: a full queue costs no decoding
    except ApiError:
        metrics.attacks.labels(served.name, method, "rejected").inc()
        raise
    try:
        [(_, image)] = await decoder.images([file], [m.input_size for m in (served, *others)])
    except BaseException:
        slot.release()
        raise
    spec = AttackRequestSpec(method=method, eps=eps, steps=steps, top_k=k, target=target)
    job = AttackJob(served, image, spec, others, settings.request_timeout_s)
    try:
        outcome, comparisons = await attacks.run(job, slot)
    except ApiError as e:
        outcome_label = {429: "rejected", 504: "timeout"}.get(e.status, "error")
        metrics.attacks.labels(served.name, method, outcome_label).inc()
        raise
    metrics.attacks.labels(served.name, method, "success" if outcome.success else "failure").inc()
    metrics.attack_latency.labels(method).observe(time.perf_counter() - t0)
    return AttackResponse(model=served.name, method=method, eps=eps, steps=steps, target=target_ref,
                          latency_ms=(time.perf_counter() - t0) * 1000, compare=comparisons,
                          **outcome.model_dump())
