"""Self-labelling (SeLa), after Asano, Rupprecht & Vedaldi 2020 ("Self-labelling via simultaneous
clustering and representation learning", ICLR; arXiv 1911.05371, read as stored text: sec. 3,
the cross-entropy to pseudo-labels that must split the N images equally among the K labels, an
optimal-transport problem solved by Sinkhorn-Knopp on the softmax outputs raised to the power
lambda, and its multi-head variant; without the constraint every image in one label is a
degenerate minimiser) and the official code yukimasano/self-label ``sinkhornknopp.py``
(``cpu_sk``, ``optimize_L_sk``: P^lamb, alternating r = (1/K) / (P c), c = (1/N) / (r^T P)
until the change of c is below 0.1, labels the argmax of diag(r) P diag(c)) and ``main.py``
(``Optimizer``: heads ``top_layer{h}``, the loss the mean over the heads of the cross-entropy
of each head's logits to its own labels, the labels of the whole training set re-optimised
``nopts`` = 100 times, the first at iteration 0, spread quadratically over the epochs), read
with the repository tools.

Published setup (main.py defaults): AlexNet or ResNet trunk, ``ncl`` = 3000 clusters per
head, ``hc`` heads (1 by default; the paper's multi-head models use several), ``lamb`` 25,
SGD lr 0.05, 200 epochs.

Here: scikit-learn's 8x8 digits, trunk ``DigitEncoder`` of common.py, two heads ``top_layer0``
and ``top_layer1`` of K = 10 clusters, each its own cross-entropy loss to its own labels (the
repo averages the heads into one; here each is a loss, weight 1), inputs seen through
common.py's ``augment``, Adam lr 1e-3, batch 128, 1200 steps; the labels of all 1347 training
digits re-optimised every 100 steps from step 0 (12 times, evenly spaced: the repo notes that
linear spacing also works) from the softmax outputs on the clean images (eval mode), lamb 25 as
in the repo. Watched as a user would (docs/probe.md): the trunk output ``features`` as a
latent, and head 0's weight rows (one per cluster, its logits their dot products with the
features) as prototypes ``clusters`` of ``features``, each row's head-0 pseudo-label observed
as its group.

Variants (truth by construction):
- ``published``: healthy, Sinkhorn-Knopp equipartition of the labels (sec. 3).
- ``argmax-labels``: broken, the labels are the argmax of each head's own predictions, no
  equipartition: the degenerate solution the paper's sec. 3 warns of (every image in one cluster
  minimises the cross-entropy), reached as the self-training feeds the largest cluster.
Measured on the test split (450 digits), without gradprobe, head 0's argmax: clusters used,
usage entropy / log 10, clustering accuracy (Hungarian matching, scipy), training-label
clusters used at the last re-optimisation, the trunk features' centred effective rank and
total variance (numpy / torch):
                    published             argmax-labels
                    seed 0    seed 1      seed 0    seed 1
  clusters used     10        10          2         1
  usage entropy     0.999     0.995       0.141     0.000
  accuracy          0.842     0.751       0.200     0.102 (chance 0.1)
  training labels   10        10          2         1      clusters at the last relabelling
  head 1 clusters   10        10          1         5
  feature rank      70.8      69.9        74.4      70.9
  feature variance  89.4      98.4        48.1      61.5
About 6-11 CPU-seconds a run (probe included).
Expected on ``argmax-labels``: ``prototype-collapse`` on ``clusters`` (one or two of the ten
rows take every assignment). Must not (both): ``inert-loss`` (both heads' losses train the
trunk), ``static-loss-weights`` (no loss is swamped by a weight: both are cross-entropies of
weight 1), ``representation-collapse`` on ``features`` (its centred effective rank does not
fall against the healthy run; its variance stays within a factor 2); on the healthy variant
also ``prototype-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, batches, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant
from ..heldout3.iic import clustering_accuracy, usage_entropy

STEPS, BATCH, LR, RELABEL_EVERY = 1200, 128, 1e-3, 100
K, HEADS, LAMB = 10, 2, 25.0


class SelfLabelNet(nn.Module):
    """A trunk and ``HEADS`` linear clustering heads (main.py's ``top_layer{h}``)."""

    def __init__(self):
        super().__init__()
        self.trunk = DigitEncoder()
        self.heads = nn.ModuleList(nn.Linear(self.trunk.width, K) for _ in range(HEADS))

    def forward(self, x):
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]


def sinkhorn_labels(probs: torch.Tensor) -> torch.Tensor:
    """``optimize_L_sk``: the argmax of the equipartitioned transport plan for P^lamb (N x K)."""
    p = probs.double().t() ** LAMB  # K x N
    n = p.shape[1]
    c = torch.full((n, 1), 1.0 / n, dtype=p.dtype)
    err, count = float("inf"), 0
    while err > 1e-1:
        r = (1.0 / K) / (p @ c)
        c_new = (1.0 / n) / (r.t() @ p).t()
        if count % 10 == 0:
            err = float((c / c_new - 1).abs().nansum())
        c, count = c_new, count + 1
    return (p * c.t() * r).argmax(0)


@torch.no_grad()
def relabel(model: SelfLabelNet, x: torch.Tensor, equipartition: bool) -> torch.Tensor:
    """New labels of every training image, one row per head."""
    model.eval()
    probs = [logits.softmax(1) for logits in model(x)[1]]
    model.train()
    return torch.stack([sinkhorn_labels(p) if equipartition else p.argmax(1) for p in probs])


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, y_te = digits_split()
    equipartition = variant == "published"
    model = SelfLabelNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    probe.watch_prototypes("clusters", model.heads[0].weight, latent="features")
    with probe:
        for step in range(STEPS):
            if step % RELABEL_EVERY == 0:
                labels = relabel(model, x_tr, equipartition)
            idx = next(order)
            features, logits = model(augment(x_tr[idx], gen))
            probe.observe(features=features, groups=labels[0, idx])
            probe.backward({f"top_layer{h}": F.cross_entropy(logits[h], labels[h, idx])
                            for h in range(HEADS)})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        features, logits = model(x_te)
    assigned = logits[0].argmax(1)
    return {"clusters_used": int(assigned.unique().numel()), "clusters": K,
            "usage_entropy": usage_entropy(assigned, K),
            "accuracy": clustering_accuracy(assigned.numpy(), y_te.numpy()),
            "head1_clusters_used": int(logits[1].argmax(1).unique().numel()),
            "train_label_clusters_used": int(labels[0].unique().numel()),
            "feature_rank": centred_effective_rank(features.numpy()),
            "feature_total_variance": float(features.var(0).sum())}


_MUST_NOT = ("inert-loss", "static-loss-weights", "representation-collapse")

FAMILY = Family(
    name="sela",
    source="Asano, Rupprecht & Vedaldi 2020 (SeLa, ICLR) sec. 3; yukimasano/self-label "
           "sinkhornknopp.py optimize_L_sk, two heads top_layer0/top_layer1",
    train=train,
    variants=(
        Variant("published", True,
                "pseudo-labels from Sinkhorn-Knopp with equipartition (lamb 25): every "
                "cluster keeps a tenth of the images",
                must_not=_MUST_NOT + ("prototype-collapse",)),
        Variant("argmax-labels", False,
                "pseudo-labels from the argmax of the heads' own predictions, no "
                "equipartition: self-training feeds the largest cluster until it holds "
                "(nearly) every image",
                expected=(Expect("prototype-collapse", "clusters"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("argmax-labels", 1)),
)
