"""Circle Loss with P x K batches and a softmax classifier beside it, after Sun, Cheng, Zhang,
Zhang, Zheng, Wang & Wei 2020 ("Circle Loss: A Unified Perspective of Pair Similarity
Optimization", CVPR, sec. 3, eq. 1 (a sample x with K within-class and L between-class
similarities), eq. 4-5 (self-paced weights a_p = [O_p - s_p]_+, a_n = [s_n - O_n]_+, detached)
and eq. 6 (O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m):
L = log(1 + sum_j exp(gamma a_n^j (s_n^j - Delta_n)) sum_i exp(-gamma a_p^i (s_p^i - Delta_p)))).
Code: TinyZeaMays/CircleLoss ``circle_loss.py`` (``convert_label_to_similarity``: the batch's
positive and negative cosine similarities from the labels, the diagonal left out;
``CircleLoss.forward`` / ``CircleLossBackward``: a_p, a_n clamped at 0 and detached, the
logits -gamma a_p (s_p - Delta_p) and gamma a_n (s_n - Delta_n), log(1 + exp(logsumexp +
logsumexp)) as a softplus; ``mnist_example_classify.py`` the class-level form), and
KevinMusgrave/pytorch-metric-learning ``losses/circle_loss.py`` ``CircleLoss.compute_loss``
(the same terms per unique anchor, averaged over the anchors that have a positive and a
negative; its docstring gives the paper's values: fine-grained image retrieval m 0.4,
gamma 80; face recognition and re-ID m 0.25, gamma 256).

Published setup for pair-wise labels (fine-grained retrieval, CUB / Cars / SOP): l2-normalised
embeddings, s the cosine similarity, m 0.4, gamma 80, batches of P classes x K images
(the class-balanced sampler of Hermans, Beyer & Leibe 2017 that every metric-learning
pipeline uses, so that each anchor has positives). Here, as a user of retrieval and
re-identification pipelines trains it, a softmax classification loss over the training
classes on the same (unnormalised) embedding is trained beside it, weight 1 (the "ID loss +
metric loss" recipe).

Here (CPU budget): the synthetic many-class retrieval set of the multi-similarity family
(``heldout6/multi_similarity.py`` ``retrieval_set``: 500 classes, each a centre in a
12-dimensional class subspace of R^64 plus isotropic noise, 20 training and 4 test images per
class, the regime of SOP where a random batch holds almost no positive pair), its P x K
sampler (P 16 x K 5, batch 80) and its shuffled loader, imported rather than written twice.
Embedder 64-128-ReLU-128-ReLU-64, linear classifier 64 -> 500 on the embedding, Adam lr 1e-3,
2,500 steps. Losses, in the order a user writes them: ``circle`` (per anchor, m 0.4, gamma 80,
on the normalised embedding) and ``cross_entropy`` (the classifier), weights 1 / 1. The probe
is told the sampler's P (``Probe(model, run_file=log, expect_groups_per_batch=16)``, the
documented declaration of batch composition, docs/findings.md ``batch-composition-mismatch``)
and sees each batch's labels as ``groups`` beside the watched normalised ``embedding``
(``watch_latent("embedding", labels="groups")``, ``observe(embedding=..., groups=labels)``, as
docs/probe.md says); test recall@1 is logged every 100 steps (``probe.log``).

Truth, measured without gradprobe: per batch the unordered same-class pairs
(``positive_pairs_per_batch``), the share of anchors with a positive, the classes per batch;
on the 2,000 test images recall@1 (the nearest other test image by cosine has the same class)
of the normalised embedding, the raw input's recall@1 as the floor, the classifier's test
accuracy, and the centred effective rank of the normalised test embedding.

Variants (truth by construction), measured on seeds 0 / 1 (input recall@1 0.181 / 0.199):
- ``pk``: healthy, P = 16 x K = 5 batches as published: 160 positive pairs per batch, every
  anchor has positives, 16 classes. Recall@1 0.353 / 0.369 (gain over the input 0.172 / 0.170),
  classifier accuracy 0.637 / 0.615, embedding rank 41.8 / 41.6.
- ``random-batches``: the sampler left out (a plain shuffled loader of batch 80 over the 500
  classes) while the probe is told P = 16, what a user who believes the sampler took effect
  declares. 5.93 / 6.08 positive pairs per batch, 13.8% / 14.2% of anchors have a positive
  (the others drop out of the circle loss), 74.3 / 74.2 classes per batch. Recall@1 0.321 /
  0.331 (gain 0.140 / 0.132: 3.2 / 3.8 points below ``pk``) although the classifier, which
  sees more classes per batch, does as well or better (0.613 / 0.614); rank 32.8 / 32.8
  (lower than ``pk``'s but no collapse: half the dimensions, recall well above the input).
  Without the classifier (circle alone, 1,500 steps, seed 0) the gap is the same: 0.331 with
  P x K, 0.287 with random batches; at 1,500 steps with the classifier 0.359 / 0.301 (seed 0)
  and 0.368 / 0.348 (seed 1), hence the 2,500 steps.
Expected on ``random-batches``: ``batch-composition-mismatch`` on ``batch`` (about 74 classes
per batch seen where 16 were declared). Allowed: ``weak-contrastive-signal`` on ``circle``
(the pair loss does get little signal: 86% of anchors without a positive). Must not (both):
``representation-collapse`` (rank measured, recall above the input), ``inert-loss``,
``non-finite``; healthy also ``batch-composition-mismatch`` and ``weak-contrastive-signal``.

CPU: about 8-10 seconds a run at one thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import centred_effective_rank
from ..harness import Expect, Family, Variant
from ..heldout6.multi_similarity import (CLASSES, DIM_EMB, DIM_IN, P, pk_batches,
                                         random_batches, recall_at_1, retrieval_set)

M, GAMMA, STEPS, LR, CE_WEIGHT = 0.4, 80.0, 2500, 1e-3, 1.0


class Embedder(nn.Module):
    """The embedding network and the softmax classifier over the training classes on it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(DIM_IN, 128), nn.ReLU(), nn.Linear(128, 128),
                                   nn.ReLU(), nn.Linear(128, DIM_EMB))
        self.classifier = nn.Linear(DIM_EMB, CLASSES)

    def forward(self, x):
        f = self.embed(x)
        return f, self.classifier(f)


