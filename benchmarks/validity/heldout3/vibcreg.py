"""VIbCReg, after Lee & Aune 2021 ("VIbCReg: Variance-Invariance-better-Covariance
Regularization for Self-Supervised Learning on Time Series", arXiv 2109.00783, sec. 3), as
implemented in the first author's (danelee2601) code: ``vibcreg_invariance_loss``,
``vibcreg_var_loss``, ``vibcreg_cov_loss``, ``VIbCRegLoss``, defaults lambda 25, mu 25, nu 200
(read as files found by code search, their repository path not shown to us), and by vturrisi/solo-learn (``solo/methods/vibcreg.py``: the
projector Linear-BN-GELU x 2 -> Linear -> IterNorm(num_groups 64, T 5), whose IterNorm
(``solo/utils/whitening.py``, after huangleiBuaa/IterNorm-pytorch) whitens groups of
2048 / 64 = 32 dimensions).

Published objective, on the projector outputs z_1, z_2 of two augmented views:
  sim = mean((z_1 - z_2)^2)                                    (invariance, weight lambda 25)
  var = mean_j relu(1 - sqrt(Var(z_1[:, j]) + 1e-4)) + same for z_2   (variance, weight mu 25)
  cov = mean(offdiag(C(z_1))^2) + mean(offdiag(C(z_2))^2)      (better covariance, weight nu 200)
where C(z) = z_c^T z_c with z_c the batch-centred z whose columns are l2-normalised: the
correlation matrix, so that the covariance term no longer depends on the embedding's scale or
dimension (VICReg's term does). The projector ends with IterNorm (Huang et al. 2019: whitening
by T = 5 Newton iterations on the trace-normalised group covariance, running statistics for
evaluation, then an affine scale and shift), which the paper adds to speed up decorrelation.

Here (CPU): scikit-learn's digits (``common.digits_split``) with the corpus's augmentations
(``common.augment``); backbone ``common.DigitEncoder`` (width 128), projector 128-128 (BN,
GELU)-128 (BN, GELU)-64 then IterNorm over groups of 32 dimensions (solo-learn's groups of
2048 / 64 = 32), T = 5; batch 256, Adam lr 1e-3 (the paper's AdamW on longer schedules), 500
steps. The three terms are passed as three losses under the repository's names ``sim_loss``,
``var_loss``, ``cov_loss`` with weights 25 / 25 / 200, and the projector output z_1 (what the
losses read) is watched as the latent ``z``.

Truth, measured on the test split without gradprobe: the mean per-dimension std of z, its
total variance (summed per-dimension variance), its centred effective rank
(``common.centred_effective_rank``, of 64), the normalised std (``common.normalised_std``) and
kNN accuracy (k = 20, ``common.knn_accuracy``) of the backbone features and of z.

Variants (truth by construction):
- ``published``: healthy, lambda 25, mu 25, nu 200.
- ``no-variance``: mu = 0 (the variance term still computed and passed with weight 0). The
  correlation term is blind to scale and the invariance term pulls both views to each other,
  so nothing holds the spread: the embedding shrinks towards one point.
Measured (seeds 0 / 1, one thread, 11-15 CPU-seconds a run):
  published:   mean per-dimension std of z 1.062 / 1.089, total variance 73.6 / 77.2, rank
               47.2 / 47.5 of 64, normalised std 0.988 / 0.990, kNN of the backbone 0.942 /
               0.944 and of z 0.944 / 0.938.
  no-variance: mean std 0.101 / 0.083, total variance 2.65 / 1.76 (3.6% / 2.3% of the
               published run's), rank 23.1 / 25.6, normalised std 0.576 / 0.563, kNN of the
               backbone 0.904 / 0.920 and of z 0.831 / 0.789.
Expected on ``no-variance``: ``representation-collapse`` on ``z`` (the embedding shrinks
towards one point and loses half its rank). Must not: ``gradient-swamping``,
``static-loss-weights`` (a weight of 0 is switched off, not static), ``inert-loss``; on the
healthy variant also ``gradient-conflict`` and ``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, DIM = 500, 256, 1e-3, 64
GROUP, ITERATIONS, EPS, MOMENTUM = 32, 5, 1e-5, 0.1  # IterNorm's defaults, groups of 32
WEIGHTS = {"published": {"sim_loss": 25.0, "var_loss": 25.0, "cov_loss": 200.0},
           "no-variance": {"sim_loss": 25.0, "var_loss": 0.0, "cov_loss": 200.0}}


class IterNorm(nn.Module):
    """Iterative whitening (Huang et al. 2019) per group of GROUP dimensions, differentiated by
    autograd through the Newton iterations; running mean and whitening matrix for evaluation."""

    def __init__(self, dim: int):
        super().__init__()
        groups = dim // GROUP
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(groups, GROUP, 1))
        self.register_buffer("running_wmat", torch.eye(GROUP).repeat(groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        grouped = x.t().reshape(-1, GROUP, n)  # (groups, GROUP, n)
        if self.training:
            mean = grouped.mean(-1, keepdim=True)
            centred = grouped - mean
            eye = torch.eye(GROUP).expand_as(self.running_wmat)
            sigma = EPS * eye + centred @ centred.transpose(1, 2) / n
            trace_inv = 1.0 / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
            sigma_n = sigma * trace_inv
            p = eye
            for _ in range(ITERATIONS):
                p = 1.5 * p - 0.5 * p @ p @ p @ sigma_n
            wmat = p * trace_inv.sqrt()
            with torch.no_grad():
                self.running_mean.lerp_(mean, MOMENTUM)
                self.running_wmat.lerp_(wmat, MOMENTUM)
        else:
            centred, wmat = grouped - self.running_mean, self.running_wmat
        white = (wmat @ centred).reshape(-1, n).t()
        return white * self.weight + self.bias


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        w = self.backbone.width
        self.projector = nn.Sequential(
            nn.Linear(w, w), nn.BatchNorm1d(w), nn.GELU(),
            nn.Linear(w, w), nn.BatchNorm1d(w), nn.GELU(), nn.Linear(w, DIM), IterNorm(DIM))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def forward(self, x):
        return self.embed(self.backbone(x))


def _correlation_off_diagonal(z: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(z - z.mean(0), dim=0)
    corr = unit.t() @ unit
    return (corr - torch.diag(corr.diagonal())).pow(2).mean()


def vibcreg_terms(z_1: torch.Tensor, z_2: torch.Tensor) -> dict[str, torch.Tensor]:
    """VIbCRegLoss's three terms apart (mse invariance, as the repository's default)."""
    std_1 = torch.sqrt(z_1.var(0) + 1e-4)
    std_2 = torch.sqrt(z_2.var(0) + 1e-4)
    return {"sim_loss": F.mse_loss(z_1, z_2),
            "var_loss": F.relu(1 - std_1).mean() + F.relu(1 - std_2).mean(),
            "cov_loss": _correlation_off_diagonal(z_1) + _correlation_off_diagonal(z_2)}


@torch.no_grad()
@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    features = model.backbone(x)
    z = model.embed(features)
    model.train(was)
    return features, z


def embedding_truth(z: torch.Tensor) -> dict:
    z = z.double().numpy()
    return {"z_mean_std": float(z.std(0).mean()), "z_total_var": float(z.var(0).sum()),
            "z_rank": centred_effective_rank(z), "z_norm_std": normalised_std(z)}


def train_two_views(model: nn.Module, probe, terms, weights: dict, gen: torch.Generator,
                    split: tuple, steps: int, batch: int, lr: float
                    ) -> tuple[torch.Tensor, dict]:
    """Two augmented views of the digits through ``model`` (``backbone``, then ``embed``),
    the terms of ``terms(z_1, z_2)`` back-propagated by ``probe`` with the latent ``z`` (the
    first view) observed; returns the test embeddings and the kNN accuracies of the backbone
    and of the embedding. Shared with spectral_cl.py."""
    x_tr, y_tr, x_te, y_te = split
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with probe:
        for _, idx in zip(range(steps), batches(len(x_tr), batch, gen)):
            z_1 = model(augment(x_tr[idx], gen))
            z_2 = model(augment(x_tr[idx], gen))
            probe.observe(z=z_1)
            probe.backward(terms(z_1, z_2), weights=weights)
            opt.step()
            opt.zero_grad()
    f_tr, z_tr = _eval(model, x_tr)
    f_te, z_te = _eval(model, x_te)
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    return z_te, {"knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
                  "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr, z_te.numpy(), y_te)}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = digits_split()
    model = Embedder()
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    z_te, knn = train_two_views(model, probe, vibcreg_terms, WEIGHTS[variant], gen, split,
                                STEPS, BATCH, LR)
    return embedding_truth(z_te) | knn


_MUST_NOT = ("gradient-swamping", "static-loss-weights", "inert-loss")

FAMILY = Family(
    name="vibcreg",
    source="Lee & Aune 2021, VIbCReg (arXiv 2109.00783) sec. 3; danelee2601 VIbCRegLoss "
           "(lambda 25, mu 25, nu 200); vturrisi/solo-learn solo/methods/vibcreg.py "
           "(IterNorm projector)",
    train=train,
    variants=(
        Variant("published", True, "invariance, variance and normalised covariance at the "
                "published weights 25 / 25 / 200, IterNorm projector",
                must_not=_MUST_NOT + ("gradient-conflict", "representation-collapse")),
        Variant("no-variance", False,
                "mu = 0: the correlation term is blind to scale and the invariance term pulls "
                "the views together, nothing holds the spread: the embedding shrinks to a point",
                expected=(Expect("representation-collapse", "z"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-variance", 1)),
)
