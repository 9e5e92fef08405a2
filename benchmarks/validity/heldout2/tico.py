"""TiCo, after Zhu, Moraes, Karakulak, Sobol, Canziani & LeCun 2022 ("TiCo: Transformation
Invariance and Covariance Contrast for Self-Supervised Visual Representation Learning",
arXiv 2206.10698, sec. 3), as implemented by sayannag/TiCo-pytorch (``TiCo/main.py``:
``TiCo_Loss``, the momentum target, the training loop) and lightly-ai/lightly
(``lightly/loss/tico_loss.py`` ``TiCoLoss``, beta 0.9).

Published objective: the l2-normalised embeddings z_1 of one view (online encoder) and z_2
of the other; a running covariance matrix C_t = beta C_{t-1} + (1 - beta) z_1^T z_1 / N
(beta 0.9; C_{t-1} detached, the current batch's term not); the loss is the transformation
invariance term -mean(z_1 . z_2) plus rho times the covariance contrast term
mean(z_1^T C_t z_1), which penalises embeddings along the directions the recent batches
already fill (low-rank solutions) and so keeps the encoder from mapping every image to one
vector (the abstract: "to avoid the trivial solution where the encoder generates constant
vectors"). rho 8 (the value the paper recommends, as sayannag's ``--rho`` help says; 20 is
the scripts' default), embedding 256, projector 2048-4096 (BN, ReLU)-256; z_2 from a
momentum copy of the encoder and projector (momentum 0.99 rising to 1 by a sine schedule),
SGD lr 0.06. The invariance term is written as lightly writes it, 1 - mean(z_1 . z_2):
the same gradient, never negative.

Here (CPU): scikit-learn's digits (``common.digits_split``) with the corpus's augmentations
(``common.augment``); backbone ``common.DigitEncoder`` (width 128), projector 128-128 (BN,
ReLU)-64 (the published projector scaled to the backbone), momentum target as published
(0.99 to 1, sine schedule over the steps); batch 256, Adam lr 1e-3 (SGD lr 0.06 needs far
more steps), 500 steps. The two terms are passed as two losses, ``invariance`` and
``covariance_contrast`` (weight rho), and the online embedding z_1 (normalised: the loss
compares it by direction) is watched as the latent ``z`` (observed).

Truth, measured on the test split without gradprobe: the normalised std of z
(``common.normalised_std``, ~1 spread over the sphere, 0 at one point), its total variance
(the summed per-dimension variance of the normalised embedding), its centred effective rank
(``common.centred_effective_rank``, of 64), the same at initialisation, and kNN (k = 20,
``common.knn_accuracy``) accuracy of the backbone features and of z; the spread of z is also
measured every 25 steps during the run, for its peak.

Variants (truth by construction):
- ``published``: healthy, rho = 8, beta = 0.9.
- ``no-covariance-contrast``: rho = 0, the covariance contrast term still computed and
  passed with weight 0. Only the invariance term is trained, against a momentum target
  without predictor: nothing keeps two images apart, and every embedding turns to one
  vector (complete collapse).
Measured (seeds 0 / 1, one thread, CPU 5-8 s a run):
  published:              normalised std of z 0.918 / 0.912 (0.157 / 0.145 at
                          initialisation: the random projector's outputs share one mean
                          direction), total variance 0.866 / 0.855, rank 45.3 / 45.2 of 64
                          (41.2 / 40.5 at initialisation), kNN 0.949 / 0.940 (backbone and z).
  no-covariance-contrast: normalised std 0.089 / 0.093 (peak 0.257 / 0.244 at step 25, then
                          falling all run), total variance 0.0090 / 0.0095 (1% of the healthy
                          run's; 13% / 15% of its own peak), rank 31.0 / 31.2, kNN of z 0.884
                          / 0.860 and of the backbone 0.916 / 0.902 (healthy 0.949 / 0.940).
Expected on ``no-covariance-contrast``: ``representation-collapse`` on ``z`` (the embeddings
close in on one vector). Must not: ``gradient-swamping``, ``static-loss-weights`` (a weight
of 0 is switched off, not static), ``inert-loss``; on the healthy variant also
``gradient-conflict`` and ``representation-collapse``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, DIM = 500, 256, 1e-3, 64
BETA, START_MOMENTUM = 0.9, 0.99
TRACK_EVERY = 25  # steps between two measurements of the test embeddings' spread
RHO = {"published": 8.0, "no-covariance-contrast": 0.0}


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        w = self.backbone.width
        self.projection_head = nn.Sequential(nn.Linear(w, w, bias=False), nn.BatchNorm1d(w),
                                             nn.ReLU(), nn.Linear(w, DIM))

    def forward(self, x):
        return self.projection_head(self.backbone(x))


def tico_terms(running: torch.Tensor, query: torch.Tensor, key: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TiCo_Loss's two terms apart, and the updated covariance C_t (to detach before the next
    step)."""
    z_1, z_2 = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    covariance = BETA * running + (1 - BETA) * z_1.T @ z_1 / z_1.shape[0]
    return ({"invariance": 1 - (z_1 * z_2).sum(1).mean(),
             "covariance_contrast": ((z_1 @ covariance) * z_1).sum(1).mean()}, covariance)


