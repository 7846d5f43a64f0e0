"""Adversarial rows for a k-NN bank (issue 10): the vote's own training set hardened, no encoder training.

A k-NN vote is a non-parametric model whose training set is its bank. `adversarial_rows` attacks each bank image
against the vote it serves (PGD on the whole-bank soft-kNN surrogate: the suite's `pgd_ce`) and returns the
embeddings of the adversarial images whose vote flipped, each labelled with its own image's label. Appended to the
bank, they put rows of the right class where that class's adversaries land. The labels are the bank's own (the
encoder never sees them). The robustness suite builds its surrogates from the artifact's bank, so it attacks the
vote over the whole enlarged bank: what it measures is adaptive to the new rows.

`harden_artifact` appends them to an exported artifact's bank (`satml harden-bank`): the first bank_size x views
rows stay the clean ones, the manifest's `bank_adversarial` records the attack and the rows, and what measured the
old bank is measured again over the new one (the manifest's metrics, with the same images and attack; the
calibration); the card is rendered anew (a robustness section from an earlier suite run measured another model).

Measured on the w40 student r29 (benchmarks/results/recipes.md, r29a): the rows lift validation clean accuracy a
little and make the vote *easier* to break for an attacker who knows them (APGD-CE on the suite's surrogate 30.7 ->
27.2 %): rows of class A pushed toward class B sit where B's adversaries go. Off by default; no artifact uses it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm import tqdm

from training import knn, knn_attacks
from training.artifact import BANK, CARD, ArtifactError, load_artifact, update_artifact
from training.card import render_card
from training.conformal import CALIBRATION
from training.data import SplitSpec, has_test_split, load_dataset, load_split
from training.evaluate import KnnModel, robust_mask
from training.manifest import BankAdversarial, Manifest, Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HardenSpec:
    """The attack whose flipped results become bank rows. PGD-5 on the T = 0.1 whole-bank surrogate was the
    recipe screened on the w40 student (benchmarks/results/recipes.md, r29a); each chunk of bank images is
    attacked with a generator seeded with `seed`, so a rerun on the same CPU writes the same rows."""

    eps: float = 8 / 255
    steps: int = 5
    temperature: float = 0.1
    seed: int = 0
    chunk: int = 1000
    max_rows: int | None = None  # keep the first max_rows flipped rows in bank order (the artifact size limit)

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1 and self.steps >= 1 and self.temperature > 0 and self.chunk >= 1):
            raise ValueError(f"need 0 < eps <= 1, steps >= 1, temperature > 0 and chunk >= 1, got {self}")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {self.max_rows}")

    def record(self, attacked: int, rows: int) -> BankAdversarial:
        return BankAdversarial(attack="pgd_ce", eps=self.eps, steps=self.steps, temperature=self.temperature,
                               seed=self.seed, chunk=self.chunk, attacked=attacked, rows=rows,
                               max_rows=self.max_rows)


def adversarial_rows(model: KnnModel, images: np.ndarray, labels: np.ndarray, spec: HardenSpec = HardenSpec(), *,
                     progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(embeddings [M, D] float32, labels [M], source index [M]) of the images whose vote `spec`'s attack flipped:
    the served encoder's embedding of each adversarial image, labelled with its image's label; the first
    `spec.max_rows` of them in image order when set."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    attack = knn_attacks.build("pgd_ce", model, knn_attacks.Budget(spec.eps, spec.steps, None),
                               knn_attacks.Surrogate(spec.temperature))
    device = model.bank.device
    embs, sources = [], []
    for i in tqdm(range(0, len(labels), spec.chunk), desc="harden bank", disable=not progress, unit="chunk"):
        ok, adv = robust_mask(model, images[i:i + spec.chunk], labels[i:i + spec.chunk], attack, seed=spec.seed,
                              keep_adversarial=True)
        assert adv is not None
        flipped = torch.as_tensor(~ok)
        # the whole chunk embedded, then the flipped rows taken: the same batches whatever flipped
        embs.append(knn.embed(model.encoder, adv, device=device).float().cpu()[flipped])
        sources.append(torch.nonzero(flipped)[:, 0] + i)
    source = torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long)
    emb = torch.cat(embs) if embs else torch.zeros(0, int(model.bank.shape[1]))
    keep = len(source) if spec.max_rows is None else min(spec.max_rows, len(source))
    return emb[:keep], torch.as_tensor(labels).long()[source[:keep]], source[:keep]


def bank_images(path: Path, data: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The training images behind an artifact's clean bank rows (uint8 NHWC, labels), rebuilt from the split its
    manifest records and checked against the bank's labels."""
    art = load_artifact(path)
    spec = art.spec
    hp = spec.training.hyperparameters if spec.training else None
    if not hp or "val_size" not in hp:
        raise ArtifactError(f"{path}: the manifest records no training split; cannot rebuild the bank's images")
    ds, _ = SplitSpec.from_config(hp).apply(load_dataset(data, "train"))
    n = spec.bank_images(int(art.bank.shape[0]))
    labels = np.asarray(ds.labels)
    if len(ds) != n or not torch.equal(torch.as_tensor(labels).long(), art.bank_labels[:n].cpu()):
        raise ArtifactError(f"{path}: {data}, split as in training, does not give the bank's {n} images and labels: "
                            "not the data this artifact was exported from?")
    return ds.images, labels


