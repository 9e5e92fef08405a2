"""Supervised contrastive learning with P x K batches, after Khosla et al. 2020 ("Supervised
Contrastive Learning", NeurIPS, eq. 2, L^sup_out; HobbitLong/SupContrast, losses.py
``SupConLoss``) with the P x K batch sampling of Hermans, Beyer & Leibe 2017 ("In Defense of
the Triplet Loss for Person Re-Identification", section 3: P classes, K samples each).

Published setup: two augmented views per image through an encoder and an MLP projection
head to 128 dimensions, l2-normalised; for each of the 2N views i, with P(i) the other
views of the same label and A(i) all other views,
L = sum_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) ),
tau = 0.07 (the repository's default; 0.1 in the paper). Other-label views are the
negatives. A P x K batch guarantees every anchor K - 1 positives and (P - 1) K negatives.

Here: the digits backbone (``common.DigitEncoder``), head 128-128-ReLU-128, the loss as
``SupConLoss`` computes it (mean over anchors), P = 8 of the 10 digit classes x K = 16
images per batch (128), Adam lr 1e-3, 1,000 steps. The probe watches
the views as a contrastive pair with the labels as groups (``observe(cont=(z1, z2),
groups=labels)``) and the normalised embedding as the latent ``z`` with those labels
(``watch_latent("z", labels="groups")``), and is told the batch plan
(``expect_groups_per_batch=8``).

Truth, measured without gradprobe: per batch, the share of anchors with no negative at all
and the share of in-batch pairs of one label (``same_label_pairs``); on the test split, the
5-nearest-neighbour accuracy of the l2-normalised embedding the loss trains (``z_knn_acc``),
the linear-probe accuracy of the projection output and of the backbone features (the
backbone's stays high on every variant: random batch-normalised features of the digits
already reach it), the total variance of the normalised embedding, and the centred
effective rank and normalised std (``common.normalised_std``) of the projection output.

Variants (truth by construction):
- ``pk``: healthy, P = 8 x K = 16 batches. Measured, seeds 0 / 1: no anchor without
  negatives, same-label pairs 0.118; z_knn_acc 0.989 / 0.991, z_linear_acc 0.987 / 0.991,
  normalised-embedding total variance 0.385 / 0.389, z_std 0.61 / 0.61, z_rank 21.0 / 21.2.
- ``one-class-batches``: the sampler gives P = 1 class x K = 128 images per batch (the
  identity count of the P x K sampler left at 1), while the plan says 8. No anchor has a
  negative: every other view is a positive, so the loss only pulls each class together and
  never pushes classes apart. Measured, seeds 0 / 1: every anchor without negatives,
  same-label pairs 1.0; z_knn_acc 0.947 / 0.940, z_linear_acc 0.918 / 0.913, total variance
  0.0014 / 0.0033, z_std 0.038 / 0.057, z_rank 28.6 / 48.7 (backbone linear accuracy 0.956
  / 0.962 against 0.989 / 0.982).
  The normalised embedding shrinks almost to one point (total variance 100-300x below
  ``pk``'s, normalised std 0.04-0.06 against 0.6), while what little spread is left still sorts the digits
  (kNN 0.95): a collapse of what the loss sees whose kind (complete, or mean-dominated with
  the information kept) the truth does not settle.
  Expected: ``batch-composition-mismatch`` on ``batch`` and ``weak-contrastive-signal`` on
  the watch ``cont``. Allowed: ``representation-collapse`` on ``z``.
Must not (healthy): ``weak-contrastive-signal``, ``batch-composition-mismatch``,
``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gradprobe

from ..common import augment, digits_split, knn_accuracy, representation_truth
from ..harness import Expect, Family, Variant
from ..simclr import SimCLR

STEPS, LR = 1000, 1e-3
TEMPERATURE = 0.07
PLAN_P, BATCH = 8, 128
DIM = 128


class SupConNet(SimCLR):
    """SimCLR's backbone and projection head (to DIM dimensions), its output l2-normalised."""

    def __init__(self):
        super().__init__(DIM)

    def forward(self, x):
        return F.normalize(super().forward(x), dim=1)


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L^sup_out over the 2N views (SupConLoss with base_temperature = temperature)."""
    z = torch.cat([z1, z2])
    y = torch.cat([labels, labels])
    self_mask = torch.eye(len(y), dtype=torch.bool)
    logits = (z @ z.T / TEMPERATURE).masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()


def pk_batches(labels: torch.Tensor, p: int, k: int, gen: torch.Generator):
    """Endless batches of p classes drawn at random, k images of each (without replacement
    within a class)."""
    classes = labels.unique()
    members = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    while True:
        chosen = torch.randperm(len(classes), generator=gen)[:p]
        yield torch.cat([members[c][torch.randperm(len(members[c]), generator=gen)[:k]]
                         for c in chosen.tolist()])


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    p = PLAN_P if variant == "pk" else 1
    model = SupConNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log, expect_groups_per_batch=PLAN_P)
    probe.watch_contrastive("cont", temperature=TEMPERATURE)
    probe.watch_latent("z", labels="groups")
    no_negative, same_pairs = [], []
    with probe:
        for _, idx in zip(range(STEPS), pk_batches(y_tr, p, BATCH // p, gen)):
            labels = y_tr[idx]
            z1, z2 = model(augment(x_tr[idx], gen)), model(augment(x_tr[idx], gen))
            probe.observe(cont=(z1, z2), groups=labels, z=z1)
            probe.backward({"supcon": supcon_loss(z1, z2, labels)})
            opt.step()
            opt.zero_grad()
            same = labels[:, None] == labels[None, :]
            no_negative.append(float(same.all(1).float().mean()))
            same_pairs.append(float((same.sum() - len(idx)) / (len(idx) * (len(idx) - 1))))
    truth = representation_truth(model.encoder, model.head)
    with torch.no_grad():
        z_tr, z_te = model(x_tr).numpy(), model(x_te).numpy()
    return {"anchors_without_negatives": sum(no_negative) / len(no_negative),
            "same_label_pairs": sum(same_pairs) / len(same_pairs),
            "z_knn_acc": knn_accuracy(z_tr, y_tr.numpy(), z_te, y_te.numpy(), k=5),
            "z_total_variance": float(z_te.var(0, ddof=1).sum())} | \
        {k: truth[k] for k in ("z_linear_acc", "linear_acc", "z_rank", "z_std")}


FAMILY = Family(
    name="supcon-pk",
    source="Khosla et al. 2020, SupCon (NeurIPS), eq. 2; HobbitLong/SupContrast; P x K batches "
           "of Hermans, Beyer & Leibe 2017",
    train=train,
    variants=(
        Variant("pk", True, "P = 8 classes x K = 16 images: every anchor has positives and "
                "negatives", must_not=("weak-contrastive-signal", "batch-composition-mismatch",
                                       "representation-collapse")),
        Variant("one-class-batches", False,
                "P = 1 x K = 128 against a plan of 8 classes: no anchor has a negative, the loss "
                "never pushes classes apart",
                expected=(Expect("batch-composition-mismatch", "batch"),
                          Expect("weak-contrastive-signal", "cont")),
                allowed=(Expect("representation-collapse", "z"),)),
    ),
    seeds=(0, 1),
    quick=(("pk", 1), ("one-class-batches", 1)),
)
