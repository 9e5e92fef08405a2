"""Orthogonal Projection Loss (OPL), after Ranasinghe, Naseer, Hayat, Khan & Khan 2021
("Orthogonal Projection Loss", ICCV, arXiv:2103.14021, sec. 3, eq. 1-4) and the official
code kahnchana/opl: ``loss.py`` (``OrthogonalProjectionLoss.forward``, gamma 0.5) and
``classification/cifar/train.py`` (``train``: ``loss = base_loss + args.opl_ratio *
op_loss`` on the network's penultimate features, ``-opl_ratio`` 0.1; SGD lr 0.1, momentum
0.9, weight decay 5e-4, batch 128).

Published setup: beside the cross-entropy, OPL acts on the penultimate features of each
minibatch: after l2-normalisation, s is the mean cosine of the same-class pairs (the
diagonal left out, eq. 2) and d that of the different-class pairs (eq. 3); L_OPL = (1 - s)
+ gamma |d| (eq. 4) pulls each class together and makes the classes orthogonal, added with
weight 0.1 (``opl_ratio``) and gamma 0.5. ``OrthogonalProjectionLoss`` drops the absolute
value ("TODO: removed abs"); the ResNet features come after a ReLU and pooling, so d >= 0.

Here: scikit-learn's 8x8 digits (the fixed 75/25 split). Network: 64 -> 128 -> 64 ReLU MLP
(the 64 non-negative penultimate features, the width of the CIFAR ResNet-56's) and a linear
classifier; SGD lr 0.05 (0.1 is the ResNet's with batch norm; this MLP has none), momentum
0.9, weight decay 5e-4, batch 128, 900 steps. Losses ``loss_ce`` (first) and ``opl`` with
weights 1 and 0.1; the penultimate features watched as ``features`` with the batch labels.

Variants (truth by construction):
- ``opl``: healthy, as published (weight 0.1, gamma 0.5, OPL on the live features).
- ``detached-features``: the OPL computed on ``features.detach()`` (a wiring fault of a
  loss meant to shape the backbone): it reaches no parameter and trains nothing, so the
  network is exactly the cross-entropy-only one and the classes are not made orthogonal.
Every run also trains the same network (same initialisation, same batches) on the
cross-entropy alone, without the probe, as the reference. Measured on the test split
without gradprobe (seeds 0 / 1): accuracy; the class geometry of the test features (mean
same-class cosine s, mean different-class cosine d, mean |cosine| between distinct class
means; 0 is orthogonal); and (healthy) every 25 steps on the trunk the medians of the
cosine between the weighted gradients of ``loss_ce`` and ``opl`` and of their norm ratio:
  opl:               acc 0.971 / 0.971 (CE-only 0.969 / 0.971); d 0.492 / 0.531 against
                     0.633 / 0.647 for CE-only, class means 0.544 / 0.586 against 0.689 /
                     0.703, s 0.900 / 0.903; centred effective rank of the features 18.9 /
                     19.6; cos(loss_ce, opl) +0.24 / +0.14, loss_ce over opl 16.8 / 20.3;
  detached-features: acc 0.969 / 0.971, d 0.633 / 0.647, class means 0.689 / 0.703, s
                     0.916 / 0.917 (all identical to CE-only: the OPL changed nothing; the
                     classes 0.14 / 0.12 less orthogonal by d and 0.15 / 0.12 by the class
                     means than in the healthy run), rank 17.1 / 17.5.
(On 8x8 digits the cross-entropy alone already reaches 0.97, so the OPL's effect shows in
the feature geometry, not in accuracy.)
Runs (the probed network and the CE-only one) take 2.5-3 CPU-seconds.
Expected (broken): ``inert-loss`` on ``opl`` (no gradient path to any parameter from the
first step). Must not (both): ``non-finite``, ``gradient-conflict`` (healthy cosine
+0.14 to +0.24; in the broken run the OPL has no gradient), ``representation-collapse``
(the features keep a centred rank of 17-20, over C - 1 = 9); healthy also ``inert-loss``,
``gradient-swamping`` (the OPL's weighted gradient is 1/17-1/20 of the cross-entropy's by
the published weight 0.1, yet it lowers d by 0.12-0.14 below the CE-only run),
``static-loss-weights``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, weighted_backward
from ..harness import Expect, Family, Variant
from ..heldout11.dkd import trunk_grads

STEPS, BATCH, HIDDEN, FEATURES, CLASSES = 900, 128, 128, 64, 10
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
# variant: (OPL weight, gamma, features detached before the OPL)
SETTINGS = {"opl": (0.1, 0.5, False), "detached-features": (0.1, 0.5, True)}
GRAD_EVERY = 25


class OPLNet(nn.Module):
    """A digit-sized stand-in for the paper's ResNet: a two-layer ReLU trunk whose output
    (the penultimate features, non-negative as after the ResNet's ReLU and pooling) feeds a
    linear classifier."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES),
                                   nn.ReLU())
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        features = self.trunk(x)
        return features, self.fc(features)


