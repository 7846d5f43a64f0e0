"""Randomized smoothing: the Clopper-Pearson bound, a classifier with a closed-form radius, abstention, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import Tensor

from training import certify as cert
from training.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 4, 4)  # tiny images: d = 48
W = torch.ones(SHAPE) / math.sqrt(math.prod(SHAPE))  # unit normal of the toy boundary


def linear(x: Tensor) -> Tensor:
    """Class 1 where <w, x> > 0.5, else 0: the L2 distance of x to the boundary is |<w, x> - 0.5|."""
    return ((x * W).flatten(1).sum(1) > 0.5).long()


def at_distance(dist: float) -> Tensor:
    """An image whose distance to `linear`'s boundary is `dist` (on the class-1 side)."""
    return W * (0.5 + dist)


def coin(x: Tensor) -> Tensor:
    """Class 1 when the first pixel is > 0: at a zero first pixel the noise makes both classes equally likely."""
    return (x[:, 0, 0, 0] > 0).long()


@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.05), (1, 10, 0.05), (5, 10, 0.001), (10, 10, 0.001),
                                       (990, 1000, 0.001), (123, 10_000, 1e-6)])
def test_clopper_pearson_matches_scipy(k: int, n: int, alpha: float) -> None:
    # one-sided 1 - alpha = the lower end of the two-sided 1 - 2 alpha exact interval
    expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert cert.lower_confidence_bound(k, n, alpha) == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_is_a_valid_bound() -> None:
    assert cert.lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))  # k = n: alpha^(1/n)
    assert cert.lower_confidence_bound(50, 100, 0.001) < 0.5 < cert.lower_confidence_bound(70, 100, 0.001)
    with pytest.raises(ValueError):
        cert.lower_confidence_bound(11, 10, 0.01)
    with pytest.raises(ValueError):
        cert.lower_confidence_bound(5, 10, 0.0)


def test_max_radius_is_the_unanimous_bound() -> None:
    assert cert.max_radius(1000, 0.001, 0.25) == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)))
    assert cert.max_radius(5, 0.01, 0.25) == 0.0  # 0.01^(1/5) = 0.40: five votes never certify


def test_radius_of_the_exact_probability_is_the_distance_to_the_boundary() -> None:
    sigma = 0.25
    for dist in (0.05, 0.3, 0.6):
        p_exact = float(norm.cdf(dist / sigma))  # P(<w, x + d> > 0.5) for d ~ N(0, sigma^2 I), |w| = 1
        assert cert.certified_radius(p_exact, sigma) == pytest.approx(dist, rel=1e-9)
    assert cert.certified_radius(0.5, sigma) == 0.0 and cert.certified_radius(0.3, sigma) == 0.0


def test_monte_carlo_radius_approaches_the_distance_from_below() -> None:
    sigma, dist = 0.25, 0.3
    x = at_distance(dist)
    radii = []
    for n in (200, 2_000, 20_000):
        c = cert.certify(linear, x, sigma=sigma, n0=100, n=n, alpha=0.001, num_classes=2, batch_size=4096,
                         generator=torch.Generator().manual_seed(n))
        assert c.label == 1 and not c.abstained and c.n == n and c.n0 == 100
        assert 0 < c.radius < dist  # a lower bound on the true radius, with probability >= 1 - alpha
        assert c.p_lower == pytest.approx(cert.lower_confidence_bound(c.count, n, 0.001))
        radii.append(c.radius)
    assert radii[0] < radii[1] < radii[2] and radii[2] > dist - 0.02


def test_counts_are_chunked_seeded_and_unclipped() -> None:
    x = torch.zeros(SHAPE)
    seen: list[Tensor] = []

    def spy(batch: Tensor) -> Tensor:
        seen.append(batch)
        return coin(batch)

    a = cert.sample_counts(spy, x, 250, 0.5, torch.Generator().manual_seed(3), num_classes=2, batch_size=64)
    assert [len(b) for b in seen] == [64, 64, 64, 58] and int(a.sum()) == 250
    assert float(torch.cat(seen).min()) < 0  # noise is not clipped to [0, 1] (Cohen et al.)
    b = cert.sample_counts(coin, x, 250, 0.5, torch.Generator().manual_seed(3), num_classes=2, batch_size=100)
    assert torch.equal(a, b)  # the same draws whatever the chunk size


def test_counts_grow_when_the_classifier_names_a_new_class() -> None:
    counts = cert.sample_counts(lambda b: torch.full((len(b),), 4), torch.zeros(SHAPE), 10, 0.1,
                                torch.Generator().manual_seed(0), num_classes=2)
    assert counts.tolist() == [0, 0, 0, 0, 10]


