"""Alignment and uniformity on the hypersphere, after Wang & Isola 2020 ("Understanding
Contrastive Representation Learning through Alignment and Uniformity on the Hypersphere",
ICML, sec. 4.1 eq. 4-5: L_align = E ||f(x) - f(y)||^alpha over positive pairs, L_uniform =
log E exp(-t ||f(x) - f(y)||^2) over all pairs, f on the unit sphere; sec. 5 trains with
their weighted sum, alpha 2, t 2) and the official SsnL/align_uniform
(``align_uniform/__init__.py``: ``align_loss(x, y, alpha=2)`` and ``uniform_loss(x, t=2)``
by ``torch.pdist``; ``examples/stl10/main.py``: ``loss = align_loss_val * align_w +
unif_loss_val * unif_w`` with ``unif_loss_val`` the mean of both views' uniformity,
align_w = unif_w = 1, SGD lr 0.12 per 256 of batch, momentum 0.9, weight decay 1e-4, batch
768; ``examples/stl10/encoder.py``: SmallAlexNet ending in an ``L2Norm`` of a 128-d
feature).

Published setup: STL-10 (train + unlabeled, 64x64 crops, SimCLR-style augmentations),
SmallAlexNet, 200 epochs, lr decayed x0.1 at epochs 155, 170, 185.

Here (CPU): scikit-learn's 8x8 digits (``common.digits_split``), two views of each digit by
``common.augment``, ``common.DigitEncoder`` (width 128) under ``nn.Linear(128, 32)`` and an
l2 normalisation (a 32-d unit embedding), batch 256, SGD lr 0.12 (0.12 x 256 / 256, as
main.py scales it), momentum 0.9, weight decay 1e-4, 300 steps without decay. The two terms
are passed to the probe as two losses named after the repository's functions,
``align_loss`` and ``uniform_loss``, with ``align_w`` and ``unif_w`` as their weights.
Watched as docs/probe.md says: the unit embedding ``embedding`` (what both losses read) as
a latent.

Variants (truth by construction):
- ``published``: healthy, align_w = unif_w = 1.
- ``no-uniformity``: unif_w = 0 (the term still computed and passed, with weight 0). Only
  alignment is trained, and it is minimised by mapping every input to one point of the
  sphere (the paper's sec. 4: alignment alone admits the constant encoder).
Measured on the test split without gradprobe (seeds 0 / 1): the uniformity (``uniform_loss``
of the test embeddings: log 1 = 0 for one point, lower is more uniform), the alignment
(``align_loss`` of two augmented views of each test digit), kNN accuracy (k 20, cosine,
``common.knn_accuracy``), centred effective rank (of 32), normalised std x sqrt(d) and total
variance of the test embeddings:
  published:     uniformity -3.06 / -3.15, alignment 0.72 / 0.69, kNN 0.951 / 0.951, rank
                 22.3 / 22.9, normalised std 0.96 / 0.98, total variance 0.95 / 0.98;
  no-uniformity: uniformity -0.0018 / -0.0020, alignment 0.0007 / 0.0007, kNN 0.844 /
                 0.853, rank 28.4 / 28.7, normalised std 0.021 / 0.022, total variance
                 0.00046 / 0.00049 (every digit on one point of the sphere, 2000x less
                 spread; what is left of the spread is isotropic, hence the high centred
                 rank, and still carries some class neighbourhoods, hence kNN above chance).
About 3 CPU-seconds a run.
Expected on ``no-uniformity``: ``representation-collapse`` on ``embedding`` (complete: the
unit embedding collapses to a point). Allowed there: ``gradient-conflict`` on
``align_loss|uniform_loss`` (alignment's descent is what drives the unweighted uniformity
to 0: true, but the cause is the weight 0, not a conflict to balance). Must not
(both): ``gradient-swamping``, ``static-loss-weights`` (a weight of 0 is switched off, not
static), ``inert-loss``, ``non-finite``; on the healthy variant also
``representation-collapse`` and ``gradient-conflict`` (the two terms of one objective at
their designed balance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, DIM = 300, 256, 32
LR, MOMENTUM, WEIGHT_DECAY = 0.12 * BATCH / 256, 0.9, 1e-4
ALPHA, T = 2, 2
UNIF_W = {"published": 1.0, "no-uniformity": 0.0}


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        self.fc = nn.Linear(self.backbone.width, DIM)

    def forward(self, x):
        return F.normalize(self.fc(self.backbone(x)), dim=1)


def align_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x: torch.Tensor, t: float = T) -> torch.Tensor:
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    encoder = Encoder()
    opt = torch.optim.SGD(encoder.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(encoder, run_file=log)
    probe.watch_latent("embedding")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x, y = encoder(torch.cat([augment(x_tr[idx], gen), augment(x_tr[idx], gen)])).chunk(2)
            probe.observe(embedding=x)
            probe.backward({"align_loss": align_loss(x, y),
                            "uniform_loss": (uniform_loss(x) + uniform_loss(y)) / 2},
                           weights={"align_loss": 1.0, "uniform_loss": UNIF_W[variant]})
            opt.step()
            opt.zero_grad()
    encoder.eval()
    with torch.no_grad():
        z_tr, z_te = encoder(x_tr), encoder(x_te)
        g = torch.Generator().manual_seed(1000 + seed)
        pairs = encoder(augment(x_te, g)), encoder(augment(x_te, g))
    return {"uniformity": float(uniform_loss(z_te)), "alignment": float(align_loss(*pairs)),
            "knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(), y_te.numpy()),
            "z_rank": centred_effective_rank(z_te.numpy()), "z_dim": DIM,
            "z_std": normalised_std(z_te.numpy()),
            "z_total_var": float(np.var(z_te.numpy(), axis=0).sum())}


_MUST_NOT = ("gradient-swamping", "static-loss-weights", "inert-loss", "non-finite")

FAMILY = Family(
    name="align-uniform",
    source="Wang & Isola 2020 (ICML), sec. 4.1 eq. 4-5; SsnL/align_uniform "
           "align_uniform/__init__.py, examples/stl10/main.py (align_w = unif_w = 1, alpha 2, t 2)",
    train=train,
    variants=(
        Variant("published", True,
                "alignment and uniformity at weights 1 and 1, as published: the two terms of one "
                "objective at their designed balance, the embedding spread over the sphere",
                must_not=_MUST_NOT + ("representation-collapse", "gradient-conflict")),
        Variant("no-uniformity", False,
                "uniformity weight 0: alignment alone is minimised by one point for every input",
                expected=(Expect("representation-collapse", "embedding"),),
                allowed=(Expect("gradient-conflict", "align_loss|uniform_loss"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("no-uniformity", 0)),
)
