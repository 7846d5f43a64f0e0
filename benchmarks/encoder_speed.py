"""Training throughput of candidate encoders on this machine (issue 10: choose the architecture on
robust accuracy per CPU-hour). Prints images/s of one forward+backward pass (what SimCLR pays per
view) and of one input-gradient step (what each PGD step of adversarial training pays), side by side.

    python benchmarks/encoder_speed.py [--threads 2] [--batch 256] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from training.models import ContrastiveModel, EncoderConfig

CANDIDATES = [("resnet10", 16), ("resnet18", 16), ("cnn8", 16), ("cnn8", 24), ("cnn8", 32), ("cnn8", 48)]


def _rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def measure(arch: str, width: int, batch: int, seconds: float, channels_last: bool) -> dict[str, Any]:
    model = ContrastiveModel(EncoderConfig(arch=arch, width=width)).train()
    x = torch.rand(batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        x = x.contiguous(memory_format=torch.channels_last)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def input_grad() -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model.encoder(xi).sum(), xi)

    params = sum(p.numel() for p in model.encoder.parameters())
    return {"arch": arch, "width": width, "params": params, "channels_last": channels_last,
            "train_img_s": round(_rate(train_step, batch, seconds)),
            "input_grad_img_s": round(_rate(input_grad, batch, seconds))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, batch {args.batch}, load {os.getloadavg()}")
    for arch, width in CANDIDATES:
        print(json.dumps(measure(arch, width, args.batch, args.seconds, args.channels_last)), flush=True)


if __name__ == "__main__":
    main()
