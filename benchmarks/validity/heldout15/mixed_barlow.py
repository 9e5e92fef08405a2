"""Mixed Barlow Twins (Bandara, Patel, Mendiratta, Patel et al. 2023, "Guarding Barlow Twins
Against Overfitting with Mixed Samples", arXiv 2312.02151, sec. 3): the Barlow Twins loss on
the cross-correlation C of two views' standardised embeddings, sum_i (1 - C_ii)^2 +
lambda sum_{i != j} C_ij^2 (Zbontar et al. 2021), plus a mixup regulariser: a mixed input
x_m = alpha x_1 + (1 - alpha) x_2[perm], alpha ~ Beta(1, 1), whose cross-correlations with
each view, C(z_m, z_1) and C(z_m, z_2), are pulled to the ones linear mixing predicts,
alpha C(z_1, z_1) + (1 - alpha) C(z_2[perm], z_1) and alpha C(z_1, z_2) + (1 - alpha)
C(z_2[perm], z_2); the regulariser is weighted by mixup_loss_scale * lambda. Official code
wgcban/mix-bt: ``main.py`` ``train`` (``out_1_norm = (out_1 - out_1.mean(dim=0)) /
out_1.std(dim=0)``, ``on_diag``, ``off_diag`` via ``off_diagonal``, ``loss_bt = on_diag +
lmbda * off_diag``, the block "MixUp (Our Contribution)": ``index = torch.randperm``,
``alpha = np.random.beta(1.0, 1.0)``, ``cc_m_1``, ``cc_m_1_gt``, ``cc_m_2``, ``cc_m_2_gt``,
``loss_mix = args.mixup_loss_scale * lmbda * (...)``), ``model.py`` ``Model`` (projector
Linear(512, 512, no bias)-BN-ReLU-Linear(512, feature_dim), output l2-normalised), the
optimiser ``optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)``, and
``scripts-pretrain-resnet18/cifar10.sh`` (feature_dim 1024, lmbda 0.0078125,
mixup_loss_scale 4, batch 256).

Published setup: ResNet-18/50 on CIFAR-10/100, TinyImageNet, STL-10, ImageNet, 2000 epochs
on CIFAR; the mixup regulariser keeps Barlow Twins from overfitting its projector's
redundancy-reduction objective as training goes on, kNN accuracy above plain Barlow Twins.

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split; labels only for the
evaluation), ``common.DigitEncoder`` (MLP 64-128-128 with BN), the official projector shape
scaled to Linear(128, 128, no bias)-BN-ReLU-Linear(128, 128) with the output l2-normalised,
two ``common.augment`` views, batch 256, Adam lr 1e-3 weight decay 1e-6 (the code's
optimiser), 400 steps; lambda 0.0078125 and mixup_loss_scale 4 as in the CIFAR-10 script.
The loss is handed to the probe split as a user would: ``on_diag`` (first: the invariance
term), ``off_diag`` (weight lambda) and ``mixup`` (the sum of both squared differences,
weight mixup_loss_scale * lambda). The projector output is watched as ``z``.

Truth, measured without gradprobe on the digits' test split (``ssl_hsic.ssl_truth``, from
common's measures): kNN accuracy (k 20, cosine) of the backbone features (the code's
``test`` monitors kNN accuracy on the backbone feature) and of z, the backbone's
linear-probe accuracy, and the centred effective rank and normalised std of z.

Variants (truth by construction):
- ``published``: healthy, the published loss. Must not: ``representation-collapse``,
  ``gradient-swamping``, ``gradient-conflict``, ``inert-loss``, ``non-finite``,
  ``static-loss-weights``.
- ``off-diag-0``: broken. The redundancy-reduction term switched off (its weight 0), the
  mixup regulariser kept at its published weight: the invariance term alone is minimised when
  every embedding dimension carries the same augmentation-invariant feature, and the mixup
  term, a consistency of cross-correlations under linear mixing, is satisfied as well by
  such collapsed embeddings; the paper presents it as a guard added to Barlow Twins'
  redundancy reduction, not a replacement for it. Measured: dimensional collapse (the
  effective rank of z far below the published run's) and lower kNN accuracy. Expected:
  ``representation-collapse`` on ``z``; allowed: ``inert-loss`` on ``off_diag`` (weight 0:
  it trains nothing, true but incidental), ``static-loss-weights`` on the three losses.
  Must not: ``gradient-conflict``.

MEASURED (train() below, 1 torch thread), seeds 0 / 1:
- ``published``: z effective rank 21.4 / 20.5, z std 0.691 / 0.675, kNN accuracy of z
  0.887 / 0.867, backbone kNN 0.916 / 0.929, backbone linear-probe accuracy 0.953 / 0.978;
  on_diag ends at 0.18 / 0.20 of its start, off_diag and mixup about level (0.98 / 0.98,
  1.08 / 1.00).
- ``off-diag-0``: z effective rank 13.1 / 12.7 (published 21.4 / 20.5), kNN of z 0.733 /
  0.727 (published 0.887 / 0.867), backbone kNN 0.896 / 0.909 (published 0.916 / 0.929);
  z std 0.720 / 0.729 (spread, as the standardisation keeps each dimension's variance: the
  collapse is dimensional, not to a point); the backbone's linear-probe accuracy 0.962 /
  0.967 (published 0.953 / 0.978: not consistently worse, the harm is in the embedding);
  the unweighted off_diag sum grows 2.26 / 2.31 times over the run (the dimensions
  correlate), mixup 1.55 / 1.61 times.

CPU: 6-9 seconds a run (1 torch thread, on a shared 2-core machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, batches, digits_split, loss_end_over_start
from ..harness import Expect, Family, Variant
from .ssl_hsic import knn_of, ssl_truth

BATCH, STEPS, LR, WEIGHT_DECAY, DIM, HIDDEN = 256, 400, 1e-3, 1e-6, 128, 128
LAMBDA, MIXUP_SCALE = 0.0078125, 4.0


class MixBT(nn.Module):
    """The digits backbone and the official projector shape; ``forward`` returns the
    l2-normalised projections (``Model.forward``'s ``F.normalize(out, dim=-1)``)."""

    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        self.projector = nn.Sequential(nn.Linear(self.encoder.width, HIDDEN, bias=False),
                                       nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                                       nn.Linear(HIDDEN, DIM))

    def forward(self, x):
        return F.normalize(self.projector(self.encoder(x)), dim=-1)


def standardise(out: torch.Tensor) -> torch.Tensor:
    return (out - out.mean(dim=0)) / out.std(dim=0)


def mixed_barlow_terms(model: MixBT, x1: torch.Tensor, x2: torch.Tensor, alpha: float,
                       index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``main.py`` ``train``'s three terms: on-diagonal, off-diagonal (unweighted) and the
    mixup regulariser (unweighted: its weight is mixup_loss_scale * lambda)."""
    n = x1.shape[0]
    z1, z2 = standardise(model(x1)), standardise(model(x2))
    c = z1.T @ z2 / n
    diagonal = torch.diagonal(c)
    on_diag = (diagonal - 1).pow(2).sum()
    off_diag = (c - torch.diag(diagonal)).pow(2).sum()
    zm = standardise(model(alpha * x1 + (1 - alpha) * x2[index]))
    cc_m_1 = zm.T @ z1 / n
    cc_m_1_gt = alpha * (z1.T @ z1) / n + (1 - alpha) * (z2[index].T @ z1) / n
    cc_m_2 = zm.T @ z2 / n
    cc_m_2_gt = alpha * (z1.T @ z2) / n + (1 - alpha) * (z2[index].T @ z2) / n
    mixup = (cc_m_1 - cc_m_1_gt).pow(2).sum() + (cc_m_2 - cc_m_2_gt).pow(2).sum()
    return on_diag, off_diag, mixup


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_tr, _, _, _ = digits_split()
    model = MixBT()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    weights = {"off_diag": 0.0 if variant == "off-diag-0" else LAMBDA,
               "mixup": MIXUP_SCALE * LAMBDA}
    series: dict[str, list[float]] = {}
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z", model.projector)
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x1, x2 = augment(x_tr[idx], gen), augment(x_tr[idx], gen)
            index = torch.randperm(BATCH, generator=gen)
            alpha = float(rng.beta(1.0, 1.0))
            on_diag, off_diag, mixup = mixed_barlow_terms(model, x1, x2, alpha, index)
            losses = {"on_diag": on_diag, "off_diag": off_diag, "mixup": mixup}
            if step % 10 == 0 or step == STEPS - 1:
                for name, loss in losses.items():
                    series.setdefault(f"{name}_loss", []).append(float(loss.detach()))
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
            if step % 100 == 99:
                probe.log(knn_acc=knn_of(model.encoder))
                model.train()
    truth = ssl_truth(model.encoder, model.projector)
    return {k: float(v) for k, v in truth.items()} | loss_end_over_start(series)


FAMILY = Family(
    name="mixed-barlow-twins",
    source="Bandara, Patel et al. 2023 (Guarding Barlow Twins Against Overfitting with Mixed "
           "Samples, arXiv 2312.02151, sec. 3: Barlow Twins plus a mixup regulariser on the "
           "cross-correlation, lambda 0.0078125, mixup_loss_scale 4); wgcban/mix-bt main.py "
           "train, model.py Model, scripts-pretrain-resnet18/cifar10.sh",
    train=train,
    variants=(
        Variant("published", True,
                "Mixed Barlow Twins as published: high kNN accuracy, z of high effective "
                "rank (measured)",
                must_not=("representation-collapse", "gradient-swamping", "gradient-conflict",
                          "inert-loss", "non-finite", "static-loss-weights")),
        Variant("off-diag-0", False,
                "the off-diagonal (redundancy-reduction) term's weight 0, the mixup "
                "regulariser kept: the embedding dimensions collapse onto a few features "
                "(effective rank of z far below the published run's, kNN accuracy of z "
                "lower; measured)",
                expected=(Expect("representation-collapse", "z"),),
                allowed=(Expect("inert-loss", "off_diag"),
                         Expect("static-loss-weights", "on_diag"),
                         Expect("static-loss-weights", "off_diag"),
                         Expect("static-loss-weights", "mixup")),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("off-diag-0", 1)),
)
