"""ProPos (Huang, Chen, Zhang & Gong 2022, "Learning Representation for Clustering via
Prototype Scattering and Positive Sampling", TPAMI, sec. 3): a BYOL-style online/target pair
trained with two losses, as the method writes them: the alignment of the predictor's output on
one view with the target's projection of the other view, computed on a *positively sampled*
online latent (PSA: q + sigma * N(0, I), sigma 0.001), and the *prototype
scattering loss* (PSL): an InfoNCE over cluster prototypes, the prototypes being the
normalised means of the l2-normalised online (resp. target) projections of each k-means
pseudo-class in the batch, the positive pair the same class's online and target prototypes,
the negatives the other classes' online prototypes (temperature 0.5); k-means re-run on the
target features of the whole set every epoch (the paper's EM view); the total is
alignment + lambda_PSL * PSL after a warm-up with PSL off.

Official code, Hzzone/ProPos: ``models/propos/byol_wrapper.py`` ``BYOLWrapper``
(``compute_centers``, ``compute_cluster_loss`` with the absent classes masked to -10 and left
out of the mean, ``forward_k``, ``forward_loss``: ``contrastive_loss = -2 *
cosine_similarity(predictor(q + randn * latent_std), k).mean()``, ``forward`` symmetric: both
losses averaged over the two view orders; predictor initialised normal(0, 0.01));
``models/propos/byol.py`` ``BYOL.train`` (``loss = contrastive_loss + cluster_loss_batch *
cluster_loss_weight * float(not is_warmup)``, latent_std 0 during warm-up),
``adjust_learning_rate`` (cosine, predictor lr x ``lambda_predictor_lr``);
``models/basic_template.py`` ``TrainTask`` (pseudo-labels by k-means on the l2-normalised
features of ``feature_extractor`` = target encoder + projector, ``reassign`` 1);
``config/cifar10_r18_propos.yml`` (SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128,
EMA 0.996, temperature 0.5, cluster_loss_weight 0.1, latent_std 0.001, warm-up 50 of 1000
epochs, lambda_predictor_lr 10, symmetric).

Published setup: ResNet-18 on CIFAR-10/20, 1000 epochs; ProPos clusters better than its BYOL
baseline (the paper's ablations of PSL and PSA against BYOL) and does not collapse.

Here (CPU budget): scikit-learn's 8x8 digits (the 1,347-image training split,
common.digits_split), views from common.augment (shift, intensity, erase, noise: the digit-
sized analogue of the crop/colour pipeline), the encoder common.DigitEncoder (MLP 64-128-128
with BN), projector and predictor MLPs 256 hidden -> 64 (BN, as the port), 50 epochs of 10
steps of batch 128; SGD lr 0.05 (the config's value, not rescaled by batch/256) with a cosine
schedule, predictor lr x10, momentum 0.9, weight decay 5e-4; target EMA 0.99 (the config's
0.996 is for ~400k steps; 500 steps need a faster target); warm-up 3 epochs (the config's 5%);
temperature 0.5, lambda_PSL 0.1, latent_std 0.001; k-means (10 clusters, sklearn, one init)
on the normalised target projections of the training set before every epoch.
``Probe(model)`` with ``alignment`` (first, the BYOL-style task loss) and
``prototype_scattering`` (weight 0.1, 0 during the warm-up), both as the method writes them;
``watch_latent("projection")`` (the normalised online projection of the first view, observed
with the pseudo-labels as groups) and ``watch_prototypes("prototypes", ...)`` on the current
k-means centroids, as a user of a prototype method would; ``probe.log(kmeans_nmi, z_std)``
every 10 epochs.

Truth, measured without gradprobe: k-means (10 clusters, 10 inits) on the target projections
of the 450 test digits: NMI and Hungarian accuracy against the labels (``kmeans_nmi``,
``kmeans_acc``), the largest cluster's share; the mean and minimum pairwise distance of the
normalised k-means centroids; the centred effective rank and the normalised std (SimSiam's
collapse measure, ~1 spread over the sphere, 0 at one point) of the test projections
(``z_rank``, ``z_std``) and the rank of the encoder features (``f_rank``).

Variants (truth by construction):
- ``published``: healthy, ProPos as published. Measured, seeds 0 / 1: k-means NMI
  0.793 / 0.707, accuracy 0.880 / 0.753; z_std 0.973 / 0.970, z_rank 39.5 / 39.4; centroid mean
  distance 1.448 / 1.444. Must not: ``representation-collapse``, ``prototype-collapse``,
  ``prototype-stale``, ``inert-loss``, ``gradient-swamping``, ``gradient-conflict``,
  ``weak-contrastive-signal``, ``non-finite``.
- ``detached-psl``: broken. The prototype scattering loss switched off by a wiring fault: the
  online prototypes are built from ``q.detach()`` (the target's are without gradient by
  design), so the PSL has no gradient path and trains nothing; the run is the BYOL baseline of
  the paper's ablation (positive sampling kept), step for step the run with
  cluster_loss_weight 0 (measured: the same figures). Nothing pushes the pseudo-classes'
  prototypes apart and the classes mix (the class collision PSL is built against).
  Measured, seeds 0 / 1: k-means NMI 0.574 / 0.570 (published 0.793 / 0.707), accuracy 0.611 / 0.624
  (published 0.880 / 0.753); centroid mean distance 1.115 / 1.091 (published 1.448 / 1.444); no collapse (z_std
  0.843 / 0.830, z_rank 46.9 / 46.8). Expected: ``inert-loss`` on ``prototype_scattering``. Allowed:
  none. Must not: ``non-finite``, ``gradient-conflict``, ``representation-collapse``.
- ``no-predictor``: broken. The predictor removed (an identity), PSL as published: the
  construction BYOL-style methods warn about (without the predictor the online network can
  match the EMA target by mapping every view to one point). Measured, seeds 0 / 1: the test
  projections collapse, z_std 0.078 / 0.080 (published 0.973 / 0.970), k-means NMI 0.612 / 0.604 (published
  0.793 / 0.707), accuracy 0.693 / 0.658; centroid mean distance 0.074 / 0.081. The PSL at weight 0.1 does not
  prevent it. Expected: ``representation-collapse`` on ``projection``. Allowed:
  ``prototype-collapse`` on ``prototypes`` (centroids of collapsed features sit together),
  ``weak-contrastive-signal`` on ``alignment``, ``gradient-swamping`` on ``alignment``.
  Must not: ``non-finite``, ``inert-loss``.

CPU: about 6-15 seconds a run (1 thread, on a shared machine).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, centred_effective_rank, digits_split, normalised_std
from ..harness import Expect, Family, Variant
from ..heldout2.scan import clustering_truth

WIDTH, HIDDEN, FEA_DIM, CLUSTERS = 128, 256, 64, 10
BATCH, EPOCHS, LR, MOMENTUM, WEIGHT_DECAY = 128, 50, 0.05, 0.9, 5e-4
LAMBDA_PREDICTOR_LR, EMA, TEMPERATURE = 10.0, 0.99, 0.5
CLUSTER_LOSS_WEIGHT, LATENT_STD, WARMUP_EPOCHS = 0.1, 0.001, 3


def mlp(inp: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, FEA_DIM))


class ProPos(nn.Module):
    """BYOLWrapper of the official code: online encoder + projector, predictor (normal(0, 0.01)
    init), target encoder + projector as an EMA copy."""

    def __init__(self, predictor: bool = True):
        super().__init__()
        self.encoder_q = DigitEncoder(WIDTH)
        self.projector_q = mlp(WIDTH)
        self.predictor = mlp(FEA_DIM) if predictor else nn.Identity()
        for m in self.predictor.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.projector_k = copy.deepcopy(self.projector_q)
        for p in [*self.encoder_k.parameters(), *self.projector_k.parameters()]:
            p.requires_grad_(False)

    def online(self, x):
        return self.projector_q(self.encoder_q(x))

    @torch.no_grad()
    def target(self, x):
        return F.normalize(self.projector_k(self.encoder_k(x)), dim=1)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        for q, k in ((self.encoder_q, self.encoder_k), (self.projector_q, self.projector_k)):
            for pq, pk in zip(q.parameters(), k.parameters()):
                pk.mul_(m).add_((1 - m) * pq)


def compute_centers(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised mean of the (normalised) features of each pseudo-class in the batch."""
    weight = F.one_hot(labels, CLUSTERS).t().float()
    return F.normalize(F.normalize(weight, p=1, dim=1) @ z, dim=1)


