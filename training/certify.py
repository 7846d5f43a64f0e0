"""Randomized smoothing over the hard k-NN vote: Cohen et al. 2019's PREDICT and CERTIFY (issue 14, part 2).

The smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), of any base classifier f
is certifiably constant within the L2 ball of radius sigma * Phi^-1(pA) around x (Cohen et al. 2019,
Theorem 1). f here is the served hard k-NN vote, which has no gradient: smoothing needs none, so the
certificate is not fooled by gradient masking the way plain attacks are (DESIGN section 1).

As in the paper (and its code), noise is added in [0, 1] pixel space, before the encoder's own mean/std
normalisation, and the noisy image is **not clipped** to [0, 1]: the theorem holds for f on all of R^d.
Everything is Monte-Carlo with a seeded `torch.Generator`, in chunks of `batch_size` noisy copies, so
memory is bounded whatever n is. `certify_images` and the `satml certify` subcommand follow the paper's
protocol: certified accuracy at a radius r = share of images whose smoothed prediction is correct, not
abstained, and certified at radius >= r.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor

Classifier = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> predicted class ids [B] (int)
ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 1.0)  # L2 radii of the certified-accuracy table (Cohen et al.'s columns)
# Cohen et al. 2019, Table/Figure for CIFAR-10 ResNet-110, sigma 0.25, n = 100,000 on 500 test images
COHEN_SIGMA_025 = {0.25: 0.60, 0.5: 0.42}
LINF_8_255_AS_L2 = math.sqrt(3 * 32 * 32) * 8 / 255  # ~1.74: the L2 ball that holds the L-inf 8/255 box


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    The alpha-quantile of Beta(k, n - k + 1); 0 when k = 0 (what Cohen et al.'s `proportion_confint(k, n,
    alpha=2 * alpha, method="beta")[0]` gives)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """sigma * Phi^-1(p_lower): the L2 radius certified by a lower bound on pA; 0 when p_lower <= 1/2."""
    return sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


def max_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius n samples can certify at alpha (all n votes for one class): sigma * Phi^-1(alpha^(1/n))."""
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)


