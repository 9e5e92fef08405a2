"""Non-parametric instance discrimination with a memory bank, after Wu, Xiong, Yu & Lin 2018
("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR): eq. 2
(the non-parametric softmax over the memory bank V, temperature tau), sec. 3.2-3.3 (V holds
one l2-normalised feature per training image, started as random vectors and updated with the
features of each mini-batch) and sec. 3.4 (proximal regularisation: the loss of instance i
becomes -log P(i | v_i^(t)) + lambda ||v_i^(t) - v_i^(t-1)||^2, v_i^(t-1) being i's memory
entry). Official code zhirongw/lemniscate.pytorch: ``lib/LinearAverage.py`` (the exact
softmax over the whole bank, ``LinearAverageOp``: out = x V^T / T; in its backward the rows
of the batch are written back as normalise(m * V[i] + (1 - m) * x_i), momentum m = 0.5, T =
0.07, the bank started uniform in +-1/sqrt(d/3)), with ``nn.CrossEntropyLoss`` on the
instance index (``main.py``, the path taken when ``--nce-k 0``); ``lib/NCEAverage.py`` and
``lib/NCECriterion.py`` are the sampled NCE estimate of the same softmax, not needed for a
bank this small. The official code has no proximal term; it is ported from the paper.

Here: scikit-learn's 8x8 digits (1347 training images = 1347 instances), the corpus's
two-layer MLP backbone (``common.DigitEncoder``, width 128, the ResNet scaled down) and a
linear embedding to d = 32 (128 in the paper), l2-normalised; the digit-sized augmentation of
``common.augment`` (random crop and colour jitter in the paper); batch 128, SGD momentum 0.9,
weight decay 5e-4 (lemniscate's optimiser; lr 0.1 here for the short run, 0.03 there), 80
epochs (800 steps). Losses ``nce`` (the cross-entropy of the non-parametric softmax against
the instance index) and ``prox`` (the paper's sec. 3.4 term, lambda = 3: the paper's lambda
weighs an NCE loss over 4096 noise samples; here, with the exact softmax and d = 32, lambda
= 30 pinned the embedding to the bank and left the healthy bank's kNN at 0.64-0.70 on seed
0). The memory entry is written after each step, as ``LinearAverageOp.backward`` does.
Watched as docs/probe.md says a prototype table is: the embedding ``feature`` as a latent,
the memory bank (one row per instance) as prototypes of ``feature``, with each row's
instance index observed as its group.

Variants (truth by construction):
- ``momentum-0.5``: healthy, as published.
- ``memory-frozen``: broken. The bank is written with momentum 1.0: normalise(1.0 * V[i] +
  0 * x_i) leaves every entry at its random start, so the memory never takes the features
  in. The softmax and the proximal term then pull each image towards a random point fixed
  at initialisation, unrelated to the image, and discriminate it from other random points:
  the bank, which NPID classifies with, never holds the features of the images.
Measured on the test split without gradprobe (seeds 0 and 1): kNN accuracy (k = 20, cosine;
lemniscate's ``test.py`` kNN, unweighted) with the bank itself as the training features, as
lemniscate evaluates (``trainFeatures = lemniscate.memory``), and with fresh features of the
training images; the lag of the bank behind the current embedding, 1 - mean cos(V[i], f(x_i))
over the training set:
  momentum-0.5:  kNN (bank) 0.871 / 0.824, kNN (fresh) 0.896 / 0.849, lag 0.027 / 0.027;
  memory-frozen: kNN (bank) 0.362 / 0.449, kNN (fresh) 0.864 / 0.887, lag 0.905 / 0.900.
The harm is the bank's: it is what NPID classifies with, and it stays random. The fresh
features of the frozen run are not worse (the MLP stays smooth in its input while it chases
random targets), so no harm to the backbone is claimed.
Expected on ``memory-frozen``: ``prototype-stale`` on ``memory`` (the table never moves while
the features it stands for do). Must not (both): ``inert-loss``, ``gradient-conflict`` (both
losses pull each feature towards its own entry), ``static-loss-weights``,
``prototype-collapse`` (the entries stay spread, at random); on the healthy variant also
``prototype-stale`` and ``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, augment, batches, digits_split, knn_accuracy
from ..harness import Expect, Family, Variant

EPOCHS, BATCH, LR, DIM = 80, 128, 0.1, 32
TEMPERATURE, PROX_WEIGHT = 0.07, 3.0
MOMENTUM = {"momentum-0.5": 0.5, "memory-frozen": 1.0}


class InstanceEmbedding(nn.Module):
    def __init__(self, instances: int):
        super().__init__()
        self.encoder = DigitEncoder()
        self.embed = nn.Linear(self.encoder.width, DIM)
        bound = 1.0 / math.sqrt(DIM / 3)  # LinearAverage's start of the bank
        self.register_buffer("memory", torch.rand(instances, DIM) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.encoder(x)), dim=1)

    @torch.no_grad()
    def write(self, feature: torch.Tensor, index: torch.Tensor, momentum: float) -> None:
        """LinearAverageOp.backward: the batch's rows written back, normalised."""
        mixed = self.memory[index] * momentum + feature * (1 - momentum)
        self.memory.index_copy_(0, index, F.normalize(mixed, dim=1))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = InstanceEmbedding(len(x_tr))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    order = batches(len(x_tr), BATCH, gen)
    steps = EPOCHS * (len(x_tr) // BATCH)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("feature")
    probe.watch_prototypes("memory", lambda: model.memory, latent="feature")
    with probe:
        for _ in range(steps):
            index = next(order)
            feature = model(augment(x_tr[index], gen))
            probe.observe(feature=feature, groups=index)
            stale = model.memory[index]
            losses = {"nce": F.cross_entropy(feature @ model.memory.t() / TEMPERATURE, index),
                      "prox": (feature - stale).pow(2).sum(1).mean()}
            probe.backward(losses, weights={"prox": PROX_WEIGHT})
            opt.step()
            opt.zero_grad()
            model.write(feature.detach(), index, MOMENTUM[variant])
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model(x_tr), model(x_te)
    bank = model.memory.numpy()
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    return {"knn_bank": knn_accuracy(bank, y_tr, f_te.numpy(), y_te),
            "knn_fresh": knn_accuracy(f_tr.numpy(), y_tr, f_te.numpy(), y_te),
            "memory_lag": float(1 - (model.memory * f_tr).sum(1).mean())}


_MUST_NOT = ("inert-loss", "gradient-conflict", "static-loss-weights", "prototype-collapse")

FAMILY = Family(
    name="npid-memory",
    source="Wu, Xiong, Yu & Lin 2018 (non-parametric instance discrimination, CVPR) eq. 2, "
           "sec. 3.4; zhirongw/lemniscate.pytorch lib/LinearAverage.py",
    train=train,
    variants=(
        Variant("momentum-0.5", True,
                "memory bank written with momentum 0.5 each time an instance is seen, as "
                "published: the entries follow the features",
                must_not=_MUST_NOT + ("prototype-stale", "representation-collapse")),
        Variant("memory-frozen", False,
                "memory bank written with momentum 1.0: every entry stays at its random "
                "start, the features are pulled to random targets",
                expected=(Expect("prototype-stale", "memory"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("momentum-0.5", 0), ("memory-frozen", 0)),
)
