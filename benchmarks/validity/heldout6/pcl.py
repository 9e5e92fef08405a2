"""Prototypical Contrastive Learning, after Li, Zhou, Xiong & Hoi 2021 ("Prototypical
Contrastive Learning of Unsupervised Representations", ICLR, sec. 3.2-3.3, eq. 6-11:
ProtoNCE = InfoNCE + the mean over M k-means clusterings of a prototype InfoNCE whose
temperature is a per-cluster concentration phi = sum_z ||v_z - c|| / (Z log(Z + alpha)),
alpha = 10), the official implementation salesforce/PCL ``main_pcl.py`` (``run_kmeans``:
faiss k-means on the momentum encoder's features of the whole training set every epoch,
centroids l2-normalised, phi of a single-point cluster set to the largest phi, phi clamped
to its 10th-90th percentiles and rescaled to a mean equal to the temperature 0.2; ``train``:
loss = CE(InfoNCE logits) + sum over clusterings of CE(prototype logits) / M) and
``pcl/builder.py`` (``forward``: MoCo v2 logits of the query against its momentum key and
the queue over T; prototype logits q . c / phi_c against the batch's own cluster centroids
and r = 16000 sampled other centroids, the target the row's own centroid).

Published setup: ResNet-50, 128-d l2-normalised embedding, MoCo v2 (queue 16384, momentum
0.999, temperature 0.2), num_cluster 25000, 50000, 100000 on ImageNet's 1.28M images (about
51, 26 and 13 images a cluster), SGD lr 0.03, 200 epochs, ProtoNCE after 20 warm-up epochs.

Here: scikit-learn's 8x8 digits (1347 training images) with the corpus's digit
augmentations, DigitEncoder + a linear head to a 32-d unit embedding, queue 512, key
momentum 0.99, temperature 0.2, K = 25, 50, 100 (54, 27 and 13 images a cluster, as
published), scikit-learn k-means each epoch on the key encoder's features, 30 epochs of
10 steps of 128, SGD lr 0.06 momentum 0.9. No warm-up: ProtoNCE is passed from the first
step (k-means of the initial features), so both losses are present on every step. The
prototype logits use every centroid once (r exceeds K here; the source's columns repeat the
positive centroid of each row of the batch).
Losses ``InfoNCE`` and ``ProtoNCE`` (the names of the paper). Watched as docs/probe.md says:
the query embedding ``embedding`` as a latent, the finest clustering's centroids as the
prototypes ``prototypes`` of ``embedding`` with each row's cluster id as its group.

Variants (truth by construction):
- ``published``: healthy, as above.
- ``two-clusters``: broken. One clustering with K = 2 for ten digit classes, and phi
  rescaled to a mean of 0.005 instead of the temperature 0.2 (40 times sharper): ProtoNCE
  drives every embedding onto one of two centroids, against the ten classes, and the
  embedding loses directions and class neighbourhoods. (K = 2 with phi at mean 0.02 lost
  less: kNN 0.76 and 0.78, rank 8.3 and 8.1. Prototypes re-clustered only once, at the
  start, did no harm: kNN 0.93 and 0.91, rank 13.0 and 13.3; dropped.)
Measured on the test split without gradprobe (seeds 0 and 1): kNN accuracy (k = 20, cosine)
of the embedding, its centred effective rank (of 32), the smallest distance between the
finest clustering's unit centroids at the end:
  published:    kNN 0.924 and 0.922, rank 11.9 and 12.3, centroid min distance 0.22 and 0.17;
  two-clusters: kNN 0.644 and 0.736, rank  6.8 and  7.6, the two centroids 0.25 and 0.28
                apart (on the unit sphere, where random unit vectors are ~1.4 apart).
About 4-8 CPU-seconds a run.
Expected on ``two-clusters``: ``representation-collapse`` on ``embedding`` (a dimensional
loss: 0.55-0.62 of the healthy rank with 0.19-0.28 of kNN accuracy lost); allowed
``prototype-collapse`` on ``prototypes`` (the two centroids close in, but both stay in use by
k-means' construction). Must not (both): ``inert-loss``, ``non-finite``, ``weak-contrastive-signal``; on the
healthy variant also ``representation-collapse``, ``prototype-collapse``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, batches, centred_effective_rank, digits_split, knn_accuracy
from ..harness import Expect, Family, Variant

EPOCHS, BATCH, LR, DIM = 30, 128, 0.06, 32
QUEUE, MOMENTUM, TEMPERATURE, ALPHA = 512, 0.99, 0.2, 10
CLUSTERINGS = {"published": (25, 50, 100), "two-clusters": (2,)}
MEAN_PHI = {"published": TEMPERATURE, "two-clusters": 0.005}  # phi rescaled to this mean


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        self.head = nn.Linear(self.encoder.width, DIM)

    def forward(self, x):
        return F.normalize(self.head(self.encoder(x)), dim=1)


def concentration(features: np.ndarray, centroids: np.ndarray, assigned: np.ndarray,
                  mean_phi: float) -> np.ndarray:
    """phi of eq. 11 per cluster, as ``run_kmeans`` computes it: mean distance over
    log(Z + alpha), singletons given the largest phi, clamped to the 10th-90th percentiles
    and scaled to a mean of ``mean_phi`` (the temperature 0.2 in the source)."""
    k = len(centroids)
    distance = np.linalg.norm(features - centroids[assigned], axis=1)
    sizes = np.bincount(assigned, minlength=k)
    phi = np.zeros(k)
    for c in range(k):
        if sizes[c] > 1:
            phi[c] = distance[assigned == c].mean() / np.log(sizes[c] + ALPHA)
    phi[sizes <= 1] = phi.max()
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return mean_phi * phi / phi.mean()


def cluster(features: np.ndarray, ks: tuple[int, ...], seed: int, mean_phi: float) -> list:
    result = []
    for i, k in enumerate(ks):
        km = KMeans(k, n_init=1, max_iter=20, random_state=seed * 10 + i).fit(features)
        assigned = km.labels_
        phi = concentration(features, km.cluster_centers_, assigned, mean_phi)
        centroids = F.normalize(torch.tensor(km.cluster_centers_, dtype=torch.float32), dim=1)
        result.append((centroids, torch.from_numpy(assigned).long(),
                       torch.tensor(phi, dtype=torch.float32)))
    return result


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    query = Embedder()
    key = copy.deepcopy(query).requires_grad_(False)
    queue = F.normalize(torch.randn(QUEUE, DIM, generator=gen), dim=1)
    opt = torch.optim.SGD(query.parameters(), lr=LR, momentum=0.9)
    order = batches(len(x_tr), BATCH, gen)
    steps = len(x_tr) // BATCH
    finest: dict[str, torch.Tensor] = {}
    probe = gradprobe.Probe(query, run_file=log)
    probe.watch_latent("embedding")
    probe.watch_prototypes("prototypes", lambda: finest["centroids"], latent="embedding")
    with probe:
        for epoch in range(EPOCHS):
            key.eval()
            with torch.no_grad():
                features = key(x_tr).numpy()
            key.train()
            clusterings = cluster(features, CLUSTERINGS[variant], seed * 1000 + epoch,
                                  MEAN_PHI[variant])
            finest["centroids"] = clusterings[-1][0]
            for _ in range(steps):
                idx = next(order)
                q = query(augment(x_tr[idx], gen))
                with torch.no_grad():
                    for pk, pq in zip(key.parameters(), query.parameters()):
                        pk.mul_(MOMENTUM).add_(pq.detach(), alpha=1 - MOMENTUM)
                    k = key(augment(x_tr[idx], gen))
                logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / TEMPERATURE
                zeros = torch.zeros(len(q), dtype=torch.long)
                proto = sum(F.cross_entropy(q @ c.t() / phi, assigned[idx])
                            for c, assigned, phi in clusterings) / len(clusterings)
                probe.observe(embedding=q, groups=clusterings[-1][1][idx])
                probe.backward({"InfoNCE": F.cross_entropy(logits, zeros), "ProtoNCE": proto})
                opt.step()
                opt.zero_grad()
                queue = torch.cat([k, queue])[:QUEUE]
    query.eval()
    with torch.no_grad():
        z_tr, z_te = query(x_tr).numpy(), query(x_te).numpy()
    return {"knn_acc": knn_accuracy(z_tr, y_tr.numpy(), z_te, y_te.numpy()),
            "z_rank": centred_effective_rank(z_te), "z_dim": DIM,
            "centroid_min_distance": float(torch.pdist(finest["centroids"]).min())}


_MUST_NOT = ("inert-loss", "non-finite", "weak-contrastive-signal")

FAMILY = Family(
    name="pcl",
    source="Li, Zhou, Xiong & Hoi 2021, Prototypical Contrastive Learning (ICLR), eq. 6-11; "
           "salesforce/PCL main_pcl.py run_kmeans/train, pcl/builder.py",
    train=train,
    variants=(
        Variant("published", True,
                "ProtoNCE over k-means with K = 25, 50, 100 re-run every epoch and phi rescaled "
                "to the temperature 0.2, as published",
                must_not=_MUST_NOT + ("representation-collapse", "prototype-collapse")),
        Variant("two-clusters", False,
                "one clustering of K = 2 for ten classes with phi 40 times too sharp: the "
                "embedding is pulled onto two centroids and loses directions and kNN accuracy",
                expected=(Expect("representation-collapse", "embedding"),),
                allowed=(Expect("prototype-collapse", "prototypes"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("two-clusters", 0)),
)
