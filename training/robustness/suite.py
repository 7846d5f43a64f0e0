"""The suite itself: models under test, the stages (clean, surrogate choice, attacks, eps sweep, paper
protocol, masking checks, abstention) and `run_suite`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training import attacks, conformal, knn, knn_attacks
from training.artifact import load_artifact
from training.card import fmt_eps
from training.data import ImageDataset, SplitSpec, load_dataset, recorded_validation
from training.evaluate import KnnModel, predictions, robust_mask
from training.knn_attacks import AttackFn, Surrogate
from training.manifest import Manifest
from training.robustness.cache import Cache, from_bits, to_bits
from training.robustness.config import (
    EXACT_TEST,
    PAPER_REPORTED,
    AttackSpec,
    SuiteConfig,
    attack_specs,
    budget,
    describe,
)
from training.robustness.diagnostics import torchattacks_agreement, zero_gradient_share
from training.robustness.report import finite, update_card, write_reports
from training.robustness.rows import AttackRow, CleanResult, EpsRow, MaskingCheck, PaperRow, WorstCase, to_json
from training.robustness.verdict import STOPPED, SuiteStopped

log = logging.getLogger("training.robustness")

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


def distinct_names(models: list[tuple[str, Path]]) -> list[str]:
    """Row names for the report: a model's own name, with its folder's name where two models share a name, or its
    whole path where their folders are named alike too (a candidate `runs/r26/art/default` gated beside the shipped
    `artifacts/default` would otherwise read as two rows named "default (default)")."""
    names = [n for n, _ in models]
    out = []
    for name, path in models:
        if names.count(name) == 1:
            out.append(name)
            continue
        alike = sum(1 for n, p in models if n == name and p.name == path.name) > 1
        out.append(f"{name} ({path if alike else path.name})")
    return out


class Suite:
    """Runs the protocol over several models; `run()` returns the JSON-ready result.

    `Suite.from_artifacts` is the usual entry; the constructor takes models and data already in memory
    (tests build hand-made encoders this way). `source` is the transfer source (None: no transfer).
    `train` holds the images left out of each bank (the temperature choice), loaded lazily when absent;
    `held_out`, when given, is the temperature choice's images instead (a validation run's own split).
    """

    def __init__(self, cfg: SuiteConfig, models: Sequence[ModelUnderTest], test: ImageDataset, *,
                 source: ModelUnderTest | None = None, train: ImageDataset | None = None,
                 held_out: ImageDataset | None = None) -> None:
        from training.config import resolve_device

        if not models:
            raise ValueError("no models to evaluate")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.cache = Cache(Path(cfg.cache_dir or Path(cfg.out) / "cache"), cfg.resume)
        self.models, self.source, self.test, self._train = list(models), source, test, train
        self.held_out = held_out
        for m, name in zip(self.models, distinct_names([(m.name, m.path) for m in self.models]), strict=True):
            m.name = name  # distinct names in tables and plots
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
        if cfg.split == "test":
            return cls(cfg, models, load_dataset(cfg.data, "test"), source=source)
        sweep, attacked = validation_images(models, load_dataset(cfg.data, "train"), cfg.n_sweep)
        return cls(cfg, models, attacked, source=source, held_out=sweep)

    # --- helpers

    def _key(self, m: ModelUnderTest, **kw: Any) -> dict[str, Any]:
        return {"model": m.model_sha256, "images": self.images_sha, "n": len(self.labels), "seed": self.cfg.seed, **kw}

    def _cached(self, m: ModelUnderTest, name: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """`compute()` (a JSON value) once per protocol key: the diagnostics a rerun would otherwise repeat."""
        hit = self.cache.get(m.model_sha256, name, key)
        if hit is not None:
            return hit["value"]
        value = compute()
        self.cache.put(m.model_sha256, name, key, {"value": value})
        return value

    def _masked(self, m: ModelUnderTest, name: str, idx: np.ndarray, attack: AttackFn, key: dict[str, Any],
                desc: str) -> tuple[np.ndarray, float]:
        """Per-image robustness over the n attacked images: `attack` runs on `idx` only, the rest count False."""
        key = {**key, "idx": _digest(idx)}
        hit = self.cache.get(m.model_sha256, name, key)
        if hit is not None:
            return from_bits(hit["mask"]), float(hit["seconds"])
        t0 = time.time()
        mask = np.zeros(len(self.labels), dtype=bool)
        if len(idx):
            mask[idx], _ = robust_mask(m.model, self.images[idx], self.labels[idx], attack,
                                       batch_size=self.cfg.batch_size, seed=self.cfg.seed, progress=self.cfg.progress,
                                       desc=desc)
        seconds = time.time() - t0
        self.cache.put(m.model_sha256, name, key, {"mask": to_bits(mask), "seconds": seconds})
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

    def clean(self, m: ModelUnderTest) -> CleanResult:
        n = len(self.test) if self.cfg.n_clean is None else min(self.cfg.n_clean, len(self.test))
        key = self._key(m, stage="clean", n_clean=n)
        hit = self.cache.get(m.model_sha256, "clean", key)
        if hit is None:
            t0 = time.time()
            pred = predictions(m.model, self.test.images[:n], self.cfg.batch_size * 2)
            hit = {"correct": to_bits(pred == self.test.labels[:n]), "seconds": time.time() - t0}
            self.cache.put(m.model_sha256, "clean", key, hit)
        correct = from_bits(hit["correct"])
        n_exact = min(EXACT_TEST, n) if self.cfg.split == "test" else n  # every training image is pixel-exact
        return CleanResult(acc=float(correct.mean()), n=int(n), exact_acc=float(correct[:n_exact].mean()),
                           exact_n=int(n_exact), seconds=hit["seconds"],
                           protocol=f"hard k-NN vote (k={m.model.k}, {m.model.metric}) on the first {n} "
                                    f"{self.cfg.images_word}; exact_acc on the first {n_exact}, whose pixels are "
                                    "exact (the rest of the test set is rebuilt from JPEG copies; every training "
                                    "image is exact)")

    def temperature_sweep(self, m: ModelUnderTest) -> dict[str, Any]:
        """Pick the surrogate whose PGD leaves the lowest hard-vote accuracy on held-out images (sets m.surrogate)."""
        cfg = self.cfg
        bank_size = m.manifest.bank_images(len(m.model.bank))
        if self.held_out is not None:
            held = self.held_out.subset(slice(0, cfg.n_sweep))
            where = "validation images (the first of the split, never attacked)"
        elif self.train_set.kind != "cifar10" and (recorded := self._recorded_sweep(m)) is not None:
            held, where = recorded, "validation images (the split the manifest records)"
        elif bank_size < len(self.train_set):
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

    def _recorded_sweep(self, m: ModelUnderTest) -> ImageDataset | None:
        """The sweep's images from the split the manifest records. Only CIFAR-10 keeps its validation images
        after the bank; any other kind is split stratified, so the images after the bank are mostly bank images
        of the last classes. None (and the slice after the bank, with a warning) when no split is recorded."""
        try:
            val = shared_validation([m], self.train_set)
            return val.subset(slice(0, min(self.cfg.n_sweep, len(val))))
        except ValueError as e:
            log.warning("%s: %s; the temperature sweep uses the training images after the bank", m.name, e)
            return None

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

    def _stop_if_below(self, m: ModelUnderTest, after: str, measured: dict[str, float],
                       rows: Sequence[AttackRow] = ()) -> None:
        """Raise `SuiteStopped` when a figure just measured is under its `stop_below` minimum. The worst case then
        is the running one, an upper bound of the full suite's (the attacks not run could only lower it)."""
        rule = self.cfg.stop_below or {}
        low = [(k, v) for k, v in measured.items() if k in rule and v < rule[k]]
        if not low:
            return
        figure, value = low[0]
        reason = f"{figure} {100 * value:.2f} % < {100 * rule[figure]:g} % after {after}"
        attacks = {r.attack: r.acc for r in rows}
        clean = m.result["clean"]
        head = self._provenance(suite_code_version())
        record = {"stopped": True, "reason": reason, "after": after, "rule": rule, **head,
                  "split": self.cfg.split, "eps": self.cfg.eps, "n_robust": len(self.labels),
                  "machine": {**head["machine"], "loadavg": _loadavg()},
                  "figures": {"clean": clean["acc"], "exact": clean.get("exact_acc"),
                              "worst": measured.get("worst")},
                  "model": {"name": m.name, "path": str(m.path), "model_sha256": m.model_sha256, "clean": clean,
                            "worst_case": None if "worst" not in measured else
                            {"acc": measured["worst"], "upper_bound": True, "attacks": list(attacks)},
                            "attacks": attacks}}
        log.warning("%s: stopped early: %s (--stop-below)", m.name, reason)
        raise SuiteStopped(record)

    def _provenance(self, version: str) -> dict[str, Any]:
        """What every record of the suite says about when, with which code and where it ran (the report's and a
        stop record's); the caller adds its load averages to `machine`."""
        return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "code_version": version,
                "device": str(self.device), "torch": torch.__version__,
                "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}

    def evaluate(self, m: ModelUnderTest) -> dict[str, Any]:
        """Everything for one model (the temperature must already be set by `temperature_sweep`)."""
        cfg, n = self.cfg, len(self.labels)
        correct = predictions(m.model, self.images, cfg.batch_size * 2) == self.labels
        idx = np.flatnonzero(correct)
        res: dict[str, Any] = {"attacked": {"n": n, "clean_correct": int(correct.sum()),
                                            "acc": float(correct.mean())}}
        rows: list[AttackRow] = []
        masks: dict[str, np.ndarray] = {}
        specs = attack_specs(cfg)
        alive = correct.copy()  # robust to every worst-case attack so far (the input of chained attacks)
        for spec in tqdm(specs, desc=f"{m.name[:16]} attacks {fmt_eps(cfg.eps)}", disable=not cfg.progress):
            sur = self.spec_surrogate(m, spec)
            mask, sec = self._spec_attack(m, spec, cfg.eps, np.flatnonzero(alive) if spec.chain else idx)
            masks[spec.name] = mask
            if spec.worst_case:
                alive &= mask
            rows.append(AttackRow(
                attack=spec.name, kind=spec.kind, eps=cfg.eps, steps=spec.steps, acc=float(mask.mean()), n=n,
                worst_case=spec.worst_case, seconds=round(sec, 2),
                surrogate=asdict(sur) if spec.kind not in ("guided", "embedding", "sw_guided") else None,
                chained=spec.chain,
                protocol=describe(spec.kind, spec.steps, cfg.eps, sur, cfg, n, spec.alpha, spec.track,
                                  extra="run only on the images still robust after every attack listed before it, "
                                        "so its column is a running worst case" if spec.chain else "")))
            if spec.worst_case:
                self._stop_if_below(m, spec.name, {"worst": float(alive.mean())}, rows=rows)
        x_tr = self.transfer_images(cfg.eps) if self.source is not None and self.source is not m else None
        if x_tr is not None:
            assert self.source is not None
            t0 = time.time()
            mask = np.zeros(n, dtype=bool)
            mask[idx] = predictions(m.model, x_tr[idx], cfg.batch_size * 2) == self.labels[idx]
            masks["transfer"] = mask
            rows.append(AttackRow(
                attack="transfer", kind="transfer", eps=cfg.eps, steps=cfg.transfer_steps, acc=float(mask.mean()),
                n=n, worst_case=True, seconds=round(time.time() - t0, 2), source=self.source.name,
                source_sha256=self.source.model_sha256, surrogate=asdict(self.source.surrogate),
                protocol=describe("transfer", cfg.transfer_steps, cfg.eps, self.source.surrogate, cfg, n,
                                  extra=f"source model {self.source.name}")))
        noise_spec = AttackSpec("noise", "noise", 1, worst_case=False, track=False)
        noise_mask, sec = self._spec_attack(m, noise_spec, cfg.eps, idx)
        worst_names = [r.attack for r in rows if r.worst_case]
        at_eps = correct.copy()
        for name in worst_names:
            at_eps &= masks[name]
        sweep = self.eps_sweep(m, correct, masks, at_eps)
        main_row = next(r for r in sweep if math.isclose(r.eps, cfg.eps))
        worst = from_bits(main_row.worst_case_bits)
        worst_case = WorstCase(acc=float(worst.mean()), n=n, eps=cfg.eps, attacks=worst_names,
                               acc_attacks_at_eps_only=float(at_eps.mean()),
                               protocol=f"an image counts as robust only if it is classified correctly clean, after "
                                        f"every one of {', '.join(worst_names)} at L-inf eps {fmt_eps(cfg.eps)}, and "
                                        "after the APGD-CE/DLR cascade at every smaller eps of the sweep")
        noise_acc = float(noise_mask.mean())
        res["attacks"] = to_json(rows)
        res["eps_sweep"] = to_json(sweep)
        res["worst_case"] = worst_case.to_json()
        res["noise"] = {"acc": noise_acc, "n": n, "eps": cfg.eps,
                        "protocol": describe("noise", 1, cfg.eps, None, cfg, n, track=False)}
        res["per_image"] = {"clean_correct": to_bits(correct), **{k: to_bits(v) for k, v in masks.items()},
                            "worst_case": to_bits(worst), "noise": to_bits(noise_mask)}
        res["paper_protocol"] = [] if cfg.headline_only else to_json(self.paper_table(m, sweep, correct))
        res["masking_checks"] = [] if cfg.headline_only else to_json(
            self.masking_checks(m, rows, noise_acc, float(correct.mean()), idx))
        if m.calibration is not None and self.cfg.split == "test":  # calibrated on the validation images
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
        rows: list[dict[str, Any]] = []
        tracked = AttackSpec("abstain_apgd_ce", "apgd_ce", cfg.abstain_steps)
        attacks_: dict[str, tuple[AttackFn, dict[str, Any]]] = {
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
                "auroc_clean_vs_adversarial": finite(conformal.auroc(torch.as_tensor(cred[idx]),
                                                                      torch.as_tensor(c_adv[flipped]))),
                "seconds": round(float(hit["seconds"]), 2)})
        return {"threshold": threshold, "coverage": float(answered.mean()), "target_coverage": cfg.abstain_coverage,
                "selective_clean_acc": float(correct[answered].mean()) if answered.any() else None,
                "clean_acc": float(correct.mean()),
                "coverage_curve": [{k: finite(v) for k, v in r.items()} for r in conformal.coverage_curve(
                    torch.as_tensor(cred), torch.as_tensor(correct))],
                "attacks": rows,
                "protocol": f"credibility = conformal p-value of the predicted class (calibration scores of the "
                            f"artifact); threshold = the largest answering >= {cfg.abstain_coverage:.0%} of the "
                            f"{n} clean test images; an attacked image is defended when answered correctly or "
                            "abstained on, a clean-wrong one only when abstained on; AUROC of credibility, clean "
                            "(correct) vs adversarial (vote flipped); claim only the adaptive row"}

    def eps_sweep(self, m: ModelUnderTest, correct: np.ndarray, masks: dict[str, np.ndarray],
                  at_eps: np.ndarray) -> list[EpsRow]:
        """Worst case (APGD-CE then APGD-DLR on the survivors) and the paper's guided attack at every eps.

        Nested cascade (AutoAttack-style, attacking only images still robust): eps grows, and an image broken
        at a smaller eps is broken at every larger one (that perturbation lies in the larger ball), so each eps
        attacks only the survivors of the previous. At the main eps the survivors of every main-table attack
        (`at_eps`) are used, so the curve there is the headline worst case.
        """
        cfg, n = self.cfg, len(self.labels)
        rows: list[EpsRow] = []
        ce = AttackSpec("apgd_ce", "apgd_ce", cfg.apgd_steps)
        dlr = AttackSpec("apgd_dlr", "apgd_dlr", cfg.apgd_steps)
        guided = AttackSpec("knn_guided", "guided", cfg.guided_steps, alpha=cfg.guided_alpha, track=False)
        alive = correct.copy()
        radii = {cfg.eps} if cfg.headline_only else set(cfg.eps_sweep) | set(cfg.paper_eps) | {cfg.eps}
        for eps in tqdm(sorted(radii), desc=f"{m.name[:16]} eps sweep", disable=not cfg.progress):
            if eps == 0:
                guided_mask = correct.copy()
            elif math.isclose(eps, cfg.eps):
                alive = alive & at_eps
                guided_mask = masks["knn_guided"]
            else:
                alive, _ = self._spec_attack(m, ce, eps, np.flatnonzero(alive), tag="sweep-")
                alive, _ = self._spec_attack(m, dlr, eps, np.flatnonzero(alive), tag="sweep-")
                guided_mask, _ = self._spec_attack(m, guided, eps, np.flatnonzero(correct))
            rows.append(EpsRow(
                eps=eps, eps_255=round(eps * 255, 3), worst_case_acc=float(alive.mean()),
                guided_acc=float(guided_mask.mean()), n=n,
                protocol=f"worst case = APGD-CE then APGD-DLR ({cfg.apgd_steps} steps, surrogate {m.surrogate}) on "
                         f"the images still robust at every smaller eps (at {fmt_eps(cfg.eps)}: after every "
                         f"main-table attack); guided = "
                         f"{describe('guided', cfg.guided_steps, eps, None, cfg, n, cfg.guided_alpha)}",
                worst_case_bits=to_bits(alive)))
        return rows

    def paper_table(self, m: ModelUnderTest, sweep: list[EpsRow], correct: np.ndarray) -> list[PaperRow]:
        """Defence success rate (the paper's metric) with its guided attack, beside our adaptive worst case."""
        out: list[PaperRow] = []
        n_att = int(correct.sum())
        for eps in self.cfg.paper_eps:
            row = next(r for r in sweep if math.isclose(r.eps, eps))
            worst = from_bits(row.worst_case_bits)
            out.append(PaperRow(
                eps=eps, n_attacked=n_att, defence_success_rate=row.guided_acc * len(self.labels) / max(1, n_att),
                adaptive_defence_rate=float(worst.sum()) / max(1, n_att),
                paper_reported=PAPER_REPORTED.get(m.method) if math.isclose(eps, 0.03) else None,
                protocol="share of the attacked, originally correct images whose k-NN prediction is unchanged; paper: "
                         f"its guided attack ({self.cfg.guided_steps} steps of eps/6, {self.cfg.guides} guides); "
                         "adaptive: our eps-sweep worst case"))
        return out

    def masking_checks(self, m: ModelUnderTest, rows: list[AttackRow], noise: float, clean: float,
                       idx: np.ndarray) -> list[MaskingCheck]:
        """AutoAttack-style sanity checks that the numbers are not inflated by gradient masking."""
        cfg, n = self.cfg, len(self.labels)
        tol = 1 / n + 1e-9  # one image
        acc = {r.attack: r.acc for r in rows}
        checks = []
        big = AttackSpec("large_eps", "apgd_ce", cfg.large_eps_steps)
        big_mask, _ = self._spec_attack(m, big, cfg.large_eps, idx)
        checks.append(MaskingCheck("large eps drives accuracy to ~0", bool(big_mask.mean() <= 0.05),
                                   float(big_mask.mean()),
                                   f"APGD-CE {cfg.large_eps_steps} steps at eps {fmt_eps(cfg.large_eps)}: "
                                   f"{100 * big_mask.mean():.1f} % (pass: <= 5 %)"))
        short, long = (f"pgd{s}" for s in cfg.pgd_steps)
        checks.append(MaskingCheck("more steps never raise accuracy", bool(acc[long] <= acc[short] + tol),
                                   [acc[short], acc[long]],
                                   f"{short} {100 * acc[short]:.1f} % vs {long} {100 * acc[long]:.1f} %"))
        white = min(v for k, v in acc.items() if k != "transfer")
        if "transfer" in acc:
            checks.append(MaskingCheck("white-box at least as strong as transfer",
                                       bool(white <= acc["transfer"] + tol), [white, acc["transfer"]],
                                       f"best white-box {100 * white:.1f} % vs transfer {100 * acc['transfer']:.1f} %"))
        weaker = [k for k, v in acc.items() if v > noise + tol]
        checks.append(MaskingCheck("every attack beats random noise", not weaker, {"noise": noise, "clean": clean},
                                   f"noise {100 * noise:.1f} % (clean {100 * clean:.1f} %)"
                                   + (f"; weaker than noise: {weaker}" if weaker else "")))
        zero = self._cached(m, "zero-gradient", self._key(m, surrogate=asdict(m.surrogate), idx=_digest(idx)),
                            lambda: zero_gradient_share(m.model, m.surrogate, self.images[idx], self.labels[idx],
                                                        self.cfg.batch_size))
        checks.append(MaskingCheck("surrogate gradients are non-zero", bool(zero <= 0.01), zero,
                                   f"{100 * zero:.1f} % of clean-correct images have an all-zero or non-finite "
                                   f"input gradient on the surrogate {m.surrogate} (pass: <= 1 %)"))
        agree = self._cached(m, "agreement", self._key(m, surrogate=asdict(m.surrogate)),
                             lambda: self.surrogate_agreement(m))
        checks.append(MaskingCheck("surrogate agrees with the hard vote (information)", None, agree,
                                   f"argmax of the soft-kNN surrogate equals the k-NN vote on {100 * agree:.1f} % of "
                                   "the attacked clean images; low agreement means a weaker stand-in, which the other "
                                   "attacks (embedding, guided, transfer) hedge"))
        return checks

    def validate_torchattacks(self, m: ModelUnderTest) -> dict[str, Any]:
        """Our PGD / APGD against torchattacks' on the same surrogate, images and budget (cached per protocol)."""
        cfg = self.cfg
        key = self._key(m, surrogate=asdict(m.surrogate), validate_n=cfg.validate_n, eps=cfg.validate_eps,
                        pgd_steps=cfg.pgd_steps[0], apgd_steps=cfg.apgd_steps)
        return self._cached(m, "torchattacks", key, lambda: self._torchattacks(m))

    def _torchattacks(self, m: ModelUnderTest) -> dict[str, Any]:
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
            clean = self.clean(m)
            m.result["clean"] = clean.to_json()
            self._stop_if_below(m, "clean", {"clean": clean.acc, "exact": clean.exact_acc})
            res = {"name": m.name, "path": str(m.path), "model_sha256": m.model_sha256,
                   "files": dict(m.manifest.files), "method": m.method,
                   "encoder": m.manifest.encoder.to_dict(), "knn": m.manifest.knn.to_dict(),
                   "clean": m.result["clean"], "temperature": m.result["temperature"]}
            res |= self.evaluate(m)
            res["seconds"] = round(time.time() - t_model, 1)
            m.result = res
            models.append(res)
            log.info("%s: clean %.1f %%, worst case %.1f %% at eps %s", m.name, 100 * res["clean"]["acc"],
                     100 * res["worst_case"]["acc"], fmt_eps(cfg.eps))
        validation = None
        if cfg.validate_n and not cfg.headline_only:
            target = self.source or self.models[0]
            try:
                validation = self.validate_torchattacks(target)
            except ImportError:
                validation = {"skipped": "torchattacks is not installed (pip install --no-deps torchattacks)"}
        head = self._provenance(version)
        return {
            "suite": "robustness", "format_version": 1, **head, "seed": cfg.seed, "quick": cfg.quick,
            "config": asdict(cfg), "seconds": round(time.time() - t0, 1),
            "machine": {**head["machine"], "loadavg_start": load_start, "loadavg_end": _loadavg()},
            "transfer_source": None if self.source is None else {"name": self.source.name,
                                                                 "model_sha256": self.source.model_sha256},
            "protocol": {
                "threat_model": "L-inf, eps in [0, 1] pixel units (8/255 = 0.0314)",
                "scoring": "the hard k-NN vote the product serves; attacks are crafted on a differentiable "
                           "soft-kNN surrogate (softmax over negative squared distances to the whole bank)",
                "images": f"first {len(self.labels)} CIFAR-10 {cfg.images_word} (attacks); clean accuracy on "
                          f"{models[0]['clean']['n'] if models else '?'} {cfg.images_word} and the exact leading "
                          "subset",
                "split": cfg.split,
                "worst_case": "per image: robust only if correct clean and after every worst-case attack",
                "references": "Croce & Hein 2020 (APGD, DLR); Madry et al. 2018 (PGD); Chen et al. 2020 (SAT, "
                              "guided attack, defence success rate)",
            },
            "models": models,
            "torchattacks_validation": validation,
        }