def prototype_scattering(q_centers, k_centers, labels) -> torch.Tensor:
    """compute_cluster_loss: an InfoNCE over prototypes; positive the same class's online and
    target prototypes, negatives the other online prototypes; classes absent from the batch
    masked out."""
    d_q = q_centers @ q_centers.t() / TEMPERATURE
    d_k = (q_centers * k_centers).sum(1) / TEMPERATURE
    eye = torch.eye(CLUSTERS, dtype=torch.bool)
    d_q = torch.where(eye, d_k[:, None].expand(-1, CLUSTERS), d_q)
    present = torch.bincount(labels, minlength=CLUSTERS) > 0
    d_q = d_q.masked_fill(~present[None, :].expand(CLUSTERS, -1), -10.0)
    pos = d_q.diagonal()
    neg = d_q[~eye].reshape(CLUSTERS, CLUSTERS - 1)
    loss = -pos + torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1)
    return (loss * present).sum() / present.sum()


def forward_loss(model, im_q, im_k, labels, latent_std, gen, detach_psl=False):
    q = model.online(im_q)
    k = model.target(im_k)
    noise_q = q + torch.randn(q.shape, generator=gen) * latent_std
    alignment = -2 * F.cosine_similarity(model.predictor(noise_q), k).mean()
    qn = F.normalize(q, dim=1)
    # the broken wiring: the online prototypes built from detached features
    scattering = prototype_scattering(compute_centers(qn.detach() if detach_psl else qn, labels),
                                      compute_centers(k, labels), labels)
    return alignment, scattering, qn


