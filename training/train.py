"""Training loops for the methods: `ssl`, `sat`, `distill`, `pseudo_at` (label-free) and `supervised`, `pgd_at`.

ssl        SimCLR-style contrastive pre-training (NT-Xent over two augmented views).
sat        Self-supervised Adversarial Training (Chen et al., ICASSP 2020, arXiv 1911.06470): craft
           x' with PGD (the paper's k-NN-guided attack toward other-class samples, or a label-free
           embedding attack), optionally keep only the successful ones, and maximise the InfoNCE bound
           on I(z(x); z(x')); an optional clean NT-Xent term (weight `clean_weight`) keeps accuracy.
supervised cross-entropy baseline with crop + flip.
pgd_at     supervised PGD adversarial training (Madry et al. 2018), the robust supervised baseline.
distill    robust self-supervised distillation (DeACL style, Zhang et al. 2022): a student matches the
           clean embedding of a frozen SSL teacher (`teacher`, e.g. an ssl run's checkpoint) and a
           TRADES-like term keeps its embedding of a PGD point x' close to its embedding of x, where x'
           maximises that distance. Labels are never used.
pseudo_at  label-free PGD-AT: the classes are k-means clusters (`clusters`) of a frozen SSL teacher's
           embedding (`training.pseudo_labels`); the encoder starts from `init` (the teacher).

Runs are resumable: `run_dir/checkpoint.pt` is written every `checkpoint_minutes` and at the end
(with optimizer, step and RNG state), and `train()` picks it up when called again with the same
run_dir. `max_minutes` stops cleanly at a step boundary so long CPU runs can be done in slices.

Read top to bottom: each method's `Step`, then `setup` (process group, device, data, model, optimizer),
`resume`, the batch iterator and one optimisation step, and `train()`, whose loop is a dozen lines.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import attacks, augment, awp, knn, losses, pseudo_labels
from training.checkpoint import (
    CHECKPOINT,
    METRICS,
    config_of,
    encoder_from_checkpoint,
    load_checkpoint,
    load_weights_source,
    save_checkpoint,
    served_weights,
    training_state,
)
from training.config import TrainConfig, resolve_device
from training.data import ImageDataset, load_split
from training.evaluate import validation_figures
from training.files import set_aside
from training.models import ContrastiveModel, Encoder, SupervisedModel, encoder_of
from training.widen import widen_encoder

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero; a pure function of the step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class WeightAverage:
    """Exponential moving average of a model's parameters and buffers (BN statistics copied as-is).

    Averaged weights sit in flatter regions of the loss; in adversarial training they are both more
    accurate and more robust than the last iterate, at no extra forward passes."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early averages are not stale
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(cur.detach(), alpha=1 - d)
            else:
                avg.copy_(cur)