def pair_means(features: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine of the same-class pairs (the diagonal left out) and of the
    different-class pairs of a batch: s and d of the paper's eq. 2-3."""
    f = F.normalize(features, p=2, dim=1)
    same = y[:, None] == y[None, :]
    pos = (same & ~torch.eye(len(y), dtype=torch.bool)).float()
    neg = (~same).float()
    cos = f @ f.T
    return (pos * cos).sum() / (pos.sum() + 1e-6), (neg * cos).sum() / (neg.sum() + 1e-6)


def opl_loss(features: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 4: L_OPL = (1 - s) + gamma |d|; as ``OrthogonalProjectionLoss.forward`` the
    d term enters without the absolute value (the features are non-negative, so d >= 0)."""
    s, d = pair_means(features, y)
    return (1.0 - s) + gamma * d



def fit(variant: str, seed: int, use_opl: bool, log: Path | None) -> tuple[OPLNet, dict]:
    weight, gamma, detach = SETTINGS[variant]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    model = OPLNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    order = batches(len(x_tr), BATCH, gen)
    measured = {"ce_opl_cosine": [], "ce_over_opl_grad": []}
    probe = gradprobe.Probe(model, run_file=log) if log else None
    if probe:
        probe.watch_latent("features", model.trunk, labels="y")
    with probe or contextlib.nullcontext():
        for step in range(STEPS):
            idx = next(order)
            y = y_tr[idx]
            if probe:
                probe.observe(y=y)
            features, logits = model(x_tr[idx])
            losses = {"loss_ce": F.cross_entropy(logits, y)}
            weights = {"loss_ce": 1.0}
            if use_opl:
                losses["opl"] = opl_loss(features.detach() if detach else features, y, gamma)
                weights["opl"] = weight
                if not detach and step % GRAD_EVERY == 0:
                    g = trunk_grads(model, losses, weights)
                    measured["ce_opl_cosine"].append(float(F.cosine_similarity(
                        g["loss_ce"], g["opl"], 0)))
                    measured["ce_over_opl_grad"].append(float(g["loss_ce"].norm()
                                                              / g["opl"].norm()))
            opt.zero_grad()
            weighted_backward(losses, weights, probe)
            opt.step()
    return model.eval(), {k: float(np.median(v)) for k, v in measured.items() if v}


def feature_truth(model: OPLNet, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy and the class geometry of the test features: the mean same-class and
    different-class cosines, and the mean |cosine| between distinct class means (0 for
    orthogonal classes, 1 when they share one direction)."""
    with torch.no_grad():
        features, logits = model(x)
        s, d = pair_means(features, y)
        means = F.normalize(torch.stack([features[y == c].mean(0) for c in range(CLASSES)]), dim=1)
        off = ~torch.eye(CLASSES, dtype=torch.bool)
    return {"acc": float((logits.argmax(1) == y).float().mean()), "same_class_cos": float(s),
            "other_class_cos": float(d),
            "class_mean_abs_cos": float((means @ means.T)[off].abs().mean()),
            "feature_rank": centred_effective_rank(features.numpy())}


def train(variant: str, seed: int, log: Path) -> dict:
    _, _, x_te, y_te = digits_split()
    model, grads = fit(variant, seed, True, log)
    ce_only, _ = fit(variant, seed, False, None)
    truth = feature_truth(model, x_te, y_te)
    base = feature_truth(ce_only, x_te, y_te)
    return {**truth, "ce_only_acc": base["acc"],
            "ce_only_other_class_cos": base["other_class_cos"],
            "ce_only_class_mean_abs_cos": base["class_mean_abs_cos"], **grads}


FAMILY = Family(
    name="orthogonal-projection",
    source="Ranasinghe, Naseer, Hayat, Khan & Khan 2021 (Orthogonal Projection Loss, ICCV, "
           "eq. 1-4, gamma 0.5, weight 0.1); kahnchana/opl loss.py "
           "OrthogonalProjectionLoss, classification/cifar/train.py",
    train=train,
    variants=(
        Variant("opl", True,
                "as published: cross-entropy plus 0.1 x OPL (gamma 0.5) on the penultimate "
                "features; the classes end more orthogonal than with the cross-entropy alone "
                "at the same accuracy",
                must_not=("non-finite", "gradient-conflict", "representation-collapse",
                          "inert-loss", "gradient-swamping", "static-loss-weights")),
        Variant("detached-features", False,
                "the OPL computed on detached features: it trains nothing, the network is "
                "the cross-entropy-only one and its classes are 0.12-0.15 less orthogonal "
                "than the healthy run's",
                expected=(Expect("inert-loss", "opl"),),
                must_not=("non-finite", "gradient-conflict", "representation-collapse")),
    ),
    seeds=(0, 1),
    quick=(("opl", 1), ("detached-features", 1)),
)