def momentum_at(step: int) -> float:
    """TiCo/main.py's ``schedule_momentum``: 0.99 rising to 1 along a sine."""
    return START_MOMENTUM + (1 - START_MOMENTUM) * math.sin(math.pi / 2 * step / (STEPS - 1))


@torch.no_grad()
def _eval(model: Embedder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    features = model.backbone(x)
    z = F.normalize(model.projection_head(features), dim=1)
    model.train(was)
    return features, z


def embedding_truth(z: torch.Tensor) -> dict:
    z = z.numpy()
    return {"z_std": normalised_std(z), "z_total_var": float(z.var(0).sum()),
            "z_rank": centred_effective_rank(z)}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Embedder()
    target = copy.deepcopy(model).requires_grad_(False)
    init = {f"{k}_init": v for k, v in embedding_truth(_eval(model, x_te)[1]).items()}
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    running = torch.zeros(DIM, DIM)
    track = []
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            m = momentum_at(step)
            with torch.no_grad():
                for p_target, p in zip(target.parameters(), model.parameters()):
                    p_target.mul_(m).add_(p, alpha=1 - m)
                key = target(augment(x_tr[idx], gen))
            query = model(augment(x_tr[idx], gen))
            terms, covariance = tico_terms(running, query, key)
            probe.observe(z=F.normalize(query, dim=1))
            probe.backward(terms, weights={"covariance_contrast": RHO[variant]})
            running = covariance.detach()
            if step % TRACK_EVERY == 0:
                track.append(embedding_truth(_eval(model, x_te)[1]))
            opt.step()
            opt.zero_grad()
    f_tr, z_tr = _eval(model, x_tr)
    f_te, z_te = _eval(model, x_te)
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    peak = {f"{k}_peak": max(t[k] for t in track) for k in track[0]}
    return embedding_truth(z_te) | init | peak | {
        "knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
        "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr, z_te.numpy(), y_te)}


_MUST_NOT = ("gradient-swamping", "static-loss-weights", "inert-loss")

FAMILY = Family(
    name="tico",
    source="Zhu et al. 2022, TiCo (arXiv 2206.10698) sec. 3; sayannag/TiCo-pytorch TiCo/main.py "
           "TiCo_Loss, beta 0.9, rho 8; lightly-ai/lightly lightly/loss/tico_loss.py",
    train=train,
    variants=(
        Variant("published", True, "invariance and covariance contrast (rho 8) at their "
                "designed equilibrium",
                must_not=_MUST_NOT + ("gradient-conflict", "representation-collapse")),
        Variant("no-covariance-contrast", False,
                "rho = 0: only the invariance term against a momentum target without "
                "predictor, nothing keeps two images apart: every embedding turns to one vector",
                expected=(Expect("representation-collapse", "z"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-covariance-contrast", 1)),
)
