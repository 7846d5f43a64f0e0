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

from training.config import TrainConfig


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
    """One flag per `TrainConfig` field, its help text read from the field's metadata."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        default = f.default if f.default is not MISSING else None
        tp, choices = _field_type(hints[f.name])
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        # the parser's ArgumentDefaultsHelpFormatter appends "(default: ...)" itself
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=tp, choices=choices, default=default, help=text)


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
    from training import (  # subcommands that live with their implementation
        adversarial_bank,
        calibrate,
        certify,
        export,
        interpolate,
        robustness,
    )
    from training.robustness import verdict

    export.add_cli(sub)
    interpolate.add_cli(sub)
    adversarial_bank.add_cli(sub)
    robustness.add_cli(sub)
    verdict.add_cli(sub)
    calibrate.add_cli(sub)
    certify.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.robustness.verdict import SuiteStopped, VerdictFailed

    try:
        result = args.func(args)
    except VerdictFailed:
        return 1  # `satml robustness-verdict`: the rule failed (printed); 2 stays for broken inputs
    except SuiteStopped as e:
        logging.getLogger("satml").warning("stopped early: %s (the record: stopped.json)", e)
        return 3  # `satml robustness --stop-below`: a figure under its minimum, the record written, no report
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("satml").error("%s", e)
        return 2
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
