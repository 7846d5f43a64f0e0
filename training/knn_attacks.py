"""The named attacks on a k-NN classifier: one catalogue for the robustness suite, the PGD metric of
training and export, and POST /attack (DESIGN section 2: one implementation of each attack).

The hard vote has no gradient, so gradient attacks differentiate a soft-kNN `Surrogate` (or the embedding)
and their result is scored by the hard vote the product serves. Each entry of `CATALOGUE` is a builder
(model, `Budget`, `Surrogate`) -> `AttackFn` plus the sentence reports print beside its number; the API's
method names are aliases of entries (`API_METHODS`), so what /attack runs is what the suite measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from training import attacks, knn

if TYPE_CHECKING:
    from training.evaluate import KnnModel
    from training.manifest import KnnSurrogate

AttackFn = Callable[[Tensor, Tensor, torch.Generator], Tensor]  # (x [B, 3, H, W], y [B], generator) -> x_adv


def step_fraction(steps: int) -> float:
    """The PGD step rule, as a fraction of eps: 2.5 / steps (Madry et al. 2018), so more steps search finer,
    not farther; every attack without an explicit step uses it."""
    return 2.5 / steps


@dataclass(frozen=True)
class Surrogate:
    """Which soft-kNN stand-in the gradient attacks differentiate (`knn.soft_knn_logits`)."""

    temperature: float = 0.1
    k: int | None = None  # None: softmax over the whole bank; k: over the k nearest only

    @classmethod
    def from_manifest(cls, chosen: KnnSurrogate | None) -> Surrogate:
        """The surrogate the robustness suite selected for an artifact (manifest knn.surrogate), else the default."""
        return cls() if chosen is None else cls(chosen.temperature, chosen.k)

    def build(self, model: KnnModel) -> knn.SoftKnnClassifier:
        return model.surrogate(self.temperature, self.k)

    def __str__(self) -> str:
        return f"T={self.temperature:g}, " + ("whole bank" if self.k is None else f"{self.k} nearest")


@dataclass(frozen=True)
class Budget:
    """How hard one attack searches. eps in [0, 1] pixel units; `alpha` is the step as a fraction of eps."""

    eps: float
    steps: int  # iterations (square: queries; fgsm and noise ignore it)
    alpha: float | None = None  # None: `step_fraction(steps)`
    track: bool = False  # stop each image at its first iterate that flips the hard vote (AutoAttack-style)
    guides: int = 300  # guided: other-class bank samples pulling the embedding (the paper uses ~300)
    sw_guides: int = 75  # sw_guided: nearest bank samples of the target class
    targets: int = 3  # apgd_targeted, sw_guided: attack each of the top other classes in turn
    target: Tensor | None = None  # [B] classes to pull toward (targeted); None: away from y

    @property
    def step(self) -> float:
        return (self.alpha if self.alpha is not None else step_fraction(self.steps)) * self.eps


Builder = Callable[["KnnModel", Budget, Surrogate], AttackFn]


@dataclass(frozen=True)
class KnnAttack:
    """One named attack: how to build it and how reports describe it."""

    name: str
    build: Builder
    description: str  # format fields: {alpha}, {guides}, {sw_guides}, {targets}
    uses_surrogate: bool  # differentiates (or scores with) the soft-kNN surrogate


def _fooled(m: KnnModel, y: Tensor, b: Budget) -> attacks.SuccessFn | None:
    return m.fooled(y) if b.track else None


def _surrogate_objective(loss: Callable[[Callable[[Tensor], Tensor], Tensor], attacks.Objective]) -> Callable[
        [KnnModel, Budget, Surrogate, Tensor], attacks.Objective]:
    """`loss` of the surrogate away from y, or (targeted) the cross-entropy toward the budget's target."""
    def objective(m: KnnModel, b: Budget, t: Surrogate, y: Tensor) -> attacks.Objective:
        sur = t.build(m)
        return loss(sur, y) if b.target is None else attacks.targeted_objective(sur, b.target)
    return objective


