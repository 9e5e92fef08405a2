"""Domain-adversarial training (DANN), after fungtion/DANN (models/model.py, train/main.py,
functions.py) and Ganin & Lempitsky 2015 ("Unsupervised Domain Adaptation by
Backpropagation", ICML).

Published setup: MNIST (labelled source) -> MNIST-M (unlabelled target: digits blended with
colour patches, |patch - digit|). A feature extractor (conv 5x5 x64, BN, max-pool, ReLU,
conv 5x5 x50, BN, channel dropout, max-pool, ReLU), a class classifier (fc-BN-ReLU-dropout,
fc-BN-ReLU, fc, log-softmax) on the features, and a domain classifier (fc-BN-ReLU, fc 2,
log-softmax) behind a gradient reversal layer of coefficient
alpha = 2 / (1 + exp(-10 p)) - 1 (p: training progress 0 -> 1). Losses err_s_label,
err_s_domain, err_t_domain (NLL), summed with weight 1; Adam lr 1e-3, batch 128.

Here: scikit-learn digits (half of the training split) as the source; the other half,
blended with random smooth background fields as |background - digit| (MNIST-M's
construction), as the target; convs 3x3 (8x8 images) with 32 and 48 channels; the same
heads, losses, schedule and optimiser; 600 steps. Measured: the healthy run's target accuracy
is 6-10 points above a run whose domain losses do not reach the features. Losses named as in fungtion/DANN:
``label``, ``s_domain``, ``t_domain``.

Variants (truth by construction):
- ``healthy``: the published method.
- ``detached-domain-head``: the domain classifier reads ``feature.detach()``: the domain
  losses train their head but never reach the feature extractor, so nothing aligns the
  domains. Expected: ``inert-loss`` on ``s_domain`` and ``t_domain`` (no path to the
  parameters the task uses).
- ``alpha-zero``: the reversal coefficient stays 0 (a schedule bug): the domain gradient
  reaching the features is multiplied by -0, exactly zero. Expected: ``inert-loss`` on
  ``s_domain`` and ``t_domain`` (zero gradient on the shared features).
Both broken variants train exactly alike (no domain gradient reaches the features in either)
and are checked by the target accuracy (``acc_target``). Must not (all variants):
``gradient-conflict`` and ``static-loss-weights`` (the adversary opposes the features by
design), ``gradient-swamping``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.demo.decoupling import GradReverse

from .common import batches, digits_split
from .harness import Expect, Family, Variant

STEPS, BATCH, LR = 600, 128, 1e-3
FEATURES = 48 * 2 * 2


class DANN(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.Dropout2d(), nn.MaxPool2d(2),
            nn.ReLU(), nn.Flatten())
        self.class_classifier = nn.Sequential(
            nn.Linear(FEATURES, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Dropout(),
            nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 10),
            nn.LogSoftmax(dim=1))
        self.domain_classifier = nn.Sequential(
            nn.Linear(FEATURES, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 2),
            nn.LogSoftmax(dim=1))

    def forward(self, x, alpha: float, detach_domain: bool = False):
        feature = self.feature(x.view(-1, 1, 8, 8))
        domain_in = feature.detach() if detach_domain else GradReverse.apply(feature, alpha)
        return self.class_classifier(feature), self.domain_classifier(domain_in)


def blend(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-M's construction at 8x8: |background - digit| with a random smooth background
    (3x3 noise, uniform in [0, 0.6], upsampled bilinearly) per image. (A background up to 1
    leaves too little of an 8x8 digit for any method: target accuracy ~0.2.)"""
    coarse = 0.6 * torch.rand(len(x), 1, 3, 3, generator=gen)
    background = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    return (background.view(len(x), 64) - x).abs()


def domains():
    x_tr, y_tr, x_te, y_te = digits_split()
    half = len(x_tr) // 2
    gen = torch.Generator().manual_seed(77)
    return (x_tr[:half], y_tr[:half], blend(x_tr[half:], gen), x_te, y_te, blend(x_te, gen))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    src_x, src_y, tgt_x, test_src, test_y, test_tgt = domains()
    model = DANN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    src_batches, tgt_batches = batches(len(src_x), BATCH, gen), batches(len(tgt_x), BATCH, gen)
    with probe:
        for step in range(STEPS):
            p = step / STEPS
            alpha = 0.0 if variant == "alpha-zero" else 2.0 / (1.0 + math.exp(-10 * p)) - 1
            detach = variant == "detached-domain-head"
            s_idx, t_idx = next(src_batches), next(tgt_batches)
            class_out, s_domain_out = model(src_x[s_idx], alpha, detach)
            _, t_domain_out = model(tgt_x[t_idx], alpha, detach)
            losses = {"label": F.nll_loss(class_out, src_y[s_idx]),
                      "s_domain": F.nll_loss(s_domain_out, torch.zeros(BATCH, dtype=torch.long)),
                      "t_domain": F.nll_loss(t_domain_out, torch.ones(BATCH, dtype=torch.long))}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        acc_src = float((model(test_src, 0.0)[0].argmax(1) == test_y).float().mean())
        acc_tgt = float((model(test_tgt, 0.0)[0].argmax(1) == test_y).float().mean())
    return {"acc_source": acc_src, "acc_target": acc_tgt}


_MUST_NOT = ("gradient-conflict", "static-loss-weights", "gradient-swamping")
_DOMAIN_INERT = (Expect("inert-loss", "s_domain"), Expect("inert-loss", "t_domain"))

FAMILY = Family(
    name="dann",
    source="fungtion/DANN (models/model.py, train/main.py); Ganin & Lempitsky 2015",
    train=train,
    variants=(
        Variant("healthy", True, "the published method (gradient reversal, alpha schedule)",
                must_not=_MUST_NOT + ("inert-loss",)),
        Variant("detached-domain-head", False,
                "the domain classifier reads feature.detach(): the domain losses never reach "
                "the feature extractor", expected=_DOMAIN_INERT, must_not=_MUST_NOT),
        Variant("alpha-zero", False,
                "reversal coefficient stuck at 0: the domain gradient reaching the features is "
                "exactly zero", expected=_DOMAIN_INERT, must_not=_MUST_NOT),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("healthy", 1), ("detached-domain-head", 1), ("alpha-zero", 1)),
)
