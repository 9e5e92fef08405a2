"""CorInfoMax, after Ozsoy, Hamdan, Arik, Yuret & Erdogan 2022 ("Self-Supervised Learning with
an Information Maximization Criterion", NeurIPS, arXiv 2209.07999, sec. 3, eq. 8-10) and its
official code serdarozsoy/corinfomax-ssl (``cifars-tiny/main_traintest.py``: ``CorInfoMax_Loss``
and ``invariance_loss``, read as a port of that file found by code search; solo-learn's
``solo/methods/corinfomax.py`` lists the same defaults: R_ini 1.0, la_R 1e-2, la_mu 1e-2).

Published objective, on the projector outputs z_1, z_2 of two augmented views (batch N, D
dimensions), with moving averages of each branch's mean and covariance:
  mu_k  <- la_mu mu_k + (1 - la_mu) mean(z_k)
  R_k   <- la_R R_k + (1 - la_R) (z_k - mu_k)^T (z_k - mu_k) / N    (R_k starts at R_ini I)
  cov   = -(logdet(R_1 + eps I) + logdet(R_2 + eps I)) / D            (the log-det term)
  inv   = mean((z_1 - z_2)^2)                                         (the invariance term)
  total = cov + alpha inv
The gradient flows through the current batch's share (1 - la_R) of R_k; the averages are
detached after each step. The log-det term (the correlative information between the views,
eq. 8) is what spreads the embedding over all D dimensions; without it the invariance term
alone is minimised by mapping every input to one point.

Here (CPU): scikit-learn's digits (``common.digits_split``) with the corpus's augmentations
(``common.augment``); backbone ``common.DigitEncoder`` (width 128), projector 128-128 (BN,
ReLU)-64, outputs l2-normalised (the official training script normalises the projector's
outputs before the loss); float64 moving statistics as in the code; la_R = la_mu = 0.01,
R_ini 1, eps 1e-8 (the repository's defaults); alpha 500 (the order of the repository's CIFAR
settings, so that the mean squared distance between unit vectors, ~1/D, weighs like the
log-det); batch 256, Adam lr 1e-3 (the paper's SGD/LARS on hundreds of epochs), 500 steps.
The two terms are passed as two losses under the repository's names ``cov`` and ``inv`` with
weights 1 / alpha, and z_1 (what the losses read) is watched as the latent ``z``.

Truth, measured on the test split without gradprobe: mean per-dimension std of z, its total
variance (of at most 1 for unit vectors), its centred effective rank
(``common.centred_effective_rank``, of 64), the kNN accuracy (k = 20, ``common.knn_accuracy``)
of the backbone features and of z.

Variants (truth by construction):
- ``published``: healthy, weights 1 / 500.
- ``no-logdet``: the log-det term computed and passed with weight 0. Only the invariance term
  trains: every view is pulled to one point and the embedding collapses.
Measured (seeds 0 / 1, one thread, 7-9 CPU-seconds a run):
  published: mean per-dimension std of z 0.060 / 0.061, total variance 0.237 / 0.240, rank
             49.7 / 50.1 of 64, kNN of the backbone 0.944 / 0.938 and of z 0.942 / 0.942.
  no-logdet: mean std 0.0024 / 0.0029, total variance 0.0004 / 0.0005 (0.2% of the published
             run's: every test digit maps to nearly one point of the sphere), kNN of the
             backbone 0.860 / 0.887 and of z 0.793 / 0.796. The centred rank stays 54.0 /
             54.4: what is left of the spread is isotropic residue, so the collapse is to a
             point (total variance), not to a subspace.
Expected on ``no-logdet``: ``representation-collapse`` on ``z``. Must not:
``gradient-swamping``, ``static-loss-weights`` (a weight of 0 switches the term off, it is not
a static trade-off), ``inert-loss``; on the healthy variant also ``gradient-conflict`` and
``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, DIM = 500, 256, 1e-3, 64
R_INI, LA_R, LA_MU, R_EPS, ALPHA = 1.0, 0.01, 0.01, 1e-8, 500.0  # repository defaults, alpha
WEIGHTS = {"published": {"cov": 1.0, "inv": ALPHA},
           "no-logdet": {"cov": 0.0, "inv": ALPHA}}


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        w = self.backbone.width
        self.projector = nn.Sequential(nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
                                       nn.Linear(w, DIM))

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)), dim=1)


class CorInfoMaxTerms:
    """CorInfoMax_Loss's two terms apart, with its moving mean and covariance per branch."""

    def __init__(self):
        self.mean = [torch.zeros(DIM, dtype=torch.float64) for _ in range(2)]
        self.cov = [R_INI * torch.eye(DIM, dtype=torch.float64) for _ in range(2)]
        self.eps = R_EPS * torch.eye(DIM, dtype=torch.float64)

    def __call__(self, z_1: torch.Tensor, z_2: torch.Tensor) -> dict[str, torch.Tensor]:
        logdets = []
        for k, z in enumerate((z_1.double(), z_2.double())):
            mean = LA_MU * self.mean[k] + (1 - LA_MU) * z.mean(0)
            centred = z - mean
            cov = LA_R * self.cov[k] + (1 - LA_R) * centred.t() @ centred / z.shape[0]
            logdets.append(torch.logdet(cov + self.eps))
            self.mean[k], self.cov[k] = mean.detach(), cov.detach()
        return {"cov": (-(logdets[0] + logdets[1]) / DIM).float(), "inv": F.mse_loss(z_1, z_2)}


@torch.no_grad()
def _eval(model: Embedder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    features = model.backbone(x)
    z = F.normalize(model.projector(features), dim=1)
    model.train(was)
    return features, z


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Embedder()
    terms = CorInfoMaxTerms()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            z_1 = model(augment(x_tr[idx], gen))
            z_2 = model(augment(x_tr[idx], gen))
            probe.observe(z=z_1)
            probe.backward(terms(z_1, z_2), weights=WEIGHTS[variant])
            opt.step()
            opt.zero_grad()
    f_tr, z_tr = _eval(model, x_tr)
    f_te, z_te = _eval(model, x_te)
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    z = z_te.double().numpy()
    return {"z_mean_std": float(z.std(0).mean()), "z_total_var": float(z.var(0).sum()),
            "z_rank": centred_effective_rank(z),
            "knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
            "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr, z_te.numpy(), y_te)}


_MUST_NOT = ("gradient-swamping", "static-loss-weights", "inert-loss")

FAMILY = Family(
    name="corinfomax",
    source="Ozsoy et al. 2022, CorInfoMax (NeurIPS, arXiv 2209.07999) sec. 3 eq. 8-10; "
           "serdarozsoy/corinfomax-ssl cifars-tiny/main_traintest.py CorInfoMax_Loss",
    train=train,
    variants=(
        Variant("published", True, "log-det of each branch's moving covariance plus alpha "
                "times the views' mean squared distance, weights 1 / 500",
                must_not=_MUST_NOT + ("gradient-conflict", "representation-collapse")),
        Variant("no-logdet", False,
                "the log-det term at weight 0: only the invariance term trains, which every "
                "constant map minimises: the embedding collapses to a point",
                expected=(Expect("representation-collapse", "z"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-logdet", 1)),
)
