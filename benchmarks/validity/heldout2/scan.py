"""SCAN's clustering step, after Van Gansbeke, Vandenhende, Georgoulis, Proesmans & Van Gool
2020 ("SCAN: Learning to Classify Images without Labels", ECCV, sec. 2.2, eq. 2) and the
official wvangansbeke/Unsupervised-Classification (``losses/losses.py`` ``SCANLoss`` and
``entropy``, ``utils/train_utils.py`` ``scan_train``, ``models/models.py``
``ClusteringModel``, ``configs/scan/scan_mnist.yml``).

Published setup: a pretext model (SimCLR or MoCo) embeds the images and the K = 20 nearest
neighbours of each image are mined once on its features; a clustering model (the pretext
backbone, trained on, under ``nn.Linear(backbone_dim, num_classes)``, the cluster head)
reads an augmented anchor and an augmented random one of its neighbours; with p the softmax
of the head's logits, eq. 2:
Lambda = -1/|D| sum_X sum_{k in N_X} log <p(X), p(k)> + lambda sum_c p'_c log p'_c,
p'_c the batch mean of p_c. The repository returns the two terms apart: ``consistency_loss``
= BCE(<p(anchor), p(neighbour)>, 1) and ``entropy_loss`` = the entropy of the mean
assignment, and trains ``total_loss = consistency_loss - entropy_weight * entropy_loss``;
``entropy_weight`` 5.0 in every SCAN config (the class default is 2.0), Adam lr 1e-4, weight
decay 1e-4, batch 128 (48 for MNIST), 10 clusters for 10 classes. The entropy term "avoids
assigning all samples to a single cluster" (sec. 2.2).

Here (CPU): scikit-learn's digits (``common.digits_split``). The pretext model is replaced
by a fixed embedding: PCA of the training digits (32 components), neighbours mined once by
cosine on it (K = 20, as published; 92% of the mined neighbours share the anchor's digit).
The clustering model is ``common.DigitEncoder`` (width 128) under ``nn.Linear(128, 10)``,
started from random weights (the published backbone starts from the pretext model; the
neighbours carry what the pretext knows), anchor and neighbour each through
``common.augment``; batch 128, Adam lr 1e-3 (1e-4 published: 10x for 600 steps instead of
50 epochs), weight decay 1e-4. The two terms are passed to the probe as two losses with
the repository's names and its sign: ``consistency`` and ``entropy`` with weight
``-entropy_weight``. Watched as docs/probe.md says: the cluster head's output (the anchors'
logits) as the latent ``logits``, the backbone's features as the latent ``features``, and
the head's weight rows as the prototypes ``cluster_head`` of ``features``, with each
anchor's cluster (the argmax of its logits) observed as its group.

Truth, measured on the test split without gradprobe: clusters used (>= 1% of the test
digits), the entropy of the cluster usage / log 10, the largest cluster's share, clustering
accuracy (Hungarian matching of clusters to digits, scipy) and NMI (scikit-learn) against the
labels; the backbone features' and the logits' centred effective rank and normalised std
(``common``), the logits' participation ratio and total variance, at the end and at
initialisation, and a linear probe of the logits (``common.linear_probe_accuracy``).

Variants (truth by construction):
- ``published``: healthy, entropy_weight 5.
- ``no-entropy``: entropy_weight 0, the term still computed and passed with weight 0. Only
  the consistency term is trained; it is minimised by putting every anchor and its
  neighbours in the same cluster with certainty, and one cluster for all is the easiest way
  (the trivial solution the entropy term exists to rule out).
Measured (seeds 0 / 1, one thread, CPU 4-8 s a run):
  published:  10 / 10 of 10 clusters used, usage entropy 0.996 / 0.990 of log 10, largest
              cluster 0.14 / 0.15, clustering accuracy 0.831 / 0.689, NMI 0.800 / 0.720;
              features rank 68.3 / 68.5 (67.7 / 66.7 at initialisation), normalised std 0.76
              / 0.76; logits rank 7.2 / 6.9 (8.8 / 9.3 at initialisation), normalised std
              0.86 / 0.90, participation 3.7 / 3.5, linear probe of the logits 0.909 / 0.878.
  no-entropy: 1 / 1 cluster takes every test digit (usage entropy 0.00, largest share 1.0),
              clustering accuracy 0.102 / 0.102 (chance), NMI 0.00 / 0.00; the backbone
              features do not collapse (rank 73.8 / 76.1, normalised std 0.68 / 0.65); the
              logits are dominated by the winning cluster's: normalised std 0.093 / 0.063,
              total variance 5.6 / 1.4 against 133 / 125 healthy, participation 1.35 / 2.58,
              while their centred rank stays 5.5 / 7.7; linear probe of the logits 0.656 /
              0.671 (25 points below healthy).
Expected on ``no-entropy``: ``prototype-collapse`` on ``cluster_head`` (one cluster takes
every digit). Allowed: ``representation-collapse`` on ``logits`` (the head's output turns to
the winning cluster's direction and loses a quarter of its linear accuracy, while its centred
rank stays: incidental to the cluster collapse). Must not (both): ``gradient-conflict``,
``gradient-swamping``, ``static-loss-weights`` (a weight of 0 is switched off, not static),
``inert-loss``, ``prototype-stale``; on the healthy variant also ``prototype-collapse`` and
``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      linear_probe_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, WEIGHT_DECAY = 600, 128, 1e-3, 1e-4
CLUSTERS, NEIGHBOURS, PRETEXT_DIM = 10, 20, 32
ENTROPY_WEIGHT = {"published": 5.0, "no-entropy": 0.0}
EPS = 1e-8  # losses.py's clamp of the mean assignment


class ClusteringModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        self.cluster_head = nn.Linear(self.backbone.width, CLUSTERS)

    def forward(self, x):
        features = self.backbone(x)
        return features, self.cluster_head(features)


def mine_neighbours(x: np.ndarray) -> np.ndarray:
    """The K nearest neighbours of each training digit (itself excluded) by cosine on the
    pretext embedding, mined once."""
    f = PCA(PRETEXT_DIM, random_state=0).fit_transform(x)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :NEIGHBOURS]


def scan_terms(anchors: torch.Tensor, neighbours: torch.Tensor) -> dict[str, torch.Tensor]:
    """losses.py's SCANLoss, its two terms apart."""
    p_anchor, p_neighbour = anchors.softmax(1), neighbours.softmax(1)
    similarity = (p_anchor * p_neighbour).sum(1)
    consistency = F.binary_cross_entropy(similarity, torch.ones_like(similarity))
    mean = p_anchor.mean(0).clamp(min=EPS)
    return {"consistency": consistency, "entropy": -(mean * mean.log()).sum()}


