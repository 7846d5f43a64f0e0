"""Adversarial attacks as pure functions of a differentiable objective.

One `pgd` serves SAT training, evaluation and the live `/attack` route. Inputs are images in
[0, 1]; eps is in the same pixel units (write 8/255). The objective maps a batch of candidate
images [B, C, H, W] to a per-example loss [B] that the attack MAXIMISES; a targeted attack passes
the negated loss. Results always lie in the eps ball around x and in [0, 1], and are detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import losses

Objective = Callable[[Tensor], Tensor]
SuccessFn = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> bool [B]: does this point fool the model?
Norm = Literal["linf", "l2"]


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (BatchNorm statistics frozen) and restore each caller's mode."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _check_budget(eps: float, alpha: float, steps: int, norm: str) -> None:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps < 0 or alpha < 0:
        raise ValueError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped [B, 1, 1, 1] for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project a perturbation onto the eps ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / _flat_norm(delta), max=1.0)


def random_start(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None) -> Tensor:
    """A uniform point of the eps ball (linf) or a random direction of random radius (l2)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if norm == "linf":
        return (2 * u - 1) * eps
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return g / _flat_norm(g) * r * eps


def _ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest ascent direction of unit size: sign for L-inf, normalised gradient for L2."""
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad)


def _project_clamp(x: Tensor, delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """delta projected onto the eps ball, then cut so that x + delta stays in [0, 1]."""
    return (x + project(delta, eps, norm)).clamp(0, 1) - x


class _SuccessTracker:
    """Remembers, per image, the first iterate that `is_adversarial` accepts (no-op without one)."""

    def __init__(self, is_adversarial: SuccessFn | None, x0: Tensor) -> None:
        self.fn = is_adversarial
        self.found: Tensor | None = None
        self.best: Tensor | None = None
        if self.fn is not None:
            self.found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
            self.best = x0.detach().clone()
            self.update(x0)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if self.fn is None:
            return
        assert self.found is not None and self.best is not None
        new = self.fn(x.detach()).to(self.found.device).bool() & ~self.found
        self.best[new] = x.detach()[new]
        self.found |= new

    def result(self, fallback: Tensor) -> Tensor:
        if self.fn is None:
            return fallback
        assert self.found is not None and self.best is not None
        return torch.where(self.found.view(-1, *([1] * (fallback.dim() - 1))), self.best, fallback)


def pgd(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_init: bool = True,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
    is_adversarial: SuccessFn | None = None,
) -> Tensor:
    """Projected gradient ascent on `objective` (Madry et al. 2018), L-inf or L2.

    x: [B, C, H, W] in [0, 1]. `model`, when given, is held in eval mode during the attack and its
    mode restored; parameter `.grad`s are never touched (torch.autograd.grad w.r.t. the input only).
    `is_adversarial`, when given, is checked on every iterate (no grad); an image that was ever
    adversarial is returned at its first such iterate (AutoAttack-style), the others at the last one.
    Returns x_adv, detached, with ||x_adv - x|| <= eps and x_adv in [0, 1].
    """
    _check_budget(eps, alpha, steps, norm)
    x = x.detach()
    delta = random_start(x, eps, norm, generator) if random_init else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    with eval_mode(model):
        tracker = _SuccessTracker(is_adversarial, x + delta)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = objective(x + delta).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = _project_clamp(x, delta.detach() + alpha * _ascent_direction(grad, norm), eps, norm)
            tracker.update(x + delta)
    return tracker.result(x + delta).detach()


def fgsm(objective: Objective, x: Tensor, *, eps: float, norm: Norm = "linf", model: nn.Module | None = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one full-size step, no random start."""
    return pgd(objective, x, eps=eps, alpha=eps, steps=1, norm=norm, random_init=False, model=model)


def nfgsm(objective: Objective, x: Tensor, *, eps: float, noise: float = 2.0, step: float = 1.0,
          model: nn.Module | None = None, generator: torch.Generator | None = None) -> Tensor:
    """N-FGSM (de Jorge et al. 2022), L-inf, for adversarial training: uniform noise of `noise` * eps, one signed
    gradient step of `step` * eps from that point, and no projection back to the eps ball (only into [0, 1]), so
    the perturbation reaches (noise + step) * eps. The noise and the missing projection are what keep single-step
    training from catastrophic overfitting at 8/255, at one forward-backward per image instead of PGD-k's k.
    Returns x_adv, detached, in [0, 1]."""
    if eps <= 0 or noise < 0 or step <= 0:
        raise ValueError(f"need eps > 0, noise >= 0 and step > 0, got {eps}, {noise}, {step}")
    x = x.detach()
    start = (x + random_start(x, noise * eps, "linf", generator)).clamp(0, 1)
    with eval_mode(model):
        start.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(start).sum(), start)
    return (start.detach() + step * eps * grad.sign()).clamp(0, 1)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations where APGD may halve its step (Croce & Hein 2020, sec. 3.2).

    w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06);
    for 100 steps: 22, 41, 57, 70, 80, 87, 93, 99.
    """
    p = [0.0, 0.22]
    while (nxt := p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)) <= 1:
        p.append(nxt)
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]} - {0})


def _value_and_grad(objective: Objective, x: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-example objective [B] (detached) and its gradient w.r.t. x (None when not needed)."""
    if not need_grad:
        with torch.no_grad():
            return objective(x).detach().float(), None
    x = x.detach().requires_grad_(True)
    f = objective(x)
    (grad,) = torch.autograd.grad(f.sum(), x)
    return f.detach().float(), grad


