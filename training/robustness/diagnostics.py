"""Checks that the numbers are not inflated: saturated surrogate gradients, agreement with torchattacks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from training import attacks, knn
from training.evaluate import KnnModel
from training.knn_attacks import Surrogate


def zero_gradient_share(model: KnnModel, surrogate: Surrogate, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 250) -> float:
    """Share of images whose surrogate cross-entropy has an all-zero or non-finite input gradient (a saturated
    softmax: the classic gradient-masking symptom that AutoAttack checks for)."""
    bad = 0
    sur = surrogate.build(model)
    device = model.bank.device
    with attacks.eval_mode(model.encoder):
        for i in range(0, len(labels), batch_size):
            x = knn.to_float_images(images[i:i + batch_size], device).requires_grad_(True)
            y = torch.as_tensor(labels[i:i + batch_size], device=device).long()
            (g,) = torch.autograd.grad(attacks.cross_entropy_objective(sur, y)(x).sum(), x)
            flat = g.flatten(1)
            bad += int(((flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)).sum())
    return bad / max(1, len(labels))


def torchattacks_agreement(classifier: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, eps: float,
                           pgd_steps: int, apgd_steps: int, seed: int = 0,
                           device: torch.device | str = "cpu") -> dict[str, Any]:
    """Robust accuracy (argmax of `classifier`) under our PGD / APGD-CE / APGD-DLR and torchattacks' versions.

    Same images, eps, steps and step size (PGD: eps/4, random start; APGD: 1 restart, rho 0.75). Raises
    ImportError when torchattacks is absent.
    """
    import torchattacks

    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(255) if images.dtype == np.uint8 else \
        torch.as_tensor(images).to(device)
    y = torch.as_tensor(labels, device=device).long()
    classifier = classifier.to(device)

    def acc(x_adv: Tensor) -> float:
        with torch.no_grad(), attacks.eval_mode(classifier):
            return float((classifier(x_adv).argmax(1) == y).float().mean())

    def fooled(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(xb).argmax(1) != y

    g = torch.Generator(device=device).manual_seed(seed)
    ours = {
        "pgd": attacks.pgd(attacks.cross_entropy_objective(classifier, y), x, eps=eps, alpha=eps / 4,
                           steps=pgd_steps, model=classifier, generator=g),
        "apgd_ce": attacks.apgd_ce(classifier, x, y, eps=eps, steps=apgd_steps, model=classifier, generator=g,
                                   is_adversarial=fooled),
        "apgd_dlr": attacks.apgd_dlr(classifier, x, y, eps=eps, steps=apgd_steps, model=classifier, generator=g,
                                     is_adversarial=fooled),
    }
    torch.manual_seed(seed)
    theirs = {
        "pgd": torchattacks.PGD(classifier, eps=eps, alpha=eps / 4, steps=pgd_steps, random_start=True)(x, y),
        "apgd_ce": torchattacks.APGD(classifier, eps=eps, steps=apgd_steps, loss="ce", seed=seed)(x, y),
        "apgd_dlr": torchattacks.APGD(classifier, eps=eps, steps=apgd_steps, loss="dlr", seed=seed)(x, y),
    }
    rows = []
    for name in ours:
        a, b = acc(ours[name]), acc(theirs[name])
        rows.append({"attack": name, "ours": a, "torchattacks": b, "diff_points": round(100 * (a - b), 2)})
    return {"torchattacks_version": torchattacks.__version__, "n": len(y), "eps": eps, "clean": acc(x),
            "pgd_steps": pgd_steps, "apgd_steps": apgd_steps, "rows": rows,
            "protocol": "accuracy of the attacked classifier's argmax (here the soft-kNN surrogate) after each "
                        "implementation's attack on the same images and budget"}
