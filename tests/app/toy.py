"""A separable toy problem for the API tests: solid colours with noise, a random tiny encoder.

A random CIFAR ResNet keeps enough colour information that a 5-NN vote over embeddings of noisy
solid-colour images classifies fresh ones perfectly, so predictions are known without training.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training import knn
from training.export import export_artifact
from training.models import Encoder, EncoderConfig, mirror_averaged
from training.reduce import reduce_encoder

COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.2, 0.9)}
CLASSES = list(COLORS)
SIZE = 32
K = 5


def toy_images(n_per_class: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [3 * n, size, size, 3] noisy solid colours and their labels [3 * n]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, rgb in enumerate(COLORS.values()):
        x = np.clip(np.array(rgb)[None, None, None] + rng.uniform(-0.15, 0.15, (n_per_class, size, size, 3)), 0, 1)
        images.append((x * 255).round().astype(np.uint8))
        labels += [c] * n_per_class
    return np.concatenate(images), np.array(labels)


def toy_encoder(seed: int) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(EncoderConfig(arch="resnet10", width=4)).eval()


def export_toy(out: Path, seed: int, *, name: str, method: str = "sat", onnx: bool = True,
               reduce_dim: int | None = None, mirror_average: bool = False) -> Path:
    """A complete artifact (weights, ONNX, bank of 192 embeddings, manifest, card) in `out`; `reduce_dim`: the
    embedding reduced by a PCA of the bank baked into the encoder (`training.reduce`), as `--reduce-dim` exports;
    `mirror_average`: the embedding averaged over the image and its mirror image, as `--mirror-average` exports."""
    encoder = toy_encoder(seed)
    if mirror_average:
        encoder = mirror_averaged(encoder)
    images, labels = toy_images(64, 100 + seed)
    bank = knn.embed(encoder, images)
    if reduce_dim:
        encoder, bank, _ = reduce_encoder(encoder, bank, reduce_dim)
    training = {"method": method, "hyperparameters": {"note": "random encoder, not trained"}, "epochs": 0,
                "seed": seed, "code_version": "test"}
    metrics = {"clean_acc": 1.0, "clean_n": 30, "robust": []}
    return export_artifact(out, encoder, bank, torch.as_tensor(labels), name=name, classes=CLASSES,
                           dataset="toy-colours", training=training, metrics=metrics,
                           description=f"toy {method} model", input_size=SIZE, k=K, bank_dtype=torch.float32,
                           onnx=onnx)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_sha(folder: Path) -> None:
    """Flip one byte of the bank so its sha256 no longer matches the manifest."""
    p = folder / "bank.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def set_format_version(folder: Path, version: int) -> None:
    p = folder / "manifest.json"
    manifest = json.loads(p.read_text())
    manifest["format_version"] = version
    p.write_text(json.dumps(manifest))
