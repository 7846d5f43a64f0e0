"""Where and how a served encoder runs: the device, the runtime (torch / onnxruntime) and the two embedders.

onnxruntime runs on the CPU EP, or the CUDA EP on a GPU, checked with `get_providers()`: never a silent
fallback. Attacks always use the torch encoder (they need gradients).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.artifact import ENCODER_ONNX, onnx_session


def resolve_serving_device(setting: str) -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; an explicit `cuda` without a GPU is an error.

    The server's `SATML_DEVICE` rule (auto/cpu/cuda); `training.config.resolve_device` is the trainer's,
    which takes any torch device name."""
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError("device 'cuda' requested (SATML_DEVICE) but torch sees no CUDA device")
    return torch.device("cpu")


def resolve_runtime(setting: str, folder: Path, device: torch.device) -> str:
    """auto -> onnxruntime on a CPU when the artifact ships encoder.onnx and onnxruntime imports (one
    GIL-free call per batch, fewer per-op costs: serve_bench measures it ahead of torch), else torch.
    On CUDA auto stays torch (onnxruntime-gpu against torch is not measured here)."""
    if setting != "auto":
        return setting
    if device.type != "cpu" or not (folder / ENCODER_ONNX).is_file():
        return "torch"
    try:
        import onnxruntime  # noqa: F401 - availability check
    except ImportError:
        return "torch"
    return "onnxruntime"


class TorchEmbed:
    """Torch encoder forward under inference mode, on the model's device."""

    name = "torch"

    def __init__(self, encoder: torch.nn.Module, device: torch.device) -> None:
        self.encoder, self.device = encoder, device

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.encoder(x.to(self.device, non_blocking=True)).float()


class OnnxEmbed:
    """onnxruntime session of `encoder.onnx`; refuses to run on another provider than the device asks for."""

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        import onnxruntime as ort

        want = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if want not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime has no {want} (available: {ort.get_available_providers()}); "
                               "install onnxruntime-gpu or choose SATML_RUNTIME=torch")
        providers: list[Any] = [want] if want == "CPUExecutionProvider" else [
            (want, {"device_id": device.index or 0}), "CPUExecutionProvider"]
        # threads: SATML_COMPUTE_THREADS / workers, this process's share of the cores
        self.session = onnx_session(path, providers, threads)
        active = self.session.get_providers()
        if not active or active[0] != want:
            raise RuntimeError(f"onnxruntime session runs on {active}, not {want}: refusing a silent fallback")
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime ({active[0]})"

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)
