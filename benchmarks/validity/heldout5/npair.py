"""Multi-class N-pair loss, after Sohn 2016 ("Improved Deep Metric Learning with Multi-class
N-pair Loss Objective", NeurIPS), with the loss code of leeesangwon/PyTorch-Image-Retrieval
(``losses.py``, ``NPairLoss``, ``l2_reg=0.02``) that public PyTorch ports copy.

Published loss (sec. 3.2, eq. 3, and sec. 3.2.1): a batch holds N pairs (x_i, x_i^+) from N
DISTINCT classes; with f = f(x), L({x_i, x_i^+}_{i=1..N}; f) = (1/N) sum_i
log(1 + sum_{j != i} exp(f_i^T f_j^+ - f_i^T f_i^+)), i.e. a softmax cross-entropy over the
rows of the N x N similarity matrix f_i^T f_j^+ with the diagonal as target: every other
pair's positive is a negative, which is only right because the N classes are distinct (the
"N-pair-mc" batch construction of sec. 3.2.1). The embeddings are not normalised; the paper
regularises their L2 norm instead ("we found that regularizing the L2 norm of the embedding
vectors to be small ... is effective", sec. 3.2.2); the port adds
l2_reg * (sum |f_i|^2 + |f_i^+|^2) / N with l2_reg = 0.02.

Here: scikit-learn digits (10 classes), an MLP 64 -> 128 -> 128 -> 32 (ReLU), Adam lr 1e-3,
N = 10 pairs per batch (the paper's N-pair-mc with N = the number of classes), 800 steps.
Losses ``n_pair_loss`` (eq. 3) and ``l2_loss`` (weight 0.02, as the port). The probe is told
the batch plan (``expect_groups_per_batch=10``), watches the anchor/positive embeddings as a
contrastive pair ``npair`` with the pair labels as groups, and the embedding as the latent
``embedding`` with those labels.

Variants (truth by construction):
- ``distinct-classes``: healthy, the published sampler: each batch draws N = 10 distinct
  classes and two different training images of each.
- ``class-sorted``: broken, the pairs of an epoch are sorted by class and read in order (a
  loader left unshuffled on a class-ordered dataset), so a batch of 10 pairs holds one
  class (two at a class boundary) and most "negatives" are other images of the anchor's own
  class: the loss pushes apart what it should pull together, and there is never a second
  class to separate from.
Measured on the test split, without gradprobe (seeds 0 and 1): Recall@1 (nearest neighbour
by cosine, the paper's retrieval measure) and 20-NN accuracy of the embedding, and the share
of in-batch negatives that have the anchor's class:
  distinct-classes: recall@1 0.978 / 0.984, knn 0.980 / 0.978, same-class negatives 0 / 0;
  class-sorted:     recall@1 0.647 / 0.711, knn 0.658 / 0.758, same-class negatives 0.98 / 0.98.
(Raw pixels give recall@1 0.978 on this split: the class-sorted embedding is far worse than
its own input.) A run takes ~2-4 CPU-seconds.
Expected on ``class-sorted``: ``batch-composition-mismatch`` on ``batch`` (one or two of
the 10 declared classes per batch) and ``weak-contrastive-signal`` on ``npair`` (most
negatives share the anchor's group). Must not (both): ``gradient-conflict``, ``inert-loss``;
on the healthy run also ``gradient-swamping``, ``representation-collapse``,
``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import digits_split, knn_accuracy
from ..harness import Expect, Family, Variant

STEPS, N_PAIRS, LR, L2_REG, DIM = 800, 10, 1e-3, 0.02, 32
CLASSES = 10


def n_pair_loss(anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Sohn's eq. 3: cross-entropy over anchors @ positives^T with the diagonal as target."""
    return F.cross_entropy(anchors @ positives.T, torch.arange(len(anchors)))


