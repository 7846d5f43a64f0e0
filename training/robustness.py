"""Robustness evaluation suite (DESIGN section 6, issue 5): adaptive attacks on k-NN artifacts, reports.

Every attack is crafted on a differentiable stand-in and scored by the hard k-NN vote the product
serves. The suite, per model:
  clean accuracy     all requested test images, and the exact leading subset (1,017 images) separately
  surrogate          soft-kNN temperature (and whole bank vs the k nearest) picked on held-out training
                     images (never the test set) as the one whose PGD leaves the lowest accuracy; reported
  attacks at eps     PGD-20/50 (random start, CE), APGD-CE and APGD-DLR (Croce & Hein 2020) on the
                     surrogate; the paper's k-NN-guided embedding attack (Chen et al. 2020); a label-free
                     embedding attack; transfer from a source model (the supervised baseline); each on all
                     clean-correct images, then the per-image worst case (robust = survives every attack)
  eps sweep          0, 2, 4, 8, 12, 16 /255, 0.03, 0.06: worst case of APGD-CE then APGD-DLR on the images
                     still robust (cascade, nested over eps), and the paper's guided attack
  paper protocol     defence success rate (attacked, originally correct images whose vote is unchanged)
                     under the guided attack at eps 0.03 and 0.06, beside the adaptive worst case
  masking checks     accuracy -> ~0 at a large eps; more steps never raise accuracy;
                     white-box at least as strong as transfer; random noise weaker than every attack;
                     zero surrogate gradients; surrogate/hard-vote agreement
Results go to `<out>/robustness.{json,md}` + PNG plots; per-attack results are cached under
`<out>/cache/<model sha>/` so an interrupted run resumes. `satml robustness --help` for the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from training import attacks, conformal, knn, knn_attacks
from training.artifact import CARD, load_artifact, update_artifact
from training.card import fmt_eps, suite_section, with_suite_section
from training.card import pct as _pct
from training.card import verdict as _verdict
from training.data import ImageDataset, load_dataset
from training.evaluate import KnnModel, predictions, robust_mask
from training.knn_attacks import AttackFn, Surrogate
from training.manifest import KnnSurrogate, Manifest, Metrics, RobustResult

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when an attack's implementation changes so cached results are not reused
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

    def __post_init__(self) -> None:
        if self.n_robust < 1:
            raise ValueError(f"n_robust must be >= 1, got {self.n_robust}")
        if not 0 < self.eps <= 1 or any(not 0 <= e <= 1 for e in self.eps_sweep):
            raise ValueError(f"eps values must be in [0, 1] pixel units, got {self.eps}, {self.eps_sweep}")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")

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


@torch.no_grad()
def credibility(m: KnnModel, calibration: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hard-vote prediction [B], conformal credibility of it [B]) for images in [0, 1]."""
    pred, counts = m.predict_votes(x)
    return pred, conformal.trust(counts.cpu(), pred.cpu(), calibration, m.k).credibility.to(pred.device)


