"""Contrastive Clustering, after Li, Hu, Liu, Peng, Zhou & Peng 2021 ("Contrastive
Clustering", AAAI, sec. 3: eq. 1-3 the instance-level contrastive head, eq. 4-6 the
cluster-level head on the columns of the soft assignment matrix, eq. 7 the entropy H(Y) of
the cluster assignment probabilities subtracted "to avoid the trivial solution that most
instances are assigned into the same cluster") and the official Yunfan-Li/
Contrastive-Clustering (``modules/contrastive_loss.py``: ``InstanceLoss``, NT-Xent over the
2N augmented rows, temperature 0.5; ``ClusterLoss``, the same over the 2M cluster columns by
cosine, temperature 1.0, plus ``ne_loss`` = log M - H(p_i) + log M - H(p_j), p the batch's
mean assignment of each view; ``modules/network.py``: ``instance_projector`` and
``cluster_projector`` = Linear-ReLU-Linear on the backbone, the latter ending in a softmax
over M = class_num clusters, z l2-normalised; ``train.py``: ``loss = loss_instance +
loss_cluster``, Adam; ``config/config.yaml``: batch 256, lr 3e-4, weight decay 0,
feature_dim 128, 1000 epochs).

Published setup: ResNet-34 on CIFAR-10/100, STL-10, ImageNet-10/dogs, tiny-ImageNet,
SimCLR-style augmentations, 1000 epochs.

Here (CPU): scikit-learn's 8x8 digits (``common.digits_split``), two views of each digit by
``common.augment``, ``common.DigitEncoder`` (width 128) as the backbone, both projectors as
published at width 128 (feature_dim 32, M = 10 clusters for ten digits; the cluster
projector split into its hidden layer and its last linear layer only to watch them), batch
128, Adam lr 1e-3 (3x the published 3e-4: 300 steps instead of 1000 epochs), weight decay 0.
The two losses are passed to the probe as ``train.py`` names them: ``loss_instance`` and
``loss_cluster`` (the entropy term inside ``loss_cluster``, as ``ClusterLoss`` returns it).
Watched as docs/probe.md says: the instance features ``z`` (l2-normalised, as the loss reads
them) as a latent; the cluster projector's hidden layer as the latent ``cluster_hidden`` and
the rows of its last linear layer as the prototypes ``clusters`` of that latent, each
anchor's cluster (the argmax of its assignment) observed as ``assigned``; the instance
head's two views as the contrastive watch ``instance`` (in-batch negatives, temperature
0.5), the digit labels observed as ``groups``.

Variants (truth by construction):
- ``published``: healthy, as above.
- ``class-sorted``: broken. A loader sorted by label: every batch holds 128 digits of one
  class (the classes in a random order each round). Every negative of ``InstanceLoss`` is
  then a digit of the anchor's own class, and the entropy term of ``ClusterLoss`` spreads
  each one-class batch over all ten clusters: the clusters are cut across the digits
  instead of along them.
Measured on the test split without gradprobe (seeds 0 / 1; clusters used: >= 1% of the
test digits; usage entropy / log 10 of the argmax assignments; Hungarian-matched clustering
accuracy and NMI against the labels, scipy and scikit-learn; kNN accuracy (k 20, cosine) and
centred effective rank of ``z``; ``head_row_usage``: entropy / log 10 of each hidden
vector's nearest head row, the watched prototypes' usage, in numpy):
  published:    10 / 10 clusters used, usage 0.984 / 0.992, clustering accuracy 0.691 /
                0.613, NMI 0.693 / 0.583, head-row usage 0.985 / 0.994, kNN 0.876 / 0.847,
                rank 12.5 / 11.8;
  class-sorted: 10 / 10 clusters used, usage 0.962 / 0.974, clustering accuracy 0.296 /
                0.293, NMI 0.221 / 0.235, head-row usage 0.977 / 0.962, kNN 0.716 / 0.696,
                rank 17.2 / 17.4 (no collapse: the harm is what the clusters and the
                instance features no longer separate).
  Dropped: ``ClusterLoss`` without ``ne_loss`` (eq. 7's entropy removed, the paper's trivial
  solution) did not collapse here in 400 steps on seed 0: 9 of 10 clusters used, usage
  0.946 against 0.996, NMI 0.699 against 0.704; the cluster contrast compares columns by
  cosine, which keeps them apart whatever their mass.
About 30 CPU-seconds a run.
Expected on ``class-sorted``: ``weak-contrastive-signal`` on ``instance`` (every negative
shares the anchor's class, by construction). Must not (both): ``inert-loss``, ``non-finite``,
``static-loss-weights``, ``prototype-stale``, ``prototype-collapse`` and
``representation-collapse`` (usage and rank kept on both variants).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy)
from ..harness import Expect, Family, Variant
from ..heldout2.scan import clustering_truth

STEPS, BATCH, LR = 300, 128, 1e-3
FEATURE_DIM, CLUSTERS = 32, 10
INSTANCE_TEMPERATURE, CLUSTER_TEMPERATURE = 0.5, 1.0


class Network(nn.Module):
    """network.py's Network on the digit backbone: an instance and a cluster projector."""

    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        width = self.backbone.width
        self.instance_projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                                nn.Linear(width, FEATURE_DIM))
        self.cluster_hidden = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.cluster_head = nn.Linear(width, CLUSTERS)

    def forward(self, x):
        h = self.backbone(x)
        hidden = self.cluster_hidden(h)
        return (F.normalize(self.instance_projector(h), dim=1), hidden,
                self.cluster_head(hidden).softmax(1))


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InstanceLoss / the contrastive part of ClusterLoss: each of the 2N rows against its
    other view, every other row a negative, cross entropy summed and divided by 2N."""
    n = len(a)
    rows = torch.cat([a, b])
    sim = F.cosine_similarity(rows[:, None], rows[None], dim=2) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def negative_entropy(c: torch.Tensor) -> torch.Tensor:
    """ClusterLoss's ne term for one view: log M - H(mean assignment)."""
    p = c.sum(0) / c.sum()
    return math.log(len(p)) + (p * p.log()).sum()