def shared_validation(models: Sequence[ModelUnderTest], train: ImageDataset) -> ImageDataset:
    """The validation split the models' manifests record (`training.data.recorded_validation`; on CIFAR-10 the
    training images after the bank). Refused when a manifest records none or the models were split differently."""
    hps = [m.manifest.training.hyperparameters if m.manifest.training else None for m in models]
    if len({SplitSpec.from_config(hp) for hp in hps if hp}) > 1:
        raise ValueError("the models were trained on different splits; evaluate them in separate validation runs")
    val = None
    for m, hp in zip(models, hps, strict=True):
        val = recorded_validation(hp, train, m.manifest.bank_images(len(m.model.bank)), str(m.path))
        if val is None:
            raise ValueError(f"{m.path}: the manifest records no training split; its validation images are unknown")
    assert val is not None  # models is never empty (Suite refuses that)
    return val


def validation_images(models: Sequence[ModelUnderTest], train: ImageDataset,
                      n_sweep: int) -> tuple[ImageDataset, ImageDataset]:
    """(sweep, attacked) of a `split="validation"` run: the models' recorded validation split, its first
    `n_sweep` for the temperature choice and the rest attacked, so no surrogate is chosen on an image it is scored
    on. For choosing a k, a vote or a recipe with the suite's full strength without looking at the test set."""
    val = shared_validation(models, train)
    if len(val) <= n_sweep:
        raise ValueError(f"no validation images left after the temperature sweep's {n_sweep}")
    return val.subset(slice(0, n_sweep)), val.subset(slice(n_sweep, len(val)))


