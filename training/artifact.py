"""The artifact contract (DESIGN section 3): read and verify `artifacts/<name>/`.

Training writes artifacts (`training.export`); the server and the evaluation suite read them with
`load_artifact`, which checks the format version and every file's sha256 before touching weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from training.conformal import CALIBRATION  # optional file: conformal calibration scores
from training.models import Encoder, EncoderConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_ONNX = "encoder.onnx"
BANK = "bank.safetensors"
CARD = "card.md"
REQUIRED_FILES = (ENCODER_WEIGHTS, BANK)


class ArtifactError(ValueError):
    """An artifact folder that must not be served: missing files, bad hashes, unknown format."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no {MANIFEST}") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path / MANIFEST}: invalid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path / MANIFEST}: expected a JSON object")
    return manifest


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """Manifest of a verified artifact; ArtifactError naming the problem otherwise."""
    path = Path(path)
    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {version!r} (this code reads {FORMAT_VERSION})")
    for key in ("name", "classes", "input", "encoder", "knn", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path / MANIFEST}: missing key {key!r}")
    files = manifest["files"]
    # a list or null digests would otherwise escape as AttributeError/TypeError, not as a refusal
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise ArtifactError(f"{path / MANIFEST}: files must map each file name to its sha256 hex digest")
    if not isinstance(manifest["classes"], list) or not manifest["classes"]:
        raise ArtifactError(f"{path / MANIFEST}: classes must be a non-empty list of names")
    for required in REQUIRED_FILES:
        if required not in files:
            raise ArtifactError(f"{path / MANIFEST}: files lacks {required}")
    for name, digest in files.items():
        f = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{path / MANIFEST}: file name {name!r} must be a plain name inside the folder")
        if not f.is_file():
            raise ArtifactError(f"{path}: listed file {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(f"{f}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...)")
    return manifest


@dataclass
class Artifact:
    """A verified, loaded model: encoder (eval mode) + k-NN bank, as the manifest describes them."""

    path: Path
    manifest: dict[str, Any]
    encoder: Encoder
    bank: Tensor  # [N, D] float32
    bank_labels: Tensor  # [N] int64
    calibration: Tensor | None = None  # [M] sorted conformal scores (training.conformal); None: no credibility

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def k(self) -> int:
        return int(self.manifest["knn"]["k"])

    @property
    def metric(self) -> str:
        return str(self.manifest["knn"].get("metric", "l2"))

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])


def encoder_config(manifest: dict[str, Any]) -> EncoderConfig:
    enc = manifest["encoder"]
    inp = manifest["input"]
    return EncoderConfig(arch=enc["arch"], width=int(enc["width"]), proj_dim=int(enc.get("proj_dim", 128)),
                         mean=tuple(inp["mean"]), std=tuple(inp["std"]))


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Verify then load; never unpickles anything (safetensors only)."""
    path = Path(path)
    manifest = verify_artifact(path)
    try:
        cfg = encoder_config(manifest)
        encoder = Encoder(cfg)
        encoder.load_state_dict(load_file(path / ENCODER_WEIGHTS))
        bank = load_file(path / BANK)
        emb, labels = bank["embeddings"].float(), bank["labels"].long()
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: cannot load encoder or bank ({e})") from e
    if emb.shape[0] != labels.shape[0] or emb.shape[1] != cfg.embed_dim:
        raise ArtifactError(f"{path}: bank shape {tuple(emb.shape)} / labels {tuple(labels.shape)} do not match "
                            f"embed_dim {cfg.embed_dim}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(manifest["classes"])):
        raise ArtifactError(f"{path}: bank labels outside [0, {len(manifest['classes'])})")
    calibration = None
    if CALIBRATION in manifest["files"]:
        try:
            calibration = load_file(path / CALIBRATION)["scores"].long().sort().values
        except (KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot load {CALIBRATION} ({e})") from e
        if calibration.dim() != 1 or calibration.numel() == 0 or calibration.min() < 0:
            raise ArtifactError(f"{path}: {CALIBRATION} must hold a non-empty 1-d tensor of scores >= 0")
    return Artifact(path, manifest, encoder.to(device).eval(), emb.to(device), labels.to(device), calibration)
