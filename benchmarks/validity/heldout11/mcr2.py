"""Maximal Coding Rate Reduction (MCR^2), after Yu, Chan, You, Song & Ma 2020 ("Learning
Diverse and Discriminative Representations via the Principle of Maximal Coding Rate
Reduction", NeurIPS; sec. 2, eq. 11: maximise Delta R(Z, Pi, eps) = R(Z, eps) - R_c(Z, eps | Pi)
over l2-normalised features Z, R(Z, eps) = 1/2 logdet(I + d / (m eps^2) Z Z^T) the coding
rate of all features, R_c = sum_j tr(Pi_j) / (2m) logdet(I + d / (tr(Pi_j) eps^2) Z Pi_j Z^T)
the rates of the classes), in the official code Ma-Lab-Berkeley/MCR2 (= ryanchankh/mcr2)
``loss.py`` ``MaximalCodingRateReduction`` (``compute_discrimn_loss_empirical``,
``compute_compress_loss_empirical``, total ``gam2 * -discrimn_loss_empi + compress_loss_empi``;
the scalar is d / (m eps), eps 0.5 in ``train_sup.py``, gam1 = gam2 = 1) and ``train_sup.py``
(features of the network's last layer normalised to the unit sphere, batch 1,000, SGD).

Published setup: ResNet-18 on CIFAR-10, feature dimension 128, eps 0.5, batch 1,000;
evaluation by nearest subspace and by the features' class subspaces (each class on a
low-dimensional subspace, the subspaces spanning the feature space).

Here: scikit-learn's 8x8 digits (10 classes, 1,347 training images); MLP 64 -> 128 -> 128
(batch norm, ReLU) -> 32, features l2-normalised; batch 256, Adam lr 1e-3, 1,000 steps, eps
0.5. The two terms are passed as two losses with the code's names: ``discrimn_loss`` is
-R(Z) (the expansion, maximised, so its negative is minimised) and ``compress_loss`` is
R_c(Z | Pi) (the compression, minimised). The normalised features are watched (``Z``) with
the batch's labels, as docs/probe.md says for a supervised latent.

Variants (truth by construction):
- ``published``: healthy, gam2 = 1: the classes spread on distinct subspaces.
- ``expansion-off``: broken. The expansion weighted 0.01 (gam2 ~ 0): the compression alone
  shrinks every class and nothing keeps the classes apart, so the features collapse
  towards one direction and the classes are no longer separable.
Measured on the test split, independently of gradprobe (seeds 0 and 1): centred effective
rank of the features (numpy), the mean effective rank of a class's features, normalised
std, total variance, linear-probe accuracy on the features, and Delta R (eq. 11) on the test
features:
  published:     effective rank 31.2 and 31.2 of 32, class rank 10.9 and 10.7, normalised std
                 0.981 and 0.981, total variance 0.964 and 0.964, accuracy 0.987 and 0.987,
                 Delta R 11.31 and 11.39;
  expansion-off: effective rank 21.1 and 21.8 (of a residual spread), class rank 23.6 and
                 23.7, normalised std 0.024 and 0.024, total variance 0.0007 and 0.0007,
                 accuracy 0.869 and 0.896, Delta R 0.018 and 0.016.
The features of ``expansion-off`` collapse to one point of the sphere (the spread falls
1,400-fold), the class subspaces are no longer distinct (each class fills the residual
noise), and 9-12% of the test digits are lost. A run takes ~9-12 CPU-seconds.
(At expansion weight 0 the collapse is the same: normalised std 0.015, accuracy 0.851,
seed 0.)
Expected on ``expansion-off``: ``representation-collapse`` on ``Z``. Allowed:
``gradient-swamping`` and ``static-loss-weights`` on ``discrimn_loss`` (its fixed weight 0.01
lets the compression take over). Must not (both): ``inert-loss``; on ``published`` also
``representation-collapse``, ``gradient-conflict`` (the two terms trade off by design),
``gradient-swamping``, ``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, linear_probe_accuracy, normalised_std
from ..harness import Expect, Family, Variant

FEATURES, HIDDEN, CLASSES = 32, 128, 10
STEPS, BATCH, LR, EPS = 1000, 256, 1e-3, 0.5
EXPANSION_WEIGHT = {"published": 1.0, "expansion-off": 0.01}


def coding_rate(w: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """logdet(I + d / (count eps) W W^T) of features W (d x n), the code's empirical rate."""
    d = w.shape[0]
    return torch.logdet(torch.eye(d) + d / (count * EPS) * w @ w.T)


def discrimn_loss(z: torch.Tensor) -> torch.Tensor:
    """R(Z): half the rate of all features."""
    return coding_rate(z.T, len(z)) / 2


def compress_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R_c(Z | Pi): each class's rate, weighted by its share of the batch, halved."""
    total = z.new_zeros(())
    for label in y.unique():
        members = z[y == label]
        total = total + coding_rate(members.T, len(members)) * len(members) / len(z)
    return total / 2


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = nn.Sequential(
        nn.Linear(64, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("Z", labels="y")
    with probe:
        for _ in range(STEPS):
            idx = next(order)
            y = y_tr[idx]
            z = F.normalize(model(x_tr[idx]), dim=1)
            probe.observe(Z=z, y=y)
            losses = {"discrimn_loss": -discrimn_loss(z), "compress_loss": compress_loss(z, y)}
            opt.zero_grad()
            probe.backward(losses, weights={"discrimn_loss": EXPANSION_WEIGHT[variant]})
            opt.step()
    model.eval()
    with torch.no_grad():
        z_tr = F.normalize(model(x_tr), dim=1)
        z_te = F.normalize(model(x_te), dim=1)
        rate_reduction = float(discrimn_loss(z_te) - compress_loss(z_te, y_te))
    f_te = z_te.numpy()
    class_ranks = [centred_effective_rank(f_te[y_te.numpy() == c]) for c in range(CLASSES)]
    return {"effective_rank": centred_effective_rank(f_te), "class_rank_mean": float(np.mean(class_ranks)),
            "normalised_std": normalised_std(f_te), "total_variance": float(f_te.var(0).sum()),
            "linear_acc": linear_probe_accuracy(z_tr.numpy(), y_tr.numpy(), f_te, y_te.numpy()),
            "rate_reduction": rate_reduction}


FAMILY = Family(
    name="mcr2",
    source="Yu, Chan, You, Song & Ma 2020 (MCR^2, NeurIPS) sec. 2 eq. 11; Ma-Lab-Berkeley/MCR2 "
           "loss.py MaximalCodingRateReduction, train_sup.py (eps 0.5)",
    train=train,
    variants=(
        Variant("published", True,
                "expansion and compression at equal weight: the classes lie on distinct "
                "subspaces that together span the feature space",
                must_not=("representation-collapse", "inert-loss", "gradient-conflict",
                          "gradient-swamping", "static-loss-weights")),
        Variant("expansion-off", False,
                "expansion weighted 0.01: the compression shrinks every class and nothing keeps "
                "the classes apart, the features collapse and the classes overlap",
                expected=(Expect("representation-collapse", "Z"),),
                allowed=(Expect("gradient-swamping", "discrimn_loss"),
                         Expect("static-loss-weights", "discrimn_loss")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("expansion-off", 0)),
)