def apgd(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    steps: int,
    norm: Norm = "linf",
    rho: float = 0.75,
    momentum: float = 0.75,
    random_init: bool = True,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
    is_adversarial: SuccessFn | None = None,
) -> Tensor:
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1): step-size-free PGD with momentum.

    Starts with step 2 * eps; at the checkpoints of `apgd_checkpoints` an image's step is halved and
    its iterate reset to its best point when (1) the objective rose in fewer than `rho` of the steps
    since the last checkpoint, or (2) the step was not halved at the last checkpoint and the best
    value has not improved since. Updates mix the projected step with the previous move (momentum
    0.75); the momentum is reset at a restart. Returns each image's highest-objective point, or, with
    `is_adversarial`, its first adversarial iterate. `steps` gradient evaluations (plus one forward
    pass at the last iterate). x: [B, C, H, W] in [0, 1]; result detached, in the eps ball and [0, 1].
    """
    _check_budget(eps, eps, steps, norm)
    if not 0 < rho <= 1 or not 0 < momentum <= 1:
        raise ValueError(f"rho and momentum must be in (0, 1], got rho={rho}, momentum={momentum}")
    x = x.detach()
    view = (-1,) + (1,) * (x.dim() - 1)
    checkpoints = set(apgd_checkpoints(steps))
    delta = random_start(x, eps, norm, generator) if random_init else torch.zeros_like(x)
    with eval_mode(model):
        x_cur = x + _project_clamp(x, delta, eps, norm)
        tracker = _SuccessTracker(is_adversarial, x_cur)
        f_cur, grad = _value_and_grad(objective, x_cur)
        assert grad is not None
        x_prev, x_best, f_best, grad_best = x_cur, x_cur.clone(), f_cur.clone(), grad.clone()
        eta = torch.full((x.shape[0],), 2 * eps, device=x.device, dtype=x.dtype)
        n_rises = torch.zeros_like(f_cur)  # steps since the last checkpoint where the objective rose
        f_best_at_check = f_best.clone()
        halved_at_check = torch.zeros_like(f_cur, dtype=torch.bool)
        last_check = 0
        for k in range(steps):
            a = 1.0 if k == 0 else momentum
            assert grad is not None  # only the last step skips its gradient
            z = x + _project_clamp(x, x_cur + eta.view(view) * _ascent_direction(grad, norm) - x, eps, norm)
            x_new = x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev)
            x_prev, x_cur = x_cur, x + _project_clamp(x, x_new - x, eps, norm)
            tracker.update(x_cur)
            f_new, grad = _value_and_grad(objective, x_cur, need_grad=k < steps - 1)
            n_rises += (f_new > f_cur).float()
            f_cur = f_new
            better = f_cur > f_best
            x_best[better], f_best[better] = x_cur[better], f_cur[better]
            if grad is not None:
                grad_best[better] = grad[better]
            if k + 1 in checkpoints and k < steps - 1:
                cond1 = n_rises < rho * (k + 1 - last_check)
                cond2 = ~halved_at_check & (f_best <= f_best_at_check)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2, eta)
                x_cur = torch.where(halve.view(view), x_best, x_cur)
                x_prev = torch.where(halve.view(view), x_best, x_prev)
                assert grad is not None  # not the last step
                grad = torch.where(halve.view(view), grad_best, grad)
                f_cur = torch.where(halve, f_best, f_cur)
                halved_at_check, f_best_at_check, last_check = halve, f_best.clone(), k + 1
                n_rises.zero_()
    return tracker.result(x_best).detach()


def square_fraction(i: int, queries: int, p_init: float) -> float:
    """Share of the image a Square-attack window covers at query i (Andriushchenko et al. 2020, sec. 3):
    p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query run,
    rescaled to `queries`."""
    i = int(i / max(1, queries) * 10_000)
    halvings = sum(i > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


IndexedScore = Callable[[Tensor, Tensor], Tensor]  # (images [n, C, H, W], their rows in the batch [n]) -> [n]


@torch.no_grad()
def square(
    score: IndexedScore,
    x: Tensor,
    *,
    eps: float,
    queries: int,
    p_init: float = 0.05,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Square attack, L-inf (Andriushchenko et al., ECCV 2020): score-based, no gradients at all.

    Starts from vertical stripes of +-eps; each query redraws one random square window (all channels
    +-eps) per image and keeps it when the score strictly rises. An image stops querying once its score
    is > 0 (the attack succeeded), so `score` must be a margin (e.g. best other vote minus true vote).
    Immune to gradient masking by construction. `score` is called with the still-active images and
    their row indices in x, so it can look up per-image labels. Result in the eps ball and [0, 1].
    `model`, when given, is held in eval mode.
    """
    _check_budget(eps, eps, max(1, queries), "linf")
    with eval_mode(model):
        return _square(score, x.detach(), eps, queries, p_init, generator)


