"""MoCo v3, after Chen, Xie & He 2021 ("An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV; sec. 3, Algorithm 1, from memory, not re-read here: two augmented views x1, x2; queries q = predictor
(projector(backbone(x))), keys k from a momentum encoder (backbone + projector, an EMA of the
query encoder's); the symmetric loss ctr(q1, k2) + ctr(q2, k1), ctr(q, k) the InfoNCE of
l2-normalised q against the batch's keys with temperature tau, times 2 tau) and the authors'
facebookresearch/moco-v3 ``moco/builder.py`` (read with the read_file tool, the stored
version: ``MoCo.ctr_loss``: ``logits = einsum('nc,mc->nm', q, k) / T``, cross-entropy against
the diagonal, ``* (2 * T)``; ``MoCo.forward``: the momentum update then ``k1, k2`` without
gradient, ``ctr_loss(q1, k2) + ctr_loss(q2, k1)``; ``_build_mlp`` with BatchNorm and an
affine-free BN last; the predictor here keeps no last BN, a choice of this port) and ``main_moco.py``'s ``adjust_moco_momentum`` (m rises from its base to 1
on a half-cosine; seen in find_string excerpts of ports that copy it, not in the repository
itself).

Published setup: ImageNet, ViT-S/B or ResNet-50, batch 4096, tau 0.2 for ViT, base momentum
0.99 for ViT, projector 3 layers 4096-256, predictor 2 layers; AdamW (ViT) or LARS.

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``), two views by
``common.augment``; the backbone is ``common.DigitEncoder`` (width 128), projector
128-256-64 (BN, last BN without affine), predictor 64-256-64; tau 0.2, base momentum 0.99
on moco-v3's half-cosine to 1; Adam lr 1e-3, batch 256, 500 steps. The two terms are
passed as ``loss_12`` = ctr(q1, k2) and ``loss_21`` = ctr(q2, k1); the backbone is watched
as a latent (``backbone``) and each term's pairs as a contrastive watch at tau
(``loss_12``: (q1, k2), ``loss_21``: (q2, k1)), with ``observe(groups=labels)`` for the
batch composition, as a user with labelled data would.

Truth, measured without gradprobe on the test split: kNN accuracy (k = 20, cosine) of the
backbone features and of the projector's outputs (what the loss shapes), linear-probe
accuracy of the backbone, the centred effective rank of the projector's outputs, the same
for the encoder before training (``untrained_*``), and the last 20 steps' summed loss.
On 8x8 digits the backbone's kNN is no measure of learning: the untrained encoder already
scores 0.94-0.95. The projector's kNN is: 0.91-0.92 untrained.

Variants (truth by construction):
- ``moco-v3``: healthy, as published (shuffled batches of 256).
- ``one-class-batches``: a class-sorted loader read in order, batches of 64 (each class has
  ~135 training digits): every batch holds one class, so every negative of both terms is of
  the anchor's own class and the loss pushes same-class digits apart. Expected:
  ``weak-contrastive-signal`` on ``loss_12`` and ``loss_21`` (single-group negatives).
  Must not: ``representation-collapse`` (the projector's centred rank stays above the
  healthy run's), ``gradient-conflict``, ``gradient-swamping``.

Measured (seeds 0 / 1, one thread):
- ``moco-v3``: projector kNN 0.938 / 0.940 (untrained 0.911 / 0.918), backbone kNN 0.940 /
  0.944, linear 0.978 / 0.978; projector centred rank 30.0 / 29.0 of 64; end loss 2.96 /
  2.94; 10 classes per batch.
- ``one-class-batches``: projector kNN 0.864 / 0.827 (7.4 / 11.3 points below healthy and
  below the untrained encoder's 0.911 / 0.918), backbone kNN 0.931 / 0.927, linear 0.962 /
  0.976 (the backbone barely harmed); projector rank 33.9 / 32.8; end loss 3.05 / 3.00; 1
  class per batch.
Left out, no harm measured on the backbone (seeds 0 / 1, backbone kNN against healthy 0.940 /
0.944): a class-sorted loader with batches of 256 (3 classes a batch: 0.947 / 0.927), keys
never updated (base momentum 1.0: 0.949 / 0.931), temperature 20 (0.940 / 0.927).

One run takes 7-13 CPU-seconds.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, linear_probe_accuracy)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, DIM, HIDDEN = 500, 256, 1e-3, 64, 256
TEMPERATURE, BASE_MOMENTUM = 0.2, 0.99
ONE_CLASS_BATCH = 64


def mlp(inputs: int, last_bn: bool) -> nn.Sequential:
    """moco-v3's ``_build_mlp`` with two layers: BN + ReLU inside, an affine-free BN last."""
    layers = [nn.Linear(inputs, HIDDEN, bias=False), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
              nn.Linear(HIDDEN, DIM, bias=False)]
    if last_bn:
        layers.append(nn.BatchNorm1d(DIM, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder(128)
        self.projector = mlp(128, last_bn=True)
        self.predictor = mlp(DIM, last_bn=False)
        self.momentum_encoder = nn.Sequential(copy.deepcopy(self.backbone),
                                              copy.deepcopy(self.projector))
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        query = list(self.backbone.parameters()) + list(self.projector.parameters())
        for p_k, p_q in zip(self.momentum_encoder.parameters(), query):
            p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return q1, q2, k1, k2


def ctr_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(q))) * (2 * tau)


