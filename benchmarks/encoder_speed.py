"""Training throughput of candidate encoders on this machine (issue 10: choose the architecture on
robust accuracy per CPU-hour). Prints images/s of one forward+backward pass (what SimCLR pays per
view) and of one input-gradient step (what each PGD step of adversarial training pays), side by side.

    python benchmarks/encoder_speed.py [--threads 2] [--batch 256] [--seconds 6] [--channels-last] [--bf16]
        [--compile] [--only cnn8:16,cnn8:32]

`--bf16` measures each encoder twice in the same run, float32 then bf16 autocast on the CPU (oneDNN uses
AMX / AVX512-BF16 where the processor has them: `lscpu | grep -o 'amx[a-z_0-9]*'`), and prints the ratio.
`--compile` does the same for `torch.compile` (inductor, C++ kernels on the CPU: needs a compiler); its compile
time is reported apart and not counted in the rate.
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


def measure(arch: str, width: int, batch: int, seconds: float, channels_last: bool,
            bf16: bool = False, compiled: bool = False) -> dict[str, Any]:
    model = ContrastiveModel(EncoderConfig(arch=arch, width=width)).train()
    x = torch.rand(batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        x = x.contiguous(memory_format=torch.channels_last)
    full: Callable[[torch.Tensor], torch.Tensor] = model
    encoder: Callable[[torch.Tensor], torch.Tensor] = model.encoder
    if compiled:
        full, encoder = torch.compile(model), torch.compile(model.encoder)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = full(x).float().sum()
        torch.autograd.backward(out)

    def input_grad() -> None:
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = encoder(xi).float().sum()
        torch.autograd.grad(out, xi)

    t0 = time.perf_counter()
    if compiled:  # the first calls compile (forward and backward graphs); not part of the rate
        train_step()
        input_grad()
    compile_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.encoder.parameters())
    return {"arch": arch, "width": width, "params": params, "channels_last": channels_last, "bf16": bf16,
            "compiled": compiled, "compile_s": round(compile_s, 1),
            "train_img_s": round(_rate(train_step, batch, seconds)),
            "input_grad_img_s": round(_rate(input_grad, batch, seconds))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="also bf16 autocast, side by side with float32")
    p.add_argument("--compile", action="store_true", help="also torch.compile, side by side with eager")
    p.add_argument("--only", default=None, help="arch:width,... instead of every candidate")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cands = CANDIDATES if args.only is None else [(a, int(w)) for a, w in (c.split(":") for c in args.only.split(","))]
    print(f"# torch {torch.__version__}, {args.threads} threads, batch {args.batch}, load {os.getloadavg()}")
    for arch, width in cands:
        fp32 = measure(arch, width, args.batch, args.seconds, args.channels_last)
        print(json.dumps(fp32), flush=True)
        if args.bf16:
            bf = measure(arch, width, args.batch, args.seconds, args.channels_last, bf16=True)
            bf["ratio_train"] = round(bf["train_img_s"] / fp32["train_img_s"], 2)
            bf["ratio_input_grad"] = round(bf["input_grad_img_s"] / fp32["input_grad_img_s"], 2)
            print(json.dumps(bf), flush=True)
        if args.compile:  # with --bf16 too: compiled under bf16 autocast, against eager bf16 (what training runs)
            base = bf if args.bf16 else fp32
            co = measure(arch, width, args.batch, args.seconds, args.channels_last, bf16=args.bf16, compiled=True)
            co["ratio_train"] = round(co["train_img_s"] / base["train_img_s"], 2)
            co["ratio_input_grad"] = round(co["input_grad_img_s"] / base["input_grad_img_s"], 2)
            print(json.dumps(co), flush=True)

if __name__ == "__main__":
    main()
