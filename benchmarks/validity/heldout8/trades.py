"""Adversarial training with TRADES, after Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan 2019
("Theoretically Principled Trade-off between Robustness and Accuracy", ICML; the objective
min E[L(f(X), Y) + max_{X' in B(X, eps)} L(f(X), f(X')) / lambda], beta = 1 / lambda, as
the official README states it) and the official code yaodongyu/TRADES (read: README.md,
trades.py ``trades_loss``, train_trades_mnist.py, train_trades_cifar10.py).

Published (the code): x_adv starts at x + 0.001 N(0, 1) and takes ``perturb_steps`` signed
ascent steps of ``step_size`` on KL(f(x) || f(x_adv)) (``nn.KLDivLoss`` summed, over the
batch), projected to the L-inf ball of radius ``epsilon`` and to [0, 1]; then
``loss_natural`` = CE(f(x), y), ``loss_robust`` = KL(f(x) || f(x_adv)) / batch_size, and
loss = loss_natural + beta loss_robust. MNIST: SmallCNN, SGD lr 0.01 momentum 0.9, batch
128, 100 epochs, epsilon 0.3, 40 steps of 0.01, beta 1 (CIFAR-10: epsilon 0.031, 10 steps
of 0.007). The README: "beta can be set in [1, 10]. Larger beta leads to more robust and
less accurate models". Robust accuracy is measured with a white-box PGD attack on the
cross-entropy from a random start at the training epsilon (the repo's pgd_attack_*.py, not
read here).

Here (CPU): scikit-learn's 8x8 digits (common.digits_split, pixels in [0, 1]), an MLP
64-128-128-10, SGD lr 0.05 momentum 0.9, batch 128, 600 steps; epsilon 0.2 with 5 ascent
steps of 0.05 in training; robust accuracy on the test split under PGD-10 on the
cross-entropy (random start, steps of 0.04, epsilon 0.2). The losses are passed under the
code's names ``loss_natural`` and ``loss_robust``, in the code's order, with the weights
1 and beta.

Truth, measured without gradprobe: natural and robust test accuracy (``natural_acc``,
``robust_acc``), against a plain cross-entropy reference trained on the same seed
(``plain_*``); every 25 steps, the weighted gradient norm of loss_robust over loss_natural's
on all parameters (``robust_over_natural_grad``, median) and their cosine; each loss's end
over start.

Variants (truth by construction):
- ``beta-1``: healthy, beta 1 as published for MNIST.
- ``beta-6``: healthy, beta 6 inside the README's range [1, 10] (the value the paper is
  usually quoted with for CIFAR-10; the stored CIFAR-10 script defaults to 1): more
  robustness for a little natural accuracy, the trade-off the method is for (its two
  gradients oppose by design).
- ``beta-1e-3``: the robust term at a fixed weight 1e-3: the cross-entropy's gradient drowns
  it, the model is trained as if plain and has no robustness.
Measured, seeds 0 / 1 (plain cross-entropy reference: natural 0.978 / 0.973, robust
0.013 / 0.009):
  beta-1:    natural_acc 0.982 / 0.973, robust_acc 0.51 / 0.47; the weighted loss_robust
             gradient is 0.88 / 0.84 of loss_natural's (median); cos -0.04 / -0.03
             (negative on 50% / 58% of the checks); loss_natural ends at 0.36 / 0.47 of its
             start, loss_robust at 0.90 / 1.00.
  beta-6:    natural_acc 0.951 / 0.967, robust_acc 0.55 / 0.52; gradient ratio 0.94 / 0.95;
             cos -0.76 / -0.75 (negative on 96% of the checks); loss_natural ends at
             0.74 / 0.79 of its start, loss_robust at 1.13 / 1.19.
  beta-1e-3: natural_acc 0.978 / 0.973 and robust_acc 0.013 / 0.009, the plain reference's
             to the digit (vs 0.51 / 0.47 at beta 1); the weighted loss_robust gradient is
             1.4% / 1.0% of loss_natural's (median); cos +0.10 / +0.05 (negative on 42%);
             loss_natural ends at 0.058 / 0.12 of its start, loss_robust at 2.0 / 2.2 (it
             rose as the model grew confident and brittle).
CPU ~5-7 s a run with the reference (one thread, shared machine).
Expected on ``beta-1e-3``: ``gradient-swamping`` of ``loss_robust`` (about 1% of the
natural gradient while it doubles) and ``static-loss-weights`` naming ``loss_robust`` (the
fixed 1e-3 is the cause; beta 1 or 6 makes the model robust). Must not (all):
``gradient-conflict`` on ``beta-1e-3`` (cosines near 0 or positive) and on the healthy
variants (beta 6's opposed gradients are the published trade-off: natural accuracy within
3 points of the plain model's), ``inert-loss`` (both losses reach every layer); on the
healthy variants also ``gradient-swamping`` and ``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, loss_end_over_start
from ..harness import Expect, Family, Variant

EPSILON, STEP_SIZE, PERTURB_STEPS = 0.2, 0.05, 5
ATTACK_STEP, ATTACK_STEPS = 0.04, 10
STEPS, LR, BATCH = 600, 0.05, 128
BETA = {"beta-1": 1.0, "beta-6": 6.0, "beta-1e-3": 1e-3}
TRUTH_EVERY = 25


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def project(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.min(torch.max(x_adv, x - EPSILON), x + EPSILON), 0.0, 1.0)


def trades_adversary(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """trades.py's inner maximisation of KL(f(x) || f(x_adv)) (sum over the batch)."""
    target = F.softmax(model(x), 1).detach()
    x_adv = x + 0.001 * torch.randn(x.shape, generator=gen)
    for _ in range(PERTURB_STEPS):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), target, reduction="sum")
        grad = torch.autograd.grad(kl, x_adv)[0]
        x_adv = project(x_adv.detach() + STEP_SIZE * grad.sign(), x)
    return x_adv.detach()


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> float:
    """White-box PGD on the cross-entropy from a random start in the epsilon ball."""
    x_adv = project(x + EPSILON * (2 * torch.rand(x.shape, generator=gen) - 1), x)
    for _ in range(ATTACK_STEPS):
        x_adv.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)[0]
        x_adv = project(x_adv.detach() + ATTACK_STEP * grad.sign(), x)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple:
    with torch.no_grad():
        natural = float((model(x).argmax(1) == y).float().mean())
    return natural, pgd_accuracy(model, x, y, torch.Generator().manual_seed(seed + 500))