def participation_ratio(z: np.ndarray) -> float:
    """(tr C)^2 / tr C^2 of the covariance C: ~1 when the variance lies along one direction."""
    eig = np.linalg.eigvalsh(np.cov(np.asarray(z, dtype=np.float64), rowvar=False))
    return float(eig.sum() ** 2 / (eig ** 2).sum())


def clustering_truth(clusters: np.ndarray, labels: np.ndarray) -> dict:
    share = np.bincount(clusters, minlength=CLUSTERS) / len(clusters)
    nz = share[share > 0]
    counts = np.zeros((CLUSTERS, CLUSTERS))
    np.add.at(counts, (clusters, labels), 1.0)
    rows, cols = linear_sum_assignment(-counts)
    return {"clusters_used": int((share >= 0.01).sum()), "top_share": float(share.max()),
            "usage_entropy": float(-(nz * np.log(nz)).sum() / math.log(CLUSTERS)) + 0.0,
            "cluster_acc": float(counts[rows, cols].sum() / len(clusters)),
            "nmi": float(normalized_mutual_info_score(labels, clusters))}


@torch.no_grad()
def _test_features(model: ClusteringModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    out = model(x)
    model.train(was)
    return out


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    neighbours = torch.from_numpy(mine_neighbours(x_tr.numpy()))
    model = ClusteringModel()
    features_init, logits_init = (t.numpy() for t in _test_features(model, x_te))
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    probe.watch_latent("logits")
    probe.watch_prototypes("cluster_head", model.cluster_head.weight, latent="features")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            pick = neighbours[idx, torch.randint(NEIGHBOURS, (len(idx),), generator=gen)]
            features, anchors = model(augment(x_tr[idx], gen))
            _, neighbour_logits = model(augment(x_tr[pick], gen))
            probe.observe(features=features, logits=anchors, groups=anchors.argmax(1))
            probe.backward(scan_terms(anchors, neighbour_logits),
                           weights={"entropy": -ENTROPY_WEIGHT[variant]})
            opt.step()
            opt.zero_grad()
    features, logits = (t.numpy() for t in _test_features(model, x_te))
    purity = float((y_tr[neighbours] == y_tr[:, None]).float().mean())
    return clustering_truth(logits.argmax(1), y_te.numpy()) | {
        "neighbour_purity": purity,
        "features_rank": centred_effective_rank(features),
        "features_rank_init": centred_effective_rank(features_init),
        "features_std": normalised_std(features),
        "logits_rank": centred_effective_rank(logits),
        "logits_rank_init": centred_effective_rank(logits_init),
        "logits_std": normalised_std(logits),
        "logits_participation": participation_ratio(logits),
        "logits_total_var": float(logits.var(0).sum()),
        "logits_total_var_init": float(logits_init.var(0).sum()),
        "logits_linear_acc": linear_probe_accuracy(_test_features(model, x_tr)[1].numpy(),
                                                   y_tr.numpy(), logits, y_te.numpy())}


_MUST_NOT = ("gradient-conflict", "gradient-swamping", "static-loss-weights", "inert-loss",
             "prototype-stale")

FAMILY = Family(
    name="scan",
    source="Van Gansbeke et al. 2020, SCAN (ECCV), eq. 2; wvangansbeke/Unsupervised-Classification "
           "losses/losses.py SCANLoss, entropy_weight 5",
    train=train,
    variants=(
        Variant("published", True, "consistency and entropy (weight 5) at their designed "
                "equilibrium: the digits spread over the clusters",
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse")),
        Variant("no-entropy", False,
                "entropy weight 0: nothing keeps the clusters in use, the consistency term is "
                "satisfied by one cluster for all",
                expected=(Expect("prototype-collapse", "cluster_head"),),
                allowed=(Expect("representation-collapse", "logits"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-entropy", 1)),
)
