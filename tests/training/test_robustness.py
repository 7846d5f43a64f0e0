"""The robustness suite (training.robustness) on a toy problem whose answer is known.

Four classes of 8x8 images: a strong class colour (0.25 / 0.75 per channel) plus a faint class pattern
(4/255). A colour encoder (mean colour) is robust at eps 8/255: no L-inf perturbation that small moves a
mean colour half-way to another class. A pattern encoder (projections onto the faint patterns) classifies
clean images just as well and breaks at eps 8/255, because the pattern is smaller than eps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import knn, knn_attacks
from training import robustness as rb
from training.artifact import verify_artifact
from training.card import CARD_BEGIN, fmt_eps
from training.data import ImageDataset
from training.evaluate import KnnModel, robust_mask
from training.manifest import EncoderSpec, InputSpec, KnnSpec, Manifest, TrainingInfo
from training.robustness.cache import from_bits

CLASSES = ("a", "b", "c", "d")
PALETTE = np.array([[0.25, 0.25, 0.75], [0.75, 0.25, 0.25], [0.25, 0.75, 0.25], [0.75, 0.75, 0.75]])
AMPLITUDE = 4 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def patterns() -> Tensor:
    """[4, 3, 8, 8] zero-mean (per channel) +-1 patterns, one per class."""
    p = torch.randint(0, 2, (4, 3, 8, 8), generator=torch.Generator().manual_seed(7)).float() * 2 - 1
    return p - p.mean((2, 3), keepdim=True)


def toy_dataset(n: int, seed: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = PALETTE[y][:, None, None, :] + AMPLITUDE * patterns()[y].permute(0, 2, 3, 1).numpy()
    x = x + rng.uniform(-8 / 255, 8 / 255, x.shape)
    return ImageDataset((np.clip(x, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64), CLASSES)


class ColourEncoder(nn.Module):
    """Robust: the centred mean colour, normalised."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.mean((2, 3)) - 0.5, dim=1)


