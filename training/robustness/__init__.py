"""Robustness evaluation suite (DESIGN section 6, issue 5): adaptive attacks on k-NN artifacts, reports.

Every attack is crafted on a differentiable stand-in and scored by the hard k-NN vote the product
serves. The suite, per model:
  clean accuracy     all requested test images, and the exact leading subset (1,017 images) separately
  surrogate          soft-kNN temperature (and whole bank vs the k nearest) picked on held-out training
                     images (never the test set) as the one whose PGD leaves the lowest accuracy; reported
  attacks at eps     PGD-20/50 (random start, CE), APGD-CE and APGD-DLR (Croce & Hein 2020) on the
                     surrogate; the paper's k-NN-guided embedding attack (Chen et al. 2020); a label-free
                     embedding attack; transfer from a source model (the supervised baseline); each on all
                     clean-correct images, then the per-image worst case (robust = survives every attack)
  eps sweep          0, 2, 4, 8, 12, 16 /255, 0.03, 0.06: worst case of APGD-CE then APGD-DLR on the images
                     still robust (cascade, nested over eps), and the paper's guided attack
  paper protocol     defence success rate (attacked, originally correct images whose vote is unchanged)
                     under the guided attack at eps 0.03 and 0.06, beside the adaptive worst case
  masking checks     accuracy -> ~0 at a large eps; more steps never raise accuracy;
                     white-box at least as strong as transfer; random noise weaker than every attack;
                     zero surrogate gradients; surrogate/hard-vote agreement
Results go to `<out>/robustness.{json,md}` + PNG plots; per-attack results are cached under
`<out>/cache/<model sha>/` so an interrupted run resumes. `satml robustness --help` for the CLI.

Modules: config (budgets, attack rows, protocol sentences), cache, suite (the stages, `run_suite`),
diagnostics (masking checks), report (markdown, plots, cards), cli (`satml robustness`).
"""

from training.robustness.cache import Cache
from training.robustness.cli import add_cli, config_from_args, parse_eps
from training.robustness.config import (
    EPS_SWEEP,
    EXACT_TEST,
    PAPER_EPS,
    SPLITS,
    AttackSpec,
    SuiteConfig,
    attack_specs,
    budget,
    describe,
)
from training.robustness.diagnostics import torchattacks_agreement, zero_gradient_share
from training.robustness.report import markdown_report, plot_eps, plot_temperature, update_card, write_reports
from training.robustness.suite import (
    ModelUnderTest,
    Suite,
    abstention_attack,
    credibility,
    distinct_names,
    load_model,
    run_suite,
    validation_images,
)

__all__ = [
    "EPS_SWEEP", "EXACT_TEST", "PAPER_EPS", "SPLITS", "AttackSpec", "Cache", "ModelUnderTest", "Suite", "SuiteConfig",
    "abstention_attack", "add_cli", "attack_specs", "budget", "config_from_args", "credibility", "describe",
    "distinct_names", "load_model", "markdown_report", "parse_eps", "plot_eps", "plot_temperature", "run_suite",
    "torchattacks_agreement", "update_card", "validation_images", "write_reports", "zero_gradient_share",
]