def truth(model: ProPos, x_tr, x_te, y_te, seed: int) -> dict:
    model.eval()
    with torch.no_grad():
        z_te = model.target(x_te).numpy()
        f_te = model.encoder_k(x_te).numpy()
    model.train()
    km = KMeans(CLUSTERS, n_init=10, random_state=seed).fit(z_te)
    t = clustering_truth(km.labels_, y_te.numpy())
    centres = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(CLUSTERS, 1)]
    return {"kmeans_nmi": t["nmi"], "kmeans_acc": t["cluster_acc"],
            "kmeans_top_share": t["top_share"], "centroid_mean_distance": float(gaps.mean()),
            "centroid_min_distance": float(gaps.min()),
            "z_rank": centred_effective_rank(z_te), "z_std": normalised_std(z_te),
            "f_rank": centred_effective_rank(f_te)}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, y_te = digits_split()
    model = ProPos(predictor=variant != "no-predictor")
    head_params = list(model.predictor.parameters())
    body = [*model.encoder_q.parameters(), *model.projector_q.parameters()]
    groups = [{"params": body, "lr_scale": 1.0}]
    if head_params:
        groups.append({"params": head_params, "lr_scale": LAMBDA_PREDICTOR_LR})
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    psl_weight = 0.0 if variant == "no-psl" else CLUSTER_LOSS_WEIGHT
    iters = len(x_tr) // BATCH
    total = EPOCHS * iters
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("projection")
    centroids = {"c": torch.zeros(CLUSTERS, FEA_DIM)}
    probe.watch_prototypes("prototypes", lambda: centroids["c"], latent="projection")
    step = 0
    with probe:
        for epoch in range(EPOCHS):
            # reassign 1: k-means on the target features of the whole set before each epoch
            model.eval()
            with torch.no_grad():
                z_all = model.target(x_tr)
            model.train()
            km = KMeans(CLUSTERS, n_init=1, random_state=seed * 1000 + epoch).fit(z_all.numpy())
            pseudo = torch.from_numpy(km.labels_).long()
            centroids["c"] = F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=1)
            warm = epoch < WARMUP_EPOCHS
            order = torch.randperm(len(x_tr), generator=gen)
            for it in range(iters):
                idx = order[it * BATCH:(it + 1) * BATCH]
                x, labels = x_tr[idx], pseudo[idx]
                v1, v2 = augment(x, gen), augment(x, gen)
                std = 0.0 if warm else LATENT_STD
                detach = variant == "detached-psl"
                a1, s1, q1 = forward_loss(model, v1, v2, labels, std, gen, detach)
                a2, s2, _ = forward_loss(model, v2, v1, labels, std, gen, detach)
                probe.observe(projection=q1, groups=labels)
                losses = {"alignment": 0.5 * (a1 + a2), "prototype_scattering": 0.5 * (s1 + s2)}
                lr = LR * 0.5 * (1 + math.cos(math.pi * step / total))
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                probe.backward(losses, weights={"prototype_scattering": psl_weight * (not warm)})
                opt.step()
                opt.zero_grad()
                model.momentum_update(EMA)
                step += 1
            if epoch % 10 == 9:
                t = truth(model, x_tr, x_te, y_te, seed)
                probe.log(kmeans_nmi=t["kmeans_nmi"], z_std=t["z_std"])
    return truth(model, x_tr, x_te, y_te, seed)


FAMILY = Family(
    name="propos",
    source="Huang, Chen, Zhang & Gong 2022 (ProPos, Learning Representation for Clustering via "
           "Prototype Scattering and Positive Sampling, TPAMI, sec. 3: BYOL-style alignment with "
           "positive sampling, prototype scattering loss over k-means prototypes, weight 0.1, "
           "temperature 0.5); Hzzone/ProPos models/propos/byol_wrapper.py BYOLWrapper, "
           "models/propos/byol.py, config/cifar10_r18_propos.yml",
    train=train,
    variants=(
        Variant("published", True,
                "ProPos as published: k-means NMI 0.793 / 0.707 on test projections, no collapse "
                "(z_std 0.973 / 0.970) (measured)",
                must_not=("representation-collapse", "prototype-collapse", "prototype-stale",
                          "inert-loss", "gradient-swamping", "gradient-conflict",
                          "weak-contrastive-signal", "non-finite")),
        Variant("detached-psl", False,
                "the prototype scattering loss built on detached online features: no gradient "
                "path, it trains nothing (the BYOL baseline); k-means NMI 0.574 / 0.570 vs 0.793 / 0.707 "
                "(measured)",
                expected=(Expect("inert-loss", "prototype_scattering"),),
                must_not=("non-finite", "gradient-conflict", "representation-collapse")),
        Variant("no-predictor", False,
                "predictor removed (PSL kept): projections collapse, z_std 0.078 / 0.080 vs 0.973 / 0.970, "
                "k-means NMI 0.612 / 0.604 vs 0.793 / 0.707 (measured)",
                expected=(Expect("representation-collapse", "projection"),),
                allowed=(Expect("prototype-collapse", "prototypes"),
                         Expect("weak-contrastive-signal", "alignment"),
                         Expect("gradient-swamping", "alignment")),
                must_not=("non-finite", "inert-loss")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-predictor", 1)),
)
