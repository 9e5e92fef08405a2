"""Mean Teacher, after Tarvainen & Valpola 2017 ("Mean teachers are better role models:
Weight-averaged consistency targets improve semi-supervised deep learning results",
NeurIPS, sec. 2-3), the published implementation CuriousAI/mean-teacher (PyTorch:
``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss``, ``ramps.py`` ``sigmoid_rampup``,
``pytorch/main.py`` ``update_ema_variables`` and the training loop; read here through the
repository's README and the widely copied excerpts of these functions found by code search).

Published setup: a student and a teacher of one architecture; the teacher's weights are an
exponential moving average of the student's (decay alpha 0.99 during ramp-up, 0.999 after;
``alpha = min(1 - 1/(step + 1), alpha)``: the true average first); each sees the batch under
its own input noise; the classification cost is the cross-entropy on the labelled part of
the batch (summed, divided by the minibatch size: ``ignore_index=NO_LABEL``); the
consistency cost is the MSE between student and teacher softmax outputs (summed over classes
divided by the number of classes, averaged over the batch), the teacher's side without
gradient; total = class_cost + w(t) * consistency_cost with w(t) = w_max *
exp(-5 (1 - t/T)^2) during a sigmoid ramp-up of T (CIFAR-10: w_max 100, 5 epochs of ramp-up;
62 labelled of 256 per batch).

Here: scikit-learn's 8x8 digits, 100 labels (10 per class) of the 1347 training images, the
rest unlabelled; the backbone of the self-supervised families (``DigitEncoder``, MLP 64 ->
128 -> 128 with batch norm) with a linear head; batch 64 of which 16 labelled; the input
noise is ``common.augment`` (shift, intensity, erasing, Gaussian noise), drawn apart for
student and teacher; Adam lr 1e-3, 500 steps, ramp-up over the first 200 steps, EMA decay
0.99 during ramp-up and 0.999 after; w_max 3 (scaled from 100 for 500 steps: measured
student test accuracy with w_max 1, 3, 10: 0.889/0.884, 0.878/0.891, 0.847/0.896 on seeds
0/1; at this scale the student gains nothing over the labels alone, the EMA teacher a little
on seed 1, see the reference below).
Losses passed as ``class_cost`` and ``consistency_cost`` (the repository's names); the
student's features are watched as latent ``features``.

Variants (truth by construction):
- ``published``: healthy, as above.
- ``no-rampup-huge-weight``: broken. The consistency weight is w = 1e4 from step 0 with no
  ramp-up, so the consistency cost swamps the classification cost on the shared backbone: the
  student is held at what the slowly moving teacher predicted, i.e. at its random start, and
  the few labels barely train it.
Reference without the consistency cost (w = 1e-9, supervised on the 100 labels only),
measured once: test accuracy 0.896 and 0.896 (seeds 0 and 1).
Measured on the test split (450 images), independently of gradprobe (seeds 0 and 1): student
test accuracy, classes the student predicts, centred effective rank of the student's test
features (of 128), and the median ratio of the weighted trunk gradient norms
class_cost / consistency_cost (``common.trunk_grad_ratio`` by autograd, every 20 steps after
step 200):
  published:             accuracy 0.878 / 0.891 (EMA teacher 0.884 / 0.920), 10 / 10
                         classes, rank 77.4 / 78.9, ratio 7.0 / 6.8;
  no-rampup-huge-weight: accuracy 0.104 / 0.096 (EMA teacher 0.122 / 0.096), 2 / 1
                         classes, rank 76.7 / 77.1, ratio 0.087 / 0.093.
So the broken student predicts (nearly) one class, chance accuracy, while its features keep
their rank: the harm is in what the class cost could not teach, not a collapsed latent (no
``representation-collapse`` is declared either way on the broken run, whose spread was not
measured). 4-6 CPU-seconds a run.
Expected on ``no-rampup-huge-weight``: ``gradient-swamping`` on ``class_cost`` (the
consistency cost at a fixed weight 1e4 drowns it on the shared layers) and
``static-loss-weights`` on ``class_cost`` (the fixed weight is the cause). Must not (both):
``inert-loss``, ``non-finite``; on the healthy variant also ``gradient-swamping``,
``representation-collapse``, ``static-loss-weights``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

import numpy as np

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      trunk_grad_ratio)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LABELLED_PER_BATCH, LR = 500, 64, 16, 1e-3
LABELS_PER_CLASS, CLASSES = 10, 10
RATIO_EVERY = 20  # steps between the independent gradient-ratio measurements
RAMPUP_STEPS, EMA_DECAY_RAMPUP, EMA_DECAY_AFTER = 200, 0.99, 0.999
CONSISTENCY = {"published": 3.0, "no-rampup-huge-weight": 1e4}


def sigmoid_rampup(step: int, length: int) -> float:
    """CuriousAI/mean-teacher ``ramps.sigmoid_rampup``: exp(-5 (1 - t/T)^2), 1 after T."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(step, length) / length
    return math.exp(-5.0 * phase * phase)


