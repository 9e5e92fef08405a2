"""Improved Deep Embedded Clustering (IDEC), after Guo, Gao, Liu & Yin 2017 ("Improved Deep
Embedded Clustering with Local Structure Preservation", IJCAI, sec. 3, eq. 5-8;
XifengGuo/IDEC ``IDEC.py``: the DEC clustering layer and the autoencoder's decoder kept as a
second output, losses ``kld`` on the clustering output and ``mse`` on the decoder's,
loss_weights [gamma, 1], batch 256, alpha 1).

Published setup: DEC (benchmarks/validity/heldout10/dec.py) with the decoder kept during
clustering, L = L_r + gamma L_c (eq. 5), L_r the reconstruction's mean squared error, L_c
DEC's KL(P || Q), gamma 0.1, so the embedding keeps the data's local structure while the
clustering loss sharpens it; P refreshed every T iterations, k-means (n_init 20) on the
pretrained embedding initialises the centres.

Here: the scaled-down pieces of ``dec.py`` (all 1,797 digits, autoencoder 64-128-64-10
pretrained 600 Adam steps inside ``train``, clustering 400 SGD steps lr 0.01 momentum 0.9
batch 256, P every 50 steps), its second loss replaced by IDEC's reconstruction. Losses
``kld`` (first, weight gamma) and ``mse`` (weight 1), as IDEC.py passes them. The probe
watches ``embedding`` and the centres as ``watch_prototypes("centres", ..., latent=
"embedding")`` with the current cluster (argmax q) as ``groups``.

Variants (truth by construction):
- ``idec``: healthy, as published (gamma 0.1).
- ``gamma-100``: gamma 100 instead of 0.1: the clustering loss's weighted gradient
  drowns the reconstruction's on the encoder, which is then free to distort the embedding
  (the failure IDEC was written against, sec. 3.2) and the reconstruction degrades.
Measured without gradprobe (seeds 0 / 1): reconstruction MSE on all images (pretrained
0.0148 / 0.0137), clustering accuracy (Hungarian; k-means start 0.733 / 0.744), NMI,
clusters in use (argmax q), centred effective rank of the embedding:
  idec:      MSE 0.0148 / 0.0137 (kept), accuracy 0.737 / 0.751, NMI 0.708 / 0.697,
             10 / 10 clusters, rank 8.45 / 8.85;
  gamma-100: MSE 0.071 / 0.066 (4.8x healthy), accuracy 0.102 / 0.102, NMI 0 / 0, 1 / 1
             cluster takes every image, rank 1.62 / 2.01 (the centres stay apart, smallest
             gap 1.78 / 1.41: the embedding left all but one).
Tried and not kept: gamma 1000 (seed 1 diverged to NaN: a non-finite run, not this
failure); gamma 10 (MSE 2.9x healthy but clustering improved, 0.76 / 0.80: a milder case
whose harm is the reconstruction only). Runs take 4-7 CPU-seconds.
Expected (broken): ``gradient-swamping`` on ``mse`` (it still has its pretrained level to
keep and rises 4.8x instead), ``static-loss-weights`` on ``mse`` (a fixed weight is the
cause), ``prototype-collapse`` on ``centres`` (one of ten in use) and
``representation-collapse`` on ``embedding`` (centred rank 8.5-8.9 -> 1.6-2.0).
``gradient-conflict`` is declared neither way (KL and reconstruction do pull the encoder
apart, by IDEC's design). Must not (both): ``non-finite``, ``prototype-stale``; healthy also
``gradient-swamping``, ``prototype-collapse``, ``representation-collapse``, ``inert-loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..common import centred_effective_rank
from ..harness import Expect, Family, Variant
from ..heldout10.dec import (Autoencoder, all_digits, clustering_truth, init_centres, pretrain,
                             train_clustering)

GAMMA, BROKEN_GAMMA = 0.1, 100.0


def train(variant: str, seed: int, log: Path) -> dict:
    x, y = all_digits()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Autoencoder()
    pretrain(model, x, gen)
    init_centres(model, x, seed, identical=False)
    start = clustering_truth(model, x, y)
    gamma = BROKEN_GAMMA if variant == "gamma-100" else GAMMA
    train_clustering(model, x, gen, log, {"kld": gamma}, with_reconstruction=True)
    end = clustering_truth(model, x, y)
    with torch.no_grad():
        end["embedding_rank"] = centred_effective_rank(model.encoder(x).numpy())
    return {"pretrained_mse": start["reconstruction_mse"], "kmeans_acc": start["cluster_acc"],
            **end}


_MUST_NOT = ("non-finite", "prototype-stale")

FAMILY = Family(
    name="idec",
    source="Guo, Gao, Liu & Yin 2017 (Improved Deep Embedded Clustering with Local Structure "
           "Preservation, IJCAI, sec. 3 eq. 5-8, gamma 0.1; XifengGuo/IDEC IDEC.py)",
    train=train,
    variants=(
        Variant("idec", True,
                "IDEC as published: DEC's KL(P||Q) weighted 0.1 plus the autoencoder's "
                "reconstruction MSE weighted 1, k-means initialised centres",
                must_not=_MUST_NOT + ("gradient-swamping", "prototype-collapse",
                                      "representation-collapse", "inert-loss")),
        Variant("gamma-100", False,
                "the clustering loss weighted 100 instead of 0.1: its gradient drowns the "
                "reconstruction's on the encoder: the reconstruction error rises 4.8x above "
                "the healthy run's, the embedding's rank falls to 1.6-2.0 and one cluster "
                "takes every image",
                expected=(Expect("gradient-swamping", "mse"),
                          Expect("static-loss-weights", "mse"),
                          Expect("prototype-collapse", "centres"),
                          Expect("representation-collapse", "embedding")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("idec", 1), ("gamma-100", 1)),
)
