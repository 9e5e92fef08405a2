"""NNCLR, after Dwibedi, Aytar, Tompson, Sermanet & Zisserman 2021 ("With a Little Help from
My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations", ICCV): sec. 3
(L_i^NNCLR = -log exp(NN(z_i, Q) . z_i^+ / tau) / sum_k exp(NN(z_i, Q) . z_k^+ / tau), NN(z,
Q) the nearest neighbour of z in a support set Q, a FIFO queue of earlier projections; the
negatives are the other views of the batch; a prediction MLP on z^+, a symmetric loss;
implementation details: queue 98,304, tau 0.1, LARS, batch 4096). The paper has no official
code; the reference port is lightly-ai/lightly: ``examples/pytorch/nnclr.py`` (``z0 =
memory_bank(z0, update=False)``, ``z1 = memory_bank(z1, update=True)``, ``loss = 0.5 *
(criterion(z0, p1) + criterion(z1, p0))``, z detached in the forward, SGD lr 0.06) and
``lightly/models/modules/nn_memory_bank.py`` (the argmax of cosine similarity over the bank,
the bank started with random unit rows and written first in first out).

Published setup: ImageNet, ResNet-50, projection 256-d, prediction MLP, 1000 epochs.

Here (CPU): scikit-learn's 8x8 digits (``common.digits_split``), two views by
``common.augment``, ``common.DigitEncoder`` (width 128) under a projection head 128-128-32
(batch norm, the last one too) and a prediction head 32-128-32, a support set of 512 rows (the
last four batches; 98,304 of 1.28M images there), tau 0.1, batch 128 (67 of the 1347 training
images left out of each epoch, as a drop-last loader does; in class order always the same 67
nines), SGD lr 0.06, momentum 0.9, weight decay 1e-6, 400 steps. The two terms of the
symmetric loss are passed to the probe as two losses named after lightly's calls, ``nn_z0_p1``
and ``nn_z1_p0``, weights 0.5 and 0.5. Watched as docs/probe.md says: the projection
``projection`` as a latent, each term's InfoNCE batch (the neighbours against the other view's
predictions, in-batch negatives) as a contrastive watch of the same name, each batch's digit
classes as ``groups`` with ``expect_groups_per_batch=10`` (a user checking that batches mix
the classes).

Variants (truth by construction):
- ``shuffled``: healthy, the loader reshuffles every epoch, as published.
- ``class-sorted``: broken. The training set stored class by class and read in order
  without shuffling: a batch of 128 holds one or two digit classes (a class has 131-137
  training images), so most in-batch negatives are the anchor's own class and the support
  set holds the last few classes only; the contrastive signal never separates classes.
Measured on the test split without gradprobe (seeds 0 / 1): kNN accuracy (k 20, cosine,
``common.knn_accuracy``) of the backbone features and of the projection, the projection's
centred effective rank (of 32) and normalised std x sqrt(d), the distance 1 - cos from each
test projection to its support-set neighbour, and from the labels of the training batches
alone the share of in-batch negatives of the anchor's class and the median classes a batch:
  shuffled:     kNN 0.924 / 0.893, projection kNN 0.893 / 0.827, rank 12.5 / 11.7, std 0.99 /
                0.98, neighbour distance 0.054 / 0.047, same-class negatives 0.099 / 0.099,
                10 / 10 classes a batch;
  class-sorted: kNN 0.891 / 0.862, projection kNN 0.731 / 0.709, rank 15.1 / 14.5, std 0.93 /
                0.93, neighbour distance 0.118 / 0.097, same-class negatives 0.683 / 0.683,
                2 / 2 classes a batch.
The harm is in the projection the loss shapes (kNN -0.16 / -0.12); the backbone loses less
(-0.03 / -0.03), on both seeds. Not kept (measured on seed 0 at batch 256, where the healthy
backbone's kNN is 0.913; no harm): a support set never written (random rows: kNN 0.940),
written once at the first step (0.920), tau 1, 5 or 0.01 (0.909, 0.924, 0.920).
About 6 CPU-seconds a run.
Expected on ``class-sorted``: ``batch-composition-mismatch`` on ``batch`` (2 of 10 declared
classes a batch) and ``weak-contrastive-signal`` on ``nn_z0_p1`` and ``nn_z1_p0`` (68% of
the negatives are the anchor's class). Must not (both): ``inert-loss``, ``non-finite``,
``static-loss-weights`` (0.5 and 0.5 are the symmetric loss), ``gradient-conflict`` and
``gradient-swamping`` (the two directions of one symmetric loss), ``representation-collapse``
(the projection's rank and spread stay up); on the healthy variant also
``batch-composition-mismatch`` and ``weak-contrastive-signal``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, DIM, QUEUE, CLASSES = 400, 128, 32, 512, 10
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE = 0.06, 0.9, 1e-6, 0.1
SHUFFLED = {"shuffled": True, "class-sorted": False}


def head(dims: tuple[int, ...], last_norm: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_norm:
            layers.append(nn.BatchNorm1d(b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NNCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        self.projection_head = head((self.backbone.width, self.backbone.width, DIM), True)
        self.prediction_head = head((DIM, self.backbone.width, DIM), False)
        # lightly's MemoryBankModule: random unit rows, replaced first in first out
        self.register_buffer("bank", F.normalize(torch.randn(QUEUE, DIM), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x))
        return z, self.prediction_head(z)

    def nearest_neighbour(self, z: torch.Tensor) -> torch.Tensor:
        """NN(z, Q): each row's most cosine-similar support-set row (no gradient)."""
        sim = F.normalize(z.detach(), dim=1) @ F.normalize(self.bank, dim=1).T
        return self.bank[sim.argmax(1)]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        slots = (self.ptr + torch.arange(len(z))) % QUEUE
        self.bank[slots] = z.detach()
        self.ptr.copy_((self.ptr + len(z)) % QUEUE)


