"""training.knn_attacks: the one catalogue of named k-NN attacks (the suite, the export metric and /attack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.colour_toy import NUM_CLASSES, data_fixture, model_fixture  # noqa: F401  (fixtures)
from training import attacks, knn
from training.evaluate import KnnModel, robust_mask
from training.knn_attacks import (
    API_METHODS,
    CATALOGUE,
    Budget,
    Surrogate,
    build,
    craft,
    describe,
    guided_attack,
    resolve,
    step_fraction,
)
from training.manifest import KnnSurrogate

pytestmark = pytest.mark.usefixtures("one_thread")

GRADIENT_ATTACKS = ["fgsm", "pgd_ce", "apgd_ce", "apgd_dlr", "guided", "embedding", "cw"]


@pytest.mark.parametrize("method", [*CATALOGUE, *API_METHODS])
@pytest.mark.parametrize("targeted", [False, True])
def test_craft_contract(method: str, targeted: bool, model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Every name (catalogue and API alias): inside the ball and the image range, encoder mode and weights untouched."""
    images, labels = data
    x = knn.to_float_images(images[:12])
    y = torch.as_tensor(labels[:12])
    target = (y + 1) % NUM_CLASSES if targeted else None
    eps = 16 / 255
    model.encoder.train()
    try:
        x_adv = craft(model, x, y, method=method, eps=eps, steps=5, target=target, guides=7,
                      generator=torch.Generator().manual_seed(0))
        assert model.encoder.training, "the encoder's mode must be restored"
    finally:
        model.encoder.eval()
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.encoder.parameters())


def test_unknown_names_are_rejected(model: KnnModel) -> None:
    with pytest.raises(ValueError, match="unknown attack method"):
        craft(model, torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), method="bogus")
    with pytest.raises(ValueError, match="unknown attack method"):
        resolve("transfer")  # a suite stage, not an attack of the catalogue


def test_api_names_are_catalogue_entries() -> None:
    assert {resolve(a).name for a in API_METHODS} <= set(CATALOGUE)
    assert resolve("adaptive") is CATALOGUE["cw"] and resolve("knn_pgd") is CATALOGUE["guided"]
    assert resolve("pgd") is CATALOGUE["pgd_ce"]


def test_one_step_rule() -> None:
    """2.5 * eps / steps everywhere (Madry et al.), unless a budget names its step."""
    assert Budget(0.04, 20).step == pytest.approx(0.04 * 2.5 / 20)
    assert Budget(0.04, 20, alpha=0.25).step == pytest.approx(0.01)
    assert step_fraction(10) == 0.25


def test_knn_pgd_is_the_guided_attack(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    """The API's knn_pgd is the catalogue's guided attack with the common step rule."""
    images, labels = data
    x, y = knn.to_float_images(images[:9]), torch.as_tensor(labels[:9])
    a = craft(model, x, y, method="knn_pgd", eps=8 / 255, steps=4, guides=7, generator=torch.Generator().manual_seed(1))
    b = guided_attack(model, x, y, eps=8 / 255, alpha=step_fraction(4) * (8 / 255), steps=4, guides=7,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_craft_is_the_catalogue_build_without_early_stop(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    """/attack (craft) runs what the suite runs (build), to the final iterate; tracking stops at the first flip."""
    images, labels = data
    x, y = knn.to_float_images(images), torch.as_tensor(labels)
    sur = Surrogate(0.2)
    a = craft(model, x, y, method="adaptive", eps=0.3, steps=6, surrogate=sur,
              generator=torch.Generator().manual_seed(2))
    b = build("cw", model, Budget(0.3, 6), sur)(x, y, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    tracked = build("cw", model, Budget(0.3, 6, track=True), sur)(x, y, torch.Generator().manual_seed(2))
    final_fooled, tracked_fooled = model.predict(a) != y, model.predict(tracked) != y
    assert final_fooled.float().mean() > 0.5
    assert tracked_fooled[final_fooled].all(), "keeping the first flipping iterate never loses a success"
    assert not torch.equal(tracked, a), "tracking stopped some images before the last step"


def test_guided_attack_pulls_toward_other_classes(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x, y = knn.to_float_images(images), torch.as_tensor(labels)
    guides = model.guides(x, y, 5)  # B x 5 x D
    assert guides.shape == (len(x), 5, model.bank.shape[1])
    objective = attacks.guided_objective(model.encoder, guides)
    x_adv = guided_attack(model, x, y, eps=0.2, alpha=0.05, steps=10, guides=5,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert objective(x_adv).mean() > objective(x).mean()
    assert (model.predict(x_adv) != y).float().mean() > 0.5, "eps 0.2 is enough to change the colour class"


def test_targeted_craft_reaches_the_target(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x, y = knn.to_float_images(images), torch.as_tensor(labels)
    target = (y + 1) % NUM_CLASSES
    for method in ("pgd", "apgd_ce", "knn_pgd", "adaptive"):
        x_adv = craft(model, x, y, method=method, eps=0.4, steps=20, target=target,
                      generator=torch.Generator().manual_seed(0))
        assert (model.predict(x_adv) == target).float().mean() > 0.8, method


@pytest.mark.parametrize("name", ["apgd_targeted", "sw_guided", "square"])
def test_suite_attacks_break_the_toy_at_a_large_radius(name: str, model: KnnModel,
                                                       data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    attack = build(name, model, Budget(0.4, 30 if name != "square" else 200, track=True, sw_guides=5, targets=2),
                   Surrogate(0.2))
    mask, _ = robust_mask(model, images, labels, attack, batch_size=10)
    noise, _ = robust_mask(model, images, labels, build("noise", model, Budget(0.4, 1)), batch_size=10)
    assert mask.mean() < 0.3 < noise.mean(), (name, mask.mean(), noise.mean())


def test_surrogate_from_the_manifest() -> None:
    assert Surrogate.from_manifest(None) == Surrogate(0.1, None)
    assert Surrogate.from_manifest(KnnSurrogate(temperature=0.02, k=75)) == Surrogate(0.02, 75)
    assert str(Surrogate(0.02, 75)) == "T=0.02, 75 nearest"


def test_descriptions_fill_their_budget() -> None:
    text = describe("guided", Budget(8 / 255, 10, alpha=1 / 6, guides=300))
    assert "300 nearest other-class" in text and "step 0.1667*eps" in text
    assert "{" not in describe("sw_guided", Budget(8 / 255, 50, sw_guides=75, targets=3))
    assert all("{" not in describe(n, Budget(8 / 255, 10)) for n in CATALOGUE)
