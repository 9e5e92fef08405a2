"""Invariant Information Clustering, after Ji, Henriques & Vedaldi 2019 ("Invariant
Information Clustering for Unsupervised Image Classification and Segmentation", ICCV; sec.
3.1 eq. 1-3 and sec. 3.3 "auxiliary overclustering"), the official code xu-ji/IIC
``code/utils/cluster/IID_losses.py`` (``IID_loss``, ``compute_joint``) and
``code/scripts/cluster/cluster_greyscale_twohead.py`` (the MNIST two-head script: heads B
and A, ``lamb_A = lamb_B = 1.0``, one epoch of each head in turn, Adam), read with the
repository tools.

Published objective: a trunk and softmax heads; for each pair (x, g(x)) of an image and a
transformed copy, the joint P (K x K) of the two cluster assignments is the batch mean of
outer products of the two heads' softmax outputs, symmetrised and normalised; marginals P_i,
P_j are its row and column sums; entries below float epsilon are clamped;
``IID_loss = -sum P_ij (log P_ij - lamb log P_j - lamb log P_i)``,
which at lamb = 1 is minus the mutual information I(z; z') = H(z) - H(z | z'). The paper
(sec. 3.1, "Why degenerate solutions are avoided", read as quoted on
hackmd.io/@vinsis/BywJsfk_s; also its introduction) keeps the marginal entropy H(z), whose
maximum needs every cluster used, so that assigning all images to one class does not
minimise the loss. Two heads on one trunk: head B with K = the number of classes, head A
overclustering with 5x more clusters (the MNIST setup: 10 and 50), each trained with its own
IIC loss (averaged over 5 sub-heads); Adam.

Here: scikit-learn's 8x8 digits; trunk ``DigitEncoder`` of common.py (64 -> 128 -> 128,
batch norm, ReLU) in place of the VGG/ResNet trunk; head B Linear(128, 10), head A
Linear(128, 50), softmax; g = common.py's ``augment`` (shift, intensity, erasure, noise);
one sub-head per head; the pair is two draws of g on the same batch (the source pairs x with
g(x) in two forward passes; here one forward of both, where x against g(x) measured worse:
usage entropy 0.85 of log 10 and clustering accuracy 0.49 against 0.91 and 0.71, seed 0,
same steps); batch 256 pairs, Adam lr 3e-3, 1000 steps. The source alternates epochs of head
B and head A; here both losses are summed each step (one optimiser step per batch). Losses
``head_A`` and ``head_B`` (weight 1 each), after the source's head names. Watched as a user
would: the trunk output ``features`` as a latent; head B's weight rows (one per cluster, the
logits being their dot products with the features, as a router's keys are in docs/probe.md)
as prototypes ``clusters_B`` of ``features``, with head B's cluster assignment (argmax)
observed as each row's group.

Variants (truth by construction):
- ``published``: healthy, lamb = 1 (the source's default): the mutual information.
- ``no-marginal-entropy``: broken, lamb = 0 in ``IID_loss``: the loss is the joint entropy
  H(z, z') = H(z | z') + H(z'), without the -H(z) - H(z') that keeps clusters in use; its
  unique minimum puts every image in one cluster (the degenerate solution of sec. 3.1).
Measured on the test split (450 digits), independently of gradprobe (seeds 0 and 1): head B
clusters used (argmax), usage entropy / log 10, clustering accuracy (Hungarian matching of
clusters to labels, scipy), head A clusters used of 50, trunk features' centred effective
rank (numpy):
  published:           10 and 9 clusters, usage 0.91 and 0.87, accuracy 0.71 and 0.66,
                       head A 31 and 24 of 50, feature rank 54.5 and 53.9;
  no-marginal-entropy:  1 and 1 cluster,  usage 0.00 and 0.00, accuracy 0.10 and 0.10,
                       head A 1 and 1, feature rank 29.2 and 27.9.
About 15-20 CPU-seconds a run (probe included).
Expected on ``no-marginal-entropy``: ``prototype-collapse`` on ``clusters_B`` (every row is
assigned to one cluster); allowed ``representation-collapse`` on ``features`` (its centred
effective rank halves against the healthy run once nothing asks the trunk to tell images
apart). Must not (both): ``inert-loss`` (both heads' losses train the trunk),
``static-loss-weights``; on the healthy variant also ``prototype-collapse``,
``representation-collapse``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, batches, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 1000, 256, 3e-3
CLUSTERS, OVERCLUSTERS = 10, 50
LAMB = {"published": 1.0, "no-marginal-entropy": 0.0}


def iid_loss(x_out: torch.Tensor, x_tf_out: torch.Tensor, lamb: float) -> torch.Tensor:
    """xu-ji/IIC ``IID_loss`` on two batches of softmax outputs (n, k)."""
    k = x_out.shape[1]
    joint = (x_out.unsqueeze(2) * x_tf_out.unsqueeze(1)).sum(0)
    joint = (joint + joint.t()) / 2
    joint = joint / joint.sum()
    p_i = joint.sum(1).view(k, 1).expand(k, k)
    p_j = joint.sum(0).view(1, k).expand(k, k)
    eps = sys.float_info.epsilon  # the source clamps below machine epsilon to avoid log 0
    joint, p_i, p_j = joint.clamp_min(eps), p_i.clamp_min(eps), p_j.clamp_min(eps)
    return -(joint * (joint.log() - lamb * p_j.log() - lamb * p_i.log())).sum()


class ClusterNet(nn.Module):
    """A trunk and two softmax heads: A overclusters, B has one cluster per class."""

    def __init__(self):
        super().__init__()
        self.trunk = DigitEncoder()
        self.head_A = nn.Linear(self.trunk.width, OVERCLUSTERS)
        self.head_B = nn.Linear(self.trunk.width, CLUSTERS)

    def forward(self, x):
        features = self.trunk(x)
        return features, self.head_A(features).softmax(1), self.head_B(features).softmax(1)


def clustering_accuracy(assigned: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to labels (Hungarian, as IIC
    evaluates)."""
    counts = np.zeros((CLUSTERS, CLUSTERS))
    np.add.at(counts, (assigned, labels), 1.0)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def usage_entropy(assigned: torch.Tensor, size: int) -> float:
    """Entropy of the cluster usage over log size: 1 when every cluster is used equally."""
    p = torch.bincount(assigned, minlength=size).double() / len(assigned)
    p = p[p > 0]
    return float((p * (1 / p).log()).sum() / math.log(size))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lamb = LAMB[variant]
    x_tr, _, x_te, y_te = digits_split()
    model = ClusterNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    probe.watch_prototypes("clusters_B", model.head_B.weight, latent="features")
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            both = torch.cat([augment(x, gen), augment(x, gen)])
            features, out_a, out_b = model(both)
            probe.observe(features=features[:BATCH], groups=out_b[:BATCH].argmax(1))
            losses = {"head_A": iid_loss(out_a[:BATCH], out_a[BATCH:], lamb),
                      "head_B": iid_loss(out_b[:BATCH], out_b[BATCH:], lamb)}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        features, out_a, out_b = model(x_te)
    assigned, over = out_b.argmax(1), out_a.argmax(1)
    return {"clusters_used": int(assigned.unique().numel()), "clusters": CLUSTERS,
            "usage_entropy": usage_entropy(assigned, CLUSTERS),
            "accuracy": clustering_accuracy(assigned.numpy(), y_te.numpy()),
            "overclusters_used": int(over.unique().numel()), "overclusters": OVERCLUSTERS,
            "feature_rank": centred_effective_rank(features.numpy())}


_MUST_NOT = ("inert-loss", "static-loss-weights")

FAMILY = Family(
    name="iic",
    source="Ji, Henriques & Vedaldi 2019 (IIC, ICCV); xu-ji/IIC "
           "code/utils/cluster/IID_losses.py IID_loss, two heads with overclustering",
    train=train,
    variants=(
        Variant("published", True,
                "IIC's mutual information (lamb 1) on both heads: every cluster stays in use",
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse")),
        Variant("no-marginal-entropy", False,
                "lamb 0: the joint entropy without the marginal entropy, minimised by "
                "putting every image in one cluster",
                expected=(Expect("prototype-collapse", "clusters_B"),),
                allowed=(Expect("representation-collapse", "features"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-marginal-entropy", 1)),
)