class PatternEncoder(nn.Module):
    """Non-robust: correlation with each class's faint pattern, normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("p", patterns())

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(torch.einsum("bchw,kchw->bk", x, self.p), dim=1)


BANK_SIZE, N_TRAIN = 160, 200


def model_under_test(name: str, encoder: nn.Module, method: str, train: ImageDataset) -> rb.ModelUnderTest:
    bank = knn.embed(encoder, train.images[:BANK_SIZE])
    model = KnnModel(encoder.eval(), bank, torch.as_tensor(train.labels[:BANK_SIZE]), 4, k=5)
    manifest = Manifest(name=name, classes=["0", "1", "2", "3"], input=InputSpec(size=8, mean=(0.0,) * 3,
                        std=(1.0,) * 3), encoder=EncoderSpec(arch="pattern", width=1), knn=KnnSpec(k=5),
                        bank_size=BANK_SIZE, training=TrainingInfo(method=method))
    return rb.ModelUnderTest(name, Path(name), manifest, model, f"{name}-sha")


def toy_config(out: Path, **overrides) -> rb.SuiteConfig:
    base = dict(out=str(out), n_robust=24, n_clean=48, eps_sweep=(0.0, 4 / 255, 8 / 255, 16 / 255),
                temperatures=(0.05, 0.5), n_sweep=16, large_eps=0.5, validate_n=0, guides=10, device="cpu",
                progress=False)
    return rb.SuiteConfig.quick_config(**{**base, **overrides})


def run_toy(out: Path, **overrides) -> dict:
    train, test = toy_dataset(N_TRAIN, seed=0), toy_dataset(48, seed=1)
    robust = model_under_test("colour", ColourEncoder(), "sat", train)
    fragile = model_under_test("pattern", PatternEncoder(), "supervised", train)
    suite = rb.Suite(toy_config(out, **overrides), [robust, fragile], test, source=fragile, train=train)
    return suite.run()


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_toy(tmp_path_factory.mktemp("suite"))


def by_name(result: dict) -> dict[str, dict]:
    return {m["name"]: m for m in result["models"]}


def test_robust_model_scores_higher(toy_result: dict) -> None:
    models = by_name(toy_result)
    colour, pattern = models["colour"], models["pattern"]
    assert colour["clean"]["acc"] == 1.0 and pattern["clean"]["acc"] == 1.0, "both solve the clean problem"
    assert colour["worst_case"]["acc"] == 1.0, "no 8/255 perturbation changes a mean colour enough"
    assert pattern["worst_case"]["acc"] <= 0.05, "the 4/255 pattern is destroyed by an 8/255 attack"
    adaptive = {r["attack"]: r["acc"] for r in pattern["attacks"]}
    assert adaptive["apgd_ce"] <= 0.05 and adaptive["apgd_dlr"] <= 0.05
    assert [r["attack"] for r in colour["attacks"]][-1] == "transfer", "transfer from the supervised source"
    assert "transfer" not in [r["attack"] for r in pattern["attacks"]], "the source is not attacked by itself"


def test_worst_case_never_above_any_attack(toy_result: dict) -> None:
    for m in toy_result["models"]:
        worst = from_bits(m["per_image"]["worst_case"])
        for name in m["worst_case"]["attacks"]:
            attack = from_bits(m["per_image"][name])
            assert not (worst & ~attack).any(), f"{m['name']}: robust in the worst case but broken by {name}"
            acc = next(r["acc"] for r in m["attacks"] if r["attack"] == name)
            assert m["worst_case"]["acc"] <= acc
        assert m["worst_case"]["acc"] <= m["attacked"]["acc"]
        sweep = sorted(m["eps_sweep"], key=lambda r: r["eps"])
        accs = [r["worst_case_acc"] for r in sweep]
        assert accs == sorted(accs, reverse=True), "the nested cascade can only lose images as eps grows"
        assert sweep[0]["eps"] == 0 and sweep[0]["worst_case_acc"] == m["attacked"]["acc"]
        main = next(r for r in sweep if abs(r["eps"] - m["worst_case"]["eps"]) < 1e-12)
        assert main["worst_case_acc"] == m["worst_case"]["acc"]


def test_stronger_attacks_run_as_a_cascade_on_the_survivors(toy_result: dict) -> None:
    """CW, runner-up surrogates, targeted APGD, Sitawarin-Wagner and Square run on the images still robust,
    so each chained column is a running worst case: never above the column before it."""
    for m in toy_result["models"]:
        rows = [r for r in m["attacks"] if r["attack"] != "transfer"]
        names = [r["attack"] for r in rows]
        assert {"cw", "apgd_ce_alt1", "apgd_t", "sw_guided", "square"} <= set(names)
        chained = [r for r in rows if r["chained"]]
        accs = [r["acc"] for r in chained]
        assert accs == sorted(accs, reverse=True)
        before = [r["acc"] for r in rows if not r["chained"] and r["worst_case"]]
        assert accs[0] <= min(before)
        assert all(name in m["worst_case"]["attacks"] for name in ("apgd_t", "sw_guided", "square"))
    colour = by_name(toy_result)["colour"]
    assert next(r for r in colour["attacks"] if r["attack"] == "square")["acc"] == 1.0


def test_square_breaks_the_fragile_model_without_gradients() -> None:
    """The score-based attack alone (on the hard-vote margin) finds the 4/255 pattern's weakness."""
    train, test = toy_dataset(N_TRAIN, seed=0), toy_dataset(48, seed=1)
    fragile = model_under_test("pattern", PatternEncoder(), "supervised", train).model
    spec = rb.AttackSpec("square", "square", 300, track=False)
    attack = knn_attacks.build("square", fragile, rb.budget(spec, 8 / 255, toy_config(Path("unused"))),
                               knn_attacks.Surrogate(0.5))
    mask, _ = robust_mask(fragile, test.images[:24], test.labels[:24], attack, batch_size=24)
    assert mask.mean() <= 0.25


def test_vote_margin_score_is_positive_exactly_when_the_vote_flips() -> None:
    train, test = toy_dataset(N_TRAIN, seed=0), toy_dataset(48, seed=1)
    model = model_under_test("pattern", PatternEncoder(), "supervised", train).model
    x = knn.to_float_images(test.images[:24])
    y = torch.as_tensor(test.labels[:24]).long()
    wrong = (y + 1) % 4
    for labels in (y, wrong):
        score = knn_attacks.vote_margin_score(model, knn_attacks.Surrogate(0.5), labels)(x, torch.arange(len(x)))
        assert torch.equal(score > 0, model.predict(x) != labels)
        assert (score[score <= 0] <= -0.5).all()


