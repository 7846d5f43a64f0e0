"""Training loops for the four methods: `ssl`, `sat`, `supervised`, `pgd_at`.

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

Runs are resumable: `run_dir/checkpoint.pt` is written every `checkpoint_minutes` and at the end
(with optimizer, step and RNG state), and `train()` picks it up when called again with the same
run_dir. `max_minutes` stops cleanly at a step boundary so long CPU runs can be done in slices.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import attacks, augment, knn, losses
from training.checkpoint import (
    CHECKPOINT,
    encoder_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    served_weights,
    training_state,
)
from training.config import TrainConfig, resolve_device
from training.data import ImageDataset, load_split
from training.evaluate import KnnModel, clean_accuracy, pgd_accuracy, step_size
from training.models import ContrastiveModel, Encoder, SupervisedModel

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero; a pure function of the step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.method in ("ssl", "sat", "distill"):
        return ContrastiveModel(cfg.encoder_config())
    return SupervisedModel(cfg.encoder_config(), num_classes)


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
        if cfg.method == "distill":
            device = next(model.parameters()).device
            self.teacher = encoder_from_checkpoint(load_checkpoint(cfg.teacher or "", device)).to(device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return getattr(self, self.cfg.method)(x, y)

    def ssl(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        v1, v2 = augment.two_views(x, self.aug, self.g)
        p = self.net(torch.cat([v1, v2]))  # 2B x P
        p1, p2 = p.chunk(2)
        return losses.info_nce(p1.float(), p2.float(), self.cfg.temperature), {}

    def _sat_adversary(self, v: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Adversarial views of v and a mask of the ones that count (all, or the successful ones)."""
        cfg, enc = self.cfg, self.model.encoder
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
        v1, v2 = augment.two_views(x, self.aug, self.g)
        v_adv, keep = self._sat_adversary(v1, y)
        p = self.net(torch.cat([v1, v2, v_adv])).float()  # 3B x P
        p1, p2, pa = p.chunk(3)
        loss = cfg.clean_weight * losses.info_nce(p1, p2, cfg.temperature)
        if keep.sum() >= 2:
            loss = loss + cfg.adv_weight * losses.mutual_information_loss(p1[keep], pa[keep], cfg.temperature)
        return loss, {"kept": keep.float().mean().item()}

    def distill(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Labels unused: teacher match on x + robustness of the student's own embedding around x."""
        cfg, enc = self.cfg, self.model.encoder
        assert self.teacher is not None
        x = augment.crop_flip(x, g=self.g)
        with torch.no_grad():
            t = self.teacher(x).float()
        objective = attacks.embedding_objective(enc, x)  # x' maximises 1 - cos(s(x'), s(x))
        x_adv = attacks.pgd(objective, x, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                            generator=self.g)
        s_clean, s_adv = self.net(torch.cat([x, x_adv]), embed=True).float().chunk(2)
        loss, match, robust = losses.distillation_loss(s_clean, t, s_adv, cfg.adv_weight)
        return loss, {"teacher_cos": 1 - match.item(), "adv_cos": 1 - robust.item()}

    def supervised(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return losses.cross_entropy(self.net(augment.crop_flip(x, g=self.g)).float(), y), {}

    def pgd_at(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = augment.crop_flip(x, g=self.g)
        objective = attacks.cross_entropy_objective(self.model, y)
        x_adv = attacks.pgd(objective, x, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, model=self.model,
                            generator=self.g)
        logits = self.net(x_adv).float()
        return losses.cross_entropy(logits, y), {"adv_acc": (logits.argmax(1) == y).float().mean().item()}


def validate(encoder: nn.Module, bank_data: ImageDataset, query: ImageDataset, k: int, device: torch.device,
             progress: bool = False, robust: int = 0) -> dict[str, float]:
    """k-NN accuracy of `query` against a bank of `bank_data` (`val_knn_acc`), and with `robust` > 0 the hard-vote
    accuracy of its first `robust` images under PGD-10 at 8/255 on the soft-kNN surrogate (T = 0.1,
    `val_pgd10_acc`): a cheap robustness signal for model selection, not the suite."""
    bank = knn.embed(encoder, bank_data.images, device=device, progress=progress).to(device)
    model = KnnModel(encoder, bank, torch.as_tensor(bank_data.labels, device=device), len(bank_data.classes),
                     min(k, len(bank)))
    out = {"val_knn_acc": clean_accuracy(model, query.images, query.labels, progress=progress)}
    if robust:
        out["val_pgd10_acc"] = pgd_accuracy(model, query.images[:robust], query.labels[:robust], eps=8 / 255,
                                            alpha=step_size(8 / 255, 10), steps=10)
    return out


def _log_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns final metrics and the checkpoint path.

    Under `torchrun --nproc_per_node N` each rank trains on its share of every global batch with
    gradients averaged by DDP (SyncBatchNorm on CUDA); rank 0 alone writes checkpoints and logs.
    """
    t_call = time.time()
    dist_info = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    if cfg.workers_threads:
        torch.set_num_threads(cfg.workers_threads)
    torch.manual_seed(cfg.seed)
    if cfg.batch_size % dist_info.world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {dist_info.world} processes")

    train_set, val_set = load_split(cfg.data, cfg.split())
    num_classes = len(train_set.classes)
    # whole training set resident on the device as uint8 NCHW: converted per batch
    images = torch.from_numpy(train_set.images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(train_set.labels).long().to(device)
    n = len(labels)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training images (after the validation "
                         f"split); pass --batch-size {max(2, n // 2)} or less")
    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(cfg, num_classes).to(device)
    if cfg.init:
        init = load_checkpoint(cfg.init)
        missing, _ = model.load_state_dict(served_weights(init), strict=False)
        if any(k.startswith("encoder.") for k in missing):
            raise ValueError(f"--init {cfg.init}: encoder weights missing or incompatible: {missing[:5]}")
        log.info("initialised from %s (%s)", cfg.init, init["config"].get("method"))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.lr * cfg.batch_size / 256
    opt = _optimizer(cfg, model, base_lr)
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed + 7919 * dist_info.rank)  # each rank augments and attacks differently
    step, elapsed = 0, 0.0
    ckpt_path = run_dir / CHECKPOINT
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)
        if state["config"]["method"] != cfg.method:
            raise ValueError(f"{ckpt_path} is a {state['config']['method']} run, not {cfg.method}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.model.load_state_dict(state["ema"])
        step, elapsed = state["step"], state.get("elapsed_s", 0.0)
        if dist_info.world == 1:
            g.set_state(state["generator"].cpu())
        log.info("resumed %s at step %d/%d", ckpt_path, step, total_steps)
    if dist_info.main:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    net: nn.Module = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU (gloo) each rank keeps its own BN stats
            net = DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model), device_ids=[device.index],
                                          find_unused_parameters=cfg.method == "distill")
        else:
            net = DistributedDataParallel(model, find_unused_parameters=cfg.method == "distill")
        model = net.module
    if cfg.compile:
        net = torch.compile(net)
    step_fn = Step(cfg, model, g, net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    metrics_path = run_dir / METRICS
    t_start = last_ckpt = time.time()

    def served() -> nn.Module:
        """The weights export will serve: the average when there is one."""
        return ema.model if ema is not None else model

    def checkpoint() -> None:
        if dist_info.main:
            save_checkpoint(ckpt_path, training_state(
                model=model, optimizer=opt, step=step, cfg=cfg, generator=g, elapsed_s=elapsed + time.time() - t_start,
                classes=list(train_set.classes), world_size=dist_info.world,
                ema=ema.model if ema is not None else None))

    stopped_early = False
    per_rank = cfg.batch_size // dist_info.world
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=cfg.method, disable=not (cfg.progress and dist_info.main),
               dynamic_ncols=True)
    while step < total_steps:
        epoch = step // steps_per_epoch
        # the same permutation on every rank; rank r takes its slice of each global batch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).to(device)
        t_epoch, seen, batches, loss_sum, stats_sum = time.time(), 0, 0, 0.0, {}
        for i in range(step % steps_per_epoch, steps_per_epoch):
            lo = i * cfg.batch_size + dist_info.rank * per_rank
            idx = perm[lo:lo + per_rank]
            x = images[idx].float().div_(255)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, int(cfg.warmup_epochs * steps_per_epoch), base_lr)
            with autocast:
                loss, stats = step_fn(x, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            seen += len(idx) * dist_info.world
            batches += 1
            loss_sum += loss.item()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", ep=epoch)
            if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                checkpoint()
                last_ckpt = time.time()
            if cfg.max_minutes is not None and time.time() - t_call > cfg.max_minutes * 60:
                stopped_early = True
                break
        if dist_info.world > 1:  # every rank must agree to stop, or DDP would hang on the next step
            flag = torch.tensor([float(stopped_early)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stopped_early = bool(flag.item())
        record: dict[str, Any] = {
            "epoch": epoch, "step": step, "loss": loss_sum / max(1, batches),
            "lr": opt.param_groups[0]["lr"], "img_per_s": seen / max(1e-9, time.time() - t_epoch),
            **{k: v / max(1, batches) for k, v in stats_sum.items()},
        }
        done_epoch = step % steps_per_epoch == 0
        evaluate_now = done_epoch and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0
        if evaluate_now and val_set is not None and dist_info.main:
            sub = val_set.subset(slice(0, cfg.eval_size))
            record.update(validate(served().encoder, train_set, sub, cfg.knn_k, device, robust=cfg.eval_robust))
            model.train()
        if dist_info.main:
            _log_json(metrics_path, record)
        log.info("epoch %s", record)
        if stopped_early:
            break
    bar.close()
    checkpoint()
    result: dict[str, Any] = {"checkpoint": str(ckpt_path), "step": step, "total_steps": total_steps,
                              "finished": step >= total_steps, "train_seconds": elapsed + time.time() - t_start,
                              "world_size": dist_info.world}
    if step >= total_steps and val_set is not None and dist_info.main:
        result.update(validate(served().encoder, train_set, val_set, cfg.knn_k, device, cfg.progress,
                               robust=cfg.eval_robust))
        _log_json(metrics_path, {"final": True, **result})
    if dist_info.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result
