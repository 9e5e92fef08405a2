"""DeepCluster, after Caron, Bojanowski, Joulin & Douze 2018 ("Deep Clustering for
Unsupervised Learning of Visual Features", ECCV, sec. 3.2-3.3; facebookresearch/deepcluster
``main.py`` (the epoch loop: features of the whole data set, k-means, pseudo-labels, a
fresh top layer drawn from N(0, 0.01) with zero bias and its own plain-SGD optimizer,
``nn.CrossEntropyLoss``), ``clustering.py`` (``preprocess_features``: PCA-whitening and l2
normalisation; ``run_kmeans``: 20 Lloyd iterations) and ``util.py`` (``UnifLabelSampler``)).

Published setup: AlexNet/VGG on ImageNet, k = 10,000 clusters (over-clustering), features
PCA-whitened to 256 dimensions and l2-normalised before k-means (faiss, 20 iterations),
k-means rerun every epoch; the classifier is re-initialised every epoch (the pseudo-labels
are permuted from one clustering to the next) and the network trained on the pseudo-labels
with cross-entropy, SGD lr 0.05, momentum 0.9, weight decay 1e-5, batch 256. Sec. 3.3
names two trivial solutions and their fixes: *empty clusters* (a centroid no point
chooses; faiss, as the paper describes, re-seeds it from a random non-empty cluster's
centroid (here the largest one's) with a small perturbation and splits that cluster's
points) and *trivial
parametrisation* (a few clusters take most images and the network predicts them whatever
the input; fixed by sampling images uniformly over the pseudo-classes,
``UnifLabelSampler``).

Here (CPU budget): scikit-learn's 8x8 digits, train and test splits together (1,797
images; labels only measure), the corpus's ``DigitEncoder`` (64-128-128, batch norm) as
the convnet, k = 30 (over-clustering of 10 classes, as 10,000 is of ImageNet's 1,000),
PCA-whitening to 32 dimensions, 20 Lloyd iterations in torch from k distinct random
images, 20 epochs of 28 batches of 64 (one pass's worth of samples per epoch, as the
sampler's N = |dataset|), the published optimiser settings. One loss,
``cross_entropy``, as the source has (its ``criterion``). The probe watches what a user of
the method would look at, the backbone output ``features``, with each image's pseudo-label
observed as ``groups``. The k-means centroids are not watched: they are recomputed, in a new
whitened basis, once an epoch by design.

Variants (truth by construction), measured without gradprobe on seeds 0 / 1 (NMI of the
final k-means against the digit labels, clusters in use, the largest cluster's share, a
linear probe of the features, first half of the images to the second; at the start
NMI 0.674 / 0.668, 30 clusters, largest 0.053 / 0.050, linear 0.959 / 0.959); 2-3 CPU-s a run:
- ``deepcluster``: healthy, as published (uniform sampling over pseudo-classes, empty
  clusters re-seeded). NMI 0.738 / 0.716, 30 / 30 clusters used (never fewer in any
  epoch), largest 0.052 / 0.064, linear 0.976 / 0.982.
- ``no-uniform-no-reassign``: images sampled uniformly over the data set and empty clusters
  left empty (their centroids stay put), the two safeguards of sec. 3.3 removed. Built as
  the broken variant, measured harmless at this scale: NMI 0.739 / 0.742, 30 / 30 clusters
  in every epoch, largest 0.065 / 0.057, linear 0.979 / 0.981. The digits' clusters are
  balanced and PCA-whitening with l2 normalisation keeps k-means from emptying any (also
  with k = 100 or 300, without whitening, with a ReLU head on top: NMI within 0.06 of
  the safeguarded run, every cluster used), so the trivial parametrisation never starts.
  Kept as a second healthy variant: a correct tool stays quiet.
- ``detached-features``: the top layer reads ``features.detach()`` (a wiring fault): the
  cross-entropy trains only the top layer, the backbone never learns from the
  pseudo-labels. NMI 0.631 / 0.639 (0.107 / 0.077 below healthy, below its own start),
  linear 0.952 / 0.956 (2.4 / 2.6 points below healthy), 30 / 30 clusters used.
  Expected: ``inert-loss`` on ``cross_entropy`` (the loss meant to train the backbone
  reaches only its own top layer). Must not: ``representation-collapse``,
  ``prototype-collapse``, ``gradient-swamping``, ``gradient-conflict``, ``non-finite``.
Must not (healthy): ``inert-loss``, ``representation-collapse``, ``prototype-collapse``,
``non-finite``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..common import DigitEncoder, digits_split, linear_probe_accuracy
from ..harness import Expect, Family, Variant

CLUSTERS, PCA_DIM, LLOYD_ITERS = 30, 32, 20
EPOCHS, BATCH = 20, 64
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-5


class DeepClusterNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = DigitEncoder()
        self.top_layer = nn.Linear(self.features.width, CLUSTERS)

    def reset_top_layer(self) -> None:
        """main.py: a new top layer every epoch, weights N(0, 0.01), bias 0."""
        with torch.no_grad():
            self.top_layer.weight.normal_(0, 0.01)
            self.top_layer.bias.zero_()

    def forward(self, x):
        return self.top_layer(self.features(x))


def all_digits() -> tuple[torch.Tensor, np.ndarray]:
    x_tr, y_tr, x_te, y_te = digits_split()
    return torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te]).numpy()


def preprocess_features(features: torch.Tensor) -> torch.Tensor:
    """clustering.py: PCA-whitening (eigen_power -0.5) to PCA_DIM, then l2 normalisation."""
    centred = features - features.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    scale = singular[:PCA_DIM] / (len(features) - 1) ** 0.5
    return F.normalize(centred @ vh[:PCA_DIM].T / (scale + 1e-8), dim=1)


def kmeans(codes: torch.Tensor, gen: torch.Generator, reassign_empty: bool):
    """Lloyd's algorithm from k distinct random points, returning each point's cluster; with
    ``reassign_empty`` an empty cluster takes the largest cluster's centroid plus a small
    perturbation (faiss's split, sec. 3.3), otherwise its centroid stays put and the cluster
    stays empty."""
    centroids = codes[torch.randperm(len(codes), generator=gen)[:CLUSTERS]].clone()
    for _ in range(LLOYD_ITERS):
        assign = torch.cdist(codes, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=CLUSTERS)
        sums = torch.zeros_like(centroids).index_add_(0, assign, codes)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if reassign_empty:
            for empty in torch.nonzero(~filled).flatten().tolist():
                largest = int(counts.argmax())
                noise = 1e-3 * torch.randn(centroids.shape[1], generator=gen)
                centroids[empty] = centroids[largest] + noise
                centroids[largest] -= noise
                counts[largest] //= 2
    return torch.cdist(codes, centroids).argmin(1)


def uniform_over_labels(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """UnifLabelSampler: N // k + 1 images drawn from every non-empty pseudo-class (with
    replacement when it holds no more), shuffled, cut to N."""
    present = torch.unique(labels)
    per_class = len(labels) // len(present) + 1
    drawn = []
    for label in present.tolist():
        members = torch.nonzero(labels == label).flatten()
        pick = (torch.randint(len(members), (per_class,), generator=gen)
                if len(members) <= per_class
                else torch.randperm(len(members), generator=gen)[:per_class])
        drawn.append(members[pick])
    order = torch.cat(drawn)
    return order[torch.randperm(len(order), generator=gen)][:len(labels)]


def cluster_truth(model: DeepClusterNet, x: torch.Tensor, y: np.ndarray, assign: torch.Tensor
                  ) -> dict:
    model.eval()
    with torch.no_grad():
        f = model.features(x).numpy()
    model.train()
    counts = np.bincount(assign.numpy(), minlength=CLUSTERS)
    half = len(x) // 2
    return {"nmi": float(normalized_mutual_info_score(y, assign.numpy())),
            "clusters_used": int((counts > 0).sum()),
            "largest_cluster_share": float(counts.max() / len(x)),
            "linear_acc": linear_probe_accuracy(f[:half], y[:half], f[half:], y[half:])}


def train(variant: str, seed: int, log: Path) -> dict:
    safeguards = variant != "no-uniform-no-reassign"
    x, y = all_digits()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DeepClusterNet()
    opt = torch.optim.SGD(model.features.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features", labels="groups")
    steps_per_epoch = len(x) // BATCH
    history = []
    with probe:
        for epoch in range(EPOCHS + 1):
            model.eval()
            with torch.no_grad():
                features = model.features(x)
            model.train()
            labels = kmeans(preprocess_features(features), gen, reassign_empty=safeguards)
            history.append(cluster_truth(model, x, y, labels))
            if epoch == EPOCHS:
                break
            order = (uniform_over_labels(labels, gen) if safeguards
                     else torch.randperm(len(x), generator=gen))
            model.reset_top_layer()
            opt_top = torch.optim.SGD(model.top_layer.parameters(), lr=LR,
                                      weight_decay=WEIGHT_DECAY)
            for step in range(steps_per_epoch):
                idx = order[step * BATCH:(step + 1) * BATCH]
                f = model.features(x[idx])
                head_input = f.detach() if variant == "detached-features" else f
                logits = model.top_layer(head_input)
                losses = {"cross_entropy": F.cross_entropy(logits, labels[idx])}
                probe.observe(features=f, groups=labels[idx])
                opt.zero_grad()
                opt_top.zero_grad()
                probe.backward(losses)
                opt.step()
                opt_top.step()
    return {f"start_{k}": v for k, v in history[0].items()} | history[-1] | {
        "min_clusters_used": min(h["clusters_used"] for h in history)}


_MUST_NOT = ("representation-collapse", "prototype-collapse", "non-finite")

FAMILY = Family(
    name="deepcluster",
    source="Caron, Bojanowski, Joulin & Douze 2018 (Deep Clustering for Unsupervised "
           "Learning of Visual Features, ECCV, sec. 3.2-3.3); facebookresearch/deepcluster "
           "main.py, clustering.py, util.py (UnifLabelSampler)",
    train=train,
    variants=(
        Variant("deepcluster", True,
                "as published: k-means (30 clusters) on PCA-whitened, l2-normalised features "
                "every epoch, a re-initialised top layer, cross-entropy on the pseudo-labels "
                "with images sampled uniformly over them, empty clusters re-seeded",
                must_not=_MUST_NOT + ("inert-loss",)),
        Variant("no-uniform-no-reassign", True,
                "uniform sampling over pseudo-classes and empty-cluster re-seeding removed; "
                "measured harmless on balanced digits (every cluster used in every epoch, "
                "NMI and linear probe as the published run's)",
                must_not=_MUST_NOT + ("inert-loss",)),
        Variant("detached-features", False,
                "the top layer reads features.detach(): the cross-entropy trains only the "
                "top layer and the backbone never learns (NMI and linear probe below the "
                "published run's on every seed)",
                expected=(Expect("inert-loss", "cross_entropy"),),
                must_not=_MUST_NOT + ("gradient-swamping", "gradient-conflict")),
    ),
    seeds=(0, 1),
    quick=(("deepcluster", 1), ("detached-features", 1)),
)
