"""Write an artifact exactly as DESIGN section 3 says, and the `bank` / `export` / `evaluate` CLI.

encoder.safetensors + encoder.onnx (checked against torch with onnxruntime) + bank.safetensors +
manifest.json (sha256 of every file) + card.md. The manifest is a `training.manifest.Manifest`;
`training.artifact.write_artifact` renders the card, hashes the files and writes it.

The encoder's weights are stored once: encoder.onnx is exported without constant folding, so that each of its
initializers is byte for byte a tensor of encoder.safetensors, and then points at that tensor's bytes inside
encoder.safetensors (ONNX external data: location, offset, length). onnxruntime folds the batch norms into the
convolutions when it loads the graph, so it runs as fast as a folded export; the file shrinks from the whole
encoder (4.7 MB at cnn8 w32) to its graph (~12 kB), which is what the 15 MB artifact limit needed for a larger
bank or encoder (issue 10). Loaders that open encoder.onnx by path (onnxruntime, `onnx.load`) find the weights
beside it; the manifest hashes both files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from training import knn
from training.artifact import BANK, ENCODER_ONNX, ENCODER_WEIGHTS, write_artifact
from training.checkpoint import config_of, encoder_from_checkpoint, load_checkpoint
from training.config import TrainConfig, resolve_device
from training.data import (
    DatasetError,
    ImageDataset,
    SplitSpec,
    has_test_split,
    load_dataset,
    load_split,
    mirrored,
)
from training.evaluate import KnnModel, clean_accuracy, pgd_accuracy
from training.manifest import EncoderSpec, InputSpec, KnnSpec, Manifest, Metrics, TrainingInfo
from training.models import Encoder, mirror_averaged
from training.reduce import reduce_encoder

log = logging.getLogger(__name__)

ONNX_ATOL = 1e-4  # max |onnxruntime - torch| allowed on L2-normalised embeddings (float32)


def code_version() -> str:
    """Git commit of the code that produced an artifact ('unknown' outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def share_weights(onnx_path: Path, weights_path: Path) -> int:
    """Point every initializer of the ONNX file that equals (name, float32, bytes) a tensor of the safetensors file
    beside it at that tensor's bytes (ONNX external data), rewrite the ONNX file, and return how many were linked.
    An initializer with no tensor of its name (an exporter constant) stays inline; one whose name matches but whose
    bytes differ is an error."""
    import onnx
    from onnx.external_data_helper import set_external_data

    if onnx_path.parent != weights_path.parent:
        raise ValueError(f"{weights_path} must sit beside {onnx_path} (external data is found relative to it)")
    raw = weights_path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header, base = json.loads(raw[8:8 + header_len]), 8 + header_len
    model = onnx.load(str(onnx_path))
    linked = 0
    for init in model.graph.initializer:
        meta = header.get(init.name)
        if not isinstance(meta, dict) or meta.get("dtype") != "F32" or init.data_type != onnx.TensorProto.FLOAT:
            continue
        start, end = meta["data_offsets"]
        if list(meta["shape"]) != list(init.dims) or raw[base + start:base + end] != init.raw_data:
            raise ValueError(f"{onnx_path.name}: initializer {init.name!r} differs from the tensor of that name in "
                             f"{weights_path.name}")
        set_external_data(init, location=weights_path.name, offset=base + start, length=end - start)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        linked += 1
    onnx_path.write_bytes(model.SerializeToString())
    return linked


def export_onnx(encoder: Encoder, path: Path, size: int, atol: float = ONNX_ATOL,
                weights: Path | None = None) -> float:
    """Export with a dynamic batch axis (opset 17) and return the measured max abs diff vs torch. `weights`: the
    encoder's safetensors file beside `path`, which the ONNX initializers then point into (`share_weights`); the
    export fails if the ONNX file is still more than its graph afterwards."""
    import onnxruntime as ort

    encoder = encoder.cpu().eval()
    x = torch.rand(2, 3, size, size)
    torch.onnx.export(encoder, (x,), str(path), input_names=["images"], output_names=["embeddings"],
                      dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=17,
                      dynamo=False, do_constant_folding=weights is None)
    if weights is not None:
        share_weights(path, weights)
        inline = path.stat().st_size  # the graph and the exporter's own constants only, if the weights linked
        if inline > max(1 << 16, weights.stat().st_size // 100):
            raise RuntimeError(f"{path.name} still holds {inline} bytes after linking its weights to {weights.name}: "
                               "did the exporter rename the initializers?")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = encoder(probe).numpy()
    diff = float(np.abs(session.run(None, {"images": probe.numpy()})[0] - ref).max())
    if diff > atol:
        raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} > {atol:.0e}")
    return diff


def export_artifact(
    out_dir: str | Path,
    encoder: Encoder,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    name: str,
    classes: list[str],
    dataset: str,
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    description: str = "",
    input_size: int = 32,
    k: int = 75,
    metric: str = "l2",
    bank_dtype: torch.dtype = torch.float16,
    onnx: bool = True,
    encoder_extra: dict[str, Any] | None = None,
    bank_views: int = 1,
) -> Path:
    """Write the artifact folder; returns it. Existing files of the same names are replaced. `bank_views` 2: the
    bank's second half holds the embeddings of the first half's images mirrored (same order, same labels)."""
    cfg = encoder.cfg
    # refuse up front what `load_artifact` would refuse, so no half-written or unloadable folder is left
    missing = [key for key in TrainingInfo.REQUIRED if key not in training]
    if missing:
        raise ValueError(f"training lacks {missing}; the manifest needs {list(TrainingInfo.REQUIRED)}")
    if bank.dim() != 2 or bank.shape[1] != cfg.embed_dim or bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank {tuple(bank.shape)} and labels {tuple(bank_labels.shape)} must be [N, "
                         f"{cfg.embed_dim}] and [N]")
    if bank_views not in (1, 2) or bank.shape[0] % bank_views:
        raise ValueError(f"bank_views must be 1 or 2 and divide the bank's {bank.shape[0]} rows, got {bank_views}")
    if bank_labels.numel() and not 0 <= int(bank_labels.min()) <= int(bank_labels.max()) < len(classes):
        raise ValueError(f"bank labels must be in [0, {len(classes)}) (one per class name)")
    training_info, measured = TrainingInfo.from_dict(training), Metrics.from_dict(metrics or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder.cpu().eval()
    save_file({k_: v.contiguous() for k_, v in encoder.state_dict().items()}, out / ENCODER_WEIGHTS)
    save_file({"embeddings": bank.to(bank_dtype).contiguous().cpu(), "labels": bank_labels.long().contiguous().cpu()},
              out / BANK)
    files = [ENCODER_WEIGHTS, BANK]
    onnx_diff = None
    if onnx:
        onnx_diff = export_onnx(encoder, out / ENCODER_ONNX, input_size, weights=out / ENCODER_WEIGHTS)
        files.append(ENCODER_ONNX)
    else:  # a graph left from an earlier export would point into the weights just replaced
        (out / ENCODER_ONNX).unlink(missing_ok=True)
    manifest = Manifest(
        name=name, description=description, dataset=dataset, classes=list(classes),
        input=InputSpec(size=input_size, channels=3, mean=cfg.mean, std=cfg.std, value_range=(0.0, 1.0),
                        resize="bilinear to size x size, RGB"),
        encoder=EncoderSpec(arch=cfg.arch, width=cfg.width, proj_dim=cfg.proj_dim, mean=cfg.mean, std=cfg.std,
                            embed_dim=cfg.embed_dim, normalize=cfg.reduce_dim is None, reduce_dim=cfg.reduce_dim,
                            mirror_average=True if cfg.mirror_average else None,
                            extra={"onnx_max_abs_diff": onnx_diff, **(encoder_extra or {})}),
        knn=KnnSpec(k=k, metric=metric, vote="majority"), bank_size=int(bank.shape[0]) // bank_views,
        bank_views=bank_views if bank_views > 1 else None,
        training=training_info, metrics=measured)
    write_artifact(out, manifest, files)
    return out


# --- CLI ------------------------------------------------------------------------------------------


def _checkpoint_parts(path: str, device: torch.device) -> tuple[Encoder, dict[str, Any], TrainConfig]:
    ckpt = load_checkpoint(path)
    return encoder_from_checkpoint(ckpt).to(device).eval(), ckpt, config_of(ckpt)


def split_of(config: dict[str, Any], val_size: int | None = None) -> SplitSpec:
    """The split a run trained with (its checkpoint's or manifest's config); `val_size` overrides its size."""
    spec = SplitSpec.from_config(config)
    return spec if val_size is None else dataclasses.replace(spec, val_size=val_size)


def cmd_bank(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    encoder, ckpt, _ = _checkpoint_parts(args.checkpoint, device)
    ds, _ = load_split(args.data, split_of(ckpt["config"], args.val_size))
    emb = knn.embed(encoder, ds.images, device=device, progress=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb.half() if args.fp16 else emb, "labels": torch.as_tensor(ds.labels).long()},
              args.out)
    return {"bank": args.out, "size": len(ds), "dim": emb.shape[1]}


def evaluation_set(data: str, val: ImageDataset | None) -> tuple[ImageDataset, str]:
    """The images metrics are reported on and their name: the test split, or for an image folder without
    root/test/ the validation split (never the bank: its own images would score themselves)."""
    if has_test_split(data):
        return load_dataset(data, "test"), "test"
    if val is None:
        raise DatasetError(f"{data}: no test/ folder and no validation split (--val-size 0) to report accuracy "
                           "on; add root/test/<class>/<image> or train with a validation split")
    log.warning("%s has no test/ folder: metrics are measured on the validation split", data)
    return val, "validation"


def evaluate_model(model: KnnModel, data: str, n_clean: int | None, n_robust: int, eps: float, steps: int,
                   progress: bool = True, val: ImageDataset | None = None) -> dict[str, Any]:
    """The manifest's metrics: clean k-NN accuracy on the test set (the validation split `val` when the data
    has no test split) and PGD accuracy on its first n_robust."""
    test, split = evaluation_set(data, val)
    clean = test.subset(slice(0, n_clean)) if n_clean else test
    t0 = time.time()
    metrics: dict[str, Any] = {"clean_acc": clean_accuracy(model, clean.images, clean.labels, progress=progress),
                               "clean_n": len(clean), "eval_split": split}
    rob = test.subset(slice(0, n_robust))
    if n_robust:
        acc = pgd_accuracy(model, rob.images, rob.labels, eps=eps, steps=steps,
                           progress=progress)
        metrics["robust"] = [{"attack": "pgd_soft_knn", "norm": "linf", "eps": eps, "steps": steps, "acc": acc,
                              "n": len(rob), "temperature": 0.1, "random_start": True}]
    metrics["eval_seconds"] = time.time() - t0
    return metrics


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    encoder, ckpt, cfg = _checkpoint_parts(args.checkpoint, device)
    ds, val = load_split(args.data, split_of(ckpt["config"], args.val_size))
    if args.k > len(ds):
        raise ValueError(f"--k {args.k} exceeds the {len(ds)} images of the bank; pass --k {len(ds)} or less")
    if args.mirror_average:  # before the bank and the PCA: both are fitted on what the served encoder returns
        encoder = mirror_averaged(encoder).to(device)
    emb = knn.embed(encoder, ds.images, device=device, progress=True)
    labels = torch.as_tensor(ds.labels).long()
    dtype = torch.float16 if args.fp16 else torch.float32
    encoder_extra: dict[str, Any] = {}
    if args.reduce_dim:  # PCA fitted on the bank only (never the validation or test images)
        encoder, emb, kept = reduce_encoder(encoder, emb, args.reduce_dim)
        encoder, emb = encoder.to(device), emb.to(device)
        encoder_extra = {"reduce": "pca of the bank embeddings", "reduce_explained_variance": round(kept, 4)}
        log.info("embedding reduced %d -> %d dimensions by a PCA of the bank (%.1f %% of its variance)",
                 encoder.cfg.feature_dim, args.reduce_dim, 100 * kept)
    if args.bank_mirror:  # the mirrored images through the served encoder (after the PCA: fitted on originals only)
        emb = torch.cat([emb, knn.embed(encoder, mirrored(ds.images), device=device, progress=True).to(emb.device)])
        labels = torch.cat([labels, labels])
    # evaluate with the bank exactly as it is shipped (after the fp16 round trip)
    model = KnnModel(encoder, emb.to(dtype).float().to(device), labels.to(device), len(ds.classes), args.k)
    metrics = evaluate_model(model, args.data, args.n_clean, args.n_robust, args.eps, args.steps, val=val)
    hp = {k: v for k, v in ckpt["config"].items() if k not in ("data", "run_dir", "progress", "extra")}
    if "interpolated" in ckpt:  # `satml interpolate`: the config is B's, the weights a mix (t, A, B, their hashes)
        hp["interpolated"] = ckpt["interpolated"]
    training = {"method": cfg.method, "hyperparameters": hp, "epochs": cfg.epochs, "seed": cfg.seed,
                "code_version": code_version(), "train_seconds": ckpt.get("elapsed_s", 0.0),
                "steps": ckpt["step"], "device": args.trained_on}
    out = export_artifact(args.out, encoder, emb, labels, name=args.name, classes=list(ds.classes),
                          dataset=args.dataset, training=training, metrics=metrics, description=args.description,
                          input_size=int(ds.images.shape[1]), k=args.k, bank_dtype=dtype,
                          encoder_extra=encoder_extra, bank_views=2 if args.bank_mirror else 1)
    return {"artifact": str(out), "metrics": metrics}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from training.artifact import load_artifact

    art = load_artifact(args.artifact, resolve_device(args.device))
    model = KnnModel.from_artifact(art)
    val = None
    if not has_test_split(args.data):  # report on the validation split the artifact was exported with
        _, val = load_split(args.data, split_of(art.manifest["training"].get("hyperparameters", {})))
    return evaluate_model(model, args.data, args.n_clean, args.n_robust, args.eps, args.steps, val=val)


def add_cli(sub: Any) -> None:
    """Register `bank`, `export` and `evaluate` on the `satml` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default="data", help="dataset path (see `satml train --help`)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")

    p = sub.add_parser("bank", help="embed the training split into a k-NN bank (safetensors)", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--val-size", type=int, default=None, help="validation images left out of the bank; unset: "
                   "the checkpoint's own split, as it trained (set it only for old checkpoints)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="store embeddings as fp16")
    common(p)
    p.set_defaults(func=cmd_bank)

    def metrics_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n-clean", type=int, default=None, help="test images for clean accuracy (None: all)")
        p.add_argument("--n-robust", type=int, default=1000, help="first N test images for PGD accuracy (0: skip)")
        p.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius in [0, 1] pixel units")
        p.add_argument("--steps", type=int, default=10, help="PGD steps")

    p = sub.add_parser("export", help="write an artifact folder (weights, ONNX, bank, manifest, card)",
                       formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--out", required=True, help="artifact folder, e.g. artifacts/default")
    p.add_argument("--name", required=True, help="model name served by the API")
    p.add_argument("--description", default="", help="one-line description for /models and the card")
    p.add_argument("--dataset", default="cifar10", help="dataset name recorded in the manifest")
    p.add_argument("--val-size", type=int, default=None, help="validation images left out of the bank; unset: "
                   "the checkpoint's own split, as it trained (set it only for old checkpoints)")
    p.add_argument("--k", type=int, default=75, help="k of the k-NN vote")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="store the bank as fp16")
    p.add_argument("--reduce-dim", type=int, default=None,
                   help="serve the N-d PCA of the embedding (fitted on the bank, baked into the encoder and the "
                        "ONNX file): a wide encoder's bank then fits the artifact size limit")
    p.add_argument("--bank-mirror", action="store_true",
                   help="add the embeddings of the bank images mirrored left-right (twice the rows; "
                        "benchmarks/bank_screen.py measures what it buys)")
    p.add_argument("--mirror-average", action="store_true",
                   help="serve the mean embedding of each image and its mirror image (the bank too): twice the "
                        "encoder's cost per image; attacks differentiate through both halves")
    p.add_argument("--trained-on", default="unknown", help="hardware the run trained on, for the card")
    metrics_args(p)
    common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="clean and PGD accuracy of an artifact", formatter_class=fmt)
    p.add_argument("--artifact", required=True, help="artifact folder")
    metrics_args(p)
    common(p)
    p.set_defaults(func=cmd_evaluate)