def plain_reference(seed: int) -> tuple:
    """The same MLP, data order and optimiser on the cross-entropy alone."""
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    order = batches(len(x_tr), BATCH, torch.Generator().manual_seed(seed))
    for _ in range(STEPS):
        idx = next(order)
        F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        opt.zero_grad()
    return accuracies(model, x_te, y_te, seed)


def train(variant: str, seed: int, log: Path) -> dict:
    beta = BETA[variant]
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    order = batches(len(x_tr), BATCH, torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 100)
    series: dict[str, list[float]] = {}
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step in range(STEPS):
            idx = next(order)
            x, y = x_tr[idx], y_tr[idx]
            x_adv = trades_adversary(model, x, noise)
            logits = model(x)
            losses = {"loss_natural": F.cross_entropy(logits, y),
                      "loss_robust": F.kl_div(F.log_softmax(model(x_adv), 1),
                                              F.softmax(logits, 1), reduction="sum") / BATCH}
            if step % TRUTH_EVERY == 0:
                g_nat = flat_grad(losses["loss_natural"], params)
                g_rob = flat_grad(losses["loss_robust"], params)
                measured = {"robust_over_natural_grad": float(beta * g_rob.norm()
                                                              / g_nat.norm()),
                            "cos_natural_robust": float(F.cosine_similarity(g_nat, g_rob, 0)),
                            "natural_loss": losses["loss_natural"].item(),
                            "robust_loss": losses["loss_robust"].item()}
                for name, value in measured.items():
                    series.setdefault(name, []).append(value)
            probe.backward(losses, weights={"loss_natural": 1.0, "loss_robust": beta})
            opt.step()
            opt.zero_grad()
    natural_acc, robust_acc = accuracies(model, x_te, y_te, seed)
    plain_natural, plain_robust = plain_reference(seed)
    return {"natural_acc": natural_acc, "robust_acc": robust_acc,
            "plain_natural_acc": plain_natural, "plain_robust_acc": plain_robust,
            "robust_over_natural_grad": float(np.median(series["robust_over_natural_grad"])),
            "cos_natural_robust": float(np.median(series["cos_natural_robust"])),
            "cos_negative_share": float(np.mean(np.array(series["cos_natural_robust"]) < 0))} \
        | loss_end_over_start({k: series[k] for k in ("natural_loss", "robust_loss")})


_MUST_NOT = ("gradient-conflict", "inert-loss")
_HEALTHY_MUST_NOT = _MUST_NOT + ("gradient-swamping", "static-loss-weights")

FAMILY = Family(
    name="trades",
    source="Zhang et al. 2019 (ICML), TRADES; yaodongyu/TRADES trades.py (trades_loss), "
           "train_trades_mnist.py, README.md",
    train=train,
    variants=(
        Variant("beta-1", True,
                "TRADES with beta 1 as published for MNIST: natural accuracy as the plain "
                "model's, robust accuracy ~0.5 against ~0.01 for the plain model",
                must_not=_HEALTHY_MUST_NOT),
        Variant("beta-6", True,
                "TRADES with beta 6, inside the published range [1, 10]: the trade-off, "
                "natural accuracy within 3 points of the plain model's, robust ~0.5",
                must_not=_HEALTHY_MUST_NOT),
        Variant("beta-1e-3", False,
                "the robust KL term at a fixed weight 1e-3: about 1% of the natural "
                "gradient, it doubles while the model ends exactly as the plain one, robust "
                "accuracy ~0.01 against ~0.5 at beta 1",
                expected=(Expect("gradient-swamping", "loss_robust"),
                          Expect("static-loss-weights", "loss_robust")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("beta-1", 1), ("beta-1e-3", 1)),
)
