"""W-MSE, after Ermolov, Siarohin, Sangineto & Sebe 2021 ("Whitening for Self-Supervised
Representation Learning", ICML; htdt/self-supervised, methods/w_mse.py, methods/whitening.py).

Published objective (sec. 3, eq. 4-6): d augmented views of a batch through one encoder and
a projection head; the embeddings of every view are whitened in sub-batches of ``w_size``
(Whitening2d: centre, Cholesky factor L of the sub-batch covariance, z = L^-1 (h - mean),
``w_eps`` 0), and the loss is the normalised MSE (2 - 2 cos) between the whitened embeddings
of every pair of views, averaged over the pairs and over ``w_iter`` random sub-batch
partitions. Whitening scatters the batch over a sphere, so the positives cannot all meet at
one point: no negatives are needed. CIFAR-10 setup (README, table 1, "W-MSE 4"):
ResNet-18, head 1024 with batch norm, d = 4 views (6 pairs), batch 256, embedding 64,
``w_size`` 128, ``w_iter`` 1, Adam lr 3e-3, normalised MSE.

Here: scikit-learn's digits with the corpus's augmentations (``common.augment``), the
corpus's ``DigitEncoder`` (width 128) for the ResNet, head 128-BN-ReLU-32 (embedding 32, so
that the published w_size / embedding ratio of 2 becomes 4 at ``w_size`` 128: a sub-batch
covariance of 32 dimensions from 128 rows is well conditioned), batch 256 (two whitening
sub-batches), W-MSE 4 (d = 4 views), ``w_iter`` 1, Adam lr 1e-3 (3e-3 is tuned for 1000
epochs of a ResNet; 1e-3 is the source's default), 300 steps (6-11 CPU-seconds a run). The loss over
each pair of views (i, j) is passed to the probe as its own term ``pair_i_j`` (the source
sums the six into ``loss`` inside its pair loop), each with weight 1/6 as the source
averages them; the head's embedding of view 0 before whitening (what the method trains) is
watched as the latent ``embedding``.

Truth, measured without gradprobe on the test split: the centred effective rank of the
embedding (``z_rank``, of 32) and its normalised std (``common.normalised_std``), the
20-nearest-neighbour accuracy of the encoder's features (the kNN monitor the source logs)
and of the embedding.

Variants (truth by construction):
- ``published``: healthy, as above. Measured, seeds 0 / 1: z_rank 23.3 / 23.3, z_std
  0.935 / 0.897, knn_acc 0.940 / 0.947, z_knn_acc 0.933 / 0.918.
- ``no-whitening``: the whitening step removed, the same normalised MSE between the raw
  embeddings of the positives (the paper's motivating failure, sec. 3: without a
  scattering constraint the trivial solution maps every input to one point). Measured,
  seeds 0 / 1: z_std 0.034 / 0.029 (a collapse to a point: 4% of the healthy spread),
  z_rank 8.4 / 7.2 (of what little spread is left), knn_acc 0.860 / 0.871 (8 points below
  healthy), z_knn_acc 0.704 / 0.664 (23 and 25 points below healthy).
  Expected: ``representation-collapse`` on ``embedding``.
Must not (both): ``gradient-conflict`` and ``gradient-swamping`` (six terms of one loss
over exchangeable pairs of views, equal weights), ``static-loss-weights`` (1/6 each is the
published average), ``inert-loss``, ``non-finite``; on the healthy variant also
``representation-collapse``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 300, 256, 1e-3
VIEWS, W_SIZE, W_ITER, EMB, HEAD = 4, 128, 1, 32, 128
PAIRS = tuple(combinations(range(VIEWS), 2))


def whiten(h: torch.Tensor) -> torch.Tensor:
    """Whitening2d of the source with w_eps 0: L^-1 (h - mean), L the Cholesky factor of the
    covariance."""
    centred = h - h.mean(0)
    cov = centred.T @ centred / (len(h) - 1)
    inv_factor = torch.linalg.solve_triangular(torch.linalg.cholesky(cov),
                                               torch.eye(h.shape[1]), upper=False)
    return centred @ inv_factor.T


def norm_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)).mean()


def pair_losses(views: list[torch.Tensor], gen: torch.Generator, whitened: bool) -> dict:
    losses = {f"pair_{i}_{j}": torch.zeros(()) for i, j in PAIRS}
    for _ in range(W_ITER):
        z = views
        if whitened:
            z = [torch.empty_like(h) for h in views]
            for idx in torch.randperm(BATCH, generator=gen).view(-1, W_SIZE):
                for view, out in zip(views, z):
                    out[idx] = whiten(view[idx])
        for i, j in PAIRS:
            losses[f"pair_{i}_{j}"] = losses[f"pair_{i}_{j}"] + norm_mse(z[i], z[j]) / W_ITER
    return losses


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    encoder = DigitEncoder(128)
    head = nn.Sequential(nn.Linear(128, HEAD), nn.BatchNorm1d(HEAD), nn.ReLU(),
                         nn.Linear(HEAD, EMB))
    model = nn.Sequential(encoder, head)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            h = model(torch.cat([augment(x_tr[idx], gen) for _ in range(VIEWS)]))
            views = list(h.split(BATCH))
            probe.observe(embedding=views[0])
            losses = pair_losses(views, gen, whitened=variant == "published")
            probe.backward(losses, weights={name: 1 / len(PAIRS) for name in losses})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        f_tr, f_te = encoder(x_tr), encoder(x_te)
        z_tr, z_te = head(f_tr).numpy(), head(f_te).numpy()
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    return {"z_rank": centred_effective_rank(z_te), "z_dim": EMB,
            "z_std": normalised_std(z_te),
            "knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
            "z_knn_acc": knn_accuracy(z_tr, y_tr, z_te, y_te)}


_MUST_NOT = ("gradient-conflict", "gradient-swamping", "static-loss-weights", "inert-loss",
             "non-finite")

FAMILY = Family(
    name="wmse",
    source="Ermolov et al. 2021, W-MSE (ICML), sec. 3 eq. 4-6, W-MSE 4, w_size 128, w_iter 1; "
           "htdt/self-supervised methods/w_mse.py, methods/whitening.py",
    train=train,
    variants=(
        Variant("published", True,
                "embeddings whitened by Cholesky in sub-batches of 128, normalised MSE between "
                "the whitened positives of every pair of the 4 views",
                must_not=_MUST_NOT + ("representation-collapse",)),
        Variant("no-whitening", False,
                "whitening removed: the normalised MSE between raw positives has the trivial "
                "solution of one point for every input, and the embedding collapses",
                expected=(Expect("representation-collapse", "embedding"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("no-whitening", 0)),
)