def test_abstention_stage_with_calibrated_models(tmp_path: Path) -> None:
    """Calibrated on the held-out toy images: coverage near the target, abstention never lowers robust
    accuracy, and the attack adaptive to the detector is at least as strong as the non-adaptive one."""
    from training import conformal

    train, test = toy_dataset(N_TRAIN, seed=0), toy_dataset(48, seed=1)
    models = [model_under_test("colour", ColourEncoder(), "sat", train),
              model_under_test("pattern", PatternEncoder(), "supervised", train)]
    for m in models:
        held = knn.to_float_images(train.images[BANK_SIZE:])
        counts = m.model.predict_votes(held)[1]
        m.calibration = conformal.calibration_scores(counts, torch.as_tensor(train.labels[BANK_SIZE:]), m.model.k)
    cfg = toy_config(tmp_path, eps_sweep=(0.0, 8 / 255), paper_eps=(), temperatures=(0.5,))
    result = rb.Suite(cfg, models, test, source=None, train=train).run()
    for m in result["models"]:
        a = m["abstention"]
        json.dumps(a, allow_nan=False)  # strict JSON: undefined numbers are null, never NaN
        assert a["coverage"] >= 0.9 and 0 <= a["threshold"] <= 1
        non_adaptive, adaptive = a["attacks"]
        for r in (non_adaptive, adaptive):
            assert r["robust_acc_with_abstention"] >= r["robust_acc_without_abstention"]
        assert adaptive["robust_acc_with_abstention"] <= non_adaptive["robust_acc_with_abstention"] + 1 / 24
    colour, pattern = by_name(result)["colour"]["abstention"], by_name(result)["pattern"]["abstention"]
    assert colour["attacks"][1]["robust_acc_with_abstention"] >= 0.85
    assert pattern["attacks"][1]["robust_acc_without_abstention"] <= 0.1
    report = rb.markdown_report(result)
    assert "Abstention (conformal credibility)" in report and "| colour | " in report.split("coverage >= 100%")[1]
    paths = rb.write_reports(result, tmp_path / "reports")
    assert Path(paths["coverage_plot"]).stat().st_size > 1000, "the accuracy-vs-coverage plot"


def test_attack_success_increases_with_eps(toy_result: dict) -> None:
    pattern = by_name(toy_result)["pattern"]
    accs = {r["eps"]: r["worst_case_acc"] for r in pattern["eps_sweep"]}
    assert accs[0.0] == 1.0 and accs[4 / 255] > accs[16 / 255]


def test_paper_protocol_and_checks(toy_result: dict) -> None:
    colour, pattern = by_name(toy_result)["colour"], by_name(toy_result)["pattern"]
    for m in (colour, pattern):
        assert [r["eps"] for r in m["paper_protocol"]] == [0.03, 0.06]
        for r in m["paper_protocol"]:
            assert r["n_attacked"] == m["attacked"]["clean_correct"]
            assert 0 <= r["adaptive_defence_rate"] <= 1 and 0 <= r["defence_success_rate"] <= 1
    assert colour["paper_protocol"][0]["adaptive_defence_rate"] == 1.0
    assert pattern["paper_protocol"][0]["adaptive_defence_rate"] == 0.0
    assert colour["paper_protocol"][0]["paper_reported"] == "~0.63-0.85"
    for m in (colour, pattern):
        checks = {c["check"]: c for c in m["masking_checks"]}
        # eps 0.5 reaches any colour, so even the robust model must fall: the attack is not masked
        assert checks["large eps drives accuracy to ~0"]["passed"], m["name"]
        assert checks["every attack beats random noise"]["passed"], m["name"]
        assert checks["surrogate gradients are non-zero"]["passed"], m["name"]
        assert checks["more steps never raise accuracy"]["passed"], m["name"]
    assert {c["check"]: c for c in colour["masking_checks"]}["white-box at least as strong as transfer"]["passed"]


def test_protocol_and_provenance_recorded(toy_result: dict) -> None:
    assert toy_result["seed"] == 0 and toy_result["code_version"] and toy_result["quick"]
    for m in toy_result["models"]:
        assert m["model_sha256"] == f"{m['name']}-sha"
        assert m["clean"]["protocol"] and m["worst_case"]["protocol"] and m["noise"]["protocol"]
        assert all(r["protocol"] for r in m["attacks"] + m["eps_sweep"] + m["paper_protocol"])
        t = m["temperature"]
        assert t["selected"] in (0.05, 0.5) and len(t["sweep"]) == 4, "2 temperatures x (whole bank, k nearest)"