def test_tied_classes_abstain() -> None:
    x = torch.zeros(SHAPE)  # coin: pA = 1/2 exactly
    for seed in range(3):
        c = cert.certify(coin, x, sigma=0.25, n0=100, n=1_000, alpha=0.001, num_classes=2,
                         generator=torch.Generator().manual_seed(seed))
        assert c.abstained and c.label == cert.ABSTAIN and c.radius == 0.0 and c.p_lower <= 0.5
        assert cert.predict(coin, x, sigma=0.25, n=1_000, alpha=0.001, num_classes=2,
                            generator=torch.Generator().manual_seed(seed)) == cert.ABSTAIN


def test_predict_answers_when_significant() -> None:
    g = torch.Generator().manual_seed(0)
    assert cert.predict(linear, at_distance(0.3), sigma=0.25, n=500, alpha=0.001, num_classes=2, generator=g) == 1
    assert cert.predict(linear, at_distance(-0.3), sigma=0.25, n=500, alpha=0.001, num_classes=2, generator=g) == 0


def test_top_two_breaks_ties_by_class_id() -> None:
    assert cert.top_two(torch.tensor([3, 5, 5, 1])) == (1, 5, 2, 5)
    assert cert.top_two(torch.tensor([7])) == (0, 7, 1, 0)


def test_bad_parameters_are_refused() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="sigma"):
        cert.sample_counts(coin, torch.zeros(SHAPE), 10, 0.0, g, 2)
    with pytest.raises(ValueError, match="n0"):
        cert.certify(coin, torch.zeros(SHAPE), sigma=0.1, n0=0, n=10, alpha=0.01, generator=g, num_classes=2)


def test_certified_accuracy_counts_correct_certificates_at_each_radius() -> None:
    def c(label: int, radius: float) -> cert.Certificate:
        return cert.Certificate(label, radius, 0.9, 90, 100, 10, 0.25, 0.001)

    acc = cert.certified_accuracy([0, 1, 2, 0], [c(0, 0.6), c(1, 0.3), c(0, 0.9), c(cert.ABSTAIN, 0.0)])
    assert acc == {"0": 0.5, "0.25": 0.5, "0.5": 0.25, "1": 0.0}


def test_a_cached_run_resumes_where_it_stopped_with_the_same_answers(tmp_path: Path) -> None:
    """certify_images(cache=...): finished images are appended as they are done; a second run reads them back
    and certifies only the rest, and the report equals one uninterrupted run; a cache of another model or data
    (a different clean vote) is refused."""
    images = torch.stack([at_distance(d) for d in (0.1, 0.3, -0.2, 0.6)])
    labels = [1, 1, 0, 1]
    kw = {"sigma": 0.25, "n0": 16, "n": 200, "alpha": 0.01, "num_classes": 2, "batch_size": 64, "seed": 3}
    fresh = cert.certify_images(linear, images, labels, **kw)
    cache = tmp_path / "run.jsonl"
    cert.certify_images(linear, images[:2], labels[:2], cache=cache, **kw)  # a run that stopped after 2 images
    assert len(cache.read_text().splitlines()) == 2
    calls: list[int] = []

    def counted(x: Tensor) -> Tensor:
        calls.append(len(x))
        return linear(x)

    resumed = cert.certify_images(counted, images, labels, cache=cache, **kw)
    assert len(cache.read_text().splitlines()) == 4
    assert sum(calls) == len(images) + 2 * (16 + 200)  # the clean votes, then only images 2 and 3
    assert resumed.certified_accuracy == fresh.certified_accuracy
    assert [(r["smoothed"], r["p_lower"]) for r in resumed.per_image] == [
        (r["smoothed"], r["p_lower"]) for r in fresh.per_image]
    with pytest.raises(ValueError, match="not the same model"):
        cert.certify_images(lambda x: 1 - linear(x), images, labels, cache=cache, **kw)


