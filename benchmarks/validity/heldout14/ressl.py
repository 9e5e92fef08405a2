"""ReSSL (Zheng, You, Wang, Qian, Zhang, Wang & Xu 2021, "ReSSL: Relational Self-Supervised
Learning with Weak Augmentation", NeurIPS, sec. 3, eq. 2-5): a student (the query encoder, a
strongly augmented view) and a teacher (the key encoder, an exponential moving average of the
student, a weakly augmented view) each give a relation distribution over a memory queue of
the teacher's past embeddings, p^i = softmax(z_i . Q / tau_s) (eq. 2) and q^i = softmax(
z'_i . Q / tau_t) (eq. 3), and the student minimises the cross-entropy H(q^i, p^i) (eq. 4-5);
the teacher's temperature 0.04 is sharper than the student's 0.1 (sec. 3.2: a sharper target
is what keeps the relation from being uniform, the ablation's tau_t table), the queue is
filled with the teacher's embeddings (first in, first out). Code: mingkai-zheng/ReSSL (the
official repository, formerly KyleZheng1997/ReSSL) ``network/ressl.py`` class ``ReSSL``
(``__init__``: the key encoder a copy of the query encoder without gradient, a buffer
``queue`` of K normalised random vectors; ``_momentum_update_key_encoder``: param_k = m
param_k + (1 - m) param_q; ``forward``: q = encoder_q(im_q), k = encoder_k(im_k) under
no_grad, ``logitsq = q . queue``, ``logitsk = k . queue``, then ``_dequeue_and_enqueue(k)``)
and ``ressl.py`` ``train`` (``loss = -sum(softmax(logitsk.detach() / args.t) *
log_softmax(logitsq / 0.1), 1).mean()``, ``--t`` 0.04; SGD momentum 0.9, weight decay 1e-4,
warm-up then cosine learning rate).

Published setup: ResNet backbone with a two-layer projection head and normalised 512-d (128-d
on CIFAR) embeddings, queue 65,536 x 2 (ImageNet; 4,096 on CIFAR), m 0.999 (0.99 on small
data sets), the student view a MoCo-style strong augmentation, the teacher's a weak one (a
random crop and flip). The features learn: kNN / linear accuracy above the other
non-contrastive methods of the paper's tables.

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split), the self-supervised
families' ``DigitEncoder`` (64-128-128, batch norm) and a projection head 128-128-32 (batch
norm, ReLU) with normalised 32-d embeddings, queue K 1,024 (K a multiple of the batch, as the
repository asserts), batch 256, m 0.99 (the repository's small-data value), SGD lr 0.05,
momentum 0.9, weight decay 1e-4 (on every parameter; the script exempts biases and batch-norm
weights), a linear warm-up over 110 steps then cosine (the script's
``adjust_learning_rate`` on steps), 700 steps. The student view is ``common.augment`` (shift,
intensity, erased patch, noise: the strong view); the teacher's is ``common.shift_one_pixel``
(the weak view, a crop's digit-sized analogue). A batch of 64 with K 512 was tried first: the
published run's embedding kNN stayed below the untrained encoder's (0.844 against 0.871,
seed 0), so the batch and queue were scaled up until the published run learns.
``Probe(model, run_file=log)`` with the one loss ``relation`` (as the repository writes it,
there is no other), ``watch_latent("embedding")`` with ``observe(embedding=q)`` (the
student's normalised embedding, what the relation is computed on, docs/probe.md), and
``probe.log(knn_acc=...)`` (backbone kNN) every 100 steps.

Truth, measured without gradprobe: kNN accuracy (k 20, cosine, ``common.knn_accuracy``) on
the test split of the backbone features (``knn_acc``) and of the embedding (``z_knn_acc``),
both also for the encoder before training (``untrained_*``); the centred effective rank and
the normalised std (``common.normalised_std``: about 1 spread over the sphere, 0 one point) of
the test embedding; the mean entropy of the teacher's relation distribution over the last 50
steps (``target_entropy_end``, nats; log 1024 = 6.93 is uniform), and the input's kNN. On 8x8
digits the backbone's kNN is no measure of learning (the untrained encoder already scores
0.94-0.95, above every trained run); the embedding's is.

Variants (truth by construction), measured on seeds 0 / 1 (untrained embedding kNN 0.871 /
0.882, untrained backbone kNN 0.951 / 0.940):
- ``published``: healthy, tau_t 0.04 < tau_s 0.1, the queue refreshed with the teacher's keys
  every step. Embedding kNN 0.933 / 0.904 (above the untrained encoder's: the features
  learn), normalised std 0.952 / 0.943, rank 14.0 / 14.0 of 32, teacher relation entropy
  3.79 / 3.77 (sharp, far from uniform 6.93); backbone kNN 0.938 / 0.938.
- ``flat-teacher``: broken. The teacher's temperature set to 0.2, above the student's 0.1 (a
  user who "softens the targets", or passes the two temperatures swapped): the target
  relation is flatter than any the student can produce, the cross-entropy is minimised by
  a student whose relation is uniform too, and the embedding contracts onto one direction.
  Teacher entropy 6.931 / 6.931 (uniform), normalised std 0.114 / 0.114 (against 0.95: every
  test embedding points one way; the centred rank 29.1 / 29.4 is the isotropic residue of
  that point), embedding kNN 0.851 / 0.833, below the untrained encoder's and 8-7 points below
  ``published``; backbone kNN 0.929 / 0.933.
- ``stale-queue``: broken. ``_dequeue_and_enqueue`` left out (the queue stays the K random
  vectors it was initialised with): the teacher's relation to fixed random anchors turns
  one-hot on the nearest anchor (entropy 0.0002 / 0.0002), and the student follows it onto
  that one anchor. Normalised std 0.044 / 0.045 (collapsed to a point on the sphere, centred
  rank 28.7 / 29.1 of residue), embedding kNN 0.800 / 0.771 (13 points below ``published``,
  below the untrained encoder's); backbone kNN 0.927 / 0.933.

Alarms. ``published``: expects nothing; must not: ``representation-collapse`` (std 0.95,
the embedding kNN above the untrained one), ``inert-loss``, ``non-finite``. ``flat-teacher``:
expected ``representation-collapse`` on ``embedding`` (the latent a user watches collapses to
one direction); allowed ``inert-loss`` on ``relation`` (with both relations uniform the loss
sits at its floor log K and its gradient fades: true and incidental); must not
``non-finite``. ``stale-queue``: expected ``representation-collapse`` on ``embedding``;
must not ``inert-loss`` (the student never reaches the one-hot target at tau_s 0.1, the
loss keeps a gradient), ``non-finite``.

CPU: about 7-8 seconds a run at one thread.
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
                      knn_accuracy, normalised_std, shift_one_pixel)
from ..harness import Expect, Family, Variant

STEPS, BATCH, QUEUE, DIM, MOMENTUM_EMA = 700, 256, 1024, 32, 0.99
LR, SGD_MOMENTUM, WEIGHT_DECAY, WARMUP, EVERY = 0.05, 0.9, 1e-4, 110, 100
TAU_S = 0.1
TAU_T = {"published": 0.04, "flat-teacher": 0.2, "stale-queue": 0.04}


class Encoder(nn.Module):
    """BackBone of the repository: backbone, projection head, normalised embedding."""

    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder()
        self.head = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                  nn.Linear(128, DIM))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)


class ReSSL(nn.Module):
    """network/ressl.py ReSSL: query encoder, EMA key encoder, queue of keys."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.encoder_q = Encoder()
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(DIM, QUEUE, generator=gen), dim=0))
        self.ptr = 0

    @torch.no_grad()
    def momentum_update(self):
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(MOMENTUM_EMA).add_(pq.detach(), alpha=1 - MOMENTUM_EMA)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        self.queue[:, self.ptr:self.ptr + len(keys)] = keys.T
        self.ptr = (self.ptr + len(keys)) % QUEUE

    def forward(self, im_q, im_k):
        q = self.encoder_q(im_q)
        with torch.no_grad():
            self.momentum_update()
            k = self.encoder_k(im_k)
        queue = self.queue.clone().detach()
        return q, k, q @ queue, k @ queue


