"""IMTL-L, learned loss scales, on two digit tasks of very different loss scales, after Liu
et al. 2021 ("Towards Impartial Multi-task Learning", ICLR, sec. 3.2, the loss-balance part
IMTL-L; the paper itself was not read here, its loss is taken from the implementation) as
implemented in median-research-group/LibMTL (LibMTL/weighting/IMTL.py, read with the
read_file tool: ``losses = self.loss_scale.exp()*losses - self.loss_scale`` with
``loss_scale`` a zero-initialised tensor of one entry per task that requires grad).

Published method: one learned scale s_t per task, started at 0, and

    L = sum_t e^{s_t} L_t - s_t

whose minimum over s_t is at e^{s_t} L_t = 1: every task's scaled loss is brought to 1.
(LibMTL's IMTL then also balances the gradients' directions, IMTL-G, on top of the scaled
losses; only IMTL-L is ported here, the part that balances scales.)

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``), a shared trunk
64-128-ReLU-128-ReLU with a linear head per task: ``digit``, the 10-class label
(cross-entropy, ~2.3 at the start), and ``asymmetry``, the ink of the top four rows minus
the ink of the bottom four in grey levels (squared error; the target's variance is ~3,100,
so ~3e3 at the start: a regression on a ~1,000x larger scale; another pairing than the
digit + total-ink pair of ``common.DigitInkNet``). Adam lr 1e-3, batch 64, 40 epochs of 21
steps (840 steps). The s's are an ``nn.Parameter`` of two entries with their own Adam
learning rate, 0.2 (a deviation: LibMTL trains them with the network's optimiser; at
1e-3 they move by at most ~0.8 in 840 steps while the asymmetry loss needs s ~ -8; at 0.05,
measured seeds 0 / 1: digit accuracy 0.762 / 0.744, s_asymmetry -2.4 at the end, the
weighting too slow to protect the trunk; at 0.5: digit 0.969 / 0.978, asymmetry MSE
275 / 225). The weights e^{s_t} are passed to ``probe.backward`` as the tensors they are and
the regulariser -sum_t s_t as the third loss ``regulariser`` (docs/probe.md, "Loss weights
given as tensors").

Truth, measured without gradprobe on the test split: digit accuracy and the asymmetry's
squared error against the same network trained on that task alone for the same steps and
seed (``single_*``); ``trunk_grad_ratio``, the median over the run of the digit loss's
weighted gradient norm over the asymmetry loss's on the whole trunk (every 20 steps); the
learned s's at the end.

Variants (truth by construction):
- ``imtl-l``: healthy, as published. s_asymmetry falls to ~-4.4 and s_digit rises to
  ~2.6 (the digit loss falls towards 0 on the training split, so its scale keeps rising).
  Measured, seeds 0 / 1: digit accuracy 0.960 / 0.949 against 0.976 / 0.973 single-task;
  asymmetry MSE 6.3 / 5.2 against 0.24 / 0.24 single-task (R^2 0.998 against 0.9999: the
  regression is still fitted, less tightly, as the digit now leads the trunk);
  trunk_grad_ratio 2.1 / 3.3.
  Must not: ``gradient-swamping``, ``static-loss-weights``, ``gradient-conflict``.
- ``equal-weights``: both weights fixed at 1, no s's, no regulariser. The asymmetry
  regression's gradient takes the shared trunk. Measured, seeds 0 / 1: digit accuracy
  0.424 / 0.376 against 0.976 / 0.973 single-task; asymmetry MSE 0.25 / 0.28 (single-task
  0.24 / 0.24); trunk_grad_ratio 0.026 / 0.031.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``digit``. Must not:
  ``gradient-conflict``.

One run (the variant and its two single-task references) takes 5-9 CPU-seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import INK_SCALE, digits_split
from ..harness import Expect, Family, Variant
from ..heldout3.auto_weighted_mtl import LearnedLossWeights, fit_two_digit_tasks

# Trained by auto_weighted_mtl's loop (the same epochs, batch and learning rate).
WIDTH = 128
SCALE_LR = 0.2


class DigitAsymmetryNet(nn.Module):
    """A shared two-layer trunk with a digit-class head and a scalar regression head."""

    def __init__(self, width: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU())
        self.digit_head, self.asymmetry_head = nn.Linear(width, 10), nn.Linear(width, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.digit_head(h), self.asymmetry_head(h).squeeze(1)


def asymmetry(x: torch.Tensor) -> torch.Tensor:
    """Ink of the top four rows minus ink of the bottom four, in grey levels."""
    rows = x.view(-1, 8, 8).sum(2) * INK_SCALE
    return rows[:, :4].sum(1) - rows[:, 4:].sum(1)


def asymmetry_loss(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (pred - asymmetry(x)).pow(2).mean()


def evaluate(model: DigitAsymmetryNet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits, pred = model(x)
    model.train()
    return float((logits.argmax(1) == y).float().mean()), float(asymmetry_loss(pred, x))


# IMTL-L: weights e^s, regulariser -sum s, s started at 0.
LEARNED_SCALES = LearnedLossWeights(
    torch.zeros(2), SCALE_LR, lambda s: {"digit": s[0].exp(), "asymmetry": s[1].exp()},
    lambda s: -s.sum())


def fit(variant: str, seed: int, log: Path | None):
    """Train on ``variant`` (also "digit-only" / "asymmetry-only", the single-task references)."""
    return fit_two_digit_tasks(
        lambda: DigitAsymmetryNet(WIDTH),
        lambda out, x, y: {"digit": F.cross_entropy(out[0], y),
                           "asymmetry": asymmetry_loss(out[1], x)},
        variant, seed, log, LEARNED_SCALES, variant == "imtl-l")


def train(variant: str, seed: int, log: Path) -> dict:
    _, _, x_te, y_te = digits_split()
    model, ratios, scales = fit(variant, seed, log)
    acc, mse = evaluate(model, x_te, y_te)
    single_acc, _ = evaluate(fit("digit-only", seed, None)[0], x_te, y_te)
    _, single_mse = evaluate(fit("asymmetry-only", seed, None)[0], x_te, y_te)
    return {"digit_acc": acc, "single_digit_acc": single_acc, "asymmetry_mse": mse,
            "single_asymmetry_mse": single_mse, "trunk_grad_ratio": float(np.median(ratios)),
            "s_digit": float(scales[0]), "s_asymmetry": float(scales[1])}


FAMILY = Family(
    name="imtl-l",
    source="Liu et al. 2021 (ICLR), IMTL-L learned loss scales e^s L - s; "
           "median-research-group/LibMTL LibMTL/weighting/IMTL.py",
    train=train,
    variants=(
        Variant("imtl-l", True, "learned scales e^s with the -s regulariser bring the "
                "asymmetry loss to the classifier's scale: digit accuracy within 0.03 of "
                "single-task, the asymmetry regression at R^2 0.998 (measured)",
                must_not=("gradient-swamping", "static-loss-weights", "gradient-conflict")),
        Variant("equal-weights", False, "equal fixed weights: the asymmetry regression in "
                "grey levels squared swamps the classifier's gradient on the trunk, digit "
                "accuracy falls ~0.55 below single-task (measured)",
                expected=(Expect("gradient-swamping", "digit"),
                          Expect("static-loss-weights", "digit")),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1),
    quick=(("equal-weights", 1), ("imtl-l", 1)),
)