def _square(score: IndexedScore, x: Tensor, eps: float, queries: int, p_init: float,
            generator: torch.Generator | None) -> Tensor:
    b, c, h, w = x.shape
    dev = x.device
    every = torch.arange(b, device=dev)
    stripes = torch.where(torch.rand(b, c, 1, w, generator=generator, device=dev) < 0.5, -eps, eps).to(x.dtype)
    x_best = (x + stripes.expand(b, c, h, w)).clamp(0, 1)
    f_best = score(x_best, every).float()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    for i in range(queries):
        ia = (f_best <= 0).nonzero().squeeze(1)
        if len(ia) == 0:
            break
        n = len(ia)
        side = max(1, min(h - 1, round(math.sqrt(square_fraction(i, queries, p_init) * h * w))))
        r = torch.randint(0, h - side + 1, (n,), generator=generator, device=dev)
        q = torch.randint(0, w - side + 1, (n,), generator=generator, device=dev)
        in_rows = (rows[None] >= r[:, None]) & (rows[None] < (r + side)[:, None])  # n x H
        in_cols = (cols[None] >= q[:, None]) & (cols[None] < (q + side)[:, None])  # n x W
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # n x 1 x H x W
        signs = torch.where(torch.rand(n, c, 1, 1, generator=generator, device=dev) < 0.5, -eps, eps).to(x.dtype)
        delta = torch.where(window, signs, x_best[ia] - x[ia])
        cand = x[ia] + _project_clamp(x[ia], delta, eps, "linf")
        f_new = score(cand, ia).float()
        better = f_new > f_best[ia]
        x_best[ia[better]], f_best[ia[better]] = cand[better], f_new[better]
    return x_best


def apgd_ce(logits_fn: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor, **budget: Any) -> Tensor:
    """APGD on the cross-entropy of `labels` (Croce & Hein 2020); keyword budget as `apgd`."""
    return apgd(cross_entropy_objective(logits_fn, labels), x, **budget)


def apgd_dlr(logits_fn: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor, **budget: Any) -> Tensor:
    """APGD on the difference-of-logits-ratio loss (Croce & Hein 2020); needs >= 3 classes."""
    return apgd(dlr_objective(logits_fn, labels), x, **budget)


def noise(x: Tensor, *, eps: float, norm: Norm = "linf", generator: torch.Generator | None = None) -> Tensor:
    """Random-noise baseline of the same size: a random corner of the L-inf ball (a random L2 sphere point)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = torch.where(u < 0.5, -eps, eps)
    else:
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = g / _flat_norm(g) * eps
    return (x.detach() + delta).clamp(0, 1)


# --- objectives -------------------------------------------------------------------------------


def cross_entropy_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """Untargeted: raise the cross-entropy of the true label. For targeted, negate and pass the target."""
    return lambda x: F.cross_entropy(logits_fn(x), labels, reduction="none")


def kl_objective(logits_fn: Callable[[Tensor], Tensor], logits_clean: Tensor) -> Objective:
    """TRADES' attack: raise KL(p(x) || p(x')) from the clean prediction (no label needed)."""
    clean = logits_clean.detach()
    return lambda x: losses.trades_kl(clean, logits_fn(x))


def targeted_objective(logits_fn: Callable[[Tensor], Tensor], target: Tensor) -> Objective:
    """Targeted: lower the cross-entropy of `target` (same loss, opposite sign)."""
    return lambda x: -F.cross_entropy(logits_fn(x), target, reduction="none")


def margin_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """CW margin: best other logit minus true logit; positive once misclassified."""

    def objective(x: Tensor) -> Tensor:
        logits = logits_fn(x)  # B x C
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        return other - true

    return objective


def dlr_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """Difference of logits ratio (Croce & Hein 2020): margin scaled by z_1 - z_3, scale invariant."""

    def objective(x: Tensor) -> Tensor:
        logits = logits_fn(x)  # B x C
        srt = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, labels[:, None]).squeeze(1)
        is_top = srt[:, 0] == true
        other = torch.where(is_top, srt[:, 1], srt[:, 0])
        return (other - true) / (srt[:, 0] - srt[:, 2] + 1e-12)

    return objective


def embedding_objective(encoder: Callable[[Tensor], Tensor], x_clean: Tensor) -> Objective:
    """Label-free: push the embedding away from the clean one (minimise cosine similarity)."""
    with torch.no_grad():
        z0 = encoder(x_clean).detach()
    return lambda x: -(encoder(x) * z0).sum(dim=1)


def guided_objective(encoder: Callable[[Tensor], Tensor], guides: Tensor) -> Objective:
    """The paper's k-NN-guided attack: pull the embedding toward other-class samples.

    guides: [B, M, D] L2-normalised embeddings of M other-class samples per image (see
    `training.knn.other_class_guides`). Maximises the mean cosine similarity to them.
    """
    return lambda x: torch.einsum("bd,bmd->b", encoder(x), guides) / guides.shape[1]
