"""VICReg with its three terms passed as three losses: issue 21's row "VICReg (Bardes, Ponce &
LeCun 2022), invariance/variance/covariance 25/25/1 as three losses".

Public source: Bardes, Ponce & LeCun 2022 ("VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", ICLR), eq. 1-6 and facebookresearch/vicreg
(main_vicreg.py): invariance ``F.mse_loss(x, y)``; variance
``mean(relu(1 - sqrt(var(x) + 1e-4))) / 2`` + the same for y; covariance: the squared
off-diagonal entries of each view's covariance matrix summed and divided by the dimension,
x + y; weights (``sim_coeff``, ``std_coeff``, ``cov_coeff``) = 25, 25, 1; expander of three
linear layers 8192-8192-8192 (BN and ReLU between); LARS, batch 2048.

Here (CPU): the digits backbone (``common.DigitEncoder``), expander 128-256-256-256 (three
linear layers, BN and ReLU between), batch 256, Adam lr 1e-3, 300 steps, ``common.augment``
views. The three terms are passed to the probe as ``invariance``, ``variance`` and
``covariance`` with weights 25, 25, 1; the expander output is watched as ``z``. Probe at
its defaults.

Variants (truth by construction, measured without gradprobe on the test digits: the mean
per-dimension std and the total variance (sum of per-dimension variances) of the expander
output, its centred effective rank and normalised std, kNN (``common.knn_accuracy``) and
linear-probe accuracy of the backbone and of the expander output):
- ``25-25-1``: healthy, the published weights. Must raise no warning or error.
- ``variance-0``: the variance term weighted 0. Invariance alone is minimised by a constant
  embedding and the covariance term by one with no spread: every output shrinks to the origin
  (the paper's ablation, Table 4, collapses without the variance term). Expected:
  ``representation-collapse`` on ``z``.

Measured (seeds 0 / 1, one thread): ``25-25-1``: per-dimension std of z 0.49 / 0.47, total
variance 60 / 57, normalised std 0.93 / 0.89, backbone kNN 0.936 / 0.916, linear 0.982 /
0.971. ``variance-0``: per-dimension std 0.009 / 0.008, total variance 0.021 / 0.016 (a
shrink to the origin by 3,000x; the normalised std still reads 0.23 / 0.20), backbone kNN
0.871 / 0.847, linear 0.960 / 0.958. gradprobe today (the baseline): ``25-25-1``: two
``error gradient-conflict`` (invariance|variance cos -0.84 / -0.87, variance|covariance
-0.98 / -0.98) and ``warning static-loss-weights``; ``variance-0``: ``error
representation-collapse`` on ``z`` (spread x0.0008 / x0.0010 of peak), a false ``warning
gradient-swamping`` on ``covariance`` (ratio 0.017 / 0.015: satisfied by the collapse, not
held back) and ``warning static-loss-weights``. CPU ~11 s a run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import DigitEncoder, augment, batches, digits_split, knn_accuracy, representation_truth
from .harness import Expect, Family, Variant

BATCH, STEPS, DIM = 256, 300, 256
WEIGHTS = {"25-25-1": {"invariance": 25.0, "variance": 25.0, "covariance": 1.0},
           "variance-0": {"invariance": 25.0, "variance": 0.0, "covariance": 1.0}}


class VICReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        w = self.encoder.width
        self.expander = nn.Sequential(nn.Linear(w, DIM), nn.BatchNorm1d(DIM), nn.ReLU(),
                                      nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.ReLU(),
                                      nn.Linear(DIM, DIM))

    def forward(self, x):
        return self.expander(self.encoder(x))


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m - torch.diag(torch.diagonal(m))


def vicreg_terms(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three terms of main_vicreg.py's loss, before their coefficients."""
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    covariance = (off_diagonal(x.T @ x / (n - 1)).pow(2).sum() / d
                  + off_diagonal(y.T @ y / (n - 1)).pow(2).sum() / d)
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = VICReg()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z", model.expander)
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            terms = vicreg_terms(model(augment(x_tr[idx], gen)), model(augment(x_tr[idx], gen)))
            probe.backward(terms, weights=WEIGHTS[variant])
            opt.step()
            opt.zero_grad()
    truth = representation_truth(model.encoder, model.expander)
    with torch.no_grad():
        f_tr, f_te = model.encoder(x_tr), model.encoder(x_te)
        z_tr, z_te = model.expander(f_tr), model.expander(f_te)
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    var = z_te.double().var(0)
    return truth | {"z_std_mean": float(var.sqrt().mean()), "z_total_variance": float(var.sum()),
                    "knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
                    "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr, z_te.numpy(), y_te)}


FAMILY = Family(
    name="vicreg",
    source="Bardes, Ponce & LeCun 2022, eq. 1-6 (facebookresearch/vicreg main_vicreg.py), 25/25/1",
    train=train,
    variants=(
        Variant("25-25-1", True,
                "the published weights: the three terms sit at the equilibrium of the trade-off",
                must_not=("representation-collapse", "gradient-conflict", "gradient-swamping",
                          "static-loss-weights")),
        Variant("variance-0", False,
                "the variance term weighted 0: the embeddings shrink to the origin (complete "
                "collapse), which the covariance term then satisfies",
                expected=(Expect("representation-collapse", "z"),),
                must_not=("gradient-swamping",)),
    ),
    quick=(("variance-0", 1),),
)
