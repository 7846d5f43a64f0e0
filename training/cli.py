"""`satml` command line: train / bank / evaluate / export. Thin: parse, call the library, print JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from training.train import TrainConfig

TRAIN_HELP: dict[str, str] = {
    "method": "ssl: SimCLR contrastive pre-training; sat: self-supervised adversarial training (paper); "
    "distill: robust distillation of an ssl teacher (DeACL style, label-free); "
    "supervised: cross-entropy baseline; pgd_at: supervised PGD adversarial training baseline",
    "data": "dataset path: CIFAR-10 python folder or .tar.gz, STL-10 binary folder, or image folder root/<class>/",
    "run_dir": "folder for checkpoint.pt, config.json and metrics.jsonl; an existing checkpoint there is resumed",
    "arch": "encoder: resnet10 | resnet18 | resnet34 (CIFAR stem) | cnn8 (plain VGG-style, fastest on CPU)",
    "width": "channels of the first stage (64 = standard; embedding dim = 8 x width)",
    "proj_dim": "output size of the contrastive projection head",
    "epochs": "total epochs of the schedule (resuming continues the same schedule)",
    "batch_size": "images per step",
    "optimizer": "sgd (momentum 0.9, nesterov) or adam",
    "lr": "learning rate per 256 images, scaled linearly with batch size; cosine decay after warm-up",
    "weight_decay": "L2 weight decay",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "temperature": "temperature of the NT-Xent and MI (InfoNCE) losses",
    "val_size": "training images held out as the validation split (0: none; default: CIFAR-10's documented last "
    "5,000, any other dataset stratified by --val-fraction); export, calibrate and evaluate reuse this split; "
    "never the test set",
    "val_fraction": "share of each class held out for validation (at least 1 image each) when --val-size is not "
    "given and the data is not CIFAR-10",
    "val_seed": "seed of the stratified validation split (separate from --seed so the split stays put)",
    "limit": "use only the first N training images (quick runs and tests)",
    "init": "checkpoint.pt to initialise from (e.g. an ssl run for sat)",
    "teacher": "distill: checkpoint.pt of the frozen clean SSL teacher whose embedding the student matches",
    "ema_decay": "keep an exponential moving average of the weights with this decay (0: off); validation "
    "and export use the average",
    "eps": "L-inf attack radius in [0,1] pixel units for sat / pgd_at (8/255 = 0.0314)",
    "alpha": "attack step size in pixel units",
    "attack_steps": "PGD steps per adversarial example during training",
    "attack": "sat attack: guided (paper: pull the embedding toward other-class samples) or embedding (label-free)",
    "guides": "number of nearest other-class in-batch samples guiding each image's attack",
    "keep": "sat: train on all adversarial examples, or only the successful ones (paper)",
    "clean_weight": "sat: weight of the clean two-view NT-Xent term",
    "adv_weight": "sat: weight of the clean/adversarial mutual-information term; distill: beta of the "
    "robustness term 1 - cos(s(x'), s(x))",
    "knn_k": "k of the k-NN validation vote",
    "eval_every": "epochs between k-NN validation checks (0: only at the end)",
    "eval_size": "validation images used by the periodic check",
    "eval_robust": "also attack this many validation images with PGD-10 at 8/255 (soft-kNN surrogate) at each "
    "check and at the end (0: off)",
    "seed": "random seed (data order, augmentation, attacks)",
    "device": "auto | cpu | cuda",
    "compile": "torch.compile the training forward pass (pays off on CUDA)",
    "workers_threads": "torch CPU threads (None: torch's choice)",
    "checkpoint_minutes": "minutes between checkpoints",
    "max_minutes": "stop cleanly (resumable) after this many minutes in this call",
    "progress": "show progress bars",
}


def _field_type(tp: Any) -> tuple[Any, tuple[str, ...] | None]:
    """The argparse type and choices of a dataclass field annotation (Optional[X] -> X, Literal -> choices)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _field_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is typing.Literal:
        # choices, so a typo (--optimizer adamw, --keep succesful) is an error, not a silent fallback
        return str, typing.get_args(tp)
    return tp, None


def add_train_args(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        default = f.default if f.default is not MISSING else None
        tp, choices = _field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        # the parser's ArgumentDefaultsHelpFormatter appends "(default: ...)" itself
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=TRAIN_HELP[f.name])
        else:
            p.add_argument(flag, type=tp, choices=choices, default=default, help=TRAIN_HELP[f.name])


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from training.train import train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "extra"})
    return train(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="satml", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an encoder (ssl, sat, supervised, pgd_at)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    from training import calibrate, certify, export, robustness  # subcommands that live with their implementation

    export.add_cli(sub)
    robustness.add_cli(sub)
    calibrate.add_cli(sub)
    certify.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("satml").error("%s", e)
        return 2
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