def _digest(idx: np.ndarray) -> str:
    """Cache-key form of a set of image indices."""
    return hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:16]


def suite_code_version() -> str:
    """Git commit of the evaluating code, read when the run starts, with '-dirty' if training/ has uncommitted
    changes (the numbers then come from code no commit holds)."""
    from training.export import code_version

    version = code_version()
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parents[1])
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


def check_card_worthy(split: str, headline_only: bool) -> None:
    """A model card records test-set figures of the full protocol: ValueError for a run that is not one (a
    validation run or a headline-only gate is for choices)."""
    if split != "test":
        raise ValueError("--update-cards records test-set figures; a validation run is for choices, not for cards")
    if headline_only:
        raise ValueError("--update-cards records the full protocol; a --headline-only run has no eps sweep or "
                         "masking checks to record")


def run_suite(cfg: SuiteConfig, artifacts: Sequence[str | Path], transfer_source: str | Path | None = None,
              update_cards: bool = False) -> dict[str, Any]:
    """Evaluate, write the reports to `cfg.out`, optionally update the cards; returns a short summary."""
    if update_cards:
        check_card_worthy(cfg.split, cfg.headline_only)
    if cfg.stop_below is not None and len(artifacts) != 1:
        raise ValueError(f"--stop-below stops a gate of one candidate; got {len(artifacts)} artifacts")
    out = Path(cfg.out)
    try:
        result = Suite.from_artifacts(cfg, artifacts, transfer_source).run()
    except SuiteStopped as stop:  # the folder holds the stop record, not an older report that would contradict it
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("robustness.*"):
            old.unlink()
        tmp = out / f"{STOPPED}.part"
        tmp.write_text(json.dumps(stop.record, indent=2) + "\n")
        tmp.replace(out / STOPPED)
        raise
    (out / STOPPED).unlink(missing_ok=True)
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