def abstention_attack(m: KnnModel, t: Surrogate, calibration: Tensor, threshold: float, eps: float, steps: int,
                      targets: int) -> AttackFn:
    """Adaptive to the detector: for each top other class, APGD on the targeted margin run to its best point
    (no early stop, so the wrong class's share of the vote keeps growing, which is what raises credibility);
    per image, keep the first result that is wrong AND credible enough to be answered."""
    def run(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        sur = t.build(m)

        def undefended(xa: Tensor) -> Tensor:
            pred, cred = credibility(m, calibration, xa)
            return (pred != y) & (cred >= threshold)

        def one(target: Tensor) -> Tensor:
            return attacks.apgd(knn_attacks.targeted_margin(sur, y, target), x, eps=eps, steps=steps,
                                model=m.encoder, generator=g)
        return knn_attacks.each_target(m, x, y, knn_attacks.top_other_classes(sur, m, x, y, targets), one,
                                       broken=undefended)
    return run


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
    parts.append(f"scored by the hard k-NN vote on the first {n} test images (clean-wrong images count as broken), "
                 f"seed {cfg.seed}")
    return "; ".join(parts) + (f"; {extra}" if extra else "")


# --- per-model state, cache ------------------------------------------------------------------------------------


@dataclass
class ModelUnderTest:
    """A k-NN model being evaluated: identity (name, path, manifest, sha256), the chosen surrogate, results."""

    name: str
    path: Path
    manifest: Manifest
    model: KnnModel
    model_sha256: str
    surrogate: Surrogate = field(default_factory=Surrogate)
    runners_up: list[Surrogate] = field(default_factory=list)  # next-best surrogates of the sweep, best first
    calibration: Tensor | None = None  # conformal calibration scores of the artifact (None: no abstention stage)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.manifest.method


def load_model(path: str | Path, device: torch.device | str = "cpu") -> ModelUnderTest:
    """A verified artifact as a model under test."""
    art = load_artifact(path, device)
    return ModelUnderTest(art.name, Path(path), art.spec, KnnModel.from_artifact(art), art.spec.model_sha256,
                          calibration=art.calibration)


class Cache:
    """Per-model JSON results and tensors under `<out>/cache/<model sha[:16]>/`, keyed by the full protocol."""

    def __init__(self, root: Path, enabled: bool) -> None:
        self.root, self.enabled = root, enabled

    def _path(self, sha: str, name: str, key: dict[str, Any], suffix: str) -> Path:
        digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / sha[:16] / f"{name}-{digest}{suffix}"

    def get(self, sha: str, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        p = self._path(sha, name, key, ".json")
        if self.enabled and p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                log.warning("ignoring unreadable cache file %s", p)
        return None

    def put(self, sha: str, name: str, key: dict[str, Any], value: dict[str, Any]) -> None:
        p = self._path(sha, name, key, ".json")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **value}))
        os.replace(tmp, p)

    def get_tensor(self, sha: str, name: str, key: dict[str, Any]) -> Tensor | None:
        p = self._path(sha, name, key, ".safetensors")
        return load_file(p)["x"] if self.enabled and p.is_file() else None

    def put_tensor(self, sha: str, name: str, key: dict[str, Any], x: Tensor) -> None:
        p = self._path(sha, name, key, ".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        save_file({"x": x.contiguous()}, tmp)
        os.replace(tmp, p)


def _bits(mask: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in mask)


def _unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


# --- the suite -------------------------------------------------------------------------------------------------


class Suite:
    """Runs the protocol over several models; `run()` returns the JSON-ready result.

    `Suite.from_artifacts` is the usual entry; the constructor takes models and data already in memory
    (tests build hand-made encoders this way). `source` is the transfer source (None: no transfer).
    `train` holds the images left out of each bank (the temperature choice), loaded lazily when absent.
    """

    def __init__(self, cfg: SuiteConfig, models: Sequence[ModelUnderTest], test: ImageDataset, *,
                 source: ModelUnderTest | None = None, train: ImageDataset | None = None) -> None:
        from training.config import resolve_device

        if not models:
            raise ValueError("no models to evaluate")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.cache = Cache(Path(cfg.cache_dir or Path(cfg.out) / "cache"), cfg.resume)
        self.models, self.source, self.test, self._train = list(models), source, test, train
        names = [m.name for m in self.models]
        for m in self.models:  # distinct names in tables and plots
            if names.count(m.name) > 1:
                m.name = f"{m.name} ({m.path.name})"
        self.images = test.images[:cfg.n_robust]
        self.labels = test.labels[:cfg.n_robust]
        if len(self.labels) < cfg.n_robust:
            log.warning("only %d test images available (asked for %d)", len(self.labels), cfg.n_robust)
        self.images_sha = hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()[:16]

    @classmethod
    def from_artifacts(cls, cfg: SuiteConfig, artifacts: Sequence[str | Path],
                       transfer_source: str | Path | None = None) -> Suite:
        """Load (and verify) artifacts; the transfer source is the given one ('none': no transfer), else the
        supervised model among them, else none."""
        from training.config import resolve_device

        device = resolve_device(cfg.device)
        models = [load_model(p, device) for p in artifacts]
        source = None
        if transfer_source is None:
            source = next((m for m in models if m.method == "supervised"), None)
        elif str(transfer_source).lower() != "none":
            given = Path(transfer_source).resolve()
            source = next((m for m in models if m.path.resolve() == given), None) or load_model(given, device)
        return cls(cfg, models, load_dataset(cfg.data, "test"), source=source)

    # --- helpers

    def _key(self, m: ModelUnderTest, **kw: Any) -> dict[str, Any]:
        return {"model": m.model_sha256, "images": self.images_sha, "n": len(self.labels), "seed": self.cfg.seed, **kw}

    def _masked(self, m: ModelUnderTest, name: str, idx: np.ndarray, attack: AttackFn, key: dict[str, Any],
                desc: str) -> tuple[np.ndarray, float]:
        """Per-image robustness over the n attacked images: `attack` runs on `idx` only, the rest count False."""
        key = {**key, "idx": hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:16]}
        hit = self.cache.get(m.model_sha256, name, key)
        if hit is not None:
            return _unbits(hit["mask"]), float(hit["seconds"])
        t0 = time.time()
        mask = np.zeros(len(self.labels), dtype=bool)
        if len(idx):
            mask[idx], _ = robust_mask(m.model, self.images[idx], self.labels[idx], attack,
                                       batch_size=self.cfg.batch_size, seed=self.cfg.seed, progress=self.cfg.progress,
                                       desc=desc)
        seconds = time.time() - t0
        self.cache.put(m.model_sha256, name, key, {"mask": _bits(mask), "seconds": seconds})
        return mask, seconds

    def spec_surrogate(self, m: ModelUnderTest, spec: AttackSpec) -> Surrogate:
        """The surrogate a spec differentiates: the selected one, or a runner-up of the sweep."""
        if spec.surrogate_rank == 0:
            return m.surrogate
        if not m.runners_up:
            return m.surrogate
        return m.runners_up[min(spec.surrogate_rank, len(m.runners_up)) - 1]

    def _spec_attack(self, m: ModelUnderTest, spec: AttackSpec, eps: float, idx: np.ndarray,
                     tag: str = "") -> tuple[np.ndarray, float]:
        sur = self.spec_surrogate(m, spec)
        extra = {k: getattr(self.cfg, k) for k in ("targets", "sw_guides")} if spec.kind in (
            "apgd_targeted", "sw_guided") else {}
        key = self._key(m, spec=asdict(spec), eps=eps, surrogate=asdict(sur),
                        guides=self.cfg.guides if spec.kind == "guided" else None, **extra)
        build = knn_attacks.build(spec.kind, m.model, budget(spec, eps, self.cfg), sur)
        return self._masked(m, f"{tag}{spec.name}-{eps:.5f}", idx, build, key,
                            f"{m.name[:16]} {spec.name} {fmt_eps(eps)}")

    @property
    def train_set(self) -> ImageDataset:
        if self._train is None:
            self._train = load_dataset(self.cfg.data, "train")
        return self._train

    # --- stages

    def clean(self, m: ModelUnderTest) -> dict[str, Any]:
        n = len(self.test) if self.cfg.n_clean is None else min(self.cfg.n_clean, len(self.test))
        key = self._key(m, stage="clean", n_clean=n)
        hit = self.cache.get(m.model_sha256, "clean", key)
        if hit is None:
            t0 = time.time()
            pred = predictions(m.model, self.test.images[:n], self.cfg.batch_size * 2)
            hit = {"correct": _bits(pred == self.test.labels[:n]), "seconds": time.time() - t0}
            self.cache.put(m.model_sha256, "clean", key, hit)
        correct = _unbits(hit["correct"])
        n_exact = min(EXACT_TEST, n)
        return {"acc": float(correct.mean()), "n": int(n), "exact_acc": float(correct[:n_exact].mean()),
                "exact_n": int(n_exact), "seconds": hit["seconds"],
                "protocol": f"hard k-NN vote (k={m.model.k}, {m.model.metric}) on the first {n} test images; "
                            f"exact_acc on the first {n_exact}, whose pixels are exact (the rest of the test set "
                            "is rebuilt from JPEG copies)"}

    def temperature_sweep(self, m: ModelUnderTest) -> dict[str, Any]:
        """Pick the surrogate whose PGD leaves the lowest hard-vote accuracy on held-out images (sets m.surrogate)."""
        cfg = self.cfg
        bank_size = m.manifest.bank_size if m.manifest.bank_size is not None else len(m.model.bank)
        if bank_size < len(self.train_set):
            held = self.train_set.subset(slice(bank_size, bank_size + cfg.n_sweep))
            where = f"training images {bank_size}..{bank_size + len(held) - 1} (held out of the bank)"
        else:  # no held-out split: test images after the attacked ones (never reported)
            held = self.test.subset(slice(cfg.n_robust, cfg.n_robust + cfg.n_sweep))
            where = f"test images {cfg.n_robust}..{cfg.n_robust + len(held) - 1} (no held-out training split)"
        spec = AttackSpec("sweep", "pgd_ce", cfg.sweep_steps, alpha=0.25)
        ks: list[int | None] = [None] + ([min(m.model.k, len(m.model.bank))] if cfg.topk_surrogate else [])
        candidates = [Surrogate(t, k) for k in ks for t in cfg.temperatures]
        rows = []
        for sur in tqdm(candidates, desc=f"{m.name[:16]} surrogate", disable=not cfg.progress, leave=False):
            key = {"model": m.model_sha256, "where": where, "surrogate": asdict(sur), "eps": cfg.eps,
                   "steps": cfg.sweep_steps, "seed": cfg.seed}
            hit = self.cache.get(m.model_sha256, "surrogate", key)
            if hit is None:
                attack = knn_attacks.build("pgd_ce", m.model, budget(spec, cfg.eps, cfg), sur)
                correct, adv = robust_mask(m.model, held.images, held.labels, attack, batch_size=cfg.batch_size,
                                           seed=cfg.seed, keep_adversarial=True)
                assert adv is not None
                votes = torch.cat([m.model.predict_votes(a.to(self.device))[1].cpu()
                                   for a in adv.split(cfg.batch_size)])
                share = votes.gather(1, torch.as_tensor(held.labels)[:, None]).squeeze(1).float() / votes.sum(1)
                hit = {"acc": float(correct.mean()), "true_vote_share": float(share.mean()),
                       "zero_gradient_share": zero_gradient_share(m.model, sur, held.images, held.labels,
                                                                  cfg.batch_size)}
                self.cache.put(m.model_sha256, "surrogate", key, hit)
            rows.append({"temperature": sur.temperature, "k": sur.k, **hit})
        # ties (e.g. a model nothing breaks) go to the surrogate whose gradients are alive, then the smoother one
        ranked = sorted(rows, key=lambda r: (r["acc"], r["true_vote_share"], r["zero_gradient_share"],
                                             -r["temperature"]))
        best = ranked[0]
        m.surrogate = Surrogate(best["temperature"], best["k"])
        m.runners_up = [Surrogate(r["temperature"], r["k"]) for r in ranked[1:]]
        return {"selected": best["temperature"], "selected_k": best["k"], "surrogate": str(m.surrogate),
                "sweep": rows, "n": len(held),
                "protocol": f"PGD-{cfg.sweep_steps} (CE, step eps/4, random start) at eps {fmt_eps(cfg.eps)} on each "
                            f"soft-kNN surrogate (temperatures x whole bank / k nearest), on {len(held)} {where}; "
                            "selected = lowest hard-vote accuracy, ties broken by the lower true-class vote share, "
                            "then the fewer all-zero input gradients (saturated softmax), then the larger temperature"}

    def transfer_images(self, eps: float) -> Tensor | None:
        """Adversarial images crafted on the source model (cached), for all n attacked images."""
        src, cfg = self.source, self.cfg
        if src is None:
            return None
        key = self._key(src, stage="transfer", eps=eps, surrogate=asdict(src.surrogate), steps=cfg.transfer_steps)
        x = self.cache.get_tensor(src.model_sha256, f"transfer-{eps:.5f}", key)
        if x is None:
            craft = knn_attacks.build("apgd_ce", src.model, knn_attacks.Budget(eps, cfg.transfer_steps), src.surrogate)
            _, x = robust_mask(src.model, self.images, self.labels, craft, batch_size=cfg.batch_size, seed=cfg.seed,
                               progress=cfg.progress, desc=f"transfer source {fmt_eps(eps)}", keep_adversarial=True)
            assert x is not None
            self.cache.put_tensor(src.model_sha256, f"transfer-{eps:.5f}", key, x)
        return x

    def surrogate_agreement(self, m: ModelUnderTest) -> float:
        """Share of the attacked images where the surrogate's argmax equals the hard vote."""
        agree = 0
        sur = m.surrogate.build(m.model)
        with torch.no_grad(), attacks.eval_mode(m.model.encoder):
            for i in range(0, len(self.labels), self.cfg.batch_size):
                x = torch.as_tensor(self.images[i:i + self.cfg.batch_size], device=self.device)
                x = x.permute(0, 3, 1, 2).float().div(255)
                agree += int((sur(x).argmax(1) == m.model.predict(x)).sum())
        return agree / len(self.labels)

    def evaluate(self, m: ModelUnderTest) -> dict[str, Any]:
        """Everything for one model (the temperature must already be set by `temperature_sweep`)."""
        cfg, n = self.cfg, len(self.labels)
        correct = predictions(m.model, self.images, cfg.batch_size * 2) == self.labels
        idx = np.flatnonzero(correct)
        res: dict[str, Any] = {"attacked": {"n": n, "clean_correct": int(correct.sum()),
                                            "acc": float(correct.mean())}}
        rows, masks = [], {}
        specs = attack_specs(cfg)
        alive = correct.copy()  # robust to every worst-case attack so far (the input of chained attacks)
        for spec in tqdm(specs, desc=f"{m.name[:16]} attacks {fmt_eps(cfg.eps)}", disable=not cfg.progress):
            sur = self.spec_surrogate(m, spec)
            mask, sec = self._spec_attack(m, spec, cfg.eps, np.flatnonzero(alive) if spec.chain else idx)
            masks[spec.name] = mask
            if spec.worst_case:
                alive &= mask
            rows.append({"attack": spec.name, "kind": spec.kind, "eps": cfg.eps, "steps": spec.steps, "norm": "linf",
                         "acc": float(mask.mean()), "n": n, "worst_case": spec.worst_case, "seconds": round(sec, 2),
                         "surrogate": asdict(sur) if spec.kind not in ("guided", "embedding", "sw_guided") else None,
                         "chained": spec.chain,
                         "protocol": describe(spec.kind, spec.steps, cfg.eps, sur, cfg, n, spec.alpha, spec.track,
                                              extra="run only on the images still robust after every attack listed "
                                                    "before it, so its column is a running worst case"
                                              if spec.chain else "")})
        x_tr = self.transfer_images(cfg.eps) if self.source is not None and self.source is not m else None
        if x_tr is not None:
            assert self.source is not None
            t0 = time.time()
            mask = np.zeros(n, dtype=bool)
            mask[idx] = predictions(m.model, x_tr[idx], cfg.batch_size * 2) == self.labels[idx]
            masks["transfer"] = mask
            rows.append({"attack": "transfer", "kind": "transfer", "eps": cfg.eps, "steps": cfg.transfer_steps,
                         "norm": "linf", "acc": float(mask.mean()), "n": n, "worst_case": True,
                         "seconds": round(time.time() - t0, 2), "source": self.source.name,
                         "source_sha256": self.source.model_sha256, "surrogate": asdict(self.source.surrogate),
                         "protocol": describe("transfer", cfg.transfer_steps, cfg.eps, self.source.surrogate, cfg,
                                              n, extra=f"source model {self.source.name}")})
        noise_spec = AttackSpec("noise", "noise", 1, worst_case=False, track=False)
        noise_mask, sec = self._spec_attack(m, noise_spec, cfg.eps, idx)
        worst_names = [r["attack"] for r in rows if r["worst_case"]]
        at_eps = correct.copy()
        for name in worst_names:
            at_eps &= masks[name]
        res["attacks"] = rows
        res["eps_sweep"] = self.eps_sweep(m, correct, masks, at_eps)
        main_row = next(r for r in res["eps_sweep"] if math.isclose(r["eps"], cfg.eps))
        worst = _unbits(main_row["worst_case_bits"])
        res["worst_case"] = {"acc": float(worst.mean()), "n": n, "eps": cfg.eps, "attacks": worst_names,
                             "acc_attacks_at_eps_only": float(at_eps.mean()),
                             "protocol": f"an image counts as robust only if it is classified correctly clean, after "
                                         f"every one of {', '.join(worst_names)} at L-inf eps {fmt_eps(cfg.eps)}, and "
                                         "after the APGD-CE/DLR cascade at every smaller eps of the sweep"}
        res["noise"] = {"acc": float(noise_mask.mean()), "n": n, "eps": cfg.eps,
                        "protocol": describe("noise", 1, cfg.eps, None, cfg, n, track=False)}
        res["per_image"] = {"clean_correct": _bits(correct), **{k: _bits(v) for k, v in masks.items()},
                            "worst_case": _bits(worst), "noise": _bits(noise_mask)}
        res["paper_protocol"] = self.paper_table(m, res["eps_sweep"], correct)
        res["masking_checks"] = self.masking_checks(m, res, idx)
        if m.calibration is not None:
            res["abstention"] = self.abstention(m, correct)
        return res

    def _trust_all(self, m: ModelUnderTest, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        assert m.calibration is not None
        preds, creds = [], []
        for i in range(0, len(images), self.cfg.batch_size):
            p, c = credibility(m.model, m.calibration, knn.to_float_images(images[i:i + self.cfg.batch_size],
                                                                            self.device))
            preds.append(p.cpu())
            creds.append(c.cpu())
        return torch.cat(preds).numpy(), torch.cat(creds).numpy()

    def abstention(self, m: ModelUnderTest, correct: np.ndarray) -> dict[str, Any]:
        """Conformal abstention (issue 14): clean accuracy vs coverage, the credibility threshold answering
        `abstain_coverage` of the clean images, and robust accuracy with abstention under a non-adaptive attack
        (APGD-CE, first flip) and one adaptive to the detector (`abstention_attack`). An attacked image counts
        as defended when answered correctly or abstained on; a clean-wrong image only when abstained on."""
        assert m.calibration is not None
        cfg, n = self.cfg, len(self.labels)
        _, cred = self._trust_all(m, self.images)
        threshold = conformal.threshold_for_coverage(torch.as_tensor(cred), cfg.abstain_coverage)
        answered = cred >= threshold
        idx = np.flatnonzero(correct)
        rows = []
        tracked = AttackSpec("abstain_apgd_ce", "apgd_ce", cfg.abstain_steps)
        attacks_ = {
            "apgd_ce (first flip; not adaptive to the detector)": (
                knn_attacks.build("apgd_ce", m.model, budget(tracked, cfg.eps, cfg), m.surrogate),
                {"spec": asdict(tracked)}),
            "targeted APGD to a credible wrong answer (adaptive)": (
                abstention_attack(m.model, m.surrogate, m.calibration, threshold, cfg.eps, cfg.abstain_steps,
                                  cfg.targets), {"steps": cfg.abstain_steps, "targets": cfg.targets}),
        }
        for name, (attack, spec) in attacks_.items():
            key = self._key(m, stage="abstention", attack=name, eps=cfg.eps, threshold=threshold,
                            surrogate=asdict(m.surrogate), **spec)
            hit = self.cache.get(m.model_sha256, f"abstain-{len(rows)}", key)
            if hit is None:
                t0 = time.time()
                _, x_adv = robust_mask(m.model, self.images[idx], self.labels[idx], attack,
                                       batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
                                       desc=f"{m.name[:16]} abstention", keep_adversarial=True)
                assert x_adv is not None
                p_adv, c_adv = self._trust_all(m, x_adv)
                hit = {"pred": p_adv.tolist(), "cred": c_adv.tolist(), "seconds": time.time() - t0}
                self.cache.put(m.model_sha256, f"abstain-{len(rows)}", key, hit)
            p_adv, c_adv = np.asarray(hit["pred"]), np.asarray(hit["cred"])
            defended = ~answered.copy()  # clean-wrong images: defended only when abstained on
            defended[idx] = (p_adv == self.labels[idx]) | (c_adv < threshold)
            flipped = p_adv != self.labels[idx]
            rows.append({
                "attack": name, "eps": cfg.eps, "n": n,
                "robust_acc_without_abstention": float(((p_adv == self.labels[idx]).sum()) / n),
                "robust_acc_with_abstention": float(defended.mean()),
                "abstained_on_adversarial": float((c_adv < threshold)[flipped].mean()) if flipped.any() else None,
                "auroc_clean_vs_adversarial": _finite(conformal.auroc(torch.as_tensor(cred[idx]),
                                                                      torch.as_tensor(c_adv[flipped]))),
                "seconds": round(float(hit["seconds"]), 2)})
        return {"threshold": threshold, "coverage": float(answered.mean()), "target_coverage": cfg.abstain_coverage,
                "selective_clean_acc": float(correct[answered].mean()) if answered.any() else None,
                "clean_acc": float(correct.mean()),
                "coverage_curve": [{k: _finite(v) for k, v in r.items()} for r in conformal.coverage_curve(
                    torch.as_tensor(cred), torch.as_tensor(correct))],
                "attacks": rows,
                "protocol": f"credibility = conformal p-value of the predicted class (calibration scores of the "
                            f"artifact); threshold = the largest answering >= {cfg.abstain_coverage:.0%} of the "
                            f"{n} clean test images; an attacked image is defended when answered correctly or "
                            "abstained on, a clean-wrong one only when abstained on; AUROC of credibility, clean "
                            "(correct) vs adversarial (vote flipped); claim only the adaptive row"}

    def eps_sweep(self, m: ModelUnderTest, correct: np.ndarray, masks: dict[str, np.ndarray],
                  at_eps: np.ndarray) -> list[dict[str, Any]]:
        """Worst case (APGD-CE then APGD-DLR on the survivors) and the paper's guided attack at every eps.

        Nested cascade (AutoAttack-style, attacking only images still robust): eps grows, and an image broken
        at a smaller eps is broken at every larger one (that perturbation lies in the larger ball), so each eps
        attacks only the survivors of the previous. At the main eps the survivors of every main-table attack
        (`at_eps`) are used, so the curve there is the headline worst case.
        """
        cfg, n, rows = self.cfg, len(self.labels), []
        ce = AttackSpec("apgd_ce", "apgd_ce", cfg.apgd_steps)
        dlr = AttackSpec("apgd_dlr", "apgd_dlr", cfg.apgd_steps)
        guided = AttackSpec("knn_guided", "guided", cfg.guided_steps, alpha=cfg.guided_alpha, track=False)
        alive = correct.copy()
        for eps in tqdm(sorted(set(cfg.eps_sweep) | set(cfg.paper_eps) | {cfg.eps}), desc=f"{m.name[:16]} eps sweep",
                        disable=not cfg.progress):
            if eps == 0:
                guided_mask = correct.copy()
            elif math.isclose(eps, cfg.eps):
                alive = alive & at_eps
                guided_mask = masks["knn_guided"]
            else:
                alive, _ = self._spec_attack(m, ce, eps, np.flatnonzero(alive), tag="sweep-")
                alive, _ = self._spec_attack(m, dlr, eps, np.flatnonzero(alive), tag="sweep-")
                guided_mask, _ = self._spec_attack(m, guided, eps, np.flatnonzero(correct))
            rows.append({"eps": eps, "eps_255": round(eps * 255, 3), "worst_case_acc": float(alive.mean()),
                         "guided_acc": float(guided_mask.mean()), "n": n,
                         "protocol": f"worst case = APGD-CE then APGD-DLR ({cfg.apgd_steps} steps, surrogate "
                                     f"{m.surrogate}) on the images still robust at every smaller eps (at "
                                     f"{fmt_eps(cfg.eps)}: after every main-table attack); "
                                     f"guided = "
                                     f"{describe('guided', cfg.guided_steps, eps, None, cfg, n, cfg.guided_alpha)}",
                         "worst_case_bits": _bits(alive)})
        return rows

    def paper_table(self, m: ModelUnderTest, sweep: list[dict[str, Any]], correct: np.ndarray) -> list[dict[str, Any]]:
        """Defence success rate (the paper's metric) with its guided attack, beside our adaptive worst case."""
        out = []
        n_att = int(correct.sum())
        for eps in self.cfg.paper_eps:
            row = next(r for r in sweep if math.isclose(r["eps"], eps))
            worst = _unbits(row["worst_case_bits"])
            out.append({"eps": eps, "n_attacked": n_att,
                        "defence_success_rate": row["guided_acc"] * len(self.labels) / max(1, n_att),
                        "adaptive_defence_rate": float(worst.sum()) / max(1, n_att),
                        "paper_reported": PAPER_REPORTED.get(m.method) if math.isclose(eps, 0.03) else None,
                        "protocol": "share of the attacked, originally correct images whose k-NN prediction is "
                                    "unchanged; paper: its guided attack "
                                    f"({self.cfg.guided_steps} steps of eps/6, {self.cfg.guides} guides); adaptive: "
                                    "our eps-sweep worst case"})
        return out

    def masking_checks(self, m: ModelUnderTest, res: dict[str, Any], idx: np.ndarray) -> list[dict[str, Any]]:
        """AutoAttack-style sanity checks that the numbers are not inflated by gradient masking."""
        cfg, n = self.cfg, len(self.labels)
        tol = 1 / n + 1e-9  # one image
        acc = {r["attack"]: r["acc"] for r in res["attacks"]}
        checks = []
        big = AttackSpec("large_eps", "apgd_ce", cfg.large_eps_steps)
        big_mask, _ = self._spec_attack(m, big, cfg.large_eps, idx)
        checks.append({"check": "large eps drives accuracy to ~0", "passed": bool(big_mask.mean() <= 0.05),
                       "value": float(big_mask.mean()),
                       "detail": f"APGD-CE {cfg.large_eps_steps} steps at eps {fmt_eps(cfg.large_eps)}: "
                                 f"{100 * big_mask.mean():.1f} % (pass: <= 5 %)"})
        short, long = (f"pgd{s}" for s in cfg.pgd_steps)
        checks.append({"check": "more steps never raise accuracy", "passed": bool(acc[long] <= acc[short] + tol),
                       "value": [acc[short], acc[long]],
                       "detail": f"{short} {100 * acc[short]:.1f} % vs {long} {100 * acc[long]:.1f} %"})
        white = min(v for k, v in acc.items() if k != "transfer")
        if "transfer" in acc:
            checks.append({"check": "white-box at least as strong as transfer",
                           "passed": bool(white <= acc["transfer"] + tol), "value": [white, acc["transfer"]],
                           "detail": f"best white-box {100 * white:.1f} % vs transfer {100 * acc['transfer']:.1f} %"})
        noise = res["noise"]["acc"]
        weaker = [k for k, v in acc.items() if v > noise + tol]
        checks.append({"check": "every attack beats random noise", "passed": not weaker,
                       "value": {"noise": noise, "clean": res["attacked"]["acc"]},
                       "detail": f"noise {100 * noise:.1f} % (clean {100 * res['attacked']['acc']:.1f} %)"
                                 + (f"; weaker than noise: {weaker}" if weaker else "")})
        zero = zero_gradient_share(m.model, m.surrogate, self.images[idx], self.labels[idx], self.cfg.batch_size)
        checks.append({"check": "surrogate gradients are non-zero", "passed": bool(zero <= 0.01), "value": zero,
                       "detail": f"{100 * zero:.1f} % of clean-correct images have an all-zero or non-finite "
                                 f"input gradient on the surrogate {m.surrogate} (pass: <= 1 %)"})
        agree = self.surrogate_agreement(m)
        checks.append({"check": "surrogate agrees with the hard vote (information)", "passed": None, "value": agree,
                       "detail": f"argmax of the soft-kNN surrogate equals the k-NN vote on {100 * agree:.1f} % of "
                                 "the attacked clean images; low agreement means a weaker stand-in, which the other "
                                 "attacks (embedding, guided, transfer) hedge"})
        return checks

    def validate_torchattacks(self, m: ModelUnderTest) -> dict[str, Any]:
        """Our PGD / APGD against torchattacks' on the same surrogate, images and budget."""
        return torchattacks_agreement(m.surrogate.build(m.model), self.images[:self.cfg.validate_n],
                                      self.labels[:self.cfg.validate_n], eps=self.cfg.validate_eps,
                                      pgd_steps=self.cfg.pgd_steps[0], apgd_steps=self.cfg.apgd_steps,
                                      seed=self.cfg.seed, device=self.device) | {"model": m.name}

    def run(self) -> dict[str, Any]:
        cfg, t0, load_start, version = self.cfg, time.time(), _loadavg(), suite_code_version()
        order = ([self.source] if self.source is not None else []) + [m for m in self.models if m is not self.source]
        for m in order:
            m.result["temperature"] = self.temperature_sweep(m)
            log.info("%s: surrogate %s", m.name, m.surrogate)
        models = []
        for m in self.models:
            t_model = time.time()
            res = {"name": m.name, "path": str(m.path), "model_sha256": m.model_sha256,
                   "files": dict(m.manifest.files), "method": m.method,
                   "encoder": m.manifest.encoder.to_dict(), "knn": m.manifest.knn.to_dict(),
                   "clean": self.clean(m), "temperature": m.result["temperature"]}
            res |= self.evaluate(m)
            res["seconds"] = round(time.time() - t_model, 1)
            m.result = res
            models.append(res)
            log.info("%s: clean %.1f %%, worst case %.1f %% at eps %s", m.name, 100 * res["clean"]["acc"],
                     100 * res["worst_case"]["acc"], fmt_eps(cfg.eps))
        validation = None
        if cfg.validate_n:
            target = self.source or self.models[0]
            try:
                validation = self.validate_torchattacks(target)
            except ImportError:
                validation = {"skipped": "torchattacks is not installed (pip install --no-deps torchattacks)"}
        return {
            "suite": "robustness", "format_version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": version, "seed": cfg.seed, "quick": cfg.quick, "device": str(self.device),
            "torch": torch.__version__, "config": asdict(cfg), "seconds": round(time.time() - t0, 1),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "loadavg_start": load_start, "loadavg_end": _loadavg()},
            "transfer_source": None if self.source is None else {"name": self.source.name,
                                                                 "model_sha256": self.source.model_sha256},
            "protocol": {
                "threat_model": "L-inf, eps in [0, 1] pixel units (8/255 = 0.0314)",
                "scoring": "the hard k-NN vote the product serves; attacks are crafted on a differentiable "
                           "soft-kNN surrogate (softmax over negative squared distances to the whole bank)",
                "images": f"first {len(self.labels)} CIFAR-10 test images (attacks); clean accuracy on "
                          f"{models[0]['clean']['n'] if models else '?'} test images and the exact leading subset",
                "worst_case": "per image: robust only if correct clean and after every worst-case attack",
                "references": "Croce & Hein 2020 (APGD, DLR); Madry et al. 2018 (PGD); Chen et al. 2020 (SAT, "
                              "guided attack, defence success rate)",
            },
            "models": models,
            "torchattacks_validation": validation,
        }