def learning_rate(step: int) -> float:
    if step < WARMUP:
        return LR * step / WARMUP
    return 0.5 * LR * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = ReSSL(gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    tau_t = TAU_T[variant]
    model.eval()
    with torch.no_grad():
        untrained = {
            "untrained_knn_acc": knn_accuracy(model.encoder_q.backbone(x_tr).numpy(),
                                              y_tr.numpy(),
                                              model.encoder_q.backbone(x_te).numpy(),
                                              y_te.numpy()),
            "untrained_z_knn_acc": knn_accuracy(model.encoder_q(x_tr).numpy(), y_tr.numpy(),
                                                model.encoder_q(x_te).numpy(), y_te.numpy())}
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding")
    entropies = []
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step)
            model.train()
            q, k, logits_q, logits_k = model(augment(x_tr[idx], gen),
                                             shift_one_pixel(x_tr[idx], gen).reshape(-1, 64))
            target = F.softmax(logits_k.detach() / tau_t, dim=1)
            relation = -(target * F.log_softmax(logits_q / TAU_S, dim=1)).sum(1).mean()
            probe.observe(embedding=q)
            probe.backward({"relation": relation})
            opt.step()
            opt.zero_grad()
            if variant != "stale-queue":
                model.dequeue_and_enqueue(k)
            entropies.append(float(-(target * target.clamp_min(1e-12).log()).sum(1).mean()))
            if step % EVERY == EVERY - 1:
                model.eval()
                with torch.no_grad():
                    probe.log(knn_acc=knn_accuracy(model.encoder_q.backbone(x_tr).numpy(),
                                                   y_tr.numpy(),
                                                   model.encoder_q.backbone(x_te).numpy(),
                                                   y_te.numpy()))
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.encoder_q.backbone(x_tr), model.encoder_q.backbone(x_te)
        z_tr, z_te = model.encoder_q(x_tr), model.encoder_q(x_te)
    return untrained | {
            "knn_acc": knn_accuracy(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy()),
            "z_knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), z_te.numpy(), y_te.numpy()),
            "input_knn_acc": knn_accuracy(x_tr.numpy(), y_tr.numpy(), x_te.numpy(),
                                          y_te.numpy()),
            "z_rank": centred_effective_rank(z_te.numpy()), "z_dim": float(DIM),
            "z_std": normalised_std(z_te.numpy()),
            "target_entropy_end": float(np.mean(entropies[-50:])),
            "target_entropy_uniform": math.log(QUEUE)}