def _pgd(loss: Callable[[Callable[[Tensor], Tensor], Tensor], attacks.Objective]) -> Builder:
    objective = _surrogate_objective(loss)

    def build(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
        def run(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
            return attacks.pgd(objective(m, b, t, y), x, eps=b.eps, alpha=b.step, steps=b.steps, model=m.encoder,
                               generator=g, is_adversarial=_fooled(m, y, b))
        return run
    return build


def _apgd(loss: Callable[[Callable[[Tensor], Tensor], Tensor], attacks.Objective]) -> Builder:
    objective = _surrogate_objective(loss)

    def build(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
        def run(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
            return attacks.apgd(objective(m, b, t, y), x, eps=b.eps, steps=b.steps, model=m.encoder, generator=g,
                                is_adversarial=_fooled(m, y, b))
        return run
    return build


def _fgsm(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    objective = _surrogate_objective(attacks.cross_entropy_objective)
    return lambda x, y, g: attacks.fgsm(objective(m, b, t, y), x, eps=b.eps, model=m.encoder)


def guided_attack(model: KnnModel, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int, guides: int = 300,
                  target: Tensor | None = None, random_init: bool = True, generator: torch.Generator | None = None,
                  is_adversarial: attacks.SuccessFn | None = None) -> Tensor:
    """The paper's k-NN-guided embedding attack (Chen et al. 2020): L-inf PGD (absolute step `alpha`) pulling
    the embedding toward the `guides` nearest bank samples of other classes (of `target`, when given)."""
    objective = attacks.guided_objective(model.encoder, model.guides(x, y, guides, target))
    return attacks.pgd(objective, x, eps=eps, alpha=alpha, steps=steps, random_init=random_init, model=model.encoder,
                       generator=generator, is_adversarial=is_adversarial)


def _guided(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    return lambda x, y, g: guided_attack(m, x, y, eps=b.eps, alpha=b.step, steps=b.steps, guides=b.guides,
                                         target=b.target, generator=g, is_adversarial=_fooled(m, y, b))


def _embedding(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    return lambda x, y, g: attacks.pgd(attacks.embedding_objective(m.encoder, x), x, eps=b.eps, alpha=b.step,
                                       steps=b.steps, model=m.encoder, generator=g, is_adversarial=_fooled(m, y, b))


@torch.no_grad()
def top_other_classes(sur: torch.nn.Module, m: KnnModel, x: Tensor, y: Tensor, n: int) -> Tensor:
    """[B, n] the classes other than y with the highest clean surrogate logits (the likeliest targets)."""
    with attacks.eval_mode(m.encoder):
        logits = sur(x).float()
    logits = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return logits.argsort(1, descending=True)[:, :min(n, logits.shape[1] - 1)]


def each_target(m: KnnModel, x: Tensor, y: Tensor, targets: Tensor, attack_one: Callable[[Tensor], Tensor],
                broken: attacks.SuccessFn | None = None) -> Tensor:
    """Run `attack_one(target [B])` per target column; keep, per image, the first result that breaks it
    (`broken`, default: the hard vote no longer says y)."""
    broken = broken or m.fooled(y)
    out, done = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for j in range(targets.shape[1]):
        x_adv = attack_one(targets[:, j])
        hit = broken(x_adv).to(done.device) & ~done
        out[hit], done = x_adv[hit], done | hit
    return out


def targeted_margin(sur: Callable[[Tensor], Tensor], y: Tensor, target: Tensor) -> attacks.Objective:
    """Logit of the target minus the true one (APGD-T's objective)."""
    def objective(xa: Tensor) -> Tensor:
        logits = sur(xa)
        return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)
    return objective


def _targeted_apgd(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    def run(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        sur = t.build(m)
        return each_target(m, x, y, top_other_classes(sur, m, x, y, b.targets), lambda target: attacks.apgd(
            targeted_margin(sur, y, target), x, eps=b.eps, steps=b.steps, model=m.encoder, generator=g,
            is_adversarial=_fooled(m, y, b)))
    return run


def _sw_guided(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    def run(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        targets = top_other_classes(t.build(m), m, x, y, b.targets)
        return each_target(m, x, y, targets, lambda tgt: guided_attack(
            m, x, y, eps=b.eps, alpha=b.step, steps=b.steps, guides=b.sw_guides, target=tgt, generator=g,
            is_adversarial=_fooled(m, y, b)))
    return run


def vote_margin_score(m: KnnModel, t: Surrogate, y: Tensor) -> attacks.IndexedScore:
    """Score for query attacks: > 0 exactly when the hard vote no longer says y; below, the vote margin
    (best other count minus true count, minus 1) plus a soft-vote tie-breaker in (-0.49, 0.49)."""
    sur = t.build(m)

    def score(x: Tensor, idx: Tensor) -> Tensor:
        yy = y[idx]
        with attacks.eval_mode(m.encoder):
            z = m.encoder(x)
        pred, votes = knn.knn_predict(z, m.bank, m.bank_labels, m.num_classes, m.k, m.metric)
        soft = knn.soft_knn_logits(z, sur.bank, sur.bank_labels, m.num_classes, sur.temperature, sur.k)
        onehot = F.one_hot(yy, m.num_classes).bool()
        soft_margin = soft.masked_fill(onehot, float("-inf")).amax(1) - soft.gather(1, yy[:, None]).squeeze(1)
        vote_margin = votes.float().masked_fill(onehot, float("-inf")).amax(1) - votes.float().gather(
            1, yy[:, None]).squeeze(1)
        below = vote_margin - 1 + 0.49 * torch.tanh(soft_margin.float())
        return torch.where(pred != yy, torch.ones_like(below), torch.minimum(below, torch.full_like(below, -0.5)))
    return score


def _square(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    return lambda x, y, g: attacks.square(vote_margin_score(m, t, y), x, eps=b.eps, queries=b.steps, model=m.encoder,
                                            generator=g)


def _noise(m: KnnModel, b: Budget, t: Surrogate) -> AttackFn:
    return lambda x, y, g: attacks.noise(x, eps=b.eps, generator=g)


CATALOGUE: dict[str, KnnAttack] = {a.name: a for a in (
    KnnAttack("fgsm", _fgsm, "FGSM (Goodfellow et al. 2015): one signed step of eps on the cross-entropy of the "
              "soft-kNN surrogate", True),
    KnnAttack("pgd_ce", _pgd(attacks.cross_entropy_objective),
              "PGD (Madry et al. 2018), random start, step {alpha}*eps, cross-entropy of the soft-kNN surrogate", True),
    KnnAttack("apgd_ce", _apgd(attacks.cross_entropy_objective),
              "APGD (Croce & Hein 2020) on the cross-entropy of the soft-kNN surrogate", True),
    KnnAttack("apgd_dlr", _apgd(attacks.dlr_objective),
              "APGD (Croce & Hein 2020) on the DLR loss of the soft-kNN surrogate", True),
    KnnAttack("guided", _guided, "the paper's k-NN-guided embedding attack (Chen et al. 2020): PGD pulling the "
              "embedding toward the {guides} nearest other-class bank samples, step {alpha}*eps, random start, "
              "final iterate", False),
    KnnAttack("embedding", _embedding, "label-free PGD pushing the embedding away from the clean one (cosine), "
              "step {alpha}*eps", False),
    KnnAttack("noise", _noise, "random-noise baseline: a uniformly random corner of the L-inf ball", False),
    KnnAttack("cw", _pgd(attacks.margin_objective), "PGD on the CW margin of the soft-kNN surrogate (the /attack "
              "'adaptive' method), step {alpha}*eps", True),
    KnnAttack("apgd_targeted", _targeted_apgd, "APGD-T style: APGD on the targeted margin (target logit minus "
              "true) of the soft-kNN surrogate, once per each of the {targets} top other classes", True),
    KnnAttack("sw_guided", _sw_guided, "Sitawarin & Wagner guide-sample attack: PGD pulling the embedding toward "
              "the {sw_guides} nearest bank samples of one target class, step {alpha}*eps, once per each of the "
              "{targets} top other classes", False),
    KnnAttack("square", _square, "Square attack (Andriushchenko et al. 2020), score-based black box on the "
              "hard-vote margin (soft vote as tie-breaker), no gradients; steps = queries", True),
)}

# POST /attack's method names (a public API) -> catalogue entries; the catalogue's own names work too
API_METHODS = {"fgsm": "fgsm", "pgd": "pgd_ce", "knn_pgd": "guided", "adaptive": "cw"}


def resolve(name: str) -> KnnAttack:
    """The catalogue entry for a catalogue name or an API alias."""
    entry = CATALOGUE.get(API_METHODS.get(name, name))
    if entry is None:
        raise ValueError(f"unknown attack method {name!r}; expected one of "
                         f"{sorted(set(CATALOGUE) | set(API_METHODS))}")
    return entry


def build(name: str, model: KnnModel, budget: Budget, surrogate: Surrogate | None = None) -> AttackFn:
    """The named attack against `model` with `budget`, differentiating `surrogate` (default T = 0.1, whole bank)."""
    return resolve(name).build(model, budget, surrogate or Surrogate())


def describe(name: str, budget: Budget, **fmt: Any) -> str:
    """The catalogue sentence of an attack with its budget filled in."""
    alpha = budget.alpha if budget.alpha is not None else step_fraction(budget.steps)
    return resolve(name).description.format(alpha=round(alpha, 4), guides=budget.guides, sw_guides=budget.sw_guides,
                                            targets=budget.targets, **fmt)


def craft(model: KnnModel, x: Tensor, y: Tensor, *, method: str = "pgd", eps: float = 8 / 255, steps: int = 10,
          target: Tensor | None = None, surrogate: Surrogate | None = None, guides: int = 300,
          generator: torch.Generator | None = None) -> Tensor:
    """Adversarial images for one request (POST /attack): the named attack, final iterate (no early stop, so
    the result lies past the decision boundary and survives 8-bit quantisation). x [B, 3, H, W] in [0, 1];
    y [B] the labels to move away from; target [B] makes it targeted (ignored by embedding and noise)."""
    attack = build(method, model, Budget(eps, steps, guides=guides, target=target), surrogate)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    return attack(x, y, generator)