def test_reports_written_and_parse(toy_result: dict, tmp_path: Path) -> None:
    paths = rb.write_reports(toy_result, tmp_path)
    assert json.loads(Path(paths["json"]).read_text())["models"][0]["name"] == "colour"
    md = Path(paths["markdown"]).read_text()
    for heading in ("## Worst case", "## Accuracy (%) under each attack", "## The paper's protocol",
                    "## Gradient-masking checks", "vs eps"):
        assert heading in md
    assert md.index("## Worst case") < md.index("under each attack"), "the report leads with the worst case"
    for key in ("eps_plot", "temperature_plot"):
        assert Path(paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reuses_cached_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = dict(eps_sweep=(0.0, 8 / 255), paper_eps=(), temperatures=(0.5,), n_robust=8)
    first = run_toy(tmp_path, **small)

    def no_attacks(*args, **kwargs):
        raise AssertionError("every attack result should come from the cache")

    monkeypatch.setattr(rb.suite, "robust_mask", no_attacks)
    monkeypatch.setattr(rb.suite, "zero_gradient_share", no_attacks)  # the masking diagnostics are cached too
    monkeypatch.setattr(rb.suite.Suite, "surrogate_agreement", no_attacks)
    second = run_toy(tmp_path, **small)
    for a, b in zip(first["models"], second["models"], strict=True):
        assert a["per_image"] == b["per_image"] and a["worst_case"] == b["worst_case"]
        assert a["masking_checks"] == b["masking_checks"]


def test_headline_only_runs_the_main_table_and_nothing_else(toy_result: dict, tmp_path: Path) -> None:
    """--headline-only (a gate for choices): the same per-attack masks and worst case at the main eps as the full
    run, no other radius attacked, no paper table, masking checks or cross-check; refused for cards; a merge never
    mixes it with full-protocol runs."""
    from training.robustness.merge import merge_results

    gate = run_toy(tmp_path, headline_only=True, validate_n=8)
    assert gate["config"]["headline_only"] and gate["torchattacks_validation"] is None
    for full, head in zip(toy_result["models"], gate["models"], strict=True):
        assert [r["eps"] for r in head["eps_sweep"]] == [pytest.approx(8 / 255)]
        assert head["paper_protocol"] == [] and head["masking_checks"] == []
        assert {r["attack"]: r["acc"] for r in head["attacks"]} == {r["attack"]: r["acc"] for r in full["attacks"]}
        assert head["worst_case"]["acc"] == head["worst_case"]["acc_attacks_at_eps_only"]
        assert head["worst_case"]["acc_attacks_at_eps_only"] == full["worst_case"]["acc_attacks_at_eps_only"]
    assert by_name(gate)["colour"]["worst_case"]["acc"] > by_name(gate)["pattern"]["worst_case"]["acc"] + 0.3
    text = rb.markdown_report(gate)
    assert rb.report.HEADLINE_ONLY in text and "Gradient-masking checks" not in text
    assert "defence success rate" not in text and "Gradient-masking checks" in rb.markdown_report(toy_result)
    with pytest.raises(ValueError, match="headline-only"):
        rb.run_suite(rb.SuiteConfig(headline_only=True), ["unused"], update_cards=True)
    with pytest.raises(ValueError, match="headline_only"):
        merge_results([("full", toy_result, ["colour"]), ("gate", gate, ["pattern"])])


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        rb.SuiteConfig(eps=0.0)
    with pytest.raises(ValueError):
        rb.SuiteConfig(temperatures=(0.0,))
    with pytest.raises(ValueError):
        rb.SuiteConfig(n_robust=0)
    assert fmt_eps(8 / 255) == "8/255" and fmt_eps(0.03) == "0.03"


def test_validation_split_run_attacks_held_out_images_with_the_full_protocol(tmp_path: Path) -> None:
    """split="validation" (choosing a k, a vote or a recipe without the test set): the sweep and the attacked
    images are the models' validation split, never a bank image; the ordering holds; no abstention stage (the
    calibration was fitted on these images) and never a card update."""
    from training import conformal
    from training.data import SplitSpec

    train = toy_dataset(N_TRAIN, seed=0)
    hp = {"val_size": N_TRAIN - BANK_SIZE, "val_fraction": 0.1, "val_seed": 0}
    bank_part, val = SplitSpec.from_config(hp).apply(train)
    assert val is not None and len(bank_part) == BANK_SIZE
    models = [model_under_test("colour", ColourEncoder(), "sat", bank_part),
              model_under_test("pattern", PatternEncoder(), "supervised", bank_part)]
    for m in models:
        m.manifest.training = TrainingInfo(method=m.method, hyperparameters=hp)
        counts = m.model.predict_votes(knn.to_float_images(val.images))[1]
        m.calibration = conformal.calibration_scores(counts, torch.as_tensor(val.labels), m.model.k)
    cfg = toy_config(tmp_path, split="validation", n_robust=24, n_sweep=8, eps_sweep=(0.0, 8 / 255), paper_eps=(),
                     temperatures=(0.05, 0.5))
    sweep, attacked = rb.validation_images(models, train, cfg.n_sweep)
    assert len(sweep) == 8 and len(attacked) == len(val) - 8
    in_bank = {row.tobytes() for row in bank_part.images}
    assert not any(row.tobytes() in in_bank for row in np.concatenate([sweep.images, attacked.images]))
    result = rb.Suite(cfg, models, attacked, source=models[1], held_out=sweep).run()
    assert result["protocol"]["split"] == "validation"
    assert "on the validation split: for choices, not for claims" in rb.markdown_report(result).splitlines()[0]
    colour, pattern = by_name(result)["colour"], by_name(result)["pattern"]
    assert colour["worst_case"]["acc"] > pattern["worst_case"]["acc"] + 0.3
    assert "validation images" in colour["clean"]["protocol"] and colour["clean"]["exact_n"] == colour["clean"]["n"]
    assert "validation images" in colour["temperature"]["protocol"]
    assert "abstention" not in colour and "abstention" not in pattern
    with pytest.raises(ValueError, match="validation"):
        rb.run_suite(cfg, ["unused"], update_cards=True)
    models[0].manifest.training = TrainingInfo(method="sat")  # no split recorded: refused, not guessed
    with pytest.raises(ValueError, match="no training split"):
        rb.validation_images(models, train, cfg.n_sweep)
    with pytest.raises(ValueError, match="split"):
        rb.SuiteConfig(split="train")


def test_temperature_sweep_uses_the_recorded_split_outside_cifar(tmp_path: Path) -> None:
    """A class-sorted folder is split stratified: the images after the bank are bank images of the last classes,
    so the sweep takes the recorded validation split's first images instead (CIFAR-10 keeps its slice)."""
    from training.data import SplitSpec

    toy = toy_dataset(N_TRAIN, seed=0)
    order = np.argsort(toy.labels, kind="stable")  # class-sorted, as an image folder loads
    train = ImageDataset(toy.images[order], toy.labels[order], toy.classes, "folder")
    hp = {"val_size": N_TRAIN - BANK_SIZE, "val_fraction": 0.1, "val_seed": 0}
    bank_part, val = SplitSpec.from_config(hp).apply(train)
    assert val is not None
    m = model_under_test("colour", ColourEncoder(), "sat", bank_part)
    m.manifest.training = TrainingInfo(method="sat", hyperparameters=hp)
    suite = rb.Suite(toy_config(tmp_path, temperatures=(0.5,), n_sweep=8), [m], toy_dataset(48, seed=1), train=train)
    held = suite._recorded_sweep(m)
    assert held is not None and len(held) == 8
    in_bank = {row.tobytes() for row in bank_part.images}
    assert not any(row.tobytes() in in_bank for row in held.images)
    assert "the split the manifest records" in suite.temperature_sweep(m)["protocol"]
    m.manifest.training = TrainingInfo(method="sat")  # nothing recorded: the old slice, with a warning
    assert suite._recorded_sweep(m) is None
    assert f"training images {BANK_SIZE}.." in suite.temperature_sweep(m)["protocol"]


def test_cli_validation_split_never_writes_over_the_test_report() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    rb.cli.add_arguments(parser)
    cfg = rb.config_from_args(parser.parse_args(["artifacts/default", "--split", "validation"]))
    assert cfg.split == "validation" and cfg.out == "benchmarks/results/validation"
    assert rb.config_from_args(parser.parse_args(["a", "--split", "validation", "--out", "x"])).out == "x"
    assert rb.config_from_args(parser.parse_args(["a"])).out == "benchmarks/results"
    assert not cfg.headline_only and rb.config_from_args(parser.parse_args(["a", "--headline-only"])).headline_only
    with pytest.raises(SystemExit):
        parser.parse_args(["a", "--split", "train"])


# --- end to end: a real (tiny) artifact through the CLI, with card update --------------------------------------


def test_cli_quick_run_updates_the_card(tiny_artifact: Path, tiny_cifar: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from training.cli import main

    quick = rb.SuiteConfig.quick_config
    smaller = dict(temperatures=(0.5,), paper_eps=(0.03,), pgd_steps=(2, 4), apgd_steps=4, embedding_steps=2,
                   guided_steps=2, large_eps_steps=2, sweep_steps=2)
    monkeypatch.setattr(rb.SuiteConfig, "quick_config", lambda **kw: quick(**{**smaller, **kw}))
    out = tmp_path / "results"
    copy = tmp_path / "copy"  # the same model in another folder, its card not yet written
    shutil.copytree(tiny_artifact, copy)
    argv = ["robustness", str(tiny_artifact), "--quick", "--data", str(tiny_cifar), "--out", str(out),
            "--n-robust", "8", "--validate-n", "0", "--device", "cpu", "--no-progress", "--update-cards",
            "--eps", "8/255", "--eps-sweep", "0", "8/255"]
    assert main(argv) == 0
    result = json.loads((out / "robustness.json").read_text())
    assert result["models"][0]["model_sha256"] == verify_artifact(tiny_artifact).model_sha256
    assert result["transfer_source"] is None
    assert (out / "robustness.md").is_file() and (out / "robustness_eps.png").is_file()
    manifest = verify_artifact(tiny_artifact).to_dict()  # card.md and the plot re-hashed: still verifies
    assert "robustness_eps.png" in manifest["files"]
    assert any(r.get("suite") == "robustness" and r["attack"] == "worst_case" for r in manifest["metrics"]["robust"])
    sweep = result["models"][0]["temperature"]
    assert manifest["knn"]["surrogate"]["temperature"] == sweep["selected"]  # what /attack will differentiate
    assert manifest["knn"]["surrogate"]["k"] == sweep["selected_k"]
    assert main(argv) == 0  # again (from the cache): the card keeps one suite section
    card = (tiny_artifact / "card.md").read_text()
    assert card.count(CARD_BEGIN) == 1 and card.startswith("# Model card: tiny")
    verify_artifact(tiny_artifact)

    # `satml robustness-card`: the finished report into the copy's card, as --update-cards wrote the original's
    assert CARD_BEGIN not in (copy / "card.md").read_text()
    assert main(["robustness-card", str(copy), str(out / "robustness.json")]) == 0
    assert (copy / "card.md").read_text() == card and (copy / "robustness_eps.png").is_file()
    assert verify_artifact(copy).to_dict()["metrics"] == verify_artifact(tiny_artifact).to_dict()["metrics"]
    other = json.loads((out / "robustness.json").read_text())
    other["models"][0]["model_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["robustness-card", str(copy), str(tmp_path / "other.json")]) == 2  # no row for this model
    gate = json.loads((out / "robustness.json").read_text())
    gate["config"]["headline_only"] = True
    (tmp_path / "gate.json").write_text(json.dumps(gate))
    assert main(["robustness-card", str(copy), str(tmp_path / "gate.json")]) == 2  # a gate is not for cards


def test_cache_returns_what_was_put_for_the_same_protocol_only(tmp_path: Path) -> None:
    cache = rb.Cache(tmp_path, enabled=True)
    key = {"model": "abc", "eps": 8 / 255, "steps": (20, 50)}  # tuples come back from JSON as lists
    cache.put("abc", "pgd20", key, {"mask": "101", "seconds": 1.5})
    assert cache.get("abc", "pgd20", key) == {"mask": "101", "seconds": 1.5}
    assert cache.get("abc", "pgd20", {**key, "eps": 4 / 255}) is None
    path = next(tmp_path.rglob("pgd20-*.json"))
    path.write_text(json.dumps({"key": {**key, "model": "other"}, "mask": "000", "seconds": 0}))
    assert cache.get("abc", "pgd20", key) is None, "a file for another protocol is never served"
    assert rb.Cache(tmp_path, enabled=False).get("abc", "pgd20", key) is None



def split_runs(result: dict) -> tuple[dict, dict]:
    """The toy result as two runs of the same protocol: colour measured by one code version, pattern by another."""
    a = json.loads(json.dumps(result)) | {"code_version": "aaaa111", "created": "2026-01-01T00:00:00+00:00"}
    b = json.loads(json.dumps(result)) | {"code_version": "bbbb222", "created": "2026-01-02T00:00:00+00:00"}
    a["models"] = [m for m in a["models"] if m["name"] == "colour"]
    b["models"] = [m for m in b["models"] if m["name"] == "pattern"]
    return a, b


def test_merge_rebuilds_one_table_from_runs_of_one_protocol(toy_result: dict, tmp_path: Path) -> None:
    from training.robustness.merge import merge_results

    a, b = split_runs(toy_result)
    merged = merge_results([("b.json", b, None), ("a.json", a, ["colour"])])
    assert [m["name"] for m in merged["models"]] == ["pattern", "colour"], "rows in the order asked for"
    original = by_name(toy_result)
    for m in merged["models"]:
        assert {k: v for k, v in m.items() if k != "run"} == original[m["name"]], "each row is its run's, unchanged"
    assert by_name(merged)["colour"]["run"] == {"file": "a.json", "code_version": "aaaa111",
                                                "created": "2026-01-01T00:00:00+00:00"}
    assert merged["code_version"] == "bbbb222, aaaa111" and merged["created"] == "2026-01-02T00:00:00+00:00"
    md = Path(rb.write_reports(merged, tmp_path)["markdown"]).read_text()
    assert "Merged from 2 suite runs of one protocol" in md and "colour from `a.json` (code aaaa111" in md
    single = rb.markdown_report(toy_result)
    for name in ("colour", "pattern"):  # the worst-case and per-attack rows read as in the one-run report
        rows = [line for line in single.splitlines() if line.startswith(f"| {name} |")][:2]
        assert all(row in md for row in rows)


def test_merge_refuses_what_is_not_one_table(toy_result: dict) -> None:
    from training.robustness.merge import merge_results, parse_source

    a, b = split_runs(toy_result)
    other_eps = b | {"config": b["config"] | {"eps": 4 / 255}}
    with pytest.raises(ValueError, match=r"different protocols \(eps\)"):
        merge_results([("a", a, None), ("b", other_eps, None)])
    other_source = b | {"transfer_source": {"name": "x", "model_sha256": "another"}}
    with pytest.raises(ValueError, match="transfer_source"):
        merge_results([("a", a, None), ("b", other_source, None)])
    with pytest.raises(ValueError, match="quick"):
        merge_results([("a", a, None), ("b", b | {"quick": False}, None)])
    with pytest.raises(ValueError, match="picked twice"):
        merge_results([("a", a, None), ("a2", a, None)])
    with pytest.raises(ValueError, match="has no model 'pattern'"):
        merge_results([("a", a, ["pattern"])])
    # where a run was written and how fast it went are not the protocol
    moved = b | {"config": b["config"] | {"out": "elsewhere", "batch_size": 7, "cache_dir": None}}
    assert len(merge_results([("a", a, None), ("b", moved, None)])["models"]) == 2
    assert parse_source("r.json") == (Path("r.json"), None)
    assert parse_source("r.json:ssl,default") == (Path("r.json"), ["ssl", "default"])
    with pytest.raises(ValueError, match="no model names"):
        parse_source("r.json:")


def test_merge_checks_rows_against_the_shipped_artifacts(tiny_artifact: Path) -> None:
    from training.robustness.merge import check_artifacts

    sha = verify_artifact(tiny_artifact).model_sha256
    row = {"name": tiny_artifact.name, "model_sha256": sha, "run": {"file": "r.json"}}
    check_artifacts({"models": [row]}, tiny_artifact.parent)
    with pytest.raises(ValueError, match=r"the row from r\.json measured"):
        check_artifacts({"models": [row | {"model_sha256": "0" * 64}]}, tiny_artifact.parent)


def test_cli_robustness_report(toy_result: dict, tmp_path: Path) -> None:
    from training.cli import main

    a, b = split_runs(toy_result)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b | {"config": b["config"] | {"seed": 1}}))
    out = tmp_path / "out"
    assert main(["robustness-report", f"{tmp_path / 'a.json'}:colour", str(tmp_path / "b.json"),
                 "--out", str(out)]) == 2, "seed differs: refused"
    assert not out.exists()
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["robustness-report", f"{tmp_path / 'a.json'}:colour", str(tmp_path / "b.json"),
                 "--out", str(out), "--stem", "shipped"]) == 0
    report = json.loads((out / "shipped.json").read_text())
    assert [m["name"] for m in report["models"]] == ["colour", "pattern"] and (out / "shipped.md").is_file()