def cluster_loss(c_i: torch.Tensor, c_j: torch.Tensor) -> torch.Tensor:
    """ClusterLoss: the contrast of the 2M cluster columns plus both views' ne terms."""
    return (nt_xent(c_i.t(), c_j.t(), CLUSTER_TEMPERATURE) + negative_entropy(c_i)
            + negative_entropy(c_j))


def nearest_row_usage(hidden: np.ndarray, rows: np.ndarray) -> float:
    """Entropy / log M of each hidden vector's nearest (Euclidean) row of the cluster head:
    the usage of the watched prototypes, computed in numpy."""
    d = ((hidden[:, None, :] - rows[None]) ** 2).sum(2)
    share = np.bincount(d.argmin(1), minlength=len(rows)) / len(hidden)
    nz = share[share > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(rows))) + 0.0


def one_class_batches(labels: torch.Tensor, gen: torch.Generator):
    """Endless batches of BATCH digits of one class each, the classes in a random order each
    round: a loader sorted by label."""
    while True:
        for digit in torch.randperm(CLUSTERS, generator=gen).tolist():
            rows = torch.nonzero(labels == digit).flatten()
            yield rows[torch.randperm(len(rows), generator=gen)[:BATCH]]


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Network()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    probe.watch_latent("cluster_hidden")
    probe.watch_prototypes("clusters", model.cluster_head.weight, latent="cluster_hidden",
                           groups="assigned")
    probe.watch_contrastive("instance", temperature=INSTANCE_TEMPERATURE)
    order = (one_class_batches(y_tr, gen) if variant == "class-sorted"
             else batches(len(x_tr), BATCH, gen))
    with probe:
        for _, idx in zip(range(STEPS), order):
            z_i, hidden_i, c_i = model(augment(x_tr[idx], gen))
            z_j, _, c_j = model(augment(x_tr[idx], gen))
            probe.observe(z=z_i, cluster_hidden=hidden_i, assigned=c_i.argmax(1),
                          instance=(z_i, z_j), groups=y_tr[idx])
            probe.backward({"loss_instance": nt_xent(z_i, z_j, INSTANCE_TEMPERATURE),
                            "loss_cluster": cluster_loss(c_i, c_j)})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        z_tr, _, _ = model(x_tr)
        z_te, hidden_te, c_te = model(x_te)
    return clustering_truth(c_te.argmax(1).numpy(), y_te.numpy()) | {
        "head_row_usage": nearest_row_usage(hidden_te.numpy(),
                                            model.cluster_head.weight.detach().numpy()),
        "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(), y_te.numpy()),
        "z_rank": centred_effective_rank(z_te.numpy())}


_MUST_NOT = ("inert-loss", "non-finite", "static-loss-weights", "prototype-stale")

FAMILY = Family(
    name="contrastive-clustering",
    source="Li et al. 2021, Contrastive Clustering (AAAI), eq. 1-7; "
           "Yunfan-Li/Contrastive-Clustering modules/contrastive_loss.py InstanceLoss, ClusterLoss",
    train=train,
    variants=(
        Variant("published", True,
                "instance and cluster contrast with the cluster entropy term, as published: "
                "the digits spread over the ten clusters",
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse")),
        Variant("class-sorted", False,
                "a loader sorted by label: every instance negative shares the anchor's class and "
                "the entropy term spreads each one-class batch over all clusters",
                expected=(Expect("weak-contrastive-signal", "instance"),),
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse")),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("class-sorted", 0)),
)
