"""Self-Classifier, after Amrani, Karlinsky & Bronstein 2022 ("Self-Supervised Classification
Network", ECCV, sec. 3, eq. 1-5: the cross-entropy between the class predictions of two
augmented views, eq. 1, has the degenerate solution of one class for every sample; Bayes'
rule with a uniform prior p(y) = 1/C turns p(y|x) into p~(y|x) = p(x|y) / sum_y' p(x|y'), with
p(x|y) a softmax over the batch (a column softmax), so that the loss is the cross-entropy
between the two views' prior-corrected predictions and the degenerate solutions are not
optimal), official code elad-amrani/self-classifier: ``src/loss.py`` ``Loss.forward`` (per
classifier and per ordered pair of views: target = ``softmax(view_i / col_tau, dim=0)``
row-normalised (L1); prediction = ``softmax(view_j / row_tau, dim=1)`` column-normalised (L1),
its log taken of ``N / C * pred + eps``; loss ``-mean_rows sum_cols target * log pred``,
averaged over the view pairs and the classifiers; no stop-gradient), ``src/model.py``
``Model`` and ``MLPHead`` (an MLP head ending in an l2-normalised embedding, then
``num_cls`` weight-normalised linear classifiers without bias, ``weight_g`` filled with 1)
and ``scripts/train_100ep.sh`` (``--row-tau 0.1 --col-tau 0.05``, ``--cls-size 1000 2000 4000
8000 --num-cls 4``, ``--dim 128 --hidden-dim 4096 --num-hidden 2 --use-bn``, LARS lr 4.8, wd
1e-6, multi-crop and nearest-neighbour augmentation from a queue).

Published setup: ResNet-50 on ImageNet, two global crops (plus six local ones), four
classifiers of 1000-8000 classes trained at once by the mean of their losses; the 1000-way
classifier is the one evaluated (unsupervised classification: NMI, adjusted NMI, ARI and
Hungarian accuracy against the ImageNet labels).

Here (CPU): scikit-learn's 8x8 digits with the corpus's augmentations (``common.augment``), two
views (no local crops, no nearest-neighbour queue); backbone ``common.DigitEncoder`` (width
128), head Linear 128 -> 256, batch norm, LeakyReLU, Linear 256 -> 32, l2-normalised;
classifiers of 10, 20, 40 and 80 classes (the published 1x, 2x, 4x, 8x the true class
count), weight-normalised, no bias; row tau 0.1, col tau 0.05, eps 1e-8, batch 256, Adam lr
1e-3 (LARS published), 400 steps.

The probe's losses: the method's loss is one mean over its classifiers, and the repository
loops over them; the natural split a user monitoring the heads makes is one loss per
classifier (``cls_10`` first: the head that is evaluated against the ten digits; ``cls_20``,
``cls_40``, ``cls_80``), each with weight 1/4 so that the weighted sum is the published loss.
The loss is not split further: its prior is not an additive term but the normalisation inside
each cross-entropy. Watched as a user would: the l2-normalised embedding (``embedding``) and
the 10-way classifier's rows as prototypes ``classes`` of that embedding, each sample's
class (argmax of the 10-way head on the first view) observed as its group.

Truth, measured without gradprobe on the test split (the 10-way head): classes used (argmax
for >= 1% of the test digits), largest class share, usage entropy (entropy of the argmax
counts / log 10), NMI and Hungarian accuracy against the digit labels, the same usage for the
80-way head; of the l2-normalised embedding: centred effective rank, total variance,
normalised std (x sqrt(d)) and linear-probe accuracy (trained on the training split).

Variants (truth by construction):
- ``published``: healthy, the loss of src/loss.py.
- ``no-prior``: broken, the uniform prior left out: the plain cross-entropy of eq. 1 between
  the views' row softmaxes (target ``softmax(view_i / col_tau, dim=1)``, prediction
  ``log_softmax(view_j / row_tau, dim=1)``; no column softmax, no column normalisation):
  one confident class for every input minimises it (sec. 3: the degenerate solution).
Measured (seeds 0 / 1, one thread; 10-way head on the test digits):
  published: 10 / 10 classes used, largest share 0.151 / 0.160, usage entropy 0.976 / 0.974,
             NMI 0.764 / 0.772, Hungarian accuracy 0.762 / 0.798; the 80-way head uses 45 /
             36 classes (usage entropy 0.893 / 0.888); embedding: centred rank 14.3 / 14.6
             of 32, total variance 0.84 / 0.85, normalised std 0.90 / 0.90, linear probe
             0.953 / 0.958;
  no-prior:  1 / 1 class takes every test digit (share 1.0, usage entropy 0.0 / 0.0), NMI 0.0
             / 0.0, Hungarian accuracy 0.102 / 0.102 (chance); the 80-way head also 1 / 1
             class; embedding: total variance 0.017 / 0.017 (x0.02 of published), normalised
             std 0.13 / 0.13, centred rank 29.2 / 29.5 (the little spread left is isotropic
             noise around the winning class row), linear probe 0.796 / 0.747.
The 10-way rows' Euclidean nearest row to the unit embedding (what the prototype watch
counts) agrees with the logits' argmax (measured once, seed 0: 450 of 450 test digits on one
row with no-prior; usage within 3 digits per class of the argmax's when published): the
weight-norm gains g stay at 0.96-1.09.

Expected on ``no-prior``: ``prototype-collapse`` on ``classes`` (one class row takes every
input, the failure the prior exists to prevent). Allowed: ``representation-collapse`` on
``embedding`` (true: it concentrates around the winning row, x0.02 of the published total
variance, a consequence of the class collapse). Must not (both): ``inert-loss``,
``non-finite``; on ``published`` also ``prototype-collapse``, ``representation-collapse``,
``gradient-conflict`` and ``gradient-swamping`` (the four heads are one objective, weighted
equally as published).

CPU: about 5.5-6.7 seconds a run (one thread).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      linear_probe_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, WIDTH, HIDDEN, DIM = 400, 256, 1e-3, 128, 256, 32
CLS_SIZES = (10, 20, 40, 80)
ROW_TAU, COL_TAU, EPS = 0.1, 0.05, 1e-8


class WeightNormClassifier(nn.Module):
    """nn.utils.weight_norm(nn.Linear(dim, classes, bias=False)) with weight_g filled with 1:
    each row g * v / ||v||."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.v = nn.Parameter(nn.Linear(dim, classes, bias=False).weight.detach().clone())
        self.g = nn.Parameter(torch.ones(classes, 1))

    def weight(self) -> torch.Tensor:
        return self.g * self.v / self.v.norm(dim=1, keepdim=True)

    def forward(self, z):
        return z @ self.weight().T


class SelfClassifierNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder(WIDTH)
        self.head = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.BatchNorm1d(HIDDEN),
                                  nn.LeakyReLU(), nn.Linear(HIDDEN, DIM))
        self.classifiers = nn.ModuleList(WeightNormClassifier(DIM, c) for c in CLS_SIZES)

    def forward(self, x):
        z = F.normalize(self.head(self.backbone(x)), dim=1, eps=1e-7)
        return z, [cls(z) for cls in self.classifiers]


def self_classifier_loss(out1: torch.Tensor, out2: torch.Tensor, prior: bool) -> torch.Tensor:
    """One classifier's loss over the two ordered view pairs (src/loss.py); ``prior=False``
    is eq. 1's plain cross-entropy between the views' row softmaxes."""
    n, c = out1.shape
    views = (out1, out2)
    if prior:
        targets = [F.normalize(F.softmax(v / COL_TAU, dim=0), p=1, dim=1, eps=EPS) for v in views]
        log_preds = [torch.log(n / c * F.normalize(F.softmax(v / ROW_TAU, dim=1), p=1, dim=0,
                                                   eps=EPS) + EPS) for v in views]
    else:
        targets = [F.softmax(v / COL_TAU, dim=1) for v in views]
        log_preds = [F.log_softmax(v / ROW_TAU, dim=1) for v in views]
    terms = [-(targets[i] * log_preds[j]).sum(1).mean() for j in range(2) for i in range(2)
             if i != j]
    return sum(terms) / len(terms)


def usage(assigned: np.ndarray, classes: int) -> dict:
    share = np.bincount(assigned, minlength=classes) / len(assigned)
    nz = share[share > 0]
    return {"classes_used": float((share >= 0.01).sum()), "largest_share": float(share.max()),
            "usage_entropy": float(-(nz * np.log(nz)).sum() / math.log(classes)) + 0.0}


def hungarian_accuracy(assigned: np.ndarray, labels: np.ndarray, classes: int) -> float:
    counts = np.zeros((classes, int(labels.max()) + 1))
    np.add.at(counts, (assigned, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = SelfClassifierNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    prior = variant == "published"
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding")
    probe.watch_prototypes("classes", lambda: model.classifiers[0].weight(), latent="embedding")
    weights = {f"cls_{c}": 1.0 / len(CLS_SIZES) for c in CLS_SIZES}
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            (z1, outs1), (_, outs2) = (model(augment(x_tr[idx], gen)) for _ in range(2))
            probe.observe(embedding=z1, groups=outs1[0].argmax(1))
            losses = {f"cls_{c}": self_classifier_loss(o1, o2, prior)
                      for c, o1, o2 in zip(CLS_SIZES, outs1, outs2)}
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        z_te, outs = model(x_te)
        z_tr, _ = model(x_tr)
    assigned = outs[0].argmax(1).numpy()
    labels = y_te.numpy()
    fine = usage(outs[-1].argmax(1).numpy(), CLS_SIZES[-1])
    return usage(assigned, CLS_SIZES[0]) | {
        "nmi": float(normalized_mutual_info_score(labels, assigned)),
        "hungarian_acc": hungarian_accuracy(assigned, labels, CLS_SIZES[0]),
        "cls_80_classes_used": fine["classes_used"], "cls_80_usage_entropy": fine["usage_entropy"],
        "embedding_rank": centred_effective_rank(z_te.numpy()),
        "embedding_total_variance": float(z_te.var(0).sum()),
        "embedding_normalised_std": normalised_std(z_te.numpy()),
        "embedding_linear_acc": linear_probe_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(),
                                                      labels)}


FAMILY = Family(
    name="self-classifier",
    source="Amrani, Karlinsky & Bronstein 2022 (Self-Supervised Classification Network, ECCV, "
           "eq. 1-5: cross-entropy of two views' predictions with a uniform prior by row/column "
           "softmax normalisation, row tau 0.1, col tau 0.05, four classifiers); "
           "elad-amrani/self-classifier src/loss.py Loss, src/model.py Model, MLPHead",
    train=train,
    variants=(
        Variant("published", True,
                "the loss of src/loss.py (uniform prior by column normalisation): every digit "
                "class's head in use, NMI and accuracy well above chance (measured)",
                must_not=("prototype-collapse", "representation-collapse", "inert-loss",
                          "non-finite", "gradient-conflict", "gradient-swamping")),
        Variant("no-prior", False,
                "eq. 1's plain cross-entropy between the views (no column softmax or "
                "normalisation): the degenerate solution, one class for (nearly) every digit "
                "(measured usage)",
                expected=(Expect("prototype-collapse", "classes"),),
                allowed=(Expect("representation-collapse", "embedding"),),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-prior", 1)),
)
