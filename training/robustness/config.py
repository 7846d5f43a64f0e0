"""The suite's budgets (`SuiteConfig`), the rows of its attack table (`AttackSpec`) and the protocol sentences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training import knn_attacks
from training.card import fmt_eps
from training.knn_attacks import Surrogate

SPLITS = ("test", "validation")  # validation: the training images after each bank and the sweep's, for choices
EXACT_TEST = 1017  # leading CIFAR-10 test images that are pixel-exact (../shared/data/cifar10/README.md)


EPS_SWEEP = (0.0, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255, 0.03, 0.06)


PAPER_EPS = (0.03, 0.06)


# defence success rate at eps 0.03 that the paper reports, by training method (DESIGN section 1)
PAPER_REPORTED = {"supervised": "~0.19", "ssl": "~0.52", "sat": "~0.63-0.85"}


@dataclass(frozen=True)
class SuiteConfig:
    """Budgets of the evaluation. Defaults are the full protocol; `quick()` the CI/test one. eps in [0, 1]."""

    data: str = "data"
    out: str = "benchmarks/results"
    cache_dir: str | None = None  # per-attack results for resuming (None: <out>/cache)
    n_robust: int = 1000  # first N test images attacked
    n_clean: int | None = None  # test images for clean accuracy (None: all)
    eps: float = 8 / 255  # main radius of the per-attack table
    eps_sweep: tuple[float, ...] = EPS_SWEEP
    paper_eps: tuple[float, ...] = PAPER_EPS
    large_eps: float = 64 / 255  # masking check: every image should fall here
    temperatures: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    topk_surrogate: bool = True  # also try the surrogate over the model's k nearest (large T -> the exact vote share)
    n_sweep: int = 200  # held-out training images for the temperature choice
    sweep_steps: int = 10  # PGD steps of the temperature sweep
    pgd_steps: tuple[int, int] = (20, 50)
    apgd_steps: int = 100  # APGD-CE / APGD-DLR at the main eps and in the eps sweep
    embedding_steps: int = 50
    guided_steps: int = 10  # the paper's attack: 10 steps of eps/6 (0.005 at eps 0.03), random start
    guided_alpha: float = 1 / 6  # step as a fraction of eps
    guides: int = 300  # the paper guides with ~300 other-class samples
    transfer_steps: int = 100  # APGD-CE on the source model's surrogate
    large_eps_steps: int = 20
    targets: int = 3  # targeted attacks aim at each of the top other classes of the clean surrogate
    targeted_steps: int = 100  # APGD steps per target
    sw_guides: int = 75  # Sitawarin & Wagner's guide-sample attack: m nearest bank samples of the target class
    sw_steps: int = 50
    cw_steps: int = 50  # PGD on the surrogate's CW margin (the /attack "adaptive" method)
    alt_surrogates: int = 2  # APGD-CE again with the next-best surrogates of the temperature sweep
    square_queries: int = 1000  # score-based black-box Square attack on the vote margin
    abstain_coverage: float = 0.9  # abstention: credibility threshold answering this share of the clean images
    abstain_steps: int = 100  # APGD steps of the abstention attacks (per target for the adaptive one)
    validate_n: int = 200  # images for the torchattacks cross-check (0: skip)
    validate_eps: float = 1 / 255  # small enough that the supervised model keeps part of its accuracy (informative)
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    progress: bool = True
    quick: bool = False
    split: str = "test"  # "validation": attack held-out training images instead (model selection; SPLITS)
    # a gate for choices: clean, the surrogate sweep, the main-table attacks and their worst case only; no eps sweep
    # beyond the main eps, paper table, masking checks or torchattacks cross-check; no cards (the main-table attacks
    # were 1,298 of the 3,222 s of the shipped default's full test-split run, results/robustness_default.json)
    headline_only: bool = False
    # fail fast (a gate of one candidate): stop at the first figure under its minimum, clean / exact once measured,
    # worst as the running per-image worst case after each worst-case attack (it only falls), instead of attacking on
    stop_below: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.stop_below is not None and (not self.stop_below or set(self.stop_below) - {"clean", "exact", "worst"}):
            raise ValueError(f"stop_below takes minimums on clean, exact and worst, got {self.stop_below}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.n_robust < 1:
            raise ValueError(f"n_robust must be >= 1, got {self.n_robust}")
        if not 0 < self.eps <= 1 or any(not 0 <= e <= 1 for e in self.eps_sweep):
            raise ValueError(f"eps values must be in [0, 1] pixel units, got {self.eps}, {self.eps_sweep}")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")

    @property
    def images_word(self) -> str:
        """What the attacked images are, for every protocol sentence."""
        return "test images" if self.split == "test" else "validation images (training images held out of the bank)"

    @classmethod
    def quick_config(cls, **overrides: Any) -> SuiteConfig:
        """A few dozen images and a few steps: the whole suite in about a minute on a tiny model."""
        base = dict(n_robust=32, n_clean=256, temperatures=(0.01, 0.05, 0.2), n_sweep=32, sweep_steps=5,
                    pgd_steps=(5, 10), apgd_steps=10, embedding_steps=10, guides=50, transfer_steps=10,
                    large_eps_steps=5, validate_n=32, batch_size=64, targets=2, targeted_steps=10, sw_guides=20,
                    sw_steps=10, cw_steps=10, alt_surrogates=1, square_queries=50, abstain_steps=10,
                    quick=True)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class AttackSpec:
    """One row of the per-attack table: a named attack kind with its budget."""

    name: str
    kind: str  # name in knn_attacks.CATALOGUE
    steps: int
    alpha: float = 0.25  # step as a fraction of eps (PGD-style attacks)
    worst_case: bool = True  # part of the per-image worst case
    track: bool = True  # keep the first iterate that flips the hard vote (AutoAttack-style)
    chain: bool = False  # attack only the images still robust after every worst-case attack listed before it
    surrogate_rank: int = 0  # 0: the surrogate the sweep selected; r: its r-th runner-up


def attack_specs(cfg: SuiteConfig) -> list[AttackSpec]:
    """The white-box attacks of the main table (transfer and noise are added by the suite)."""
    short, long = cfg.pgd_steps
    return [  # PGD step 2.5 * eps / steps (Madry et al. 2018), so more steps means a finer, not longer, search
        AttackSpec(f"pgd{short}", "pgd_ce", short, alpha=2.5 / short),
        AttackSpec(f"pgd{long}", "pgd_ce", long, alpha=2.5 / long),
        AttackSpec("apgd_ce", "apgd_ce", cfg.apgd_steps),
        AttackSpec("apgd_dlr", "apgd_dlr", cfg.apgd_steps),
        AttackSpec("knn_guided", "guided", cfg.guided_steps, alpha=cfg.guided_alpha, track=False),
        AttackSpec("embedding", "embedding", cfg.embedding_steps, alpha=0.1),
        # the stronger, costlier attacks run on the survivors of the ones above (AutoAttack-style cascade):
        # the per-image worst case is the same as running them on every image
        AttackSpec("cw", "cw", cfg.cw_steps, alpha=2.5 / cfg.cw_steps, chain=True),
        *(AttackSpec(f"apgd_ce_alt{r}", "apgd_ce", cfg.apgd_steps, chain=True, surrogate_rank=r)
          for r in range(1, cfg.alt_surrogates + 1)),
        AttackSpec("apgd_t", "apgd_targeted", cfg.targeted_steps, chain=True),
        AttackSpec("sw_guided", "sw_guided", cfg.sw_steps, alpha=2.5 / cfg.sw_steps, chain=True),
        AttackSpec("square", "square", cfg.square_queries, chain=True, track=False),
    ]


def budget(spec: AttackSpec, eps: float, cfg: SuiteConfig) -> knn_attacks.Budget:
    """The catalogue budget of one suite row at radius eps."""
    return knn_attacks.Budget(eps, spec.steps, spec.alpha, spec.track, cfg.guides, cfg.sw_guides, cfg.targets)


_TRANSFER = ("transfer: APGD-CE crafted on the source model's soft-kNN surrogate (best-loss point), scored on this "
             "model")


def describe(kind: str, steps: int, eps: float, surrogate: Surrogate | None, cfg: SuiteConfig, n: int,
             alpha: float = 0.25, track: bool = True, extra: str = "") -> str:
    """The protocol sentence stored beside a number: the catalogue's description of `kind` (or the transfer
    stage), its budget, surrogate and scoring."""
    if kind == "transfer":
        what, uses_surrogate = _TRANSFER, True
    else:
        what = knn_attacks.describe(kind, knn_attacks.Budget(eps, steps, alpha, track, cfg.guides, cfg.sw_guides,
                                                             cfg.targets))
        uses_surrogate = knn_attacks.CATALOGUE[kind].uses_surrogate
    parts = [f"L-inf eps={fmt_eps(eps)}", what]
    if kind != "noise":
        parts.append(f"{steps} steps")
    if surrogate is not None and uses_surrogate:
        parts.append(f"surrogate {surrogate}")
    if track and kind not in ("noise", "transfer", "guided", "square"):
        parts.append("an image counts as broken at its first iterate that flips the hard vote")
    parts.append(f"scored by the hard k-NN vote on the first {n} {cfg.images_word} (clean-wrong images count as "
                 f"broken), seed {cfg.seed}")
    return "; ".join(parts) + (f"; {extra}" if extra else "")