def test_cli_certify_writes_json_and_markdown(tiny_artifact: Path, tiny_cifar: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["certify", str(tiny_artifact), "--data", str(tiny_cifar), "--sigma", "0.25", "--n", "64",
                 "--n0", "16", "--alpha", "0.01", "--n-images", "3", "--out", str(out), "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    [report] = json.loads((out / "certify.json").read_text())["reports"]
    assert summary["reports"][0]["images"] == report["images"] == 3 and len(report["per_image"]) == 3
    assert set(report["certified_accuracy"]) == {"0", "0.25", "0.5", "1"}
    assert 0 <= report["abstention_rate"] <= 1 and report["seconds_per_image"] > 0
    assert report["median_seconds_per_image"] == sorted(r["seconds"] for r in report["per_image"])[1]  # of 3
    assert all(r["radius"] >= 0 and (r["smoothed"] == -1) == (r["radius"] == 0) for r in report["per_image"])
    md = (out / "certify.md").read_text()
    assert "Cohen et al. ResNet-110" in md and "1.74" in md and "| r = 0.25 |" in md
    assert main(["certify", str(tiny_artifact), "--data", str(tiny_cifar), "--sigma", "0.12", "0.5", "--n", "16",
                 "--n0", "4", "--n-images", "2", "--out", str(out), "--name", "two", "--note", "shared box"]) == 0
    reports = json.loads((out / "two.json").read_text())["reports"]
    assert [r["sigma"] for r in reports] == [0.12, 0.5]
    md = (out / "two.md").read_text()
    assert "| 0.12 |" in md and "| 0.5 |" in md and "shared box" in md
    # n = 16 at alpha 0.001 cannot certify above sigma * Phi^-1(0.001^(1/16)); the markdown says so
    assert f"{cert.max_radius(16, 0.001, 0.5):.2f} (sigma 0.5)" in md
    cached = ["certify", str(tiny_artifact), "--data", str(tiny_cifar), "--sigma", "0.25", "--n", "32", "--n0", "8",
              "--n-images", "2", "--out", str(out), "--name", "cached", "--cache-dir", str(tmp_path / "cache")]
    assert main(cached) == 0 and main(cached) == 0  # the second run reads every image back
    [jsonl] = (tmp_path / "cache").iterdir()
    assert "sigma0.25_n32_n08" in jsonl.name and len(jsonl.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):  # argparse refuses alpha outside (0, 0.5)
        main(["certify", str(tiny_artifact), "--data", str(tiny_cifar), "--alpha", "0.7"])


def test_onnx_runtime_certifies_the_served_classifier(tiny_cifar: Path, tmp_path: Path) -> None:
    """--runtime onnxruntime (auto on a CPU when the artifact has encoder.onnx): encoder.onnx + the bank votes as
    the torch classifier does on noisy copies, the markdown names the runtime, and its cache rows never mix with
    torch's."""
    from training import knn
    from training.artifact import ENCODER_ONNX, load_artifact, onnx_session
    from training.data import load_dataset
    from training.evaluate import KnnModel
    from training.export import export_artifact
    from training.models import Encoder, EncoderConfig

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(arch="cnn8", width=4, proj_dim=16)).eval()
    train = load_dataset(str(tiny_cifar), "train")
    folder = export_artifact(tmp_path / "art", encoder, knn.embed(encoder, train.images[:64]),
                             torch.as_tensor(train.labels[:64]), name="tiny", classes=list(train.classes),
                             dataset="cifar10", training={"method": "ssl", "hyperparameters": {}, "epochs": 0,
                                                          "seed": 0, "code_version": "test"}, k=5)
    art = load_artifact(folder)
    options = onnx_session(folder / ENCODER_ONNX, ["CPUExecutionProvider"], 1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # the server's options
    assert options.intra_op_num_threads == 1
    onnx = cert.onnx_classifier(folder, art.bank, art.bank_labels, art.num_classes, art.k, art.metric, 1)
    size = art.input_size
    x = torch.rand(1, 3, size, size) + 0.25 * torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(onnx(x), KnnModel.from_artifact(art).predict(x))
    cpu = torch.device("cpu")
    assert cert.resolve_runtime("auto", cpu, folder) == "onnxruntime"
    assert cert.resolve_runtime("auto", torch.device("cuda"), folder) == "torch"
    assert cert.resolve_runtime("auto", cpu, tmp_path) == "torch"  # no encoder.onnx: what the server runs then
    with pytest.raises(ValueError, match="CPU only"):
        cert.resolve_runtime("onnxruntime", torch.device("cuda"), folder)
    with pytest.raises(ValueError, match=r"no encoder\.onnx"):
        cert.resolve_runtime("onnxruntime", cpu, tmp_path)
    common = [str(folder), "--data", str(tiny_cifar), "--sigma", "0.25", "--n", "32", "--n0", "8", "--n-images",
              "2", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    for runtime in ("torch", "onnxruntime"):
        assert main(["certify", *common, "--runtime", runtime, "--name", runtime]) == 0
        md = (tmp_path / "out" / f"{runtime}.md").read_text()
        assert ("onnxruntime, as the server runs it" in md) == (runtime == "onnxruntime")
        assert f"--runtime {runtime}" in md
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 2 and names[0].endswith("seed0.jsonl") and names[1].endswith("seed0_onnx.jsonl")


def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["certify", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: satml certify")
    for flag in ("--sigma", "--n", "--n0", "--alpha", "--n-images", "--out", "--batch-size", "--seed", "--threads",
                 "--cache-dir", "--runtime"):
        assert flag in out
