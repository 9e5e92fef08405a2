"""EWC, Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic
forgetting in neural networks", PNAS, eq. 3: L(theta) = L_B(theta) + sum_i lambda/2 F_i
(theta_i - theta*_A,i)^2, F the diagonal Fisher information at task A's optimum), as
moskomule/ewc.pytorch writes it (utils.py ``EWC._diag_fisher``, ``EWC.penalty``,
``ewc_train``; demo.ipynb on permuted MNIST: importance 1000, 200 Fisher samples).

Published method (the port): after task A, ``EWC`` stores theta*_A and the diagonal Fisher,
the mean over ``sample_size`` task-A inputs, one at a time, of the squared gradient of the
log-likelihood of the model's own predicted label; task B then trains on
``F.cross_entropy(output, target) + importance * ewc.penalty(model)`` with
``penalty = sum_n (F_n * (p_n - theta*_n) ** 2).sum()`` (importance = lambda / 2 of eq. 3).

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split) as the permuted-pixels
benchmark of the paper and the port: task A the digits, task B the same digits with one
fixed pixel permutation (the same for every seed), one 10-way head; an MLP 64-100-100-10
(ReLU), Adam lr 1e-3, batch 64 (the port's plain SGD at lr 1e-3 needs hundreds of epochs,
and SGD at lr 0.1 diverges under the penalty from importance 100 up: the largest Fisher entry
here is 0.11, beyond 1 / (lr * importance));
400 task-A steps (unprobed), the Fisher on 200 task-A training digits, then 600 task-B steps
probed: ``Probe(model)`` with the two terms of the port's sum named ``cross_entropy`` and
``penalty`` (weight ``importance``), and ``probe.log(acc_task_a=..., acc_task_b=...)`` (test
accuracies) every 25 steps, as a continual-learning user tracks both tasks.

Truth, measured without gradprobe: task-A test accuracy after task A and after task B
(``forgetting`` the drop), task-B test accuracy, against plain fine-tuning on task B
(importance 0, same seed, unprobed); every 25 probed steps, over all parameters, cross_entropy's
weighted gradient norm over the penalty's (``ce_over_penalty``) and their cosine (medians,
share of negative cosines); each loss's last 10 samples over samples 1-5.

Variants (truth by construction):
- ``published``: healthy, importance 1000 (the port's). Measured, seeds 0 / 1: task A
  0.958 / 0.969 after A, 0.749 / 0.929 after B (forgetting 0.209 / 0.040, against 0.473 /
  0.482 for plain fine-tuning), task B 0.942 / 0.898 (fine-tuning 0.969 / 0.969): both tasks
  stay good, A far better kept than without the penalty. cross_entropy over penalty gradient
  norm 2.28 / 1.75 (weighted), cosine +0.01 / -0.08 (negative on 46% / 75% of the checks);
  cross_entropy end over start 0.29 / 0.34, penalty 0.24 / 0.27.
  Must not: ``inert-loss``, ``gradient-conflict``, ``gradient-swamping``, ``static-loss-weights``.
- ``aliased-means``: broken. theta*_A is stored as the live parameters themselves
  (``dict(model.named_parameters())``, the aliasing the port's ``deepcopy`` avoids), so
  ``p - theta*`` is 0 at every step: the penalty is 0 with a gradient exactly 0 although its
  graph reaches every parameter, and task A is forgotten as without EWC. Measured, seeds 0 / 1:
  penalty gradient norm 0.0 at every check; task A 0.484 / 0.487 after B (forgetting 0.473 /
  0.482, against 0.209 / 0.040 for ``published``), task B 0.969 / 0.969: identical to plain
  fine-tuning on both seeds. Expected: ``inert-loss`` on ``penalty``.
- ``sgd-lr-0.1``: broken. The port's importance 1000 with plain SGD at lr 0.1 on task B: the
  penalty's curvature 2 * importance * F_i exceeds 2 / lr on the stiffest parameters (largest
  Fisher entry 0.11, lr * 2 * 1000 * 0.11 = 22), so its pull towards theta*_A overshoots and
  grows each step until it overflows. Measured, seeds 0 / 1: the penalty is Inf from step
  24 / 16, cross_entropy NaN from step 30 / 33; both tasks end at chance, task A 0.100 / 0.100,
  task B 0.100 / 0.100 (published 0.749 / 0.929 and 0.942 / 0.898). Before it overflows
  (gradients checked every step) cross_entropy's weighted gradient norm is below 0.1 of the
  penalty's on 91% / 71% of the finite steps (median 0.000 / 0.008). Expected:
  ``non-finite`` on ``penalty`` (it goes first); allowed: ``non-finite`` on
  ``cross_entropy`` (it follows), ``gradient-swamping`` and ``static-loss-weights`` on
  ``cross_entropy`` (the fixed importance drowns it before the overflow).

Not kept: an importance so large that task B never learns. Under Adam the step size does not
grow with the importance, and task B is learnt anyway; measured on seed 0, importance 1e4 /
1e5 / 1e7 / 1e9: task B 0.938 / 0.944 / 0.933 / 0.924, forgetting of A 0.338 / 0.391 /
0.584 / 0.478 (the stiff penalty makes Adam oscillate about theta*_A): no "B never learns"
harm, and its forgetting is not a clean weight-too-large cause. Under SGD it diverges instead
(above).

CPU: about 4-7 seconds a run (probed run plus the unprobed fine-tuning reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (batches, continual_outcome, digits_split, log_task_accuracies,
                      loss_end_over_start, weighted_backward, with_fine_tune)
from ..harness import Expect, Family, Variant

TASK_A_STEPS, TASK_B_STEPS, BATCH, LR, FISHER_SAMPLES, TRUTH_EVERY = 400, 600, 64, 1e-3, 200, 25
IMPORTANCE_OF = {"published": 1000.0, "aliased-means": 1000.0, "sgd-lr-0.1": 1000.0,
                 "fine-tune": 0.0}


def tasks():
    """(x_train, y, x_test, y_test) of task A and of task B (pixels permuted, one fixed
    permutation)."""
    x_tr, y_tr, x_te, y_te = digits_split()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1234))
    return (x_tr, y_tr, x_te, y_te), (x_tr[:, perm], y_tr, x_te[:, perm], y_te)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def diag_fisher(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The port's ``_diag_fisher``: mean over single inputs of the squared gradient of the
    log-likelihood of the predicted label."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in x:
        model.zero_grad()
        output = model(row[None])
        F.nll_loss(F.log_softmax(output, 1), output.argmax(1)).backward()
        for n, p in model.named_parameters():
            fisher[n] += p.grad ** 2 / len(x)
    model.zero_grad()
    return fisher


def penalty_of(model: nn.Module, fisher: dict, means: dict) -> torch.Tensor:
    return sum((fisher[n] * (p - means[n]) ** 2).sum() for n, p in model.named_parameters())


def gradient_truth(model: nn.Module, losses: dict, weights: dict) -> dict[str, float]:
    """Over all parameters: the penalty's weighted gradient norm, and cross_entropy's over it
    with their cosine where it is not 0."""
    params = list(model.parameters())
    grads = {name: weights.get(name, 1.0) * torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, params, retain_graph=True)]) for name, loss in losses.items()}
    ce, penalty = grads["cross_entropy"], grads["penalty"]
    truth = {"penalty_grad_norm": float(penalty.norm())}
    if truth["penalty_grad_norm"] > 0:
        truth |= {"ce_over_penalty": float(ce.norm() / penalty.norm()),
                  "cos_ce_penalty": float(F.cosine_similarity(ce, penalty, dim=0))}
    return truth


def fit(variant: str, seed: int, log: Path | None) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (xa, ya, xa_test, ya_test), (xb, yb, xb_test, yb_test) = tasks()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    a_batches = batches(len(xa), BATCH, gen)
    for _ in range(TASK_A_STEPS):
        s = next(a_batches)
        F.cross_entropy(model(xa[s]), ya[s]).backward()
        optimizer.step()
        optimizer.zero_grad()
    acc_a_after_a = accuracy(model, xa_test, ya_test)
    fisher = diag_fisher(model, xa[torch.randperm(len(xa), generator=gen)[:FISHER_SAMPLES]])
    # the aliasing bug the port's deepcopy avoids: theta*_A read from the live parameters
    means = dict(model.named_parameters()) if variant == "aliased-means" else {
        n: p.detach().clone() for n, p in model.named_parameters()}
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    weights = {"penalty": IMPORTANCE_OF[variant]}
    if variant == "sgd-lr-0.1":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first_non_finite: dict[str, int] = {}
    # the diverging run is finite for only some 20 steps: its gradients are checked each step
    truth_every = 1 if variant == "sgd-lr-0.1" else TRUTH_EVERY
    b_batches = batches(len(xb), BATCH, gen)
    series: dict[str, list[float]] = {}
    for step in range(TASK_B_STEPS):
        s = next(b_batches)
        cross_entropy = F.cross_entropy(model(xb[s]), yb[s])
        penalty = penalty_of(model, fisher, means)
        losses = {"cross_entropy": cross_entropy, "penalty": penalty}
        for name, loss in losses.items():
            if not torch.isfinite(loss) and name not in first_non_finite:
                first_non_finite[name] = step
        if step % truth_every == truth_every - 1:  # at 25 steps, not step 0 (penalty gradient 0)
            if weights["penalty"] > 0 and not first_non_finite:
                for name, value in gradient_truth(model, losses, weights).items():
                    if np.isfinite(value):
                        series.setdefault(name, []).append(value)
            for name, loss in (("cross_entropy_loss", cross_entropy), ("penalty_loss", penalty)):
                series.setdefault(name, []).append(float(loss.detach()))
        weighted_backward(losses, weights, probe)
        optimizer.step()
        optimizer.zero_grad()
        log_task_accuracies(probe, step, TRUTH_EVERY, lambda: accuracy(model, xa_test, ya_test),
                            lambda: accuracy(model, xb_test, yb_test))
    if probe is not None:
        probe.close()
    outcome = continual_outcome(acc_a_after_a, accuracy(model, xa_test, ya_test),
                                accuracy(model, xb_test, yb_test))
    outcome |= {f"{name}_non_finite_from": step for name, step in first_non_finite.items()}
    return outcome, series


def train(variant: str, seed: int, log: Path) -> dict:
    outcome, series = fit(variant, seed, log)
    reference, _ = fit("fine-tune", seed, None)
    truth = with_fine_tune(outcome, reference)
    if "penalty_grad_norm" in series:
        truth["penalty_grad_norm_max"] = max(series["penalty_grad_norm"])
    if "cos_ce_penalty" in series:
        truth |= {name: float(np.median(series[name]))
                  for name in ("ce_over_penalty", "cos_ce_penalty")}
        truth["cos_negative_share"] = float(np.mean(np.array(series["cos_ce_penalty"]) < 0))
        truth["ce_over_penalty_below_0.1_share"] = float(np.mean(
            np.array(series["ce_over_penalty"]) < 0.1))
    return truth | {name: ratio for name, ratio in loss_end_over_start(series).items()
                    if np.isfinite(ratio)}  # a penalty that is 0 throughout has no ratio


FAMILY = Family(
    name="ewc",
    source="Kirkpatrick et al. 2017 (EWC, PNAS, eq. 3); moskomule/ewc.pytorch utils.py "
           "(EWC._diag_fisher, EWC.penalty, ewc_train)",
    train=train,
    variants=(
        Variant("published", True,
                "EWC as the port writes it, importance 1000: task A kept, task B learnt "
                "(measured)",
                must_not=("inert-loss", "gradient-conflict", "gradient-swamping",
                          "static-loss-weights")),
        Variant("aliased-means", False,
                "theta*_A aliases the live parameters: the penalty is 0 with a zero gradient at "
                "every step, task A is forgotten as in plain fine-tuning (measured)",
                expected=(Expect("inert-loss", "penalty"),),
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights")),
        Variant("sgd-lr-0.1", False,
                "importance 1000 under SGD lr 0.1: the penalty's stiffest directions overshoot "
                "and overflow (Inf from step 16-24), both tasks end at chance (measured)",
                expected=(Expect("non-finite", "penalty"),),
                allowed=(Expect("non-finite", "cross_entropy"),
                         Expect("gradient-swamping", "cross_entropy"),
                         Expect("static-loss-weights", "cross_entropy")),
                must_not=("inert-loss", "gradient-conflict")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("aliased-means", 1), ("sgd-lr-0.1", 1)),
)
