"""Online Deep Clustering, ODC, after Zhan, Xie, Liu, Ong & Loy 2020 ("Online Deep Clustering
for Unsupervised Representation Learning", CVPR, sec. 3: a samples memory of every image's
feature and pseudo-label, updated by momentum from the batch's features, labels re-assigned
to the nearest centroid; a centroids memory recomputed from the samples memory; loss
re-weighting by the inverse square root of the cluster sizes; small clusters dissolved and the
largest cluster split in two to refill them). Official code, open-mmlab/mmselfsup (the
OpenSelfSup code base of the authors): ``mmselfsup/models/memories/odc_memory.py``
``ODCMemory`` (``init_memory``, ``update_samples_memory``: feature_new = (1 - momentum) old +
momentum new, re-normalised, new label the argmax of the centroids' similarities;
``_compute_centroids``; ``update_centroids_memory``; ``deal_with_small_clusters`` and
``_redirect_empty_clusters`` / ``_partition_max_cluster``: 2-means of the largest cluster),
``mmselfsup/engine/hooks/odc_hook.py`` ``ODCHook.after_train_iter`` (centroids every
``centroids_update_interval`` iterations, small clusters every iteration, ``set_reweight``:
(1 / histogram) ** 0.5 normalised), ``mmselfsup/models/algorithms/odc.py`` ``ODC.loss``, the
older ``openselfsup/models/odc.py`` ``ODC.set_reweight`` (``nn.CrossEntropyLoss(weight=...)``),
and the configs ``configs/selfsup/_base_/models/odc.py`` (memory momentum 0.5, 10,000 clusters,
min_cluster 20, ODCNeck 2048-512-256, ClsHead) and
``configs/selfsup/odc/odc_resnet50_8xb64-steplr-440e_in1k.py`` (SGD lr 0.06, momentum 0.9 and
0 for the head, weight decay 1e-5).

Published setup: ResNet-50 on ImageNet, the memory initialised by k-means on the features of
the network before training, then every iteration: cross-entropy of the head on the batch's
memory labels (class-weighted), samples memory updated from the batch (momentum 0.5),
centroids recomputed every 10 iterations, small clusters handled every iteration, weights
re-set every iteration (ODCHook with centroids_update_interval 10,
deal_with_small_clusters_interval 1, reweight True, reweight_pow 0.5).

Here (CPU budget): scikit-learn's 8x8 digits, the training split (1,347 images; labels only
measure), the corpus's ``DigitEncoder`` (64-128-128, batch norm) as the backbone, a neck of
one linear layer to 32 dimensions with batch norm (ODCNeck scaled), a linear head over 30
clusters (over-clustering of 10 classes as 10,000 of ImageNet's 1,000), min_cluster 10 (20 of
~128 images a cluster on ImageNet, here ~45), the corpus's ``augment`` as the augmentation,
batch 64, 1,500 steps, the published optimiser; sklearn k-means (one init) for the start and
for the 2-means split. One loss, ``cross_entropy``, as the source has. The probe watches what a
user of the method looks at: the normalised neck output ``feature`` with each image's memory
label as ``groups`` (``watch_latent("feature", labels="groups")``) and the centroids memory as
the prototypes of that latent (``watch_prototypes("centroids", lambda: memory.centroids,
latent="feature")``; the labels index its rows); the label bank's usage entropy is logged
every 50 steps.

Truth, measured without gradprobe: from the label bank at the end, the usage entropy over
log 30 (1 = balanced), clusters used and at least min_cluster in size, the largest cluster's
share, NMI against the digit labels; on the test split a 20-NN accuracy (cosine) of the
backbone and of the neck feature (trained on the training split's features), a linear probe
of the backbone, the centred effective rank of the normalised neck feature. At the start
(the k-means memory of the untrained network), seeds 0 / 1: usage 0.985 / 0.976, 30 / 30
clusters, NMI 0.599 / 0.609, feature 20-NN 0.929 / 0.907, backbone 20-NN 0.951 / 0.940,
feature rank 24.6 / 25.2.

Variants (truth by construction), measured on seeds 0 / 1:
- ``published``: healthy, as the ODCHook runs it. Clusters stay balanced (usage 0.976 / 0.981,
  30 / 30 used, largest 0.061 / 0.063) and the clustering improves (NMI 0.670 / 0.658, up from
  0.599 / 0.609), the memory labels still changing (label change ratio 0.22 / 0.24 over the
  last 50 steps); feature 20-NN 0.904 / 0.896, backbone 20-NN 0.920 / 0.920 and linear probe
  0.962 / 0.971 (the untrained MLP's features are already near the pixels' kNN on digits, so
  the paper's gain in representation does not show at this scale; the clustering's does),
  feature rank 14.2 / 13.0; 57 / 53 small-cluster redirections.
- ``no-small-cluster-handling``: healthy by measurement. The small-cluster handling and the
  loss re-weighting left out (``deal_with_small_clusters`` never called, plain
  cross-entropy), centroids refreshed every 10 steps. Built as broken (the paper's guard
  against collapse), measured harmless here: usage 0.960 / 0.955, 30 / 29 clusters used,
  largest 0.076 / 0.075, NMI 0.683 / 0.687, feature 20-NN 0.927 / 0.904, rank 14.2 / 13.5. The
  digits' clusters are balanced and the centroids follow the memory, so no cluster empties:
  a correct tool stays quiet.
- ``no-odc-hook``: broken. The ODCHook left out of the config (custom_hooks not set): the
  centroids keep the k-means values of the untrained network (never refreshed from the
  memory), no small-cluster handling, no re-weighting. The memory features move with the
  network while the centroids stay, labels flow to the few centroids the features drift
  towards and the clusters collapse: usage 0.522 / 0.485, 12 / 10 of 30 clusters used, largest
  0.466 / 0.420, NMI 0.373 / 0.489 (below the start), feature 20-NN 0.811 / 0.860 (0.093 /
  0.036 below ``published``), rank 10.7 / 10.5; the backbone is not measurably worse (20-NN
  0.900 / 0.933, linear 0.969 / 0.967). That ``no-small-cluster-handling`` stays balanced
  shows the stale centroids are the cause.
Expected on ``no-odc-hook``: ``prototype-stale`` on ``centroids`` (never moved while the
feature moves). Allowed: ``prototype-collapse`` on ``centroids`` (the usage collapse is true:
10-12 of 30 in use, entropy about 0.5 of log 30, the rule's threshold), and
``representation-collapse`` on ``feature`` (the neck feature concentrates on the few clusters
in use, 20-NN and rank below ``published``, though no collapse to a point). Must not (all):
``inert-loss``, ``non-finite``; healthy also ``prototype-stale`` (refreshed every 10 steps,
still in between by design), ``prototype-collapse`` and ``representation-collapse``.

CPU: about 7-11 seconds a run at one thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, linear_probe_accuracy)
from ..harness import Expect, Family, Variant

CLUSTERS, FEAT_DIM, MOMENTUM_MEMORY, MIN_CLUSTER = 30, 32, 0.5, 10
CENTROIDS_EVERY, REWEIGHT_POW = 10, 0.5
STEPS, BATCH, LR, SGD_MOMENTUM, WEIGHT_DECAY = 1500, 64, 0.06, 0.9, 1e-5


class ODCNet(nn.Module):
    """Backbone, neck (to the memory's feature dimension) and the linear head of the
    pseudo-classes."""

    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        self.neck = nn.Sequential(nn.Linear(self.backbone.width, FEAT_DIM),
                                  nn.BatchNorm1d(FEAT_DIM))
        self.head = nn.Linear(FEAT_DIM, CLUSTERS)

    def forward(self, x):
        feature = self.neck(self.backbone(x))
        return feature, self.head(feature)


class ODCMemory:
    """odc_memory.py ODCMemory on one process: the samples memory (l2-normalised features and
    pseudo-labels of every image) and the centroids memory."""

    def __init__(self, feature: torch.Tensor, seed: int):
        self.feature_bank = F.normalize(feature, dim=1)
        labels = KMeans(CLUSTERS, n_init=1, random_state=seed).fit_predict(
            self.feature_bank.numpy())
        self.label_bank = torch.from_numpy(labels).long()
        self.centroids = torch.zeros(CLUSTERS, feature.shape[1])
        self.update_centroids()

    def update_samples(self, idx: torch.Tensor, feature: torch.Tensor) -> float:
        """update_samples_memory: momentum blend of the stored and the new normalised
        feature, re-normalised; each image's new label its most similar centroid."""
        new = (1 - MOMENTUM_MEMORY) * self.feature_bank[idx] + MOMENTUM_MEMORY * F.normalize(
            feature, dim=1)
        self.feature_bank[idx] = F.normalize(new, dim=1)
        label = (self.feature_bank[idx] @ self.centroids.T).argmax(1)
        change = float((label != self.label_bank[idx]).float().mean())
        self.label_bank[idx] = label
        return change

    def update_centroids(self, rows=None) -> None:
        """update_centroids_memory / _compute_centroids: each non-empty cluster's mean memory
        feature (empty ones kept)."""
        for c in range(CLUSTERS) if rows is None else rows:
            members = self.label_bank == c
            if members.any():
                self.centroids[c] = self.feature_bank[members].mean(0)

    def histogram(self) -> np.ndarray:
        return np.bincount(self.label_bank.numpy(), minlength=CLUSTERS)

    def deal_with_small_clusters(self, seed: int) -> int:
        """deal_with_small_clusters: the images of clusters under MIN_CLUSTER go to their most
        similar other centroid; each emptied cluster then takes half of the largest cluster
        (2-means on its memory features, _redirect_empty_clusters), both centroids updated."""
        small = np.nonzero(self.histogram() < MIN_CLUSTER)[0].tolist()
        if not small:
            return 0
        keep = torch.tensor([c for c in range(CLUSTERS) if c not in small])
        for s in small:
            members = torch.nonzero(self.label_bank == s).flatten()
            if len(members):
                target = (self.feature_bank[members] @ self.centroids[keep].T).argmax(1)
                self.label_bank[members] = keep[target]
        for e in small:
            largest = int(self.histogram().argmax())
            members = torch.nonzero(self.label_bank == largest).flatten()
            split = KMeans(2, n_init=1, random_state=seed, max_iter=20).fit_predict(
                self.feature_bank[members].numpy())
            if split.min() == split.max():
                split = np.arange(len(members)) % 2
            self.label_bank[members[torch.from_numpy(split == 1)]] = e
            self.update_centroids([largest, e])
        return len(small)

    def class_weight(self) -> torch.Tensor:
        """ODCHook.set_reweight: (1 / cluster size) ** 0.5, normalised."""
        inverse = (1.0 / (self.histogram().astype(np.float32) + 1e-10)) ** REWEIGHT_POW
        return torch.from_numpy(inverse / inverse.sum())


def cluster_truth(memory: ODCMemory, y_train: np.ndarray) -> dict:
    counts = memory.histogram()
    p = counts[counts > 0] / counts.sum()
    return {"usage_entropy": float(-(p * np.log(p)).sum() / np.log(CLUSTERS)),
            "clusters_used": int((counts > 0).sum()),
            "clusters_at_min_size": int((counts >= MIN_CLUSTER).sum()),
            "largest_cluster_share": float(counts.max() / counts.sum()),
            "nmi": float(normalized_mutual_info_score(y_train, memory.label_bank.numpy()))}


def representation(model: ODCNet, x_tr, y_tr, x_te, y_te) -> dict:
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.backbone(x_tr).numpy(), model.backbone(x_te).numpy()
        z_tr, z_te = model.neck(torch.from_numpy(f_tr)).numpy(), model.neck(
            torch.from_numpy(f_te)).numpy()
    model.train()
    return {"knn_acc": knn_accuracy(f_tr, y_tr, f_te, y_te),
            "feature_knn_acc": knn_accuracy(z_tr, y_tr, z_te, y_te),
            "feature_rank": centred_effective_rank(
                z_te / np.maximum(np.linalg.norm(z_te, axis=1, keepdims=True), 1e-12)),
            "linear_acc": linear_probe_accuracy(f_tr, y_tr, f_te, y_te)}


def train(variant: str, seed: int, log: Path) -> dict:
    x_tr, y_tr, x_te, y_te = digits_split()
    y_tr_np, y_te_np = y_tr.numpy(), y_te.numpy()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ODCNet()
    start = representation(model, x_tr, y_tr_np, x_te, y_te_np)
    model.eval()
    with torch.no_grad():
        memory = ODCMemory(model(x_tr)[0], seed)  # k-means on the initial network's features
    model.train()
    start |= cluster_truth(memory, y_tr_np)
    head = list(model.head.parameters())
    opt = torch.optim.SGD(
        [{"params": [p for n, p in model.named_parameters() if not n.startswith("head.")]},
         {"params": head, "momentum": 0.0}],
        lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    refresh = variant != "no-odc-hook"  # ODCHook's centroids update
    balance = variant not in ("no-small-cluster-handling", "no-odc-hook")
    weight = memory.class_weight() if balance else None
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("feature", labels="groups")
    probe.watch_prototypes("centroids", lambda: memory.centroids, latent="feature")
    order = batches(len(x_tr), BATCH, gen)
    changes, small_events = [], 0
    with probe:
        for step in range(STEPS):
            idx = next(order)
            feature, logits = model(augment(x_tr[idx], gen))
            labels = memory.label_bank[idx].clone()
            probe.observe(feature=F.normalize(feature, dim=1), groups=labels)
            probe.backward({"cross_entropy": F.cross_entropy(logits, labels, weight=weight)})
            opt.step()
            opt.zero_grad()
            changes.append(memory.update_samples(idx, feature.detach()))
            # ODCHook.after_train_iter
            if refresh and (step + 1) % CENTROIDS_EVERY == 0:
                memory.update_centroids()
            if balance:
                small_events += memory.deal_with_small_clusters(seed)
                weight = memory.class_weight()
            if step % 50 == 49:
                probe.log(cluster_usage_entropy=cluster_truth(memory, y_tr_np)["usage_entropy"])
    end = representation(model, x_tr, y_tr_np, x_te, y_te_np) | cluster_truth(memory, y_tr_np)
    return {f"start_{k}": v for k, v in start.items()} | end | {
        "label_change_ratio_end": float(np.mean(changes[-50:])),
        "small_clusters_redirected": float(small_events)}


_HEALTHY_MUST_NOT = ("prototype-stale", "prototype-collapse", "representation-collapse",
                     "inert-loss", "non-finite")

FAMILY = Family(
    name="odc",
    source="Zhan, Xie, Liu, Ong & Loy 2020 (Online Deep Clustering for Unsupervised "
           "Representation Learning, CVPR, sec. 3); open-mmlab/mmselfsup "
           "mmselfsup/models/memories/odc_memory.py ODCMemory, mmselfsup/engine/hooks/"
           "odc_hook.py ODCHook, mmselfsup/models/algorithms/odc.py, openselfsup/models/odc.py",
    train=train,
    variants=(
        Variant("published", True,
                "as published: momentum samples memory, centroids recomputed every 10 steps, "
                "small clusters handled and the loss re-weighted every step; clusters stay "
                "balanced (30 of 30 used) and NMI rises (measured)",
                must_not=_HEALTHY_MUST_NOT),
        Variant("no-small-cluster-handling", True,
                "small-cluster handling and re-weighting left out, centroids still refreshed; "
                "measured harmless on digits (29-30 of 30 clusters used, NMI as published)",
                must_not=_HEALTHY_MUST_NOT),
        Variant("no-odc-hook", False,
                "the ODC hook left out: the centroids keep their k-means start while the "
                "memory features move, no small-cluster handling, no re-weighting; the "
                "clusters collapse to 10-12 of 30 and NMI falls below its start (measured)",
                expected=(Expect("prototype-stale", "centroids"),),
                allowed=(Expect("prototype-collapse", "centroids"),
                         Expect("representation-collapse", "feature")),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-odc-hook", 1)),
)
