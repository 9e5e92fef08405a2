"""Random Loss Weighting, after Lin, Ye, Xu, Shi & Zhang 2022 ("Reasonable Effectiveness of
Random Weighting: A Litmus Test for Multi-Task Learning", TMLR; arXiv 2111.10603) and
LibMTL's implementation (median-research-group/LibMTL, LibMTL/weighting/RLW.py, read).

Published (the code): each step, ``batch_weight = softmax(torch.randn(task_num))`` and the
update follows ``sum_k batch_weight[k] * losses[k]`` (the paper's default, weights from a
standard normal through a softmax, so they are positive and sum to 1; the paper also tries
Dirichlet, uniform and Bernoulli draws). Hard parameter sharing: one shared encoder with a
head per task; each task's loss is its usual one. RLW is the paper's "litmus test": a weighting method
should beat random weights; on its benchmarks RLW is competitive with most of them.

Here (CPU): scikit-learn's 8x8 digits (common.digits_split) with three tasks under LibMTL's
task names: ``digit`` (10-class cross-entropy), ``parity`` (even/odd cross-entropy) and
``ink`` (MSE on the standardised ink of the image, common.ink_of, z-scored on the training
split); a shared trunk 64-32-32 (ReLU) and one linear head per task; Adam lr 3e-3, batch 64,
800 steps (at lr 1e-3 and 500 steps RLW's weights, summing to 1, left every task short). Each task is also trained alone (the same trunk, its own head, seed and batches) as
its single-task reference, the paper's yardstick.

Truth, measured without gradprobe, on the test split: ``digit_acc``, ``parity_acc``,
``ink_r2`` (1 - MSE / variance) and the single-task references ``single_*``; every 25
steps, the weighted gradient norm of ``ink`` over ``digit``'s on the trunk
(common.trunk_grad_ratio, ``ink_over_digit_grad``, median).

Variants (truth by construction):
- ``rlw-normal``: healthy, RLW as published (softmax of a standard normal each step).
- ``ink-x1000-equal``: the ink target in thousandths of a standard deviation (x1000, its MSE
  ~1e6 against ~2 for the cross-entropies) at fixed equal weights 1: the ink gradient owns
  the trunk and the two classification tasks learn on features shaped for ink alone.
Measured, seeds 0 / 1 (single-task references: digit 0.969 / 0.962, parity 0.982 / 0.980,
ink R^2 0.996 / 0.997 at scale 1; ink R^2 0.73 / 0.66 at x1000):
  rlw-normal:      digit_acc 0.944 / 0.956, parity_acc 0.973 / 0.976, ink_r2 0.94 / 0.88:
                   within 2.5 points of single-task on both classifications (RLW's known
                   small cost against single-task on ink); weighted ink gradient 8.9 / 3.1x
                   digit's on the trunk (median).
  ink-x1000-equal: digit_acc 0.171 / 0.184 (against 0.969 / 0.962 alone), parity_acc
                   0.507 / 0.696 (against 0.982 / 0.980: chance is 0.5); ink_r2 0.75 / 0.73,
                   as alone; weighted ink gradient 27,800 / 28,500x digit's on the trunk.
CPU ~4-7 s a run with the three single-task references (one thread, shared machine).
Expected on ``ink-x1000-equal``: ``gradient-swamping`` of ``digit`` and of ``parity`` and
``static-loss-weights`` naming them (fixed equal weights are the cause: RLW or a weight that
balances the scale frees them). Must not: ``inert-loss`` (every loss reaches the trunk); on
the healthy variant also ``gradient-swamping``, ``static-loss-weights`` (the weights are
redrawn every step) and ``gradient-conflict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, ink_of, trunk_grad_ratio
from ..harness import Expect, Family, Variant

STEPS, LR, BATCH, WIDTH = 800, 3e-3, 64, 32
TASKS = ("digit", "parity", "ink")
INK_SCALE = {"rlw-normal": 1.0, "ink-x1000-equal": 1000.0}
TRUTH_EVERY = 25


class HardSharing(nn.Module):
    """LibMTL's hard parameter sharing: a shared encoder and one head per task."""

    def __init__(self, tasks: tuple[str, ...]):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                                   nn.ReLU())
        outputs = {"digit": 10, "parity": 2, "ink": 1}
        self.heads = nn.ModuleDict({t: nn.Linear(WIDTH, outputs[t]) for t in tasks})

    def forward(self, x):
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


