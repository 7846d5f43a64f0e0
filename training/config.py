"""`TrainConfig`: what one training run is, each field with its default and its `satml train --help` text.

The CLI builds its flags from these fields (name, type, default, `metadata["help"]`), so an option and its
help cannot drift apart. Units are in the help; comments say why a default is what it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from training.data import SplitSpec
from training.models import EncoderConfig

Method = Literal["ssl", "sat", "supervised", "pgd_at", "distill", "pseudo_at"]
METHODS = ("ssl", "sat", "supervised", "pgd_at", "distill", "pseudo_at")


@dataclass
class TrainConfig:
    """One training run. Defaults are the CPU-friendly recipe."""

    method: Method = field(default="ssl", metadata={
        "help": "ssl: SimCLR contrastive pre-training; sat: self-supervised adversarial training (paper); distill: "
                "robust distillation of an ssl teacher (DeACL style, label-free); pseudo_at: PGD adversarial training "
                "on k-means clusters of an ssl teacher's embedding (label-free); supervised: cross-entropy "
                "baseline; pgd_at: supervised PGD adversarial training baseline"})
    data: str = field(default="data", metadata={
        "help": "dataset path: CIFAR-10 python folder or .tar.gz, STL-10 binary folder, or image folder "
                "root/<class>/"})
    run_dir: str = field(default="runs/ssl", metadata={
        "help": "folder for checkpoint.pt, config.json and metrics.jsonl; an existing checkpoint there is resumed "
                "(without one, an earlier metrics.jsonl is renamed metrics.jsonl.before-<time>)"})
    arch: str = field(default="resnet18", metadata={
        "help": "encoder: resnet10 | resnet18 | resnet34 (CIFAR stem) | cnn8 (plain VGG-style, fastest on CPU)"})
    width: int = field(default=64, metadata={
        "help": "channels of the first stage (64 = standard; embedding dim = 8 x width)"})
    proj_dim: int = field(default=128, metadata={"help": "output size of the contrastive projection head"})
    epochs: int = field(default=100, metadata={
        "help": "total epochs of the schedule (resuming continues the same schedule)"})
    batch_size: int = field(default=256, metadata={"help": "images per step"})
    optimizer: Literal["sgd", "adam"] = field(default="sgd", metadata={"help": "sgd (momentum 0.9, nesterov) or adam"})
    # paper SAT: adam 1e-4
    lr: float = field(default=0.06, metadata={
        "help": "learning rate per 256 images, scaled linearly with batch size; cosine decay after warm-up"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "epochs of linear learning-rate warm-up"})
    temperature: float = field(default=0.5, metadata={"help": "temperature of the NT-Xent and MI (InfoNCE) losses"})
    noise_sigma: float = field(default=0.0, metadata={
        "help": "Gaussian noise std ([0, 1] pixel units, unclipped) added to every training view, for an encoder "
                "certified by randomized smoothing (`satml certify` with the same sigma); 0: off"})
    # validation split (training.data.validation_split, shared by export, calibrate, evaluate): CIFAR-10's
    # documented last 5,000 (DESIGN section 6); other data stratified, val_fraction of each class, seeded
    val_size: int | None = field(default=None, metadata={
        "help": "training images held out as the validation split (0: none; default: CIFAR-10's documented last "
                "5,000, any other dataset stratified by --val-fraction); export, calibrate and evaluate reuse this "
                "split; never the test set"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of each class held out for validation (at least 1 image each) when --val-size is not given "
                "and the data is not CIFAR-10"})
    # apart from `seed`, so changing the training seed never moves the split
    val_seed: int = field(default=0, metadata={
        "help": "seed of the stratified validation split (separate from --seed so the split stays put)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N training images (quick runs and tests)"})
    init: str | None = field(default=None, metadata={
        "help": "checkpoint.pt or exported artifact dir to initialise from (e.g. an ssl run for sat); a narrower "
                "cnn8 is widened to --width keeping its function (Net2WiderNet), e.g. a wide distillation student"})
    teacher: str | None = field(default=None, metadata={
        "help": "distill: checkpoint.pt or artifact dir of the frozen clean SSL teacher whose embedding the "
                "student matches; pseudo_at: the teacher whose embedding is clustered into pseudo-labels"})
    clusters: int = field(default=100, metadata={
        "help": "pseudo_at: k-means clusters of the teacher's embedding used as classes (no labels are used)"})
    soft_targets: float = field(default=0.0, metadata={
        "help": "pseudo_at: 0 trains on the hard cluster ids; > 0 on the teacher's soft assignment "
                "softmax(cos(z, centroids) / this temperature), the attack raising the same soft cross-entropy "
                "(noisy hard pseudo-labels hurt adversarial training most)"})
    ema_decay: float = field(default=0.0, metadata={
        "help": "keep an exponential moving average of the weights with this decay (0: off); validation and export "
                "use the average"})
    # adversarial settings (sat, pgd_at, distill)
    eps: float = field(default=8 / 255, metadata={
        "help": "L-inf attack radius in [0,1] pixel units for sat / pgd_at (8/255 = 0.0314)"})
    alpha: float = field(default=2 / 255, metadata={"help": "attack step size in pixel units"})
    attack_steps: int = field(default=5, metadata={"help": "PGD steps per adversarial example during training"})
    train_attack: Literal["pgd", "nfgsm"] = field(default="pgd", metadata={
        "help": "pgd_at/pseudo_at (not TRADES): the training adversary; pgd: PGD with --attack-steps of --alpha; "
                "nfgsm: N-FGSM (de Jorge et al. 2022), noise of 2 eps and one step of eps without projection: one "
                "forward-backward per image instead of --attack-steps (pair it with --co-guard)"})
    co_guard: float = field(default=0.0, metadata={
        "help": "stop the run (resumable, not finished) when the validation PGD-10 accuracy (--eval-robust) falls "
                "this much (0-1) below its best so far in the run: the mark of catastrophic overfitting, which "
                "single-step training can hit (0: off)"})
    attack: Literal["guided", "embedding"] = field(default="guided", metadata={
        "help": "sat attack: guided (paper: pull the embedding toward other-class samples) or embedding (label-free)"})
    guides: int = field(default=32, metadata={
        "help": "number of nearest other-class in-batch samples guiding each image's attack"})
    keep: Literal["all", "successful"] = field(default="all", metadata={
        "help": "sat: train on all adversarial examples, or only the successful ones (paper)"})
    clean_weight: float = field(default=1.0, metadata={"help": "sat: weight of the clean two-view NT-Xent term"})
    adv_weight: float = field(default=1.0, metadata={
        "help": "sat: weight of the clean/adversarial mutual-information term; distill: beta of the robustness term "
                "1 - cos(s(x'), s(x))"})
    trades_beta: float = field(default=0.0, metadata={
        "help": "pgd_at/pseudo_at: 0 trains on the adversarial images (PGD-AT, Madry et al.); > 0 is TRADES (Zhang "
                "et al. 2019): CE on the clean images + beta * KL(clean || adversarial), the attack raising the KL "
                "(the paper's beta: 6)"})
    awp_gamma: float = field(default=0.0, metadata={
        "help": "pgd_at/pseudo_at: adversarial weight perturbation (Wu et al. 2020), the conv and linear weights "
                "moved by this share of their norm up the step's training loss (PGD-AT's adversarial CE, or the TRADES "
                "loss with --trades-beta) before each update and back after it (0: off; the paper's settings: 0.01 "
                "for PGD-AT, 0.005 for TRADES; one more forward-backward per step)"})
    knn_k: int = field(default=75, metadata={"help": "k of the k-NN validation vote"})
    eval_every: int = field(default=5, metadata={"help": "epochs between k-NN validation checks (0: only at the end)"})
    eval_size: int = field(default=2000, metadata={"help": "validation images used by the periodic check"})
    eval_robust: int = field(default=0, metadata={
        "help": "also attack this many validation images with PGD-10 at 8/255 (soft-kNN surrogate) at each check and "
                "at the end (0: off)"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, augmentation, attacks)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "training arithmetic: bf16 autocast (the loss and the optimizer state stay float32) or fp32; auto: "
                "bf16 where it is native (CUDA, a CPU with AMX or AVX512-BF16: ~2-3x the images/s there), fp32 "
                "elsewhere (an AVX2-only CPU emulates bf16 at ~0.1x; benchmarks/encoder_speed.py --bf16); the "
                "exported encoder and every evaluation are float32"})
    memory_format: Literal["auto", "channels_last", "contiguous"] = field(default="auto", metadata={
        "help": "layout of the model and its input batches; auto: channels_last on CUDA, contiguous on a CPU "
                "(channels_last is also faster on these CPUs: benchmarks/encoder_speed.py --channels-last)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training forward pass (pays off on CUDA)"})
    workers_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's choice)"})
    checkpoint_minutes: float = field(default=3.0, metadata={"help": "minutes between checkpoints"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "stop cleanly (resumable) after this many minutes in this call"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    extra: dict[str, Any] = field(default_factory=dict)  # not a flag: free-form notes kept in the checkpoint

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {'|'.join(METHODS)}, got {self.method!r}")
        if self.method in ("distill", "pseudo_at") and not self.teacher:
            raise ValueError(f"method {self.method} needs --teacher (checkpoint.pt of a clean ssl run)")
        if self.trades_beta < 0:
            raise ValueError(f"trades_beta must be >= 0, got {self.trades_beta}")
        if self.train_attack == "nfgsm" and (self.method not in ("pgd_at", "pseudo_at") or self.trades_beta > 0):
            raise ValueError(f"train_attack nfgsm is for pgd_at / pseudo_at without TRADES, got method {self.method}, "
                             f"trades_beta {self.trades_beta}")
        if self.co_guard < 0 or (self.co_guard > 0 and self.eval_robust <= 0):
            raise ValueError(f"co_guard must be >= 0 and needs --eval-robust > 0 (its signal), got {self.co_guard} "
                             f"with eval_robust {self.eval_robust}")
        if self.awp_gamma < 0 or (self.awp_gamma > 0 and self.method not in ("pgd_at", "pseudo_at")):
            raise ValueError(f"awp_gamma must be >= 0 and is for pgd_at / pseudo_at, got {self.awp_gamma} with "
                             f"method {self.method}")
        if not 0 <= self.noise_sigma <= 4:
            raise ValueError(f"noise_sigma must be in [0, 4], got {self.noise_sigma}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be >= 2, got {self.clusters}")
        if self.soft_targets < 0 or (self.soft_targets > 0 and self.method != "pseudo_at"):
            raise ValueError(f"soft_targets must be >= 0 and is for pseudo_at only, got {self.soft_targets} with "
                             f"method {self.method}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.alpha <= max(self.eps, 1e-12) <= 1 and self.method in ("sat", "pgd_at", "distill",
                                                                                 "pseudo_at"):
            raise ValueError(f"need 0 <= alpha <= eps <= 1, got alpha={self.alpha}, eps={self.eps}")
        for name, allowed in (("optimizer", ("sgd", "adam")), ("attack", ("guided", "embedding")),
                              ("keep", ("all", "successful"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs >= 1 and batch_size >= 2 required, got {self.epochs}, {self.batch_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Unknown keys are dropped, missing ones take today's default: old checkpoints' configs still load."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def split(self) -> SplitSpec:
        """The training/validation split this run uses (and export, calibrate, evaluate rebuild)."""
        return SplitSpec.from_config(asdict(self))

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(arch=self.arch, width=self.width, proj_dim=self.proj_dim)


def resolve_device(name: str) -> torch.device:
    """The torch device a `device` option names (auto: CUDA when there is one); shared by train and export."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)