def test_distinct_names_tell_a_candidate_from_the_shipped_model() -> None:
    """Rows keep their names unless two collide; then the folder, or the whole path where folders collide too."""
    assert rb.distinct_names([("default", Path("artifacts/default")), ("ssl", Path("artifacts/ssl"))]) == [
        "default", "ssl"]
    assert rb.distinct_names([("default", Path("artifacts/default")), ("default", Path("runs/r26/art/default"))]) == [
        "default (artifacts/default)", "default (runs/r26/art/default)"]
    assert rb.distinct_names([("m", Path("a/one")), ("m", Path("b/two")), ("x", Path("c/two"))]) == [
        "m (one)", "m (two)", "x"]


def test_stop_below_stops_at_the_first_figure_under_its_minimum(toy_result: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--stop-below (a gate that fails fast): the fragile model stops after its first worst-case attack with the
    running worst case, an upper bound of the full run's; a model that keeps every minimum gets the full run's
    figures; a wrong clean vote stops before any attack; run_suite leaves the stop record, never a stale report."""
    from training.robustness.verdict import STOPPED, SuiteStopped

    train, test = toy_dataset(N_TRAIN, seed=0), toy_dataset(48, seed=1)
    fragile = model_under_test("pattern", PatternEncoder(), "supervised", train)
    with pytest.raises(SuiteStopped) as stop:
        rb.Suite(toy_config(tmp_path / "a", stop_below={"worst": 0.5}), [fragile], test, train=train).run()
    record = stop.value.record
    first = next(r for r in by_name(toy_result)["pattern"]["attacks"] if r["worst_case"])
    assert record["after"] == first["attack"] and list(record["model"]["attacks"]) == [first["attack"]]
    assert record["figures"]["worst"] == pytest.approx(first["acc"]) and first["acc"] < 0.5
    assert record["figures"]["worst"] >= by_name(toy_result)["pattern"]["worst_case"]["acc"]
    assert record["model"]["worst_case"]["upper_bound"] and "worst" in record["reason"]

    robust = model_under_test("colour", ColourEncoder(), "sat", train)
    kept = rb.Suite(toy_config(tmp_path / "b", stop_below={"worst": 0.3, "clean": 0.5}), [robust], test,
                    train=train).run()["models"][0]
    full = by_name(toy_result)["colour"]  # that run also had a transfer source: compare the attacks both ran
    assert {r["attack"]: r["acc"] for r in kept["attacks"]} == {
        r["attack"]: r["acc"] for r in full["attacks"] if r["attack"] != "transfer"}
    assert kept["worst_case"]["acc"] == full["worst_case"]["acc"] >= 0.3

    wrong = model_under_test("wrong", ColourEncoder(), "sat", train)
    wrong.model.bank_labels = (wrong.model.bank_labels + 1) % 4
    with pytest.raises(SuiteStopped) as stop:
        rb.Suite(toy_config(tmp_path / "c", stop_below={"clean": 0.5}), [wrong], test, train=train).run()
    assert stop.value.record["after"] == "clean" and stop.value.record["model"]["attacks"] == {}
    assert stop.value.record["figures"]["clean"] < 0.5 and stop.value.record["figures"]["worst"] is None

    out = tmp_path / "gate"
    out.mkdir()
    (out / "robustness.json").write_text("{}")  # an earlier run's report: it would contradict the stop
    cfg = toy_config(out, stop_below={"worst": 0.5})
    monkeypatch.setattr(rb.Suite, "from_artifacts", classmethod(lambda cls, c, a, s=None: cls(
        c, [model_under_test("pattern", PatternEncoder(), "supervised", train)], test, train=train)))
    with pytest.raises(SuiteStopped):
        rb.run_suite(cfg, ["pattern"])
    assert not list(out.glob("robustness.*"))
    assert json.loads((out / STOPPED).read_text())["after"] == first["attack"]
    with pytest.raises(ValueError, match="one candidate"):
        rb.run_suite(cfg, ["a", "b"])
    with pytest.raises(ValueError, match="stop_below"):
        rb.SuiteConfig(stop_below={"robust": 0.3})