def momentum_at(step: int, base: float) -> float:
    """main_moco.py's adjust_moco_momentum, per step."""
    return 1 - 0.5 * (1 + math.cos(math.pi * step / STEPS)) * (1 - base)


def truth(model: MoCoV3) -> dict:
    x_tr, y_tr, x_te, y_te = digits_split()
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.backbone(x_tr), model.backbone(x_te)
        z_tr, z_te = model.projector(f_tr), model.projector(f_te)
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    return {"knn_acc": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
            "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr, z_te.numpy(), y_te),
            "linear_acc": linear_probe_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
            "z_rank": centred_effective_rank(z_te.numpy())}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    batch, sorted_loader = BATCH, False
    if variant == "one-class-batches":
        batch, sorted_loader = ONE_CLASS_BATCH, True
        order = torch.argsort(y_tr, stable=True)
        x_tr, y_tr = x_tr[order], y_tr[order]
    model = MoCoV3()
    untrained = {f"untrained_{k}": v for k, v in truth(model).items()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("backbone", model.backbone)
    probe.watch_contrastive("loss_12", temperature=TEMPERATURE)
    probe.watch_contrastive("loss_21", temperature=TEMPERATURE)
    tail, classes = [], []
    for step, idx in zip(range(STEPS), batches(len(x_tr), batch, gen, shuffle=not sorted_loader)):
        x1, x2 = augment(x_tr[idx], gen), augment(x_tr[idx], gen)
        q1, q2, k1, k2 = model(x1, x2, momentum_at(step, BASE_MOMENTUM))
        probe.observe(loss_12=(q1, k2), loss_21=(q2, k1), groups=y_tr[idx])
        losses = {"loss_12": ctr_loss(q1, k2, TEMPERATURE),
                  "loss_21": ctr_loss(q2, k1, TEMPERATURE)}
        probe.backward(losses)
        opt.step()
        opt.zero_grad()
        classes.append(len(torch.unique(y_tr[idx])))
        if step >= STEPS - 20:
            tail.append(sum(v.item() for v in losses.values()))
    probe.close()
    return {**truth(model), **untrained, "end_loss": float(np.mean(tail)),
            "classes_per_batch": float(np.median(classes))}


HEALTHY_MUST_NOT = ("representation-collapse", "weak-contrastive-signal", "gradient-conflict",
                    "gradient-swamping", "inert-loss")

FAMILY = Family(
    name="moco-v3",
    source="Chen, Xie & He 2021 (ICCV), MoCo v3 Algorithm 1; facebookresearch/moco-v3 "
           "moco/builder.py (ctr_loss, forward)",
    train=train,
    variants=(
        Variant("moco-v3", True, "MoCo v3 as published (tau 0.2, momentum 0.99 to 1, shuffled "
                "batches): the projector outputs' kNN accuracy above the untrained encoder's (measured)",
                must_not=HEALTHY_MUST_NOT),
        Variant("one-class-batches", False, "a class-sorted loader read in order with batches "
                "of 64: each batch holds one class, so every negative of both terms is the "
                "anchor's own class and the projector's outputs lose the classes (kNN below "
                "the healthy run's and the untrained encoder's, measured)",
                expected=(Expect("weak-contrastive-signal", "loss_12"),
                          Expect("weak-contrastive-signal", "loss_21")),
                must_not=("representation-collapse", "gradient-conflict", "gradient-swamping")),
    ),
    seeds=(0, 1),
    quick=(("one-class-batches", 1), ("moco-v3", 1)),
)