FAMILY = Family(
    name="ressl",
    source="Zheng et al. 2021 (ReSSL: Relational Self-Supervised Learning with Weak "
           "Augmentation, NeurIPS, eq. 2-5, tau_s 0.1, tau_t 0.04, EMA teacher, queue); "
           "mingkai-zheng/ReSSL (formerly KyleZheng1997/ReSSL) network/ressl.py ReSSL, "
           "ressl.py train",
    train=train,
    variants=(
        Variant("published", True,
                "teacher temperature 0.04 below the student's 0.1, the queue refreshed every "
                "step: embedding kNN 0.93 / 0.90 above the untrained encoder's 0.87 / 0.88, "
                "normalised std 0.95 (measured)",
                must_not=("representation-collapse", "inert-loss", "non-finite")),
        Variant("flat-teacher", False,
                "teacher temperature 0.2 above the student's 0.1: the target relation is "
                "uniform, the embedding contracts onto one direction (normalised std 0.11 "
                "against 0.95), embedding kNN 0.85 / 0.83 against 0.93 / 0.90 (measured)",
                expected=(Expect("representation-collapse", "embedding"),),
                allowed=(Expect("inert-loss", "relation"),),
                must_not=("non-finite",)),
        Variant("stale-queue", False,
                "the queue is never updated (random anchors): the teacher's relation is "
                "one-hot on one anchor and the embedding collapses onto it (normalised std "
                "0.04 against 0.95), embedding kNN 0.80 / 0.77 against 0.93 / 0.90 (measured)",
                expected=(Expect("representation-collapse", "embedding"),),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("flat-teacher", 1)),
)
