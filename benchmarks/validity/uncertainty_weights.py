"""Multi-task learning with learned uncertainty weights, after Kendall, Gal & Cipolla 2018
("Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics",
CVPR), eqs. 7 and 10: with s_i = log sigma_i^2 learned beside the network,

    L = exp(-s_cls) L_cls + 1/2 exp(-s_reg) L_reg + 1/2 (s_cls + s_reg),

classification by cross-entropy (eq. 10) and regression by squared error (eq. 7, the
Gaussian likelihood).

Published setup: semantic segmentation, instance regression and depth on Cityscapes with a
shared DeepLabV3 encoder. Here: scikit-learn's 8x8 digits, a shared trunk MLP 64->64->64
(ReLU), a classification head (10 digits) and a regression head predicting the image's ink
(its mean pixel intensity) in units 1000 times too small, so that its target is ~300 and
centred on the training mean and measured with a fixed noise (std 30 in those units, drawn
once per image), so that its squared error stays ~1e3 where the cross-entropy is ~1: the
scale mismatch and the task noise that uncertainty weighting is for.
The losses are named ``cls`` and ``reg``, the regulariser ``1/2 (s_cls + s_reg)`` is the third
loss ``log_variance``, and the learned weights are passed to ``probe.backward`` as the
tensors they are (``weights={"cls": exp(-s_cls), "reg": exp(-s_reg) / 2}``), as docs/probe.md
allows. Adam lr 1e-3 for the network and 5e-2 for the log-variances, batch 128, 1,000 steps.
(At 1e-2 Adam's second moment, which remembers the first steps' huge gradient of s_reg,
keeps s_reg near 3 after 1,000 steps, far from log 1e3, and classification reaches 0.77.)

Variants (truth by construction):
- ``learned-weights``: healthy. s_reg rises towards the log of the regression error (~5 by
  the end) and s_cls falls below 0, which scales the regression gradient down and the
  classification gradient up.
- ``equal-weights``: both weights fixed at 1, no log-variances. The regression gradient,
  hundreds of times larger, takes the shared trunk: the classification loss is swamped.
Measured without gradprobe: classification accuracy on the test split against a single-task
run of the same network and seed (cls alone, no probe), the regression error, and the ratio of
the weighted cls to the weighted reg gradient norm over the trunk's parameters (median over
every 10th step). Expected on ``equal-weights``: ``gradient-swamping`` and
``static-loss-weights`` on ``cls`` (issue 21, row "learned uncertainty weights": today
nothing, because ``reg`` is guessed to be a regulariser from its name and exempted).

Measured (seeds 0 / 1, one thread): ``learned-weights`` classification accuracy 0.969 / 0.969
against 0.973 / 0.971 single-task, trunk ratio cls/reg 0.21 / 0.17, s_reg 5.3 / 5.3;
``equal-weights`` accuracy 0.687 / 0.647 against 0.973 / 0.971 single-task, trunk ratio
0.0011 / 0.0012; regression RMSE 34-36 in both (the noise's std is 30).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split, trunk_grad_ratio
from .harness import Expect, Family, Variant

STEPS, BATCH, LR, LOG_VARIANCE_LR = 1000, 128, 1e-3, 5e-2
INK_SCALE, INK_NOISE = 1000.0, 0.03
RATIO_EVERY = 20


class TwoTaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.cls_head, self.reg_head = nn.Linear(64, 10), nn.Linear(64, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.cls_head(h), self.reg_head(h).squeeze(1)


def noisy_ink(x: torch.Tensor, mean: float, seed: int) -> torch.Tensor:
    """The regression target: the mean pixel intensity, centred on the training set's mean,
    measured with a fixed Gaussian noise (std INK_NOISE) drawn once per image."""
    noise = INK_NOISE * torch.randn(len(x), generator=torch.Generator().manual_seed(seed))
    return INK_SCALE * (x.mean(1) - mean + noise)


def single_task_accuracy(seed: int) -> float:
    """Test accuracy of the same network trained on the classification loss alone (no probe)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = TwoTaskNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
        F.cross_entropy(model(x_tr[idx])[0], y_tr[idx]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return float((model(x_te)[0].argmax(1) == y_te).float().mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    ink_mean = float(x_tr.mean())
    ink_tr, ink_te = noisy_ink(x_tr, ink_mean, 0), noisy_ink(x_te, ink_mean, 1)
    model = TwoTaskNet()
    learned = variant == "learned-weights"
    log_variance = nn.Parameter(torch.zeros(2))  # s_cls, s_reg
    groups = [{"params": model.parameters()}]
    if learned:
        groups.append({"params": [log_variance], "lr": LOG_VARIANCE_LR})
    opt = torch.optim.Adam(groups, lr=LR)
    ratios = []
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x, y = x_tr[idx], y_tr[idx]
            logits, ink_pred = model(x)
            losses = {"cls": F.cross_entropy(logits, y), "reg": F.mse_loss(ink_pred, ink_tr[idx])}
            if learned:
                weights = {"cls": torch.exp(-log_variance[0]), "reg": torch.exp(-log_variance[1]) / 2}
                losses["log_variance"] = log_variance.sum() / 2
            else:
                weights = {"cls": 1.0, "reg": 1.0}
            if step % RATIO_EVERY == 0:
                ratios.append(trunk_grad_ratio(model, losses, weights, "cls", "reg"))
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        logits, ink_pred = model(x_te)
    return {"acc_cls": float((logits.argmax(1) == y_te).float().mean()),
            "single_task_acc": single_task_accuracy(seed),
            "reg_rmse": float(F.mse_loss(ink_pred, ink_te).sqrt()),
            "trunk_ratio_cls_reg": float(torch.tensor(ratios).median()),
            "s_cls": log_variance[0].item(), "s_reg": log_variance[1].item()}


FAMILY = Family(
    name="uncertainty-weights",
    source="Kendall, Gal & Cipolla 2018 (CVPR), eqs. 7 and 10: learned log-variance loss weights",
    train=train,
    variants=(
        Variant("learned-weights", True,
                "learned log-variances scale the regression gradient down to the classification's",
                must_not=("gradient-swamping", "static-loss-weights", "inert-loss")),
        Variant("equal-weights", False,
                "weights fixed at 1: the regression gradient, hundreds of times larger, takes the trunk",
                expected=(Expect("gradient-swamping", "cls"), Expect("static-loss-weights", "cls")),
                must_not=("gradient-conflict",)),
    ),
    quick=(("equal-weights", 1),),
)
