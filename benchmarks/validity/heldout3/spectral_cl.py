"""Spectral contrastive learning, after HaoChen, Wei, Gaidon & Ma 2021 ("Provable Guarantees
for Self-Supervised Deep Learning with Spectral Contrastive Loss", NeurIPS, eq. 5), as
implemented by jhaochenz96/spectral_contrastive_learning (``models/spectral.py`` ``D``, the
backbone head of ``models/backbones/cifar_resnet_1_mlp_norelu.py``, the setup of
``configs/spectral_resnet_mlp1000_norelu_cifar10_lr003_mu1.yaml``).

Published objective: L(f) = -2 E[f(x)^T f(x+)] + E[(f(x)^T f(x'))^2] over positive pairs
(two augmentations of one image) and independent pairs. ``D`` computes it on a batch of
embeddings z_1, z_2 of two views, each row first clipped to norm at most sqrt(mu):
  part1 = -2 mean_i(z_1[i] . z_2[i])                               (attraction)
  part2 = mean over i != j of (z_1[i] . z_2[j])^2                  (repulsion)
both divided by mu, and returns them apart as ``part1`` and ``part2``. mu = 1; the embedding
is the ResNet's 2048 (BN, ReLU) -> 1000 (BN, no ReLU) head; SGD lr 0.03, momentum 0.9, weight
decay 5e-4, batch 512, 800 epochs on CIFAR-10.

Here (CPU): scikit-learn's digits (``common.digits_split``) with the corpus's augmentations
(``common.augment``); backbone ``common.DigitEncoder`` (width 128), head 128-256 (BN,
ReLU)-64 (BN, no ReLU), mu = 1; batch 256, Adam lr 1e-3, 1200 steps (at 500 steps, with
Adam or with the published SGD, the ``no-repulsion`` run had only begun to collapse: total
variance 0.64 / 0.29 and 0.64 / 0.23 on seeds 0 / 1). The objective is split into its two
terms, passed as two losses ``attraction`` (part1) and ``repulsion`` (part2), as a user
splitting one objective for diagnosis would, and the clipped embedding z_1 (what the loss
reads) is watched as the latent ``z``.

Truth, measured on the test split without gradprobe: the normalised std of z
(``common.normalised_std``), its total variance (summed per-dimension variance), its centred
effective rank (``common.centred_effective_rank``, of 64) and kNN accuracy (k = 20,
``common.knn_accuracy``) of the backbone features and of z.

Variants (truth by construction):
- ``published``: healthy, both terms at weight 1.
- ``no-repulsion``: the repulsion term still computed and passed with weight 0. The
  attraction term alone is maximised by one vector of norm sqrt(mu) for every image: nothing
  keeps two images apart.
Measured (seeds 0 / 1, one thread, 14-22 CPU-seconds a run):
  published:    normalised std of z 0.868 / 0.866, total variance 0.787 / 0.786, rank 9.8 /
                9.3 of 64 (the spectral solution: about one direction per digit class), kNN
                of the backbone 0.927 / 0.927 and of z 0.893 / 0.882.
  no-repulsion: normalised std 0.047 / 0.020, total variance 0.0030 / 0.0005 (0.4% / 0.06%
                of the published run's), rank 16.3 / 22.1 (of what little spread is left),
                kNN of the backbone 0.898 / 0.904 and of z 0.771 / 0.684.
Expected on ``no-repulsion``: ``representation-collapse`` on ``z`` (every embedding turns to
one vector). Must not: ``gradient-swamping``, ``static-loss-weights`` (a weight of 0 is
switched off, not static), ``inert-loss``; on the healthy variant also ``gradient-conflict``
(the two terms pull against each other by design) and ``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, centred_effective_rank, digits_split, normalised_std
from ..harness import Expect, Family, Variant
from .vibcreg import train_two_views

STEPS, BATCH, LR, DIM, MU = 1200, 256, 1e-3, 64, 1.0
WEIGHTS = {"published": {"attraction": 1.0, "repulsion": 1.0},
           "no-repulsion": {"attraction": 1.0, "repulsion": 0.0}}


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        w = self.backbone.width
        self.head = nn.Sequential(nn.Linear(w, 2 * w), nn.BatchNorm1d(2 * w), nn.ReLU(),
                                  nn.Linear(2 * w, DIM), nn.BatchNorm1d(DIM))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return clip_norm(self.head(features))

    def forward(self, x):
        return self.embed(self.backbone(x))


def clip_norm(z: torch.Tensor) -> torch.Tensor:
    """``D``'s first step: rows longer than sqrt(mu) scaled back to norm sqrt(mu)."""
    inside = (z.norm(dim=1) < math.sqrt(MU)).float()[:, None]
    return inside * z + (1 - inside) * F.normalize(z, dim=1) * math.sqrt(MU)


def spectral_terms(z_1: torch.Tensor, z_2: torch.Tensor) -> dict[str, torch.Tensor]:
    """``D``'s part1 and part2 (both over mu), on already clipped embeddings."""
    n = z_1.shape[0]
    square = (z_1 @ z_2.t()).pow(2)
    off_diagonal = square - torch.diag(square.diagonal())
    return {"attraction": -2 * (z_1 * z_2).sum(1).mean() / MU,
            "repulsion": off_diagonal.mean() * n / (n - 1) / MU}


def embedding_truth(z: torch.Tensor) -> dict:
    z = z.double().numpy()
    return {"z_norm_std": normalised_std(z), "z_total_var": float(z.var(0).sum()),
            "z_rank": centred_effective_rank(z)}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = digits_split()
    model = Embedder()
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    z_te, knn = train_two_views(model, probe, spectral_terms, WEIGHTS[variant], gen, split,
                                STEPS, BATCH, LR)
    return embedding_truth(z_te) | knn


_MUST_NOT = ("gradient-swamping", "static-loss-weights", "inert-loss")

FAMILY = Family(
    name="spectral-cl",
    source="HaoChen et al. 2021, spectral contrastive loss (NeurIPS, eq. 5); "
           "jhaochenz96/spectral_contrastive_learning models/spectral.py D, mu 1",
    train=train,
    variants=(
        Variant("published", True, "attraction and repulsion at weight 1, as published",
                must_not=_MUST_NOT + ("gradient-conflict", "representation-collapse")),
        Variant("no-repulsion", False,
                "repulsion weight 0: the attraction term alone is maximised by one vector for "
                "every image, nothing keeps two images apart: the embeddings collapse to a point",
                expected=(Expect("representation-collapse", "z"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-repulsion", 1)),
)