class Step:
    """One optimisation step of a method: batch of float images [B, 3, H, W] + labels -> (loss, stats).

    `net` runs the training forward pass (it may be DDP-wrapped or compiled, so gradients sync);
    `model` is the plain module, used by the attacks, which need no gradient sync.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, g: torch.Generator, net: nn.Module | None = None) -> None:
        self.cfg, self.model, self.g = cfg, model, g
        self.net = net if net is not None else model
        self.aug = augment.AugmentConfig()
        self.teacher: Encoder | None = None
        self.perturbed: tuple[list[Tensor], list[Tensor]] | None = None  # AWP: (weights, their shifts) this step
        if cfg.method == "distill":
            device = next(model.parameters()).device
            self.teacher = encoder_from_checkpoint(load_weights_source(cfg.teacher or "", device)).to(device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return getattr(self, self.cfg.method)(x, y)

    def restore(self) -> None:
        """Undo this step's adversarial weight perturbation (`awp_gamma`); call after the optimiser step."""
        if self.perturbed is not None:
            awp.shift(*self.perturbed, sign=-1.0)
            self.perturbed = None

    def _perturb_weights(self, training_loss: Callable[[], Tensor]) -> None:
        """AWP: move the weights up the step's own training loss (`training_loss` evaluates it through `model`: one
        forward-backward, BN statistics kept) before the training forward pass; `restore` moves them back."""
        weights = awp.perturbable(self.model)
        with awp.frozen_buffers(self.model):  # the gradient first: BN's backward reads the buffers it restores
            grads = torch.autograd.grad(training_loss(), weights)
        self.perturbed = (weights, awp.weight_perturbation(weights, grads, self.cfg.awp_gamma))
        awp.shift(*self.perturbed)

    def _noisy(self, x: Tensor) -> Tensor:
        """`noise_sigma`: every training view gets Gaussian noise (after augmentation, before any attack)."""
        return augment.gaussian_noise(x, self.cfg.noise_sigma, self.g)

    def _two_views(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v1, v2 = augment.two_views(x, self.aug, self.g)
        return self._noisy(v1), self._noisy(v2)

    def _crop_flip(self, x: Tensor) -> Tensor:
        return self._noisy(augment.crop_flip(x, g=self.g))

    def ssl(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        v1, v2 = self._two_views(x)
        p = self.net(torch.cat([v1, v2]))  # 2B x P
        p1, p2 = p.chunk(2)
        return losses.info_nce(p1.float(), p2.float(), self.cfg.temperature), {}

    def _sat_adversary(self, v: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Adversarial views of v and a mask of the ones that count (all, or the successful ones)."""
        cfg, enc = self.cfg, self.model.get_submodule("encoder")
        with attacks.eval_mode(self.model), torch.no_grad():
            z = enc(v).float()  # B x D
        if cfg.attack == "guided":
            m = min(cfg.guides, int((y[None] != y[:, None]).sum(1).min().item()))
            guides = knn.other_class_guides(z, y, z, y, max(m, 1))  # B x m x D
            objective = attacks.guided_objective(enc, guides)
        else:
            objective = attacks.embedding_objective(enc, v)
        v_adv = attacks.pgd(objective, v, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                            generator=self.g)
        keep = torch.ones(len(v), dtype=torch.bool, device=v.device)
        if cfg.keep == "successful":
            num_classes = int(y.max()) + 1
            # an in-batch bank has only B rows: with k >= B every query gets the batch-majority label
            k = max(1, min(cfg.knn_k, len(y) // num_classes))
            with attacks.eval_mode(self.model), torch.no_grad():
                pred, _ = knn.knn_predict(enc(v_adv).float(), z, y, num_classes, k=k)
            keep = pred != y
        return v_adv, keep

    def sat(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        v1, v2 = self._two_views(x)
        v_adv, keep = self._sat_adversary(v1, y)
        p = self.net(torch.cat([v1, v2, v_adv])).float()  # 3B x P
        p1, p2, pa = p.chunk(3)
        loss = cfg.clean_weight * losses.info_nce(p1, p2, cfg.temperature)
        if keep.sum() >= 2:
            loss = loss + cfg.adv_weight * losses.mutual_information_loss(p1[keep], pa[keep], cfg.temperature)
        return loss, {"kept": keep.float().mean().item()}

    def distill(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Labels unused: teacher match on x + robustness of the student's own embedding around x."""
        cfg, enc = self.cfg, self.model.get_submodule("encoder")
        assert self.teacher is not None
        x = self._crop_flip(x)
        with torch.no_grad():
            t = self.teacher(x).float()
        objective = attacks.embedding_objective(enc, x)  # x' maximises 1 - cos(s(x'), s(x))
        x_adv = attacks.pgd(objective, x, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                            generator=self.g)
        s, mapped = self.net(torch.cat([x, x_adv]), align=True)
        s_clean, s_adv = s.float().chunk(2)
        loss, match, robust = losses.distillation_loss(s_clean, t, s_adv, cfg.adv_weight,
                                                       student_mapped=mapped[: len(x)].float())
        return loss, {"teacher_cos": 1 - match.item(), "adv_cos": 1 - robust.item()}

    def supervised(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return losses.cross_entropy(self.net(self._crop_flip(x)).float(), y), {}

    def pseudo_at(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """PGD-AT where y are the teacher's cluster ids, or its soft assignment [B, clusters] with `soft_targets`
        (setup replaced the labels): no label is used."""
        return self.pgd_at(x, y)

    def pgd_at(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = self._crop_flip(x)
        if cfg.trades_beta > 0:
            return self._trades(x, y)
        objective = attacks.cross_entropy_objective(self.model, y)
        if cfg.train_attack == "nfgsm":
            x_adv = attacks.nfgsm(objective, x, eps=cfg.eps, model=self.model, generator=self.g)
        else:
            x_adv = attacks.pgd(objective, x, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                                generator=self.g)
        if cfg.awp_gamma > 0:
            self._perturb_weights(lambda: losses.cross_entropy(self.model(x_adv).float(), y))
        logits = self.net(x_adv).float()
        hard = pseudo_labels.hard_ids(y)  # soft pseudo_at targets: their argmax is the cluster id
        return losses.cross_entropy(logits, y), {"adv_acc": (logits.argmax(1) == hard).float().mean().item()}

    def _trades(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """TRADES: the attack raises KL from the clean prediction (eval mode, as the PGD-AT attack); the loss
        is CE on the clean images + beta * KL(clean || adversarial), both through the training forward pass.
        With `awp_gamma` the weights first move up that same loss (TRADES-AWP, Wu et al. 2020)."""
        cfg = self.cfg
        with attacks.eval_mode(self.model), torch.no_grad():
            clean = self.model(x).float()
        objective = attacks.kl_objective(self.model, clean)
        x_adv = attacks.pgd(objective, x, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                            generator=self.g)
        both = torch.cat([x, x_adv])
        if cfg.awp_gamma > 0:
            def trades_loss_here() -> Tensor:
                logits_clean, logits_adv = self.model(both).float().chunk(2)
                return losses.trades_loss(logits_clean, logits_adv, y, cfg.trades_beta)[0]

            self._perturb_weights(trades_loss_here)
        logits_clean, logits_adv = self.net(both).float().chunk(2)
        loss, kl = losses.trades_loss(logits_clean, logits_adv, y, cfg.trades_beta)
        hard = pseudo_labels.hard_ids(y)
        return loss, {"adv_acc": (logits_adv.argmax(1) == hard).float().mean().item(), "kl": kl.item()}


@dataclass(frozen=True)
class Dist:
    """Process-group facts; world 1 without torchrun. Each rank takes `batch_size / world` images per step."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def _optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.method == "distill":  # a student wider or narrower than its teacher gets a linear map for the match
        teacher_dim = config_of(load_weights_source(cfg.teacher or "")).encoder_config().embed_dim
        own = cfg.encoder_config().embed_dim
        return ContrastiveModel(cfg.encoder_config(), align_dim=teacher_dim if teacher_dim != own else None)
    if cfg.method in ("ssl", "sat"):
        return ContrastiveModel(cfg.encoder_config())
    return SupervisedModel(cfg.encoder_config(), num_classes)


# --- set-up ---------------------------------------------------------------------------------------


@dataclass
class Data:
    """The training split resident on the device as uint8 NCHW (converted per batch), and the validation split."""

    train_set: ImageDataset
    val_set: ImageDataset | None
    images: Tensor  # [N, 3, H, W] uint8
    labels: Tensor  # [N] int64
    steps_per_epoch: int


@dataclass
class Run:
    """What one `train()` call sets up and its loop advances; `save` writes it as checkpoint.pt."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    data: Data
    model: nn.Module  # the plain module (attacks, EMA, checkpoints); `net` below may wrap it
    opt: torch.optim.Optimizer
    g: torch.Generator  # augmentation and attack randomness (data order has its own, per epoch)
    ema: WeightAverage | None
    base_lr: float  # cfg.lr scaled to the batch size
    step: int = 0
    elapsed_s: float = 0.0  # training time of earlier calls (a resumed run)
    t_start: float = field(default_factory=time.time)  # when this call's training began
    saved_at: float = field(default_factory=time.time)  # last periodic checkpoint

    @property
    def total_steps(self) -> int:
        return self.data.steps_per_epoch * self.cfg.epochs

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.run_dir) / CHECKPOINT

    def served(self) -> nn.Module:
        """The weights export will serve: the average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    def autocast(self) -> torch.autocast:
        """bf16 mixed precision where `--precision` asks for it (auto: where it runs natively), else float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=uses_bf16(self.cfg, self.device))

    def train_seconds(self) -> float:
        return self.elapsed_s + time.time() - self.t_start

    def save(self) -> None:
        """Write checkpoint.pt (rank 0 only: every rank holds the same weights)."""
        if self.dist.main:
            save_checkpoint(self.checkpoint_path, training_state(
                model=self.model, optimizer=self.opt, step=self.step, cfg=self.cfg, generator=self.g,
                elapsed_s=self.train_seconds(), classes=list(self.data.train_set.classes),
                world_size=self.dist.world, ema=self.ema.model if self.ema is not None else None))
        self.saved_at = time.time()


def _device(cfg: TrainConfig, dist: Dist) -> torch.device:
    device = resolve_device(cfg.device)
    return torch.device("cuda", dist.local_rank) if device.type == "cuda" and dist.world > 1 else device


def load_data(cfg: TrainConfig, device: torch.device) -> Data:
    train_set, val_set = load_split(cfg.data, cfg.split())
    images = torch.from_numpy(train_set.images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(train_set.labels).long().to(device)
    n = len(labels)
    if n // cfg.batch_size < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training images (after the validation "
                         f"split); pass --batch-size {max(2, n // 2)} or less")
    return Data(train_set, val_set, images, labels, n // cfg.batch_size)


def cluster_labels(cfg: TrainConfig, data: Data, device: torch.device) -> Tensor:
    """pseudo_at: k-means ids of the training images under the frozen teacher (deterministic in the seed, so a
    resumed run recomputes the same ones); their purity against the real labels is logged, never trained on."""
    teacher = encoder_from_checkpoint(load_weights_source(cfg.teacher or "", device)).to(device).eval()
    assign = pseudo_labels.teacher_pseudo_labels(teacher, data.train_set.images, cfg.clusters, seed=cfg.seed,
                                                 device=device, soft=cfg.soft_targets)
    hard = pseudo_labels.hard_ids(assign)
    log.info("pseudo_at: %d clusters of the teacher's embedding, purity %.3f against the real labels (a "
             "diagnostic)%s", cfg.clusters, pseudo_labels.purity(hard, torch.as_tensor(data.train_set.labels)),
             f"; soft targets at T={cfg.soft_targets:g}, mean top share {assign.max(1).values.mean():.3f}"
             if assign.dim() == 2 else "")
    return assign.to(device)


def setup(cfg: TrainConfig) -> Run:
    """Process group, device, data, model (from `--init` when given), optimizer, weight average, generator.

    The order fixes the random streams: the global seed is set before the model's initialisation."""
    dist = init_distributed(cfg.device)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    device = _device(cfg, dist)
    if cfg.workers_threads:
        torch.set_num_threads(cfg.workers_threads)
    if cfg.precision == "bf16" and not native_bf16(device):
        log.warning("--precision bf16 on a CPU without AVX512-BF16 or AMX: autocast emulates bf16 here, ~10x slower "
                    "than float32 (measured 0.09x); --precision auto or fp32 trains faster")
    log.info("precision: %s", "bf16 autocast" if uses_bf16(cfg, device) else "float32")
    torch.manual_seed(cfg.seed)
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {dist.world} processes")
    data = load_data(cfg, device)
    num_classes = len(data.train_set.classes)
    if cfg.method == "pseudo_at":  # the labels the steps see become the teacher's clusters
        data.labels, num_classes = cluster_labels(cfg, data, device), cfg.clusters
        # a resumed run (perhaps on another machine) must have recomputed the clusters it started with
        agreement = pseudo_labels.check_or_record(Path(cfg.run_dir) / pseudo_labels.RECORD,
                                                  pseudo_labels.hard_ids(data.labels),
                                                  resuming=(Path(cfg.run_dir) / CHECKPOINT).exists(),
                                                  write=dist.rank == 0)
        log.info("pseudo_at: cluster ids agree with the run's record (%s) on %.4f of the images",
                 pseudo_labels.RECORD, agreement)
    model = build_model(cfg, num_classes).to(device)
    if cfg.init:
        init_from(model, cfg.init, cfg.seed)
    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
    base_lr = cfg.lr * cfg.batch_size / 256
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed + 7919 * dist.rank)  # each rank augments and attacks differently
    return Run(cfg, dist, device, data, model, _optimizer(cfg, model, base_lr), g,
               WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None, base_lr)


def parallelize(run: Run) -> nn.Module:
    """The module the training forward pass runs: DDP-wrapped under torchrun, compiled with `compile`.

    Call it after `resume`: DDP broadcasts rank 0's weights when it wraps the model."""
    cfg, net = run.cfg, run.model
    if run.dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        unused = cfg.method == "distill"
        if run.device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU (gloo) each rank keeps its own BN stats
            net = DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(run.model),
                                          device_ids=[run.device.index], find_unused_parameters=unused)
        else:
            net = DistributedDataParallel(run.model, find_unused_parameters=unused)
        run.model = net.module  # SyncBatchNorm conversion made new modules (sharing the parameters)
    return cast(nn.Module, torch.compile(net)) if cfg.compile else net


# --- restore --------------------------------------------------------------------------------------


def init_from(model: nn.Module, path: str, seed: int = 0) -> None:
    """`--init`: start from another run's (served) weights; its heads may differ, its encoder may not, except
    that a narrower plain CNN of the same arch is widened to this model's width keeping its function
    (`training.widen`, Net2WiderNet), with the distillation map back to its embedding when the model has one."""
    init = load_weights_source(path)
    weights = served_weights(init)
    src, own = config_of(init).encoder_config(), encoder_of(model).cfg
    if src.arch == own.arch and src.width < own.width:
        weights, align = widen_encoder(weights, src, own.width, seed=seed)
        align_map = getattr(model, "align", None)
        if isinstance(align_map, nn.Linear) and align_map.weight.shape == align.shape:
            weights["align.weight"] = align
        log.info("widened %s width %d -> %d (Net2WiderNet)", src.arch, src.width, own.width)
    missing, _ = model.load_state_dict(weights, strict=False)
    if any(k.startswith("encoder.") for k in missing):
        raise ValueError(f"--init {path}: encoder weights missing or incompatible: {missing[:5]}")
    log.info("initialised from %s (%s)", path, init["config"].get("method"))


def resume(run: Run) -> None:
    """Continue from run_dir/checkpoint.pt when there is one: weights, optimizer, average, step, generator."""
    path = run.checkpoint_path
    if not path.exists():
        set_aside_old_metrics(Path(run.cfg.run_dir) / METRICS, run.dist.main)
        return
    state = load_checkpoint(path, run.device)
    if state["config"]["method"] != run.cfg.method:
        raise ValueError(f"{path} is a {state['config']['method']} run, not {run.cfg.method}")
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.ema is not None and "ema" in state:
        run.ema.model.load_state_dict(state["ema"])
    run.step, run.elapsed_s = state["step"], state.get("elapsed_s", 0.0)
    if run.dist.world == 1:  # only rank 0's stream is saved: restored on every rank, all would draw alike
        run.g.set_state(state["generator"].cpu())
    log.info("resumed %s at step %d/%d", path, run.step, run.total_steps)


def set_aside_old_metrics(log_path: Path, main: bool) -> Path | None:
    """A fresh start in a folder with an earlier run's metrics log (no checkpoint to resume) renames that log to
    `metrics.jsonl.before-<UTC time>` instead of appending to it: its rows are another run's, and `--co-guard` would
    read their best as this run's. Only the main rank renames; returns the new name, or None."""
    if not main or not log_path.is_file():
        return None
    moved = set_aside(log_path, "before")
    log.warning("fresh start in %s: its earlier metrics log moved to %s", log_path.parent, moved.name)
    return moved


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively: CUDA, or a CPU with AVX512-BF16 or AMX (oneDNN's bf16 kernels). Elsewhere CPU autocast
    emulates it: cnn8 w32 trained at 0.09x the float32 images/s on an AVX2-only EPYC (encoder_speed.py --bf16)."""
    if device.type == "cuda":
        return True
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if callable(p))


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: `--precision bf16`, or auto where bf16 is native."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))


def channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the model and its batches use the channels_last layout (`--memory-format`; auto: on CUDA)."""
    return cfg.memory_format == "channels_last" or (cfg.memory_format == "auto" and device.type == "cuda")


# --- the loop -------------------------------------------------------------------------------------


def batches(run: Run) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(epoch, images [B/world, 3, H, W] float in [0, 1], labels) for every step from `run.step` to the end.

    Each epoch's order is a function of (seed, epoch) alone, so a resumed run picks up mid-epoch where it
    stopped; every rank draws the same permutation and takes its slice of each global batch."""
    cfg, data, dist = run.cfg, run.data, run.dist
    per_rank, n = cfg.batch_size // dist.world, len(data.labels)
    layout_cl = channels_last(cfg, run.device)
    step = run.step
    while step < run.total_steps:
        epoch = step // data.steps_per_epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).to(run.device)
        for i in range(step % data.steps_per_epoch, data.steps_per_epoch):
            lo = i * cfg.batch_size + dist.rank * per_rank
            idx = perm[lo:lo + per_rank]
            x = data.images[idx].float().div_(255)
            if layout_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            yield epoch, x, data.labels[idx]
        step = (epoch + 1) * data.steps_per_epoch


def optimise(run: Run, step_fn: Step, x: Tensor, y: Tensor) -> tuple[float, dict[str, float]]:
    """One step of the schedule: learning rate, forward (bf16 autocast per `--precision`), backward, update,
    average."""
    lr = lr_at(run.step, run.total_steps, int(run.cfg.warmup_epochs * run.data.steps_per_epoch), run.base_lr)
    for group in run.opt.param_groups:
        group["lr"] = lr
    try:
        with run.autocast():
            loss, stats = step_fn(x, y)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
    finally:  # AWP: the update was taken at perturbed weights; the weights move back, also when the step fails
        step_fn.restore()
    if run.ema is not None:
        run.ema.update(run.model, run.step)
    run.step += 1
    return loss.item(), stats


@dataclass
class EpochMeter:
    """Running sums over one epoch's steps, for its metrics.jsonl record."""

    epoch: int
    t0: float = field(default_factory=time.time)
    seen: int = 0  # images over all ranks
    batches: int = 0
    loss: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, stats: dict[str, float], images: int) -> None:
        self.seen, self.batches, self.loss = self.seen + images, self.batches + 1, self.loss + loss
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v

    def record(self, run: Run) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": run.step, "loss": self.loss / max(1, self.batches),
                "lr": run.opt.param_groups[0]["lr"], "img_per_s": self.seen / max(1e-9, time.time() - self.t0),
                **{k: v / max(1, self.batches) for k, v in self.stats.items()}}


def all_agree_to_stop(run: Run, stop: bool) -> bool:
    """Every rank must agree to stop, or DDP would hang on the next step."""
    if run.dist.world == 1:
        return stop
    flag = torch.tensor([float(stop)], device=run.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def validate(run: Run, query: ImageDataset, progress: bool = False) -> dict[str, float]:
    """`evaluate.validation_figures` of the served weights against a bank of the training split."""
    bank_set = run.data.train_set
    return validation_figures(run.served().get_submodule("encoder"), bank_set.images, bank_set.labels,
                              len(bank_set.classes), query.images, query.labels, k=run.cfg.knn_k,
                              eval_robust=run.cfg.eval_robust, device=run.device, progress=progress)


def end_epoch(run: Run, meter: EpochMeter) -> bool:
    """Log the epoch's record, with a validation check every `eval_every` completed epochs; True when that check
    trips `co_guard` (every rank gets the same answer)."""
    cfg, record = run.cfg, meter.record(run)
    completed = run.step % run.data.steps_per_epoch == 0
    check = bool(completed and cfg.eval_every and (meter.epoch + 1) % cfg.eval_every == 0
                 and run.data.val_set is not None)
    tripped = False
    if check and run.dist.main and run.data.val_set is not None:
        record.update(validate(run, run.data.val_set.subset(slice(0, cfg.eval_size))))
        run.model.train()
        best = overfit_best(Path(cfg.run_dir) / METRICS, record.get("val_pgd10_acc"), cfg.co_guard, run.step)
        if best is not None:
            record["co_guard_best"], tripped = best, True
            log.error("catastrophic overfitting? validation PGD-10 accuracy %.3f is %.3f below the run's best %.3f "
                      "(--co-guard %g): stopping; the checkpoint is resumable, but a PGD adversary "
                      "(--train-attack pgd) or a smaller step is the usual cure", record["val_pgd10_acc"],
                      best - record["val_pgd10_acc"], best, cfg.co_guard)
    if run.dist.main:
        _log_json(Path(cfg.run_dir) / METRICS, record)
    log.info("epoch %s", record)
    return all_agree_to_stop(run, tripped) if check and cfg.co_guard else tripped


def overfit_best(log_path: Path, acc: float | None, drop: float, step: int | None = None) -> float | None:
    """The best earlier validation PGD-10 accuracy in the run's metrics log when `acc` is `drop` or more below
    it, else None (also when the guard is off, drop 0, or there is no earlier figure). With `step`, only rows
    logged before it count (a run resumed from an older checkpoint logged later rows before it stopped)."""
    if not drop or acc is None or not log_path.is_file():
        return None
    earlier = [r["val_pgd10_acc"] for r in map(json.loads, log_path.read_text().splitlines())
               if "val_pgd10_acc" in r and not r.get("final") and (step is None or r.get("step", 0) < step)]
    best = max(earlier, default=None)
    return best if best is not None and acc <= best - drop else None


def _log_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def finish(run: Run) -> dict[str, Any]:
    """The call's result; a finished run is validated on the whole validation split (logged as `final`)."""
    cfg, done = run.cfg, run.step >= run.total_steps
    result: dict[str, Any] = {"checkpoint": str(run.checkpoint_path), "step": run.step,
                              "total_steps": run.total_steps, "finished": done,
                              "train_seconds": run.train_seconds(), "world_size": run.dist.world}
    if done and run.data.val_set is not None and run.dist.main:
        result.update(validate(run, run.data.val_set, cfg.progress))
        _log_json(Path(cfg.run_dir) / METRICS, {"final": True, **result})
    if run.dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns final metrics and the checkpoint path.

    Under `torchrun --nproc_per_node N` each rank trains on its share of every global batch with
    gradients averaged by DDP (SyncBatchNorm on CUDA); rank 0 alone writes checkpoints and logs.
    """
    t_call = time.time()
    run = setup(cfg)
    resume(run)
    if run.dist.main:
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    step_fn = Step(cfg, run.model, run.g, parallelize(run))
    run.t_start = run.saved_at = time.time()
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.step, desc=cfg.method,
               disable=not (cfg.progress and run.dist.main), dynamic_ncols=True)
    meter: EpochMeter | None = None
    guarded = False
    for epoch, x, y in batches(run):
        meter = meter if meter is not None and meter.epoch == epoch else EpochMeter(epoch)
        loss, stats = optimise(run, step_fn, x, y)
        meter.add(loss, stats, len(y) * run.dist.world)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", ep=epoch)
        if time.time() - run.saved_at > cfg.checkpoint_minutes * 60:
            run.save()
        over_budget = cfg.max_minutes is not None and time.time() - t_call > cfg.max_minutes * 60
        if over_budget or run.step % run.data.steps_per_epoch == 0:  # an epoch ends, or this call does
            stop = all_agree_to_stop(run, over_budget)
            guarded = end_epoch(run, meter)
            if stop or guarded:
                break
    bar.close()
    run.save()
    result = finish(run)
    if guarded:
        result["stopped_by"] = "co_guard"
    return result