def targets(x: torch.Tensor, y: torch.Tensor, ink_mean: float, ink_std: float,
            ink_scale: float) -> dict:
    return {"digit": y, "parity": y % 2, "ink": ink_scale * (ink_of(x) - ink_mean) / ink_std}


def task_losses(out: dict, target: dict) -> dict:
    return {t: (F.mse_loss(out[t].squeeze(1), target[t]) if t == "ink"
                else F.cross_entropy(out[t], target[t])) for t in out}


def evaluate(model: HardSharing, target: dict, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model(x)
    scores = {}
    for t in out:
        if t == "ink":
            scores["ink_r2"] = float(1 - F.mse_loss(out[t].squeeze(1), target[t])
                                     / target[t].var())
        else:
            scores[f"{t}_acc"] = float((out[t].argmax(1) == target[t]).float().mean())
    return scores


def fit(model: HardSharing, x: torch.Tensor, target: dict, seed: int, step_fn) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x), BATCH, torch.Generator().manual_seed(seed))
    for step in range(STEPS):
        idx = next(order)
        step_fn(step, task_losses(model(x[idx]), {t: v[idx] for t, v in target.items()}))
        opt.step()
        opt.zero_grad()


def train(variant: str, seed: int, log: Path) -> dict:
    x_tr, y_tr, x_te, y_te = digits_split()
    ink = ink_of(x_tr)
    scale = INK_SCALE[variant]
    t_tr = targets(x_tr, y_tr, float(ink.mean()), float(ink.std()), scale)
    t_te = targets(x_te, y_te, float(ink.mean()), float(ink.std()), scale)
    torch.manual_seed(seed)
    model = HardSharing(TASKS)
    draws = torch.Generator().manual_seed(seed + 100)
    ratios = []
    probe = gradprobe.Probe(model, run_file=log)

    def step_fn(step, losses):
        if variant == "rlw-normal":
            batch_weight = F.softmax(torch.randn(len(TASKS), generator=draws), dim=-1)
        else:
            batch_weight = torch.ones(len(TASKS))
        weights = {t: float(w) for t, w in zip(TASKS, batch_weight)}
        if step % TRUTH_EVERY == 0:
            ratios.append(trunk_grad_ratio(model, losses, weights, "ink", "digit"))
        probe.backward(losses, weights=weights)

    with probe:
        fit(model, x_tr, t_tr, seed, step_fn)
    outcome = evaluate(model, t_te, x_te)
    for t in TASKS:
        torch.manual_seed(seed)
        alone = HardSharing((t,))
        fit(alone, x_tr, {t: t_tr[t]}, seed, lambda step, losses: losses[t].backward())
        outcome |= {f"single_{k}": v for k, v in evaluate(alone, {t: t_te[t]}, x_te).items()}
    return outcome | {"ink_over_digit_grad": float(np.median(ratios))}


FAMILY = Family(
    name="rlw",
    source="Lin et al. 2022, Random Loss Weighting (TMLR, arXiv 2111.10603); "
           "median-research-group/LibMTL LibMTL/weighting/RLW.py",
    train=train,
    variants=(
        Variant("rlw-normal", True,
                "RLW as published: softmax of a standard normal each step; every task within "
                "2.5 points of its single-task accuracy (measured)",
                must_not=("inert-loss", "gradient-swamping", "static-loss-weights",
                          "gradient-conflict")),
        Variant("ink-x1000-equal", False,
                "the ink target x1000 at fixed equal weights: its gradient is ~28,000x the "
                "digit task's on the trunk; digit accuracy ~0.18 and parity 0.51-0.70 against "
                "0.96-0.98 single-task",
                expected=(Expect("gradient-swamping", "digit"),
                          Expect("gradient-swamping", "parity"),
                          Expect("static-loss-weights", "digit"),
                          Expect("static-loss-weights", "parity")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("rlw-normal", 1), ("ink-x1000-equal", 1)),
)