def sample_counts(classify: Classifier, x: Tensor, num: int, sigma: float, generator: torch.Generator,
                  num_classes: int, batch_size: int = 256) -> Tensor:
    """Counts [C] (int64, C >= num_classes) of f's predictions on `num` copies of x [C, H, W] + N(0, sigma^2 I).

    Noise is drawn `batch_size` copies at a time on x's device from `generator` (which must live there),
    so peak memory is one chunk. C grows if f names a class >= num_classes (a bank that gained classes)."""
    if sigma <= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if num < 0 or batch_size < 1:
        raise ValueError(f"need num >= 0 and batch_size >= 1, got {num}, {batch_size}")
    counts = torch.zeros(num_classes, dtype=torch.long)
    left = num
    while left > 0:
        b = min(batch_size, left)
        noise = torch.randn((b, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        pred = torch.as_tensor(classify(x.unsqueeze(0) + sigma * noise)).long().cpu().view(-1)
        if pred.numel() != b or (b and int(pred.min()) < 0):
            raise ValueError(f"the classifier returned {pred.numel()} labels (min {int(pred.min())}) for {b} images")
        chunk = torch.bincount(pred, minlength=len(counts))
        if len(chunk) > len(counts):
            counts = torch.cat([counts, counts.new_zeros(len(chunk) - len(counts))])
        counts += chunk
        left -= b
    return counts


def top_two(counts: Tensor) -> tuple[int, int, int, int]:
    """(cA, nA, cB, nB): the most and second most frequent classes (ties: the lower class id first)."""
    if len(counts) < 2:
        counts = torch.cat([counts, counts.new_zeros(2 - len(counts))])
    # stable sort of -counts: equal counts keep class order, so ties are deterministic
    order = torch.sort(-counts, stable=True).indices
    a, b = int(order[0]), int(order[1])
    return a, int(counts[a]), b, int(counts[b])


def predict(classify: Classifier, x: Tensor, *, sigma: float, n: int, alpha: float, generator: torch.Generator,
            num_classes: int, batch_size: int = 256) -> int:
    """Cohen et al.'s PREDICT: the top class of n noisy votes if a two-sided binomial test between the top two
    counts rejects p = 1/2 at level alpha, else ABSTAIN. Returns a wrong class with probability <= alpha."""
    counts = sample_counts(classify, x, n, sigma, generator, num_classes, batch_size)
    a, na, _, nb = top_two(counts)
    return a if binomtest(na, na + nb, 0.5).pvalue <= alpha else ABSTAIN


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one image: label (ABSTAIN when the test fails), L2 radius, the bound behind it."""

    label: int
    radius: float  # 0.0 when abstained
    p_lower: float  # Clopper-Pearson lower bound on pA from the n estimation samples
    count: int  # estimation samples that voted for the selected class
    n: int
    n0: int
    sigma: float
    alpha: float

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


def certify(classify: Classifier, x: Tensor, *, sigma: float, n0: int, n: int, alpha: float,
            generator: torch.Generator, num_classes: int, batch_size: int = 256) -> Certificate:
    """Cohen et al.'s CERTIFY: select cA by n0 noisy votes, estimate pA by n fresh ones, bound it below with
    Clopper-Pearson at 1 - alpha; abstain when that bound is <= 1/2, else certify radius sigma * Phi^-1(pA_lower).
    Separate samples for selection and estimation keep the bound valid."""
    if n0 < 1 or n < 1:
        raise ValueError(f"need n0 >= 1 and n >= 1, got n0={n0}, n={n}")
    selection = sample_counts(classify, x, n0, sigma, generator, num_classes, batch_size)
    ca = top_two(selection)[0]
    estimation = sample_counts(classify, x, n, sigma, generator, num_classes, batch_size)
    count = int(estimation[ca]) if ca < len(estimation) else 0
    p_lower = lower_confidence_bound(count, n, alpha)
    if p_lower <= 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, count, n, n0, sigma, alpha)
    return Certificate(ca, certified_radius(p_lower, sigma), p_lower, count, n, n0, sigma, alpha)


# --- the paper's protocol over a test set --------------------------------------------------------------


@dataclass
class CertifyReport:
    """Certified accuracy vs L2 radius over images, with what it took; JSON-able via `to_dict`."""

    sigma: float
    n: int
    n0: int
    alpha: float
    images: int
    certified_accuracy: dict[str, float]  # radius -> share correct and certified at >= radius
    abstention_rate: float
    base_accuracy: float  # the hard k-NN vote on the clean images
    seconds_per_image: float  # mean of the images' wall times (a run paused mid-image counts the pause)
    median_seconds_per_image: float = 0.0  # robust to such pauses: the figure the markdown reports
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def certified_accuracy(labels: Sequence[int], certs: Sequence[Certificate], radii: Sequence[float] = RADII
                       ) -> dict[str, float]:
    """Share of images whose certificate is correct (not abstained) with radius >= r, per r (keys as '%g')."""
    m = max(len(labels), 1)
    return {f"{r:g}": sum(c.label == y and c.radius >= r for y, c in zip(labels, certs, strict=True)) / m
            for r in radii}


def certify_images(classify: Classifier, images: Tensor, labels: Sequence[int], *, sigma: float, n0: int, n: int,
                   alpha: float, num_classes: int, batch_size: int = 256, seed: int = 0,
                   radii: Sequence[float] = RADII, progress: bool = False, cache: Path | None = None) -> CertifyReport:
    """CERTIFY each image [N, C, H, W] in [0, 1] (its own generator, seeded seed + index, so any subset
    reproduces) and tabulate Cohen et al.'s certified accuracy.

    `cache`: a JSON-lines file of finished images (one row each, appended and flushed as it is done) read back
    first, so a run of hours that stops resumes where it was; the caller keys the file by everything that
    decides a row (model, sigma, n, n0, alpha, seed)."""
    from tqdm.auto import tqdm

    done: dict[int, dict[str, Any]] = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[int(row["index"])] = row
    certs, rows, total = [], [], 0.0
    base = [int(p) for p in torch.cat([torch.as_tensor(classify(images[i:i + batch_size])).long().cpu().view(-1)
                                       for i in range(0, len(images), batch_size)]).tolist()] if len(images) else []
    sink = cache.open("a") if cache is not None else None
    try:
        for i in tqdm(range(len(images)), desc=f"certify sigma={sigma:g}", disable=not progress, leave=False):
            row = done.get(i)
            if row is None:
                g = torch.Generator(device=images.device).manual_seed(seed + i)
                t0 = time.perf_counter()
                c = certify(classify, images[i], sigma=sigma, n0=n0, n=n, alpha=alpha, generator=g,
                            num_classes=num_classes, batch_size=batch_size)
                row = {"index": i, "label": int(labels[i]), "base": base[i], "smoothed": c.label,
                       "correct": c.label == int(labels[i]), "radius": c.radius, "p_lower": c.p_lower,
                       "count": c.count, "seconds": time.perf_counter() - t0}
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
            elif row["label"] != int(labels[i]) or row["base"] != base[i]:
                raise ValueError(f"{cache}: image {i} was cached with label {row['label']} / base vote {row['base']}, "
                                 f"now {int(labels[i])} / {base[i]}: not the same model or data; delete the file")
            total += row["seconds"]
            certs.append(Certificate(row["smoothed"], row["radius"], row["p_lower"], row["count"], n, n0, sigma,
                                     alpha))
            rows.append(row)
    finally:
        if sink is not None:
            sink.close()
    m = max(len(images), 1)
    return CertifyReport(
        sigma=sigma, n=n, n0=n0, alpha=alpha, images=len(images),
        certified_accuracy=certified_accuracy([int(y) for y in labels], certs, radii),
        abstention_rate=sum(c.abstained for c in certs) / m,
        base_accuracy=sum(b == int(y) for b, y in zip(base, labels, strict=True)) / m,
        seconds_per_image=total / m, median_seconds_per_image=statistics.median(r["seconds"] for r in rows) if rows
        else 0.0, per_image=rows)


def render_markdown(reports: Sequence[CertifyReport], meta: dict[str, Any]) -> str:
    """The reports (one per sigma) as markdown: certified accuracy vs L2 radius beside Cohen et al.'s, the cost,
    and what an L2 certificate does and does not claim."""
    radii = list(reports[0].certified_accuracy) if reports else [f"{r:g}" for r in RADII]
    first = reports[0] if reports else None
    runtime = ("encoder.onnx under onnxruntime, as the server runs it" if meta.get("runtime") == "onnxruntime" else
               "the torch encoder, as `satml evaluate` scores it")
    lines = [
        f"# Certified accuracy (randomized smoothing, Cohen et al. 2019): {meta.get('artifact', '')}",
        "",
        f"Smoothed hard k-NN vote of the artifact's classifier (encoder + bank + k; {runtime}). Noise N(0, sigma^2 I) "
        "in [0, 1] pixel space, not clipped (as in the paper). Certified accuracy at r = share of images predicted "
        "correctly, not abstained, and certified at L2 radius >= r (CERTIFY: Clopper-Pearson lower bound on pA, "
        "abstain when it is <= 1/2).",
        "",
    ]
    if first is not None:
        lines += [f"n0 = {first.n0}, n = {first.n:,}, alpha = {first.alpha:g}, first {first.images} test images, "
                  f"seed {meta.get('seed', 0)} (image i: seed + i).", ""]
    lines += [
        "| model | sigma | " + " | ".join(f"r = {k}" for k in radii)
        + " | abstained | base k-NN clean | s / image (median) |",
        "|---|---:|" + "---:|" * (len(radii) + 3),
    ]
    for r in reports:
        lines.append(f"| {meta.get('artifact', 'this model')} | {r.sigma:g} | "
                     + " | ".join(f"{v:.0%}" for v in r.certified_accuracy.values())
                     + f" | {r.abstention_rate:.0%} | {r.base_accuracy:.0%} | {r.median_seconds_per_image:.2f} |")
    cohen = [f"{COHEN_SIGMA_025[float(k)]:.0%}" if float(k) in COHEN_SIGMA_025 else "-" for k in radii]
    lines.append("| Cohen et al. ResNet-110 (n = 100,000, 500 images) | 0.25 | " + " | ".join(cohen) + " | - | - | - |")
    if first is not None:
        top = ", ".join(f"{max_radius(r.n, r.alpha, r.sigma):.2f} (sigma {r.sigma:g})" for r in reports)
        lines += [
            "",
            f"n = {first.n:,} estimation samples, not the paper's (Cohen et al. certify with n = 100,000 and predict "
            "with 10,000): a smaller n lowers the Clopper-Pearson bound, so these radii are conservative next to "
            f"the paper's. The largest radius n = {first.n:,} can certify at alpha = {first.alpha:g} (all n votes "
            f"for one class) is {top}: a column beyond it is 0 % by construction.",
        ]
    lines += [
        "",
        f"An L2 certificate is its own claim: the L-inf 8/255 box of the robustness suite reaches L2 "
        f"{LINF_8_255_AS_L2:.2f} at its corners (sqrt(3 * 32 * 32) * 8/255), far beyond these radii, so a radius "
        "here says nothing about the 8/255 numbers, and the other way round.",
        "",
        f"Machine: {meta.get('machine', '')}; `uptime` load average (1, 5, 15 min) before / after: "
        f"{meta.get('load_before', '')} / {meta.get('load_after', '')}; torch threads {meta.get('threads', '')}; "
        f"wall {meta.get('wall_s', 0):.0f} s.",
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        f"Command: `{meta.get('command', '')}`",
        "",
    ]
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, torch {torch.__version__}"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


RUNTIMES = ("auto", "torch", "onnxruntime")


def onnx_classifier(folder: Path, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int, metric: str,
                    threads: int = 0) -> Classifier:
    """The served runtime's base classifier: `encoder.onnx` under onnxruntime (CPU, no spinning, as the server
    runs it) and the exact k-NN vote over the bank (`knn.TorchKnn`, the server's torch index). The encoder
    agrees with the torch one to ~1e-6; `satml certify` ran 1.2-1.3x faster per image with it (the shipped
    default, n = 4,000, two threads, an idle AVX2 VM: 3.4-3.7 s against 4.0-4.9 s)."""
    from training import knn
    from training.artifact import ENCODER_ONNX, onnx_session

    session = onnx_session(folder / ENCODER_ONNX, ["CPUExecutionProvider"], threads or None)
    name = session.get_inputs()[0].name
    index = knn.TorchKnn(bank.float().cpu(), bank_labels.cpu(), num_classes, k, metric)  # type: ignore[arg-type]

    def classify(x: Tensor) -> Tensor:
        z = torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])
        return index.predict(z)[0]

    return classify


def resolve_runtime(runtime: str, device: torch.device, folder: Path) -> str:
    """auto: onnxruntime on a CPU where it is installed and the artifact has encoder.onnx (what the server runs
    then, and the faster one), else torch."""
    from training.artifact import ENCODER_ONNX

    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("--runtime onnxruntime certifies on the CPU only; use --device cpu or --runtime torch")
        if not (folder / ENCODER_ONNX).is_file():
            raise ValueError(f"{folder} has no {ENCODER_ONNX}; use --runtime torch")
        return runtime
    if runtime == "torch" or device.type != "cpu" or not (folder / ENCODER_ONNX).is_file():
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def cmd_certify(args: argparse.Namespace) -> dict[str, Any]:
    from training.artifact import load_artifact, sha256_file
    from training.data import load_dataset
    from training.evaluate import KnnModel
    from training.knn import to_float_images

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    t0, load_before = time.perf_counter(), _load()
    art = load_artifact(args.artifact, device)
    test = load_dataset(args.data, "test")
    if list(test.classes) != art.classes:
        raise ValueError(f"dataset classes {test.classes} differ from the artifact's {art.classes}")
    count = min(args.n_images, len(test))
    runtime = resolve_runtime(args.runtime, device, Path(args.artifact))
    if runtime == "onnxruntime":
        classify = onnx_classifier(Path(args.artifact), art.bank, art.bank_labels, art.num_classes, art.k,
                                   art.metric, args.threads)
    else:
        classify = KnnModel.from_artifact(art).predict
    images, labels = to_float_images(test.images[:count], device), test.labels[:count].tolist()
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_key = sha256_file(Path(args.artifact) / "manifest.json")[:16]  # the manifest hashes every file

    def cache(sigma: float) -> Path | None:
        if cache_dir is None:
            return None
        tag = "_onnx" if runtime == "onnxruntime" else ""  # torch rows keep the name they had before the option
        return cache_dir / (f"{model_key}_sigma{sigma:g}_n{args.n}_n0{args.n0}_alpha{args.alpha:g}_seed{args.seed}"
                            f"{tag}.jsonl")

    reports = [certify_images(classify, images, labels, sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                              num_classes=art.num_classes, batch_size=args.batch_size, seed=args.seed,
                              progress=args.progress, cache=cache(sigma)) for sigma in args.sigma]
    sigmas = " ".join(f"{s:g}" for s in args.sigma)
    meta = {"artifact": art.name, "path": str(args.artifact), "device": str(device), "runtime": runtime,
            "threads": torch.get_num_threads(),
            "machine": _machine(), "load_before": load_before, "load_after": _load(),
            "wall_s": time.perf_counter() - t0, "seed": args.seed, "note": args.note,
            "command": f"satml certify {args.artifact} --sigma {sigmas} --n {args.n} --n0 {args.n0} "
                       f"--alpha {args.alpha:g} --n-images {args.n_images} --threads {args.threads} "
                       f"--runtime {runtime}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "certify"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "reports": [r.to_dict() for r in reports]},
                                                 indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(reports, meta))
    summary = [{k: v for k, v in r.to_dict().items() if k not in ("per_image", "meta")} for r in reports]
    return {"meta": meta, "reports": summary, "files": [str(out / f"{stem}.json"), str(out / f"{stem}.md")]}


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 0.5), got {text!r}")
    return value


def add_cli(sub: Any) -> None:
    """Register `satml certify`."""
    p = sub.add_parser("certify", help="randomized-smoothing certified L2 radius of an artifact's k-NN vote "
                       "(Cohen et al. 2019); JSON + markdown", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", help="artifact folder, e.g. artifacts/default")
    p.add_argument("--data", default="data", help="dataset path (its test split; CIFAR-10 python layout)")
    p.add_argument("--sigma", type=_positive(float), nargs="+", default=[0.25],
                   help="noise std in [0, 1] pixel units; several: one report each")
    p.add_argument("--n", type=_positive(int), default=1000, help="estimation samples per image (paper: 100,000)")
    p.add_argument("--n0", type=_positive(int), default=100, help="selection samples per image (paper: 100)")
    p.add_argument("--alpha", type=_alpha, default=0.001, help="failure probability of each certificate")
    p.add_argument("--n-images", type=_positive(int), default=100, help="first N test images")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="noisy copies per forward pass")
    p.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded seed + i")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="the base classifier's encoder: onnxruntime (encoder.onnx, as the server runs it; CPU) or "
                        "torch (encoder.safetensors); auto: onnxruntime on a CPU where it is installed and the "
                        "artifact has encoder.onnx")
    p.add_argument("--out", default="test-output/certify", help="folder for <name>.json and <name>.md")
    p.add_argument("--cache-dir", default=None, help="keep each finished image here (JSON lines per model, sigma, "
                   "n, n0, alpha and seed) and resume from it: a run of hours survives a stop")
    p.add_argument("--name", default=None, help="file stem (default: certify)")
    p.add_argument("--note", default="", help="a paragraph for the markdown (e.g. what else ran on the machine)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="progress bar")
    p.set_defaults(func=cmd_certify)