def update_ema(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """The repository's ``update_ema_variables``: the true average until the EMA is better;
    parameters only, the teacher's batch-norm statistics come from its own forward passes."""
    decay = min(1 - 1 / (step + 1), decay)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(decay).add_(s, alpha=1 - decay)


def labelled_subset(y: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random training images of each class (the few labels)."""
    picks = [torch.nonzero(y == c).flatten() for c in range(CLASSES)]
    return torch.cat([p[torch.randperm(len(p), generator=gen)[:per_class]] for p in picks])


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = DigitEncoder()
        self.head = nn.Linear(self.trunk.width, CLASSES)

    def forward(self, x):
        features = self.trunk(x)
        return features, self.head(features)


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Summed squared softmax difference / classes, averaged over the batch (as published)."""
    diff = F.softmax(student_logits, 1) - F.softmax(teacher_logits, 1)
    return diff.pow(2).sum() / CLASSES / len(student_logits)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    labelled = labelled_subset(y_tr, LABELS_PER_CLASS, gen)
    unlabelled = torch.ones(len(x_tr), dtype=torch.bool)
    unlabelled[labelled] = False
    unlabelled = torch.nonzero(unlabelled).flatten()
    student = Classifier()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    w_max = CONSISTENCY[variant]
    ramped = variant == "published"
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    ratios = []  # weighted trunk gradient norm, class / consistency, after the ramp-up
    lab_order = batches(len(labelled), LABELLED_PER_BATCH, gen)
    unl_order = batches(len(unlabelled), BATCH - LABELLED_PER_BATCH, gen)
    probe = gradprobe.Probe(student, run_file=log)
    probe.watch_latent("features")
    with probe:
        for step in range(STEPS):
            idx_l, idx_u = labelled[next(lab_order)], unlabelled[next(unl_order)]
            x = torch.cat([x_tr[idx_l], x_tr[idx_u]])
            features, logits = student(augment(x, gen))
            with torch.no_grad():
                _, teacher_logits = teacher(augment(x, gen))
            probe.observe(features=features)
            losses = {
                "class_cost": F.cross_entropy(logits[:LABELLED_PER_BATCH], y_tr[idx_l],
                                              reduction="sum") / BATCH,
                "consistency_cost": softmax_mse_loss(logits, teacher_logits)}
            weight = w_max * (sigmoid_rampup(step, RAMPUP_STEPS) if ramped else 1.0)
            if step % RATIO_EVERY == 0 and step >= RAMPUP_STEPS:
                ratios.append(trunk_grad_ratio(student, losses, {"consistency_cost": weight},
                                               "class_cost", "consistency_cost"))
            probe.backward(losses, weights={"consistency_cost": weight})
            opt.step()
            opt.zero_grad()
            decay = EMA_DECAY_RAMPUP if step < RAMPUP_STEPS else EMA_DECAY_AFTER
            update_ema(teacher, student, decay, step)
    student.eval()
    teacher.eval()
    with torch.no_grad():
        features, logits = student(x_te)
        predicted = logits.argmax(1)
        teacher_predicted = teacher(x_te)[1].argmax(1)
    return {"test_accuracy": float((predicted == y_te).float().mean()),
            "teacher_test_accuracy": float((teacher_predicted == y_te).float().mean()),
            "classes_predicted": int(predicted.unique().numel()),
            "feature_effective_rank": centred_effective_rank(features.numpy()),
            "median_class_over_consistency_grad": float(np.median(ratios))}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="mean-teacher",
    source="Tarvainen & Valpola 2017 (Mean Teacher, NeurIPS, sec. 2-3); CuriousAI/mean-teacher "
           "pytorch/mean_teacher/losses.py softmax_mse_loss, ramps.py sigmoid_rampup, "
           "pytorch/main.py update_ema_variables",
    train=train,
    variants=(
        Variant("published", True,
                "consistency weight ramped up with the published sigmoid schedule, EMA teacher "
                "0.99/0.999: the unlabelled images add to the 100 labels",
                must_not=_MUST_NOT + ("gradient-swamping", "representation-collapse",
                                      "static-loss-weights")),
        Variant("no-rampup-huge-weight", False,
                "consistency weight 1e4 from step 0 without ramp-up: the consistency cost "
                "drowns the classification cost and the student stays near its start",
                expected=(Expect("gradient-swamping", "class_cost"),
                          Expect("static-loss-weights", "class_cost")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("no-rampup-huge-weight", 0)),
)
