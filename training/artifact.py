"""The artifact contract (DESIGN section 3): write, verify, load and update `artifacts/<name>/`.

The folder's manifest is a `training.manifest.Manifest` and its card comes from `training.card`; this
module owns the files around them. `write_artifact` finishes a new folder (`training.export`),
`load_artifact` checks the format version and every file's sha256 before touching weights (the server,
the suite), and `update_artifact` is the one way to change a shipped artifact afterwards (calibration,
the suite's card section) so that it still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from training.card import render_card
from training.conformal import CALIBRATION  # optional file: conformal calibration scores
from training.manifest import FORMAT_VERSION, Manifest
from training.models import Encoder, EncoderConfig

MANIFEST = "manifest.json"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_ONNX = "encoder.onnx"
BANK = "bank.safetensors"
CARD = "card.md"
REQUIRED_FILES = (ENCODER_WEIGHTS, BANK)


class ArtifactError(ValueError):
    """An artifact folder that must not be served: missing files, bad hashes, unknown format."""


def onnx_session(path: str | Path | bytes, providers: list[Any], threads: int | None = None,
                 spin: bool = False) -> Any:
    """An onnxruntime session of an `encoder.onnx` as the server runs it: no busy-waiting between ops (on a CPU the
    event loop and the decoders need the same cores), `threads` intra-op threads when given (None: onnxruntime's
    choice). With `spin` the intra-op threads busy-wait between the ops of a run and stop when it returns (for a
    run nothing else wants the cores for: a sleeping thread's wake-up per op costs a batch of one ~0.35 ms here).
    One place for these options: the server's `OnnxEmbed` and `FusedOnnx`, and `satml certify --runtime
    onnxruntime`. `path` may be the serialised model itself (bytes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=providers)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest's JSON object, unchecked (ArtifactError when there is none or it is not JSON)."""
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


def verify_artifact(path: str | Path) -> Manifest:
    """The typed manifest of a verified artifact (known format, well-formed, every listed file present with
    its recorded sha256); ArtifactError naming the problem otherwise."""
    path = Path(path)
    raw = read_manifest(path)
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {version!r} (this code reads {FORMAT_VERSION})")
    try:
        manifest = Manifest.from_dict(raw)
    except (ValueError, TypeError) as e:  # TypeError: int([1, 2]) and the like
        raise ArtifactError(f"{path / MANIFEST}: {e}") from e
    for required in REQUIRED_FILES:
        if required not in manifest.files:
            raise ArtifactError(f"{path / MANIFEST}: files lacks {required}")
    for name, digest in manifest.files.items():
        _check_file_name(path, name)
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: listed file {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(f"{f}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...)")
    return manifest


def _check_file_name(path: Path, name: str) -> None:
    if Path(name).name != name or name in ("", ".", ".."):
        raise ArtifactError(f"{path / MANIFEST}: file name {name!r} must be a plain name inside the folder")


def _write_atomic(target: Path, data: bytes) -> None:
    """Replace `target` in one step, so a reader (a server starting up) never sees half a file."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _write_manifest(path: Path, manifest: Manifest) -> None:
    _write_atomic(path / MANIFEST, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())


def write_artifact(path: str | Path, manifest: Manifest, payload: Iterable[str]) -> Manifest:
    """Finish an artifact whose `payload` files (weights, bank, ONNX) are already in the folder: render
    card.md from the manifest, hash payload + card into `manifest.files` and write manifest.json last, so a
    folder is only ever servable once complete. Returns the manifest as written."""
    path = Path(path)
    names = list(payload)
    missing = [f for f in REQUIRED_FILES if f not in names]
    if missing:
        raise ArtifactError(f"{path}: an artifact needs {missing}")
    (path / CARD).write_text(render_card(manifest))
    for name in names:
        _check_file_name(path, name)
    manifest.files = {f: sha256_file(path / f) for f in [*names, CARD]}
    _write_manifest(path, manifest)
    return manifest


def update_artifact(path: str | Path, edit: Callable[[Manifest], None] | None = None,
                    files: Mapping[str, bytes] | None = None) -> Manifest:
    """Rewrite part of a verified artifact in place and keep it verifying: write `files` (name -> content)
    into the folder and list them, apply `edit` to the manifest (in place), re-hash every listed file, then replace
    manifest.json atomically. The artifact is verified first, so an update never blesses a file that had
    been tampered with, and an `edit` that raises leaves the folder as it was. Returns the manifest written."""
    path = Path(path)
    manifest = verify_artifact(path)
    files = files or {}
    for name in files:
        _check_file_name(path, name)
    if edit is not None:
        edit(manifest)  # before any write: an edit that refuses (raises) leaves the folder untouched
    for name, data in files.items():
        _write_atomic(path / name, data)
        manifest.files[name] = ""  # hashed below with the rest
    for name in manifest.files:
        _check_file_name(path, name)
        if not (path / name).is_file():
            raise ArtifactError(f"{path}: listed file {name} is missing")
    manifest.files = {name: sha256_file(path / name) for name in manifest.files}
    _write_manifest(path, manifest)
    return manifest


@dataclass
class Artifact:
    """A verified, loaded model: encoder (eval mode) + k-NN bank, as the manifest describes them."""

    path: Path
    spec: Manifest  # the manifest, typed
    encoder: Encoder
    bank: Tensor  # [N, D] float32
    bank_labels: Tensor  # [N] int64
    calibration: Tensor | None = None  # [M] sorted conformal scores (training.conformal); None: no credibility

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as JSON: what GET /models/{name} returns (and what app.registry and the benchmarks read)."""
        return self.spec.to_dict()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)

    @property
    def k(self) -> int:
        return self.spec.knn.k

    @property
    def metric(self) -> str:
        return self.spec.knn.metric

    @property
    def input_size(self) -> int:
        return self.spec.input.size


def encoder_config(manifest: Manifest) -> EncoderConfig:
    """The EncoderConfig to rebuild before loading the weights (normalisation constants from `input`)."""
    enc, inp = manifest.encoder, manifest.input
    return EncoderConfig(arch=enc.arch, width=enc.width, proj_dim=enc.proj_dim, mean=tuple(inp.mean),  # type: ignore[arg-type]
                         std=tuple(inp.std), reduce_dim=enc.reduce_dim,  # type: ignore[arg-type]
                         mirror_average=bool(enc.mirror_average))


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
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(manifest.classes)):
        raise ArtifactError(f"{path}: bank labels outside [0, {len(manifest.classes)})")
    calibration = None
    if CALIBRATION in manifest.files:
        try:
            calibration = load_file(path / CALIBRATION)["scores"].long().sort().values
        except (KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot load {CALIBRATION} ({e})") from e
        if calibration.dim() != 1 or calibration.numel() == 0 or calibration.min() < 0:
            raise ArtifactError(f"{path}: {CALIBRATION} must hold a non-empty 1-d tensor of scores >= 0")
    return Artifact(path, manifest, encoder.to(device).eval(), emb.to(device), labels.to(device), calibration)