def suite_code_version() -> str:
    """Git commit of the evaluating code, read when the run starts, with '-dirty' if training/ has uncommitted
    changes (the numbers then come from code no commit holds)."""
    from training.export import code_version

    version = code_version()
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = bool(out.stdout.strip()) and out.returncode == 0
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return version + "-dirty" if dirty and version != "unknown" else version


def _loadavg() -> list[float] | None:
    """1/5/15-minute load average (a busy machine slows every attack; recorded beside the timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def zero_gradient_share(model: KnnModel, surrogate: Surrogate, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 250) -> float:
    """Share of images whose surrogate cross-entropy has an all-zero or non-finite input gradient (a saturated
    softmax: the classic gradient-masking symptom that AutoAttack checks for)."""
    bad = 0
    sur = surrogate.build(model)
    device = model.bank.device
    with attacks.eval_mode(model.encoder):
        for i in range(0, len(labels), batch_size):
            x = knn.to_float_images(images[i:i + batch_size], device).requires_grad_(True)
            y = torch.as_tensor(labels[i:i + batch_size], device=device).long()
            (g,) = torch.autograd.grad(attacks.cross_entropy_objective(sur, y)(x).sum(), x)
            flat = g.flatten(1)
            bad += int(((flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)).sum())
    return bad / max(1, len(labels))


def torchattacks_agreement(classifier: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, eps: float,
                           pgd_steps: int, apgd_steps: int, seed: int = 0,
                           device: torch.device | str = "cpu") -> dict[str, Any]:
    """Robust accuracy (argmax of `classifier`) under our PGD / APGD-CE / APGD-DLR and torchattacks' versions.

    Same images, eps, steps and step size (PGD: eps/4, random start; APGD: 1 restart, rho 0.75). Raises
    ImportError when torchattacks is absent.
    """
    import torchattacks

    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(255) if images.dtype == np.uint8 else \
        torch.as_tensor(images).to(device)
    y = torch.as_tensor(labels, device=device).long()
    classifier = classifier.to(device)

    def acc(x_adv: Tensor) -> float:
        with torch.no_grad(), attacks.eval_mode(classifier):
            return float((classifier(x_adv).argmax(1) == y).float().mean())

    def fooled(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(xb).argmax(1) != y

    g = torch.Generator(device=device).manual_seed(seed)
    ours = {
        "pgd": attacks.pgd(attacks.cross_entropy_objective(classifier, y), x, eps=eps, alpha=eps / 4,
                           steps=pgd_steps, model=classifier, generator=g),
        "apgd_ce": attacks.apgd_ce(classifier, x, y, eps=eps, steps=apgd_steps, model=classifier, generator=g,
                                   is_adversarial=fooled),
        "apgd_dlr": attacks.apgd_dlr(classifier, x, y, eps=eps, steps=apgd_steps, model=classifier, generator=g,
                                     is_adversarial=fooled),
    }
    torch.manual_seed(seed)
    theirs = {
        "pgd": torchattacks.PGD(classifier, eps=eps, alpha=eps / 4, steps=pgd_steps, random_start=True)(x, y),
        "apgd_ce": torchattacks.APGD(classifier, eps=eps, steps=apgd_steps, loss="ce", seed=seed)(x, y),
        "apgd_dlr": torchattacks.APGD(classifier, eps=eps, steps=apgd_steps, loss="dlr", seed=seed)(x, y),
    }
    rows = []
    for name in ours:
        a, b = acc(ours[name]), acc(theirs[name])
        rows.append({"attack": name, "ours": a, "torchattacks": b, "diff_points": round(100 * (a - b), 2)})
    return {"torchattacks_version": torchattacks.__version__, "n": len(y), "eps": eps, "clean": acc(x),
            "pgd_steps": pgd_steps, "apgd_steps": apgd_steps, "rows": rows,
            "protocol": "accuracy of the attacked classifier's argmax (here the soft-kNN surrogate) after each "
                        "implementation's attack on the same images and budget"}


# --- reports ---------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    """JSON has no NaN: undefined numbers (no image to measure on) are null."""
    return None if isinstance(x, float) and math.isnan(x) else x


def markdown_report(result: dict[str, Any]) -> str:
    """The human-readable report: worst case first, then each attack, eps sweep, paper table, checks."""
    models, cfg = result["models"], result["config"]
    eps = fmt_eps(cfg["eps"])
    n_att = models[0]["worst_case"]["n"] if models else 0
    names = [r["attack"] for r in models[0]["attacks"]] if models else []
    for m in models[1:]:
        names += [r["attack"] for r in m["attacks"] if r["attack"] not in names]
    lines = [f"# Robustness report{' (quick mode: not the full protocol)' if result['quick'] else ''}", "",
             f"Code {result['code_version']}, seed {result['seed']}, {result['device']}, torch {result['torch']}, "
             f"{result['created']}, {result['seconds'] / 60:.1f} min. "
             f"Threat model: {result['protocol']['threat_model']}. "
             f"Scoring: {result['protocol']['scoring']}.", "",
             f"## Worst case at eps {eps} (an image is robust only if it survives every attack)", "",
             f"| model | method | clean (n) | clean, exact images (n) | **worst case** (n={n_att}) | surrogate T |",
             "|---|---|---|---|---|---|"]
    for m in models:
        c = m["clean"]
        lines.append(f"| {m['name']} | {m['method']} | {_pct(c['acc'])} % ({c['n']}) | {_pct(c['exact_acc'])} % "
                     f"({c['exact_n']}) | **{_pct(m['worst_case']['acc'])} %** | {m['temperature']['surrogate']} |")
    lines += ["", f"## Accuracy (%) under each attack at eps {eps}", "",
              "| model | clean (attacked images) | " + " | ".join(names) + " | worst case | noise |",
              "|---|---|" + "---|" * len(names) + "---|---|"]
    for m in models:
        acc = {r["attack"]: r["acc"] for r in m["attacks"]}
        lines.append(f"| {m['name']} | {_pct(m['attacked']['acc'])} | " + " | ".join(_pct(acc.get(a)) for a in names)
                     + f" | **{_pct(m['worst_case']['acc'])}** | {_pct(m['noise']['acc'])} |")
    lines += ["", "Attack protocols:", ""]
    seen = set()
    for m in models:
        for r in m["attacks"]:
            if r["attack"] not in seen:
                seen.add(r["attack"])
                lines.append(f"- `{r['attack']}`: {r['protocol']}")
    sweep_eps = [r["eps"] for r in models[0]["eps_sweep"]] if models else []
    lines += ["", "## Accuracy (%) vs eps: adaptive worst case / paper's guided attack", "",
              "| model | " + " | ".join(fmt_eps(e) for e in sweep_eps) + " |", "|---|" + "---|" * len(sweep_eps)]
    for m in models:
        lines.append(f"| {m['name']} | " + " | ".join(f"{_pct(r['worst_case_acc'])} / {_pct(r['guided_acc'])}"
                                                   for r in m["eps_sweep"]) + " |")
    if models:
        lines += ["", f"Worst case here: {models[0]['eps_sweep'][-1]['protocol'].split('; guided')[0]}. "
                  "Plot: `robustness_eps.png`."]
    lines += ["", "## The paper's protocol: defence success rate", "",
              "Share of the attacked, originally correct images whose k-NN prediction is unchanged (Chen et al. 2020, "
              "100 test images there); ours under the paper's guided attack and under our adaptive worst case.", "",
              "| model | method | eps | attacked | paper's guided attack | adaptive worst case | paper reports |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        for r in m["paper_protocol"]:
            lines.append(f"| {m['name']} | {m['method']} | {r['eps']:g} | {r['n_attacked']} | "
                         f"{r['defence_success_rate']:.2f} | {r['adaptive_defence_rate']:.2f} | "
                         f"{r['paper_reported'] or '-'} |")
    with_abst = [m for m in models if m.get("abstention")]
    if with_abst:
        lines += ["", f"## Abstention (conformal credibility) at eps {eps}", "",
                  "| model | threshold | clean coverage | selective clean acc | attack | robust acc, no abstention | "
                  "**robust acc with abstention** | adversarial abstained on | AUROC clean vs adv |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in with_abst:
            a = m["abstention"]
            for r in a["attacks"]:
                abst = "-" if r["abstained_on_adversarial"] is None else _pct(r["abstained_on_adversarial"])
                lines.append(f"| {m['name']} | {a['threshold']:.3f} | {_pct(a['coverage'])} % | "
                             f"{_pct(a['selective_clean_acc'])} % | {r['attack']} | "
                             f"{_pct(r['robust_acc_without_abstention'])} % | "
                             f"**{_pct(r['robust_acc_with_abstention'])} %** | {abst} % | "
                             + ("-" if r["auroc_clean_vs_adversarial"] is None else
                                f"{r['auroc_clean_vs_adversarial']:.3f}") + " |")
        lines += ["", with_abst[0]["abstention"]["protocol"] + "."]
    lines += ["", "## Gradient-masking checks", "", "| model | check | result | detail |", "|---|---|---|---|"]
    for m in models:
        for c in m["masking_checks"]:
            lines.append(f"| {m['name']} | {c['check']} | {_verdict(c['passed'])} | {c['detail']} |")
    lines += ["", "## Surrogate choice (on held-out training images): hard-vote accuracy (%) after PGD", ""]
    if models:
        cols = [(r["temperature"], r["k"]) for r in models[0]["temperature"]["sweep"]]
        lines += ["| model | " + " | ".join(f"T={t:g}" + ("" if k is None else f", k={k}") for t, k in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for m in models:
            cells = [_pct(r["acc"]) + " (0 grad)" * (r["zero_gradient_share"] > 0.01)
                     for r in m["temperature"]["sweep"]]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        lines += ["", models[0]["temperature"]["protocol"] + ". (0 grad): over 1 % of the images have an all-zero "
                  "input gradient on that surrogate (saturated softmax)."]
    v = result.get("torchattacks_validation")
    lines += ["", "## Cross-check against torchattacks", ""]
    if not v:
        lines.append("Not run.")
    elif "skipped" in v:
        lines.append(f"Skipped: {v['skipped']}.")
    else:
        lines += [f"torchattacks {v['torchattacks_version']} on {v['model']}, {v['n']} images, "
                  f"eps {fmt_eps(v['eps'])}, "
                  f"PGD {v['pgd_steps']} steps, APGD {v['apgd_steps']} steps; {v['protocol']}. Clean "
                  f"{_pct(v['clean'])} %.", "", "| attack | ours | torchattacks | difference (points) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['attack']} | {_pct(r['ours'])} | {_pct(r['torchattacks'])} | {r['diff_points']:+.1f} |"
                  for r in v["rows"]]
    lines += ["", "## Models", ""]
    lines += [f"- {m['name']}: `{m['path']}`, model sha256 `{m['model_sha256'][:16]}...` (encoder + bank), "
              f"{m['encoder'].get('arch', '?')} width {m['encoder'].get('width', '?')}, k={m['knn'].get('k', '?')}; "
              f"evaluated in {m['seconds'] / 60:.1f} min" for m in models]
    return "\n".join(lines) + "\n"


def _save_plot(fig: Any, ax: Any, path: Path) -> Path:
    """Common finish of the report plots: grid, legend, tight layout, PNG, figure closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_eps(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs eps for all models on one figure: worst case solid, paper's guided attack dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, m in enumerate(result["models"]):
        rows = sorted(m["eps_sweep"], key=lambda r: r["eps"])
        e = [r["eps"] * 255 for r in rows]
        color = f"C{i}"
        ax.plot(e, [100 * r["worst_case_acc"] for r in rows], "o-", color=color, label=f"{m['name']}: worst case")
        ax.plot(e, [100 * r["guided_acc"] for r in rows], "s--", color=color, alpha=0.6,
                label=f"{m['name']}: paper's guided attack")
    ax.axvline(result["config"]["eps"] * 255, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("L-inf eps (/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("k-NN accuracy vs attack radius" + (" (quick mode)" if result["quick"] else ""))
    return _save_plot(fig, ax, path)


def plot_temperature(result: dict[str, Any], path: Path) -> Path:
    """Hard-vote accuracy after PGD on the surrogate vs its temperature, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    for i, m in enumerate(result["models"]):
        for k, style in ((None, "o-"), ("topk", "s--")):
            rows = [r for r in m["temperature"]["sweep"] if (r["k"] is None) == (k is None)]
            if rows:
                ax.semilogx([r["temperature"] for r in rows], [100 * r["acc"] for r in rows], style, color=f"C{i}",
                            label=f"{m['name']}, " + ("whole bank" if k is None else f"{rows[0]['k']} nearest")
                            + f" (chosen: {m['temperature']['surrogate']})" * (k is None))
    ax.set_xlabel("soft-kNN temperature")
    ax.set_ylabel("accuracy after PGD (%)")
    ax.set_title("Surrogate temperature sweep (held-out images)")
    return _save_plot(fig, ax, path)


def write_reports(result: dict[str, Any], out: str | Path, stem: str = "robustness") -> dict[str, str]:
    """`<stem>.json`, `<stem>.md`, `<stem>_eps.png`, `<stem>_temperature.png` in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "eps_plot": out / f"{stem}_eps.png",
             "temperature_plot": out / f"{stem}_temperature.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_report(result))
    plot_eps(result, paths["eps_plot"])
    plot_temperature(result, paths["temperature_plot"])
    return {k: str(v) for k, v in paths.items()}


def update_card(artifact: str | Path, model: dict[str, Any], result: dict[str, Any], plot: str | Path | None) -> None:
    """Write the suite's section into card.md (replacing an earlier one), copy the plot, record the results in
    `metrics.robust` and the chosen surrogate in `knn.surrogate`; `update_artifact` re-hashes, so the artifact
    still verifies."""
    path = Path(artifact)
    card = (path / CARD).read_text() if (path / CARD).is_file() else f"# Model card: {model['name']}\n"
    files = {CARD: with_suite_section(card, suite_section(model, result)).encode()}
    if plot is not None:
        files["robustness_eps.png"] = Path(plot).read_bytes()

    def record(manifest: Manifest) -> None:
        if manifest.model_sha256 != model["model_sha256"]:
            raise ValueError(f"{path}: encoder/bank differ from the evaluated model {model['model_sha256'][:12]}")
        metrics = manifest.metrics = manifest.metrics or Metrics()
        robust = [r for r in metrics.robust or [] if r.suite != "robustness"]
        most = max((r["steps"] for r in model["attacks"]), default=0)  # the worst case's longest attack
        for r in model["attacks"] + [{"attack": "worst_case", "steps": most, **model["worst_case"]}]:
            robust.append(RobustResult(attack=r["attack"], norm="linf", eps=r["eps"], steps=r.get("steps"),
                                       acc=r["acc"], n=r["n"], suite="robustness", code_version=result["code_version"],
                                       quick=result["quick"]))
        metrics.robust = robust
        sur = model["temperature"]  # what /attack differentiates: the suite's strongest
        manifest.knn.surrogate = KnnSurrogate(temperature=sur["selected"], k=sur["selected_k"],
                                              chosen_by="robustness suite temperature sweep")

    update_artifact(path, record, files)


def run_suite(cfg: SuiteConfig, artifacts: Sequence[str | Path], transfer_source: str | Path | None = None,
              update_cards: bool = False) -> dict[str, Any]:
    """Evaluate, write the reports to `cfg.out`, optionally update the cards; returns a short summary."""
    result = Suite.from_artifacts(cfg, artifacts, transfer_source).run()
    paths = write_reports(result, cfg.out)
    if update_cards:
        for art, m in zip(artifacts, result["models"], strict=True):
            update_card(art, m, result, paths["eps_plot"])
    return {"reports": paths, "cards_updated": bool(update_cards), "seconds": result["seconds"],
            "models": {m["name"]: {"clean": m["clean"]["acc"], "worst_case": m["worst_case"]["acc"],
                                   "surrogate": m["temperature"]["surrogate"],
                                   "attacks": {r["attack"]: r["acc"] for r in m["attacks"]},
                                   "checks_failed": [c["check"] for c in m["masking_checks"] if c["passed"] is False]}
                       for m in result["models"]}}


# --- CLI -------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", help="artifact folders, e.g. artifacts/default artifacts/supervised")
    p.add_argument("--transfer-source", default=None,
                   help="artifact whose adversarial images are transferred (default: the supervised one; 'none')")
    p.add_argument("--data", default="data", help="dataset path (CIFAR-10 python layout)")
    p.add_argument("--out", default=None, help="folder for robustness.{json,md} and the plots (default: "
                   "benchmarks/results; with --quick: test-output/robustness_quick, so quick runs never overwrite)")
    p.add_argument("--cache-dir", default=None, help="per-attack results for resuming (default: <out>/cache)")
    p.add_argument("--quick", action="store_true", help="a few dozen images and few steps (tests, CI)")
    p.add_argument("--n-robust", type=int, default=None, help="first N test images attacked (full: 1000)")
    p.add_argument("--n-clean", type=int, default=None, help="test images for clean accuracy (full: all)")
    p.add_argument("--eps", type=parse_eps, default=None, help="main L-inf radius in [0, 1], e.g. 8/255 (full: 8/255)")
    p.add_argument("--eps-sweep", type=parse_eps, nargs="+", default=None,
                   help="radii of the accuracy-vs-eps sweep (full: 0 2/255 4/255 8/255 12/255 16/255 0.03 0.06)")
    p.add_argument("--validate-n", type=int, default=None, help="images for the torchattacks cross-check (0: skip)")
    p.add_argument("--batch-size", type=int, default=None, help="images per attack batch")
    p.add_argument("--seed", type=int, default=0, help="seed of every random start")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse per-attack results from the cache folder")
    p.add_argument("--update-cards", action="store_true",
                   help="write the results into each artifact's card.md and re-hash it in manifest.json")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> float in [0, 1] pixel units."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from e
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"eps must be in [0, 1] pixel units, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    sweep = tuple(args.eps_sweep) if args.eps_sweep else None
    over = {k: v for k, v in {"n_robust": args.n_robust, "n_clean": args.n_clean, "eps": args.eps, "eps_sweep": sweep,
                                "validate_n": args.validate_n, "batch_size": args.batch_size}.items() if v is not None}
    out = args.out or ("test-output/robustness_quick" if args.quick else "benchmarks/results")
    common = dict(data=args.data, out=out, cache_dir=args.cache_dir, seed=args.seed, device=args.device,
                  resume=args.resume, progress=args.progress)
    cfg = SuiteConfig.quick_config(**common) if args.quick else SuiteConfig(**common)
    return replace(cfg, **over)


def cmd_robustness(args: argparse.Namespace) -> dict[str, Any]:
    return run_suite(config_from_args(args), args.artifacts, args.transfer_source, args.update_cards)


def add_cli(sub: Any) -> None:
    """Register `satml robustness`."""
    p = sub.add_parser("robustness", help="robustness evaluation suite: adaptive attacks, eps sweep, paper protocol, "
                       "masking checks; JSON + markdown + plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_robustness)
