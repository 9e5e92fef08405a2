"""Deep Embedded Clustering (DEC), after Xie, Girshick & Farhadi 2016 ("Unsupervised Deep
Embedding for Clustering Analysis", ICML, sec. 3.1 eq. 1-3, sec. 3.2; the Keras port
XifengGuo/DEC-keras that XifengGuo/IDEC's ``IDEC.py`` imports ``ClusteringLayer`` and
``autoencoder`` from: batch 256, alpha 1, k-means with 20 restarts on the pretrained
encoder's embedding, loss ``kld``), with a cluster-balance term as the second loss.

Published setup: an autoencoder d-500-500-2000-10 is pretrained on reconstruction; its
decoder is dropped, k-means (n_init 20) on the embedding z initialises the centres mu_j,
which become parameters. Soft assignment (eq. 1, Student's t, alpha 1):
  q_ij = (1 + |z_i - mu_j|^2)^-1 / sum_j' (1 + |z_i - mu_j'|^2)^-1;
target (eq. 3) p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij, computed
on the whole data set and held fixed for T iterations; loss KL(P || Q) (eq. 2), SGD on the
encoder and the centres together.

Here: scikit-learn's 8x8 digits, train and test splits together (1,797 images, clustering
is unsupervised; labels only measure it), 10 clusters. Autoencoder 64-128-64-10 (ReLU),
pretrained 600 Adam steps (lr 1e-3, batch 256) inside ``train``; clustering 400 SGD steps
(lr 0.01, momentum 0.9, batch 256), P recomputed every 50 steps (T scaled with the data).
DEC alone is single-loss; the second loss ``balance`` is the cluster-size prior users add
(KL(uniform || mean_i q_i) over the batch, weight 0.1): DEC's own eq. 3 already
normalises by cluster frequency, so on the healthy run it barely acts. Losses ``kld``
(first) and ``balance``. The probe watches the embedding ``embedding`` and the centres as
``watch_prototypes("centres", ..., latent="embedding")`` with each image's current cluster
(argmax q) observed as ``groups``.

Variants (truth by construction):
- ``dec``: healthy, as published (k-means initialised centres).
- ``identical-centres``: every centre initialised to the embedding's mean instead of by
  k-means. q is then uniform for every image, P = Q, and by symmetry every centre gets the
  same gradient: the centres stay one point and every image sits in one cluster.
Measured without gradprobe (seeds 0 / 1): clustering accuracy (Hungarian matching to the
labels), NMI, the number of clusters in use, the centres' smallest pairwise distance:
  dec:               k-means start 0.733 / 0.744, end accuracy 0.733 / 0.765, NMI 0.722 /
                     0.717, 10 / 10 clusters used, smallest centre gap 2.07 / 1.42;
  identical-centres: accuracy 0.115 / 0.114 (62 / 65 points below healthy), NMI 0.002 /
                     0.002, 2 / 2 clusters used (float ties), smallest centre gap 0.
Runs take 3-7 CPU-seconds.
Expected (broken): ``prototype-collapse`` on ``centres``. Allowed: ``inert-loss`` on
``kld`` and ``balance`` (with q uniform both losses are zero with zero gradient up to rounding, by
construction), ``prototype-stale`` on ``centres`` (they move only together, if at all).
Must not (both): ``gradient-conflict``, ``non-finite``; healthy also ``prototype-collapse``,
``prototype-stale``, ``representation-collapse``, ``gradient-swamping``, ``inert-loss``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

CLUSTERS, EMBED, BATCH = 10, 10, 256
PRETRAIN_STEPS, PRETRAIN_LR = 600, 1e-3
CLUSTER_STEPS, CLUSTER_LR, MOMENTUM, TARGET_EVERY = 400, 0.01, 0.9, 50
BALANCE_WEIGHT = 0.1


class Autoencoder(nn.Module):
    """The stacked autoencoder, scaled to 64 inputs; ``centres`` are DEC's mu_j."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                                     nn.ReLU(), nn.Linear(64, EMBED))
        self.decoder = nn.Sequential(nn.Linear(EMBED, 64), nn.ReLU(), nn.Linear(64, 128),
                                     nn.ReLU(), nn.Linear(128, 64))
        self.centres = nn.Parameter(torch.zeros(CLUSTERS, EMBED))


def all_digits() -> tuple[torch.Tensor, np.ndarray]:
    x_tr, y_tr, x_te, y_te = digits_split()
    return torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te]).numpy()