def circle_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 6 for each anchor (sample x of eq. 1) over its positives and negatives in the batch,
    with the self-paced weights of eq. 5 (detached) and the margins of eq. 6:
    softplus(logsumexp_n gamma a_n (s_n - m) + logsumexp_p -gamma a_p (s_p - 1 + m)), a_p =
    [1 + m - s_p]_+, a_n = [s_n + m]_+; averaged over the anchors that have a positive and a
    negative (CircleLoss.compute_loss of pytorch-metric-learning). A batch without a positive
    pair gives 0."""
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool)
    neg = ~same
    kept = pos.any(1) & neg.any(1)
    if not kept.any():
        return 0.0 * sim.sum()
    ap = torch.clamp_min(1 + M - sim.detach(), 0.0)
    an = torch.clamp_min(sim.detach() + M, 0.0)
    minus_inf = torch.tensor(float("-inf"))
    logit_p = torch.where(pos, -GAMMA * ap * (sim - (1 - M)), minus_inf)[kept]
    logit_n = torch.where(neg, GAMMA * an * (sim - M), minus_inf)[kept]
    return F.softplus(torch.logsumexp(logit_n, 1) + torch.logsumexp(logit_p, 1)).mean()


class BatchComposition:
    """What the loader gave, batch by batch, measured in the loop without gradprobe: positive
    pairs (two items of one class), the share of anchors with a positive, classes."""

    def __init__(self) -> None:
        self.positive_pairs, self.with_positive, self.classes = [], [], []

    def add(self, labels: torch.Tensor) -> None:
        same = labels[:, None] == labels[None, :]
        self.positive_pairs.append(float(same.sum() - len(labels)) / 2)
        self.with_positive.append(float((same.sum(1) > 1).float().mean()))
        self.classes.append(len(torch.unique(labels)))

    def means(self) -> dict[str, float]:
        return {"positive_pairs_per_batch": float(np.mean(self.positive_pairs)),
                "anchors_with_positive": float(np.mean(self.with_positive)),
                "classes_per_batch": float(np.mean(self.classes))}


def train(variant: str, seed: int, log: Path) -> dict:
    x_tr, y_tr, x_te, y_te = retrieval_set(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Embedder()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sampler = pk_batches(y_tr, gen) if variant == "pk" else random_batches(len(y_tr), gen)
    probe = gradprobe.Probe(model, run_file=log, expect_groups_per_batch=P)
    probe.watch_latent("embedding", labels="groups")
    composition = BatchComposition()
    with probe:
        for step, idx in zip(range(STEPS), sampler):
            labels = y_tr[idx]
            f, logits = model(x_tr[idx])
            emb = F.normalize(f, dim=1)
            probe.observe(embedding=emb, groups=labels)
            probe.backward({"circle": circle_loss(emb, labels),
                            "cross_entropy": F.cross_entropy(logits, labels)},
                           weights={"cross_entropy": CE_WEIGHT})
            opt.step()
            opt.zero_grad()
            composition.add(labels)
            if step % 100 == 99:
                with torch.no_grad():
                    probe.log(recall_at_1=recall_at_1(model.embed(x_te).numpy(), y_te.numpy()))
    with torch.no_grad():
        emb_te = model.embed(x_te).numpy()
        class_acc = float((model(x_te)[1].argmax(1) == y_te).float().mean())
    return {**composition.means(), "recall_at_1": recall_at_1(emb_te, y_te.numpy()),
            "input_recall_at_1": recall_at_1(x_te.numpy(), y_te.numpy()),
            "test_class_acc": class_acc,
            "embedding_rank": centred_effective_rank(
                F.normalize(torch.from_numpy(emb_te), dim=1).numpy())}


_MUST_NOT = ("representation-collapse", "inert-loss", "non-finite")

FAMILY = Family(
    name="circle-loss",
    source="Sun et al. 2020 (Circle Loss, CVPR, eq. 1, 4-6, pair-wise labels m 0.4, gamma 80) "
           "with a softmax classifier; TinyZeaMays/CircleLoss circle_loss.py "
           "(convert_label_to_similarity, CircleLoss); KevinMusgrave/pytorch-metric-learning "
           "losses/circle_loss.py; P x K batches of Hermans, Beyer & Leibe 2017",
    train=train,
    variants=(
        Variant("pk", True,
                "P = 16 classes x K = 5 images per batch as published: 160 positive pairs per "
                "batch, every anchor has positives; recall@1 0.35-0.37 (input 0.18-0.20)",
                must_not=_MUST_NOT + ("batch-composition-mismatch", "weak-contrastive-signal")),
        Variant("random-batches", False,
                "a shuffled loader over 500 classes where P = 16 classes per batch was "
                "declared: about 74 classes and 6 positive pairs per batch, 86% of anchors "
                "without a positive; recall@1 3-4 points below P x K on both seeds (measured)",
                expected=(Expect("batch-composition-mismatch", "batch"),),
                allowed=(Expect("weak-contrastive-signal", "circle"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("pk", 1), ("random-batches", 1)),
)