def remeasured(model: KnnModel, spec: Manifest, data: str | Path, progress: bool = False) -> Metrics | None:
    """The manifest's metrics measured again on `model` with the images and attack they record (None if none)."""
    from training.export import evaluate_model, split_of

    m = spec.metrics
    if m is None or m.clean_acc is None:
        return None
    r = m.robust[0] if m.robust else None
    val = None
    if not has_test_split(data):  # the export measured on the validation split then (training.export)
        _, val = load_split(data, split_of((spec.training.hyperparameters if spec.training else None) or {}))
    steps = r.steps if r is not None and r.steps is not None else 10
    return Metrics.from_dict(evaluate_model(model, str(data), m.clean_n, r.n if r else 0, r.eps if r else 8 / 255,
                                            steps, progress=progress, val=val))


def refuse_hardened(path: Path, spec: Manifest) -> None:
    """Attack the clean bank once: a second hardening would attack rows that are themselves adversarial."""
    if spec.bank_adversarial is not None:
        raise ArtifactError(f"{path}: its bank already holds {spec.bank_adversarial.rows} adversarial rows")


def harden_artifact(path: str | Path, data: str | Path, spec: HardenSpec = HardenSpec(),
                    device: str | torch.device = "cpu", progress: bool = False) -> BankAdversarial:
    """Append `adversarial_rows` of the bank's own images to the artifact at `path` (in place), through
    `append_adversarial_rows`. Refuses an artifact already hardened (attack the clean bank only once)."""
    path = Path(path)
    art = load_artifact(path, device)
    refuse_hardened(path, art.spec)
    n, views = art.spec.bank_images(int(art.bank.shape[0])), art.spec.bank_views or 1
    if art.bank.shape[0] != n * views:
        raise ArtifactError(f"{path}: {art.bank.shape[0]} bank rows, not the {n} x {views} the manifest describes")
    images, labels = bank_images(path, data)
    emb, adv_labels, _ = adversarial_rows(KnnModel.from_artifact(art), images, labels, spec, progress=progress)
    record = spec.record(attacked=len(labels), rows=len(emb))
    append_adversarial_rows(path, emb, adv_labels, record, data, device, progress)
    log.info("%s: %d adversarial rows appended (PGD-%d flipped them; %d bank images attacked)", path, record.rows,
             spec.steps, len(labels))
    return record


def append_adversarial_rows(path: str | Path, emb: Tensor, labels: Tensor, record: BankAdversarial, data: str | Path,
                            device: str | torch.device = "cpu", progress: bool = False) -> None:
    """Write `adversarial_rows`' output after the artifact's clean rows (in the bank's stored dtype), record it in
    the manifest, measure the metrics again, render the card and recalibrate (if it was calibrated)."""
    from training.calibrate import calibrate_artifact

    path = Path(path)
    art = load_artifact(path, device)
    refuse_hardened(path, art.spec)
    if len(emb) != record.rows or len(labels) != record.rows:
        raise ValueError(f"{len(emb)} rows and {len(labels)} labels for a record of {record.rows}")
    stored = load_file(path / BANK)
    dtype = stored["embeddings"].dtype
    bank = torch.cat([stored["embeddings"], emb.to(dtype)]).contiguous()
    bank_labels = torch.cat([stored["labels"], labels.to(stored["labels"].dtype)]).contiguous()
    served = KnnModel(art.encoder, bank.float().to(art.bank.device), bank_labels.long().to(art.bank.device),
                      art.num_classes, art.k, art.metric)  # type: ignore[arg-type]
    metrics = remeasured(served, art.spec, data, progress)

    def edit(manifest: Manifest) -> None:
        manifest.bank_adversarial = record
        if metrics is not None:
            manifest.metrics = metrics

    written = update_artifact(path, edit, files={BANK: save({"embeddings": bank, "labels": bank_labels})})
    update_artifact(path, files={CARD: render_card(written).encode()})
    if CALIBRATION in art.spec.files:  # its scores were votes over the old bank
        calibrate_artifact(path, data, device=device)


def cmd_harden_bank(args: argparse.Namespace) -> dict[str, Any]:
    src, out = Path(args.artifact), Path(args.out)
    if out.resolve() != src.resolve():
        if out.exists():
            raise ArtifactError(f"{out} exists; pass a new folder (or the artifact itself to harden it in place)")
        shutil.copytree(src, out)
    spec = HardenSpec(eps=args.eps, steps=args.steps, temperature=args.temperature, seed=args.seed,
                      max_rows=args.max_rows)
    record = harden_artifact(out, args.data, spec, args.device, progress=args.progress)
    return {"artifact": str(out), "bank_adversarial": record.to_dict()}


def add_cli(sub: Any) -> None:
    p = sub.add_parser("harden-bank", help="append adversarial rows of the bank's own images to an artifact's bank "
                       "(measured: easier to break under the adaptive suite; see benchmarks/results/recipes.md, r29a)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", help="artifact folder (its manifest must record the training split)")
    p.add_argument("--out", required=True, help="new artifact folder (the artifact itself: harden in place)")
    p.add_argument("--data", default="data", help="the dataset the bank was built from")
    p.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius of the attack, in [0, 1] pixel units")
    p.add_argument("--steps", type=int, default=5, help="PGD steps")
    p.add_argument("--temperature", type=float, default=0.1, help="soft-kNN surrogate temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts (per chunk of 1,000 images)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="keep the first N flipped rows in bank order (the artifact size limit: 104 bytes a row at "
                        "48-d fp16 with int64 labels)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(func=cmd_harden_bank)