def info_nce(neighbours: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """L^NNCLR: the neighbour of view 1 against the predictions of view 2, in-batch negatives."""
    logits = F.normalize(neighbours, dim=1) @ F.normalize(predictions, dim=1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(len(logits)))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    if not SHUFFLED[variant]:  # a data set stored class by class, read in order
        order = torch.argsort(y_tr, stable=True)
        x_tr, y_tr = x_tr[order], y_tr[order]
    model = NNCLR()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(model, run_file=log, expect_groups_per_batch=CLASSES)
    probe.watch_latent("projection")
    probe.watch_contrastive("nn_z0_p1", temperature=TEMPERATURE)
    probe.watch_contrastive("nn_z1_p0", temperature=TEMPERATURE)
    same_class_negatives, classes_per_batch = [], []
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen, SHUFFLED[variant])):
            z0, p0 = model(augment(x_tr[idx], gen))
            z1, p1 = model(augment(x_tr[idx], gen))
            nn0, nn1 = model.nearest_neighbour(z0), model.nearest_neighbour(z1)
            probe.observe(projection=z0, nn_z0_p1=(nn0, p1), nn_z1_p0=(nn1, p0), groups=y_tr[idx])
            probe.backward({"nn_z0_p1": info_nce(nn0, p1), "nn_z1_p0": info_nce(nn1, p0)},
                           weights={"nn_z0_p1": 0.5, "nn_z1_p0": 0.5})
            opt.step()
            opt.zero_grad()
            model.enqueue(z1)
            same = (y_tr[idx, None] == y_tr[None, idx]).float()
            same_class_negatives.append(float((same.sum() - BATCH) / (BATCH * (BATCH - 1))))
            classes_per_batch.append(len(torch.unique(y_tr[idx])))
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.backbone(x_tr), model.backbone(x_te)
        z_tr, z_te = model.projection_head(f_tr), model.projection_head(f_te)
        lag = 1 - F.cosine_similarity(model.nearest_neighbour(z_te), z_te).mean()
    return {"knn_acc": knn_accuracy(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy()),
            "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(), y_te.numpy()),
            "z_rank": centred_effective_rank(z_te.numpy()), "z_dim": DIM,
            "z_std": normalised_std(z_te.numpy()),
            "neighbour_distance": float(lag),
            "same_class_negatives": float(np.mean(same_class_negatives)),
            "median_classes_per_batch": float(np.median(classes_per_batch))}


_MUST_NOT = ("inert-loss", "non-finite", "static-loss-weights", "gradient-conflict",
             "gradient-swamping", "representation-collapse")

FAMILY = Family(
    name="nnclr",
    source="Dwibedi et al. 2021, NNCLR (ICCV), sec. 3 (NN(z, Q) as the positive, support-set "
           "queue, symmetric loss, tau 0.1); lightly-ai/lightly examples/pytorch/nnclr.py, "
           "lightly/models/modules/nn_memory_bank.py",
    train=train,
    variants=(
        Variant("shuffled", True,
                "the loader reshuffles every epoch, as published: batches mix all ten classes "
                "and the support set follows the projections",
                must_not=_MUST_NOT + ("batch-composition-mismatch", "weak-contrastive-signal")),
        Variant("class-sorted", False,
                "data stored class by class and read in order: one or two classes a batch, most "
                "negatives of the anchor's own class, the projection's kNN drops",
                expected=(Expect("batch-composition-mismatch", "batch"),
                          Expect("weak-contrastive-signal", "nn_z0_p1"),
                          Expect("weak-contrastive-signal", "nn_z1_p0")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("shuffled", 0), ("class-sorted", 0)),
)