def soft_assignment(z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with alpha 1."""
    kernel = 1.0 / (1.0 + torch.cdist(z, centres) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """Eq. 3."""
    weight = q ** 2 / q.sum(0)
    return weight / weight.sum(1, keepdim=True)


def kld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) summed over clusters, averaged over the batch (Keras ``kld``)."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean()


def pretrain(model: Autoencoder, x: torch.Tensor, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(model.decoder.parameters()),
                           lr=PRETRAIN_LR)
    order = batches(len(x), BATCH, gen)
    for _ in range(PRETRAIN_STEPS):
        xb = x[next(order)]
        loss = F.mse_loss(model.decoder(model.encoder(xb)), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def init_centres(model: Autoencoder, x: torch.Tensor, seed: int, identical: bool) -> None:
    with torch.no_grad():
        z = model.encoder(x)
        if identical:
            model.centres.copy_(z.mean(0).expand(CLUSTERS, EMBED))
        else:
            km = KMeans(CLUSTERS, n_init=20, random_state=seed).fit(z.numpy())
            model.centres.copy_(torch.from_numpy(km.cluster_centers_).float())


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Unsupervised clustering accuracy: the best one-to-one cluster-to-label map
    (Hungarian algorithm), as DEC's sec. 4.2 defines it."""
    counts = np.zeros((CLUSTERS, CLUSTERS), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def clustering_truth(model: Autoencoder, x: torch.Tensor, y: np.ndarray) -> dict:
    with torch.no_grad():
        clusters = soft_assignment(model.encoder(x), model.centres).argmax(1).numpy()
        gaps = torch.pdist(model.centres)
        return {"cluster_acc": cluster_accuracy(y, clusters),
                "nmi": float(normalized_mutual_info_score(y, clusters)),
                "clusters_used": int(len(np.unique(clusters))),
                "min_centre_distance": float(gaps.min()),
                "reconstruction_mse": float(F.mse_loss(model.decoder(model.encoder(x)), x))}


def train_clustering(model: Autoencoder, x: torch.Tensor, gen: torch.Generator, log: Path,
                     weights: dict, with_reconstruction: bool) -> None:
    """DEC's (or, with the reconstruction kept, IDEC's) clustering phase, probed."""
    params = [model.centres, *model.encoder.parameters()]
    if with_reconstruction:
        params += list(model.decoder.parameters())
    opt = torch.optim.SGD(params, lr=CLUSTER_LR, momentum=MOMENTUM)
    order = batches(len(x), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding", labels="groups")
    probe.watch_prototypes("centres", model.centres, latent="embedding")
    with probe:
        for step in range(CLUSTER_STEPS):
            if step % TARGET_EVERY == 0:
                with torch.no_grad():
                    p_all = target_distribution(soft_assignment(model.encoder(x), model.centres))
            idx = next(order)
            z = model.encoder(x[idx])
            q = soft_assignment(z, model.centres)
            losses = {"kld": kld(p_all[idx], q)}
            if with_reconstruction:
                losses["mse"] = F.mse_loss(model.decoder(z), x[idx])
            else:
                uniform = torch.full((CLUSTERS,), 1.0 / CLUSTERS)
                losses["balance"] = kld(uniform[None], q.mean(0, keepdim=True))
            probe.observe(embedding=z, groups=q.argmax(1))
            opt.zero_grad()
            probe.backward(losses, weights=weights)
            opt.step()


def train(variant: str, seed: int, log: Path) -> dict:
    x, y = all_digits()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Autoencoder()
    pretrain(model, x, gen)
    init_centres(model, x, seed, identical=variant == "identical-centres")
    start = clustering_truth(model, x, y)
    train_clustering(model, x, gen, log, {"balance": BALANCE_WEIGHT}, with_reconstruction=False)
    end = clustering_truth(model, x, y)
    return {"kmeans_acc": start["cluster_acc"], **{k: v for k, v in end.items()
                                                   if k != "reconstruction_mse"}}


_MUST_NOT = ("gradient-conflict", "non-finite")

FAMILY = Family(
    name="dec",
    source="Xie, Girshick & Farhadi 2016 (Unsupervised Deep Embedding for Clustering "
           "Analysis, ICML, sec. 3.1 eq. 1-3, sec. 3.2; XifengGuo/DEC-keras ClusteringLayer "
           "as imported by XifengGuo/IDEC IDEC.py)",
    train=train,
    variants=(
        Variant("dec", True,
                "DEC as published (pretrained autoencoder, k-means initialised centres, "
                "Student-t q, sharpened target P refreshed every 50 steps, KL(P||Q)) plus a "
                "cluster-size balance term weighted 0.1",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse", "gradient-swamping",
                                      "inert-loss")),
        Variant("identical-centres", False,
                "every centre initialised to the embedding's mean: q is uniform, P = Q, every "
                "centre gets the same gradient, so the centres stay one point and one cluster "
                "takes every image (clustering accuracy at the largest class's share)",
                expected=(Expect("prototype-collapse", "centres"),),
                allowed=(Expect("inert-loss", "kld"), Expect("inert-loss", "balance"),
                         Expect("prototype-stale", "centres")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("dec", 1), ("identical-centres", 1)),
)