def l2_loss(anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    return (anchors.pow(2).sum() + positives.pow(2).sum()) / len(anchors)


def distinct_class_pairs(labels: torch.Tensor, gen: torch.Generator):
    """The published N-pair-mc sampler: N distinct classes, two different images of each."""
    members = [torch.nonzero(labels == c).flatten() for c in range(CLASSES)]
    while True:
        classes = torch.randperm(CLASSES, generator=gen)[:N_PAIRS]
        picks = [members[c][torch.randperm(len(members[c]), generator=gen)[:2]] for c in classes]
        yield torch.stack([p[0] for p in picks]), torch.stack([p[1] for p in picks])


def class_sorted_pairs(labels: torch.Tensor, gen: torch.Generator):
    """Each image paired with another of its class, the epoch's pairs sorted by class and
    read in order: N consecutive pairs share one or two classes."""
    members = [torch.nonzero(labels == c).flatten() for c in range(CLASSES)]
    while True:
        anchors, positives = [], []
        for m in members:
            order = m[torch.randperm(len(m), generator=gen)]
            anchors.append(order)
            positives.append(order.roll(1))
        anchors, positives = torch.cat(anchors), torch.cat(positives)
        for start in range(0, len(anchors) - N_PAIRS + 1, N_PAIRS):
            yield anchors[start:start + N_PAIRS], positives[start:start + N_PAIRS]


SAMPLERS = {"distinct-classes": distinct_class_pairs, "class-sorted": class_sorted_pairs}


def recall_at_1(f_test: np.ndarray, y_test: np.ndarray) -> float:
    """Share of test images whose nearest other test image (cosine) has their class."""
    f = f_test / np.maximum(np.linalg.norm(f_test, axis=1, keepdims=True), 1e-12)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return float((y_test[sim.argmax(1)] == y_test).mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, DIM))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    same_class_negatives = []
    probe = gradprobe.Probe(model, run_file=log, expect_groups_per_batch=N_PAIRS)
    probe.watch_contrastive("npair")
    probe.watch_latent("embedding", labels="groups")
    with probe:
        for _, (a_idx, p_idx) in zip(range(STEPS), SAMPLERS[variant](y_tr, gen)):
            labels = y_tr[a_idx]
            same_pairs = int((labels[:, None] == labels[None, :]).sum()) - N_PAIRS  # off-diagonal
            same_class_negatives.append(same_pairs / (N_PAIRS * (N_PAIRS - 1)))
            anchors, positives = model(x_tr[a_idx]), model(x_tr[p_idx])
            probe.observe(npair=(anchors, positives), groups=labels, embedding=anchors)
            probe.backward({"n_pair_loss": n_pair_loss(anchors, positives),
                            "l2_loss": l2_loss(anchors, positives)}, weights={"l2_loss": L2_REG})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        f_tr, f_te = model(x_tr).numpy(), model(x_te).numpy()
    return {"recall_at_1": recall_at_1(f_te, y_te.numpy()),
            "knn_acc": knn_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy()),
            "same_class_negative_share": float(np.mean(same_class_negatives))}


_MUST_NOT = ("gradient-conflict", "inert-loss")

FAMILY = Family(
    name="npair",
    source="Sohn 2016 (multi-class N-pair loss, NeurIPS) eq. 3 and sec. 3.2.1-3.2.2; "
           "leeesangwon/PyTorch-Image-Retrieval losses.py NPairLoss (l2_reg 0.02)",
    train=train,
    variants=(
        Variant("distinct-classes", True, "N = 10 pairs of 10 distinct classes per batch, as "
                "published: no negative shares the anchor's class",
                must_not=_MUST_NOT + ("gradient-swamping", "representation-collapse",
                                      "static-loss-weights")),
        Variant("class-sorted", False,
                "pairs read in class order: 1-2 classes per batch, most negatives share the "
                "anchor's class, and retrieval falls below the healthy run's (measured)",
                expected=(Expect("batch-composition-mismatch", "batch"),
                          Expect("weak-contrastive-signal", "npair")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("distinct-classes", 1), ("class-sorted", 1)),
)
