"""Dynamic Weight Average on two digit tasks of very different loss scales, after Liu, Johns &
Davison 2019 ("End-to-End Multi-Task Learning with Attention", CVPR, eq. 7;
lorenmt/mtan, im2im_pred/utils.py ``multi_task_trainer``).

Published method (eq. 7): w_k(t) = K exp(r_k(t-1)/T) / sum_i exp(r_i(t-1)/T) with
r_k(t-1) = L_k(t-1) / L_k(t-2), L_k the task's training loss averaged over an epoch, T = 2,
K the number of tasks; w_k = 1 for the first two epochs. The weights are floats fixed within
an epoch and multiply the raw losses, whose sum is backpropagated (``lambda_weight[i, index]
* train_loss[i]`` in ``multi_task_trainer``). The trainer tracks each task's training and
test metrics every epoch; the ``equal`` option of the same trainer keeps w_k = 1. DWA reads
only the losses' values (no gradients, unlike GradNorm) and balances the *rate* at which each
loss falls (r_k is a ratio of one loss to itself): it never compares the losses' scales.

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``), one trunk
(64-128-ReLU-128-ReLU) and a linear head per task: ``digit``, the 10-class label
(cross-entropy, MTAN's semantic task), and ``ink``, the total ink of the image in
scikit-learn's stored grey levels 0-16 (the sum of the 64 pixels: mean 313, std 34;
squared error, a regression in large units as MTAN's depth in metres is). Adam lr 1e-3
(MTAN: 1e-4 over 200 epochs with a step decay at 100), batch 64, 40 epochs of 21 steps
(840 steps), no scheduler. Each epoch's mean training losses feed DWA; each epoch ends with
``probe.log(test_digit_acc=..., test_ink_rmse=...)``, the test metrics MTAN prints.

Truth, measured without gradprobe on the test split: digit accuracy and ink RMSE (grey
levels) against the same network trained on that task alone for the same steps and seed
(``single_*``); ``trunk_grad_ratio``, the median over the run of the digit loss's weighted
gradient norm over the ink loss's on the whole trunk (torch.autograd.grad every 20 steps);
the range of the weights DWA used.

Variants (truth by construction, labelled by what was measured):
- ``equal-weights``: w = (1, 1), MTAN's ``equal`` option. The ink loss, ~1e5 at the start,
  drowns the classifier's gradient on the trunk.
  Measured, seeds 0 / 1: digit accuracy 0.102 / 0.096 (one
  class for every input) against 0.976 / 0.973 single-task; ink RMSE 1.92 / 1.90, the
  single-task value; trunk_grad_ratio (digit / ink) 0.047 / 0.048.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``digit``. Must not:
  ``gradient-conflict``.
- ``dwa``: the published DWA (T = 2) on the same losses: its weights stay within (0, 2) and
  follow the ratio of each loss to its value an epoch before, so a 1e3-1e5-fold difference in
  scale is left as it is. Measured, seeds 0 / 1: weights w_digit 0.994-1.24 / 0.997-1.25
  (w_ink = 2 - w_digit); digit accuracy 0.102 / 0.096 against 0.976 / 0.973 single-task; ink
  RMSE 1.91 / 1.89 (single-task 1.92 / 1.90); trunk_grad_ratio 0.050 / 0.046. DWA changes
  nothing that matters here: the digit task is held back exactly as under equal weights.
  Broken: expected ``gradient-swamping`` naming ``digit``. Must not: ``static-loss-weights``
  (the weights change every epoch), ``gradient-conflict``.
- ``dwa-standardised``: DWA with the ink target standardised on the training split (z-score),
  the usual fix for a regression in large units; the RMSE is read back in grey levels.
  Healthy. Measured, seeds 0 / 1 (the single-task references on the same standardised target):
  digit accuracy 0.967 / 0.973 against 0.976 / 0.973; ink RMSE 5.21 / 5.06 grey levels against
  5.51 / 4.93; trunk_grad_ratio 0.30 / 0.23 (the classifier holds a quarter of the
  regression's gradient on the trunk and loses nothing); w_digit 0.885-1.10 / 0.855-1.08.
  Must not: ``gradient-swamping``, ``static-loss-weights``, ``gradient-conflict``.

One run (the variant and its two single-task references) takes 4-7 CPU-seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe

from ..common import DigitInkNet, batches, digits_split, ink_of, trunk_grad_ratio
from ..harness import Expect, Family, Variant

EPOCHS, BATCH, LR, WIDTH = 40, 64, 1e-3, 128
TEMPERATURE = 2.0  # MTAN's default --temp
RATIO_EVERY = 20
TASKS = ("digit", "ink")


class InkTarget:
    """The ink regression's target: grey levels, or their z-score on the training split."""

    def __init__(self, x_train: torch.Tensor, standardise: bool):
        ink = ink_of(x_train)
        self.mean, self.std = (float(ink.mean()), float(ink.std())) if standardise else (0.0, 1.0)

    def of(self, x: torch.Tensor) -> torch.Tensor:
        return (ink_of(x) - self.mean) / self.std

    def in_grey_levels(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction * self.std + self.mean


def dwa_weights(history: list[list[float]]) -> list[float]:
    """Eq. 7 from the epoch-mean losses so far (1 for the first two epochs)."""
    if len(history) < 2:
        return [1.0] * len(TASKS)
    rates = [last / before for last, before in zip(history[-1], history[-2])]
    exps = [math.exp(r / TEMPERATURE) for r in rates]
    return [len(TASKS) * e / sum(exps) for e in exps]


def evaluate(model: DigitInkNet, target: InkTarget, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits, ink = model(x)
    model.train()
    rmse = (target.in_grey_levels(ink) - ink_of(x)).pow(2).mean().sqrt()
    return float((logits.argmax(1) == y).float().mean()), float(rmse)


def fit(variant: str, seed: int, probe_file: Path | None, standardise: bool
        ) -> tuple[DigitInkNet, InkTarget, dict]:
    """Train on ``variant`` (also "digit-only" / "ink-only", the single-task references, on
    the variant's ink target)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    target = InkTarget(x_tr, standardise)
    model = DigitInkNet(WIDTH)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = len(x_tr) // BATCH
    loader = batches(len(x_tr), BATCH, gen)
    history, ratios, used = [], [], []
    probe = gradprobe.Probe(model, run_file=probe_file) if probe_file else None
    for epoch in range(EPOCHS):
        weights = dict(zip(TASKS, dwa_weights(history) if variant.startswith("dwa") else [1.0, 1.0]))
        used.append(list(weights.values()))
        epoch_losses = np.zeros(len(TASKS))
        for batch in range(steps_per_epoch):
            idx = next(loader)
            logits, ink = model(x_tr[idx])
            losses = {"digit": F.cross_entropy(logits, y_tr[idx]), "ink": F.mse_loss(ink, target.of(x_tr[idx]))}
            epoch_losses += [losses[t].item() / steps_per_epoch for t in TASKS]
            if variant.endswith("-only"):
                losses[variant.removesuffix("-only")].backward()
            else:
                if (epoch * steps_per_epoch + batch) % RATIO_EVERY == 0:
                    ratios.append(trunk_grad_ratio(model, losses, weights, "digit", "ink"))
                probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
        history.append(list(epoch_losses))
        if probe:
            acc, rmse = evaluate(model, target, x_te, y_te)
            probe.log(test_digit_acc=acc, test_ink_rmse=rmse)
    if probe:
        probe.close()
    if not ratios:
        return model, target, {}
    w = np.array(used)
    return model, target, {"trunk_grad_ratio": float(np.median(ratios)),
                           "w_digit_min": float(w[:, 0].min()), "w_digit_max": float(w[:, 0].max())}


def train(variant: str, seed: int, log: Path) -> dict:
    _, _, x_te, y_te = digits_split()
    standardise = variant == "dwa-standardised"
    model, target, extra = fit(variant, seed, log, standardise)
    acc, rmse = evaluate(model, target, x_te, y_te)
    digit_alone, digit_target, _ = fit("digit-only", seed, None, standardise)
    ink_alone, ink_target, _ = fit("ink-only", seed, None, standardise)
    single_acc, _ = evaluate(digit_alone, digit_target, x_te, y_te)
    _, single_rmse = evaluate(ink_alone, ink_target, x_te, y_te)
    return {"digit_acc": acc, "single_digit_acc": single_acc, "ink_rmse": rmse,
            "single_ink_rmse": single_rmse} | extra


FAMILY = Family(
    name="dwa-digits",
    source="Liu, Johns & Davison 2019, MTAN (CVPR) eq. 7, Dynamic Weight Average, T 2; "
           "lorenmt/mtan im2im_pred/utils.py multi_task_trainer",
    train=train,
    variants=(
        Variant("dwa-standardised", True, "DWA on losses of comparable scale (ink target "
                "standardised): both tasks at their single-task level (measured)",
                must_not=("gradient-swamping", "static-loss-weights", "gradient-conflict")),
        Variant("dwa", False, "DWA as published on an ink regression in grey levels squared: "
                "the weights balance loss rates, not scales, and the ink gradient still "
                "drowns the classifier's on the trunk",
                expected=(Expect("gradient-swamping", "digit"),),
                must_not=("static-loss-weights", "gradient-conflict")),
        Variant("equal-weights", False, "equal fixed weights: the ink regression in grey "
                "levels squared swamps the classifier's gradient on the trunk",
                expected=(Expect("gradient-swamping", "digit"),
                          Expect("static-loss-weights", "digit")),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1),
    quick=(("dwa", 1), ("dwa-standardised", 1)),
)
