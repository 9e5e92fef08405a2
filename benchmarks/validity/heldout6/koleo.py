"""The KoLeo differential-entropy regulariser, after Sablayrolles, Douze, Schmid & Jégou 2019
("Spreading vectors for similarity search", ICLR, sec. 3: a network maps vectors onto the
unit sphere, trained by a triplet loss that keeps neighbourhoods, eq. 3, plus lambda times
the Kozachenko-Leonenko entropy term L_KoLeo = -1/n sum_i log(rho_n,i), rho_n,i the distance
from f(x_i) to its nearest neighbour in the batch, eq. 4-5), the official implementation
facebookresearch/spreadingvectors ``train.py`` (``triplet_optimize``: positive drawn among the
input space's 10 nearest neighbours (``rank_positive``), negative the 50th nearest neighbour
in the output space recomputed each epoch (``rank_negative``), per-point loss
relu(||f(a) - f(p)|| - ||f(a) - f(n)||), ``loss_uniform = -log(n * distances).mean()`` with
the nearest neighbour found on detached outputs (``pairwise_NNs_inner``), loss = triplet +
``lambda_uniform`` (default 0.05) x uniform; MLP d -> 1024 -> 1024 -> 16 with batch norm and
an l2 ``Normalize``, SGD momentum 0.9, batch 64, lr schedule 0.1, 0.1, 0.05, 0.01). DINOv2
(facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``) uses the same term.

Published setup: Deep1M / BigANN descriptors (96-d and 128-d, 500k training vectors), 160
epochs, evaluated by the nearest-neighbour recall of the output space (sec. 4).
Here: scikit-learn's 8x8 digits (64-d; the 1347 training images as the training vectors and
the database, the 450 test images as queries), hidden width 256, output 16, 20 epochs of
21 steps, the lr schedule spread over them, lambda 0.05 as in the source. Losses
``triplet`` and ``koleo`` (weight lambda). Watched as docs/probe.md says: the unit outputs
``embedding`` as a latent.

Variants (truth by construction):
- ``published``: healthy, lambda = 0.05.
- ``lambda-100x``: broken. lambda = 5: the entropy term's gradient drowns the triplet's on
  the whole network (independent trunk gradient ratio triplet / (lambda koleo) below), the
  outputs spread uniformly over the sphere and forget which inputs were neighbours.
Measured without gradprobe (seeds 0 and 1): recall@10 (share of test queries whose nearest
database neighbour in input space is among their 10 nearest in the output space), kNN
label accuracy (k = 20, cosine) of the outputs, the mean distance from a database output to
its nearest other output (the spread KoLeo raises), and the median over training of the
trunk gradient ratio |grad triplet| / |lambda grad koleo| (every 20th step, by
``torch.autograd.grad``), and the mean triplet loss over the last epoch:
  published:   recall@10 0.962 and 0.953, kNN 0.962 and 0.953, NN distance 0.514 and 0.515,
               gradient ratio 2.86 and 3.16, last-epoch triplet 0.0016 and 0.0012;
  lambda-100x: recall@10 0.853 and 0.818, kNN 0.844 and 0.829, NN distance 0.640 and 0.643,
               gradient ratio 0.083 and 0.090, last-epoch triplet 0.028 and 0.034.
About 4-8 CPU-seconds a run.
Expected on ``lambda-100x``: ``gradient-swamping`` on ``triplet`` (its gradient 1/12 of the
weighted KoLeo term's while it stays unsatisfied, 20-30 times the healthy end loss, and
neighbourhoods are lost) and ``static-loss-weights`` on ``triplet`` (the fixed lambda is the
cause). Allowed: ``gradient-conflict`` on ``triplet|koleo`` (the entropy term pushes apart
the nearest neighbours that the triplet pulls together, by construction). Must not (both):
``representation-collapse`` (the outputs spread, the opposite of a collapse), ``inert-loss``,
``non-finite``; on the healthy variant also ``gradient-swamping``, ``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, knn_accuracy, trunk_grad_ratio
from ..harness import Expect, Family, Variant

EPOCHS, BATCH, HIDDEN, DOUT, MOMENTUM = 20, 64, 256, 16, 0.9
LR_SCHEDULE = (0.1, 0.1, 0.05, 0.01)  # each over a quarter of the epochs
RANK_POSITIVE, RANK_NEGATIVE = 10, 50
LAMBDA = {"published": 0.05, "lambda-100x": 5.0}
RATIO_EVERY = 20


class Spreader(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DOUT))

    def forward(self, x):
        return F.normalize(self.trunk(x), dim=1)


def nearest(queries: torch.Tensor, base: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Indices of the k nearest rows of ``base`` (Euclidean), nearest first."""
    d = torch.cdist(queries, base)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def koleo(z: torch.Tensor) -> torch.Tensor:
    """-mean log(n * rho_i), the neighbour found on detached unit outputs as in the source."""
    with torch.no_grad():
        dots = z @ z.t()
        dots.fill_diagonal_(-1.0)
        neighbour = dots.argmax(1)
    return -torch.log(len(z) * F.pairwise_distance(z, z[neighbour], eps=1e-8)).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    positives_of = nearest(x_tr, x_tr, RANK_POSITIVE, exclude_self=True)
    net = Spreader()
    lam = LAMBDA[variant]
    opt = torch.optim.SGD(net.parameters(), lr=LR_SCHEDULE[0], momentum=MOMENTUM)
    order = batches(len(x_tr), BATCH, gen)
    steps, ratios, last_epoch_triplet = len(x_tr) // BATCH, [], []
    probe = gradprobe.Probe(net, run_file=log)
    probe.watch_latent("embedding")
    with probe:
        for epoch in range(EPOCHS):
            for group in opt.param_groups:
                group["lr"] = LR_SCHEDULE[epoch * len(LR_SCHEDULE) // EPOCHS]
            pick = torch.randint(RANK_POSITIVE, (len(x_tr),), generator=gen)
            positive = positives_of[torch.arange(len(x_tr)), pick]
            net.eval()
            with torch.no_grad():
                negative = nearest(net(x_tr), net(x_tr), RANK_NEGATIVE, exclude_self=True)[:, -1]
            net.train()
            for step in range(steps):
                idx = next(order)
                a, p, n = net(x_tr[idx]), net(x_tr[positive[idx]]), net(x_tr[negative[idx]])
                losses = {"triplet": F.relu(F.pairwise_distance(a, p) - F.pairwise_distance(a, n)).mean(),
                          "koleo": koleo(a)}
                probe.observe(embedding=a)
                if (epoch * steps + step) % RATIO_EVERY == 0:
                    ratios.append(trunk_grad_ratio(net, losses, {"koleo": lam}, "triplet", "koleo"))
                if epoch == EPOCHS - 1:
                    last_epoch_triplet.append(float(losses["triplet"]))
                probe.backward(losses, weights={"koleo": lam})
                opt.step()
                opt.zero_grad()
    net.eval()
    with torch.no_grad():
        z_tr, z_te = net(x_tr), net(x_te)
    true_nn = nearest(x_te, x_tr, 1, exclude_self=False)[:, 0]
    found = nearest(z_te, z_tr, 10, exclude_self=False)
    spread = torch.cdist(z_tr, z_tr).fill_diagonal_(float("inf")).min(1).values
    return {"recall_at_10": float((found == true_nn[:, None]).any(1).float().mean()),
            "knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(), y_te.numpy()),
            "mean_nn_distance": float(spread.mean()),
            "median_grad_ratio_triplet_over_koleo": float(np.median(ratios)),
            "last_epoch_triplet": float(np.mean(last_epoch_triplet))}


_MUST_NOT = ("representation-collapse", "inert-loss", "non-finite")

FAMILY = Family(
    name="koleo",
    source="Sablayrolles, Douze, Schmid & Jegou 2019, Spreading vectors for similarity search "
           "(ICLR), eq. 3-5; facebookresearch/spreadingvectors train.py triplet_optimize",
    train=train,
    variants=(
        Variant("published", True,
                "triplet loss plus KoLeo with lambda 0.05 as in the source: neighbourhoods kept",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights")),
        Variant("lambda-100x", False,
                "KoLeo weighted 5 (100 times the source's 0.05): its gradient drowns the "
                "triplet's, the outputs spread uniformly and nearest neighbours are lost",
                expected=(Expect("gradient-swamping", "triplet"),
                          Expect("static-loss-weights", "triplet")),
                allowed=(Expect("gradient-conflict", "triplet|koleo"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("lambda-100x", 0)),
)
