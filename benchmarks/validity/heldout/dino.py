"""DINO, self-distillation with no labels, after Caron et al. 2021 ("Emerging Properties in
Self-Supervised Vision Transformers", ICCV; Algorithm 1, sec. 3.1 and 5.3) and the published
code facebookresearch/dino (``main_dino.py``: ``DINOLoss``, ``vision_transformer.py``:
``DINOHead``).

Published setup: a student g_s and a teacher g_t of the same architecture (backbone + DINO
head: 3-layer MLP, hidden 2048, GELU, bottleneck 256, l2-normalisation, weight-normalised
last layer with its norm fixed to 1, K = 65536 outputs); the teacher is an EMA of the
student (momentum 0.996 -> 1, cosine) and gets no gradient; loss
H(P_t, P_s) = - sum softmax((g_t(x) - C) / tau_t) log softmax(g_s(x') / tau_s) over pairs of
different views; tau_s = 0.1, tau_t = 0.04 (sharpening); centre C <- m C + (1 - m) mean over
the batch of g_t, m = 0.9 (centering); AdamW, weight decay 0.04 -> 0.4, gradient clipping 3.

Here: scikit-learn digits with the corpus's augmentations (common.augment: shift, intensity
scale, erased patch, noise), two views, no multi-crop; backbone the corpus's DigitEncoder
(MLP 64 -> 128 -> 128 with batch norm, standing in for the ResNet-50 of the paper's convnet
runs); head 128 -> 256 -> 256 -> bottleneck 64 with batch norm (the published
``--use_bn_in_head`` option), K = 64 outputs; batch 128, AdamW lr 1e-3, weight decay 0.04,
clipping 3, teacher momentum 0.996 -> 1 (cosine), tau_t 0.04 fixed (the published warm-up
starts at 0.04), 400 steps. Without batch norm (a GELU MLP as DINO's ViT head) the published
recipe collapsed to the uniform distribution here too (teacher entropy 1.00 of log K on
every input, at lr 1e-3 and 5e-3, K 64 and 128), so it could not serve as the healthy run.
One loss, ``dino``, as the published code computes it. Watched as a user of DINO would:
the student's backbone features of the first view (``features``), the representation DINO
is evaluated on, and the teacher's centred and sharpened output distribution P_t
(``teacher``), the quantity the collapse analysis of sec. 5.3 reads.

Variants (truth by construction, sec. 5.3 and Fig. 7 of the paper: centering prevents one
dimension from dominating, sharpening prevents the collapse to the uniform distribution):
- ``healthy``: centering and sharpening, as published.
- ``no-centering``: C stays 0: one output dimension dominates every input (collapse to one
  dimension); the teacher's per-input distributions are nearly one-hot on the same output.
- ``no-sharpening``: tau_t = tau_s = 0.1 with centering: the teacher's output is the uniform
  distribution for every input (collapse to uniform).
Measured on the test split with the teacher, without gradprobe (seeds 1 and 3): mean
per-input entropy of P_t and entropy of its mean over the inputs (both over log K), their
difference (the information the output carries about the input, over log K), the output
dimensions that are the argmax of P_t for >= 1% of inputs, 20-NN accuracy (cosine) of the
teacher's backbone features (DINO's k-NN evaluation), centred effective rank of the
features:
  healthy:       entropy 0.76 / 0.80, mean's entropy 0.98 / 0.98, information 0.21 / 0.18,
                 26-28 dimensions used, k-NN 0.95 / 0.97, feature rank 90.9 / 90.6;
  no-centering:  entropy 0.06 / 0.25, mean's entropy 0.07 / 0.30, information 0.013 / 0.057,
                 1 / 3 dimensions used, k-NN 0.96 / 0.97, feature rank 91.6 / 90.9;
  no-sharpening: entropy 0.98 / 0.99, mean's entropy 1.00 / 1.00, information 0.018 / 0.010,
                 28 dimensions used (argmax of a near-uniform output), k-NN 0.95 / 0.97,
                 feature rank 89.9 / 89.8.
The collapse is in the head's output only: the batch-normalised backbone keeps its rank and
its k-NN accuracy (which is also the accuracy of random features on digits), so the
backbone's ``features`` are not collapsed in any variant.
Expected on both broken variants: ``representation-collapse`` on ``teacher`` (the teacher's
outputs no longer depend on the input: information 0.01-0.06 of log K against 0.18-0.21).
Must not (all): ``inert-loss``; on ``healthy`` also ``representation-collapse``,
``orthogonality-vanishing``.
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

from ..common import DigitEncoder, augment, batches, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, WEIGHT_DECAY, CLIP = 400, 128, 1e-3, 0.04, 3.0
OUT, BOTTLENECK, HIDDEN, WIDTH = 64, 64, 256, 128
TAU_S, TAU_T, CENTER_MOMENTUM, TEACHER_MOMENTUM = 0.1, 0.04, 0.9, 0.996
KNN = 20


class DINOHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.GELU(),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.GELU(),
            nn.Linear(HIDDEN, BOTTLENECK))
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(BOTTLENECK, OUT, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False  # norm_last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitEncoder(WIDTH)
        self.head = DINOHead()

    def forward(self, x):
        features = self.backbone(x)
        return features, self.head(features)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              tau_t: float) -> torch.Tensor:
    """DINOLoss.forward of the published code, for two views."""
    targets = [F.softmax((t - center) / tau_t, dim=-1).detach() for t in teacher]
    total, pairs = 0.0, 0
    for iq, q in enumerate(targets):
        for v, s in enumerate(student):
            if v != iq:
                total = total + torch.sum(-q * F.log_softmax(s / TAU_S, dim=-1), dim=-1).mean()
                pairs += 1
    return total / pairs


def knn_accuracy(f_tr: torch.Tensor, y_tr: torch.Tensor, f_te: torch.Tensor,
                 y_te: torch.Tensor) -> float:
    """DINO's weighted k-NN classifier (eval_knn.py, T = 0.07) on l2-normalised features."""
    f_tr, f_te = F.normalize(f_tr, dim=1), F.normalize(f_te, dim=1)
    sim, idx = (f_te @ f_tr.t()).topk(KNN, dim=1)
    votes = torch.zeros(len(f_te), 10).scatter_add_(1, y_tr[idx], (sim / 0.07).exp())
    return float((votes.argmax(1) == y_te).float().mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    student = Network()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    center = torch.zeros(OUT)
    tau_t = TAU_S if variant == "no-sharpening" else TAU_T
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(student, run_file=log)
    probe.watch_latent("features")
    probe.watch_latent("teacher")
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            views = [augment(x_tr[idx], gen) for _ in range(2)]
            outs = [student(v) for v in views]
            with torch.no_grad():
                t_out = [teacher(v)[1] for v in views]
            probe.observe(features=outs[0][0],
                          teacher=F.softmax((t_out[0] - center) / tau_t, dim=-1))
            probe.backward({"dino": dino_loss([o[1] for o in outs], t_out, center, tau_t)})
            nn.utils.clip_grad_norm_(student.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                if variant != "no-centering":
                    batch_center = torch.cat(t_out).mean(0)
                    center = center * CENTER_MOMENTUM + batch_center * (1 - CENTER_MOMENTUM)
                m = 1 - (1 - TEACHER_MOMENTUM) * (math.cos(math.pi * step / STEPS) + 1) / 2
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    teacher.eval()
    with torch.no_grad():
        f_tr = teacher(x_tr)[0]
        f_te, out_te = teacher(x_te)
        probs = F.softmax((out_te - center) / tau_t, dim=-1)
    log_k = math.log(OUT)
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean()) / log_k
    mean = probs.mean(0)
    marginal = float(-(mean * mean.clamp_min(1e-12).log()).sum()) / log_k
    winners = torch.bincount(probs.argmax(1), minlength=OUT)
    return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal,
            "teacher_information": marginal - entropy,
            "dims_used": int((winners >= 0.01 * len(x_te)).sum()),
            "knn_acc": knn_accuracy(f_tr, y_tr, f_te, y_te),
            "features_rank": centred_effective_rank(np.asarray(f_te))}


FAMILY = Family(
    name="dino",
    source="Caron et al. 2021 (DINO, Algorithm 1, sec. 5.3); facebookresearch/dino "
           "main_dino.py DINOLoss, vision_transformer.py DINOHead",
    train=train,
    variants=(
        Variant("healthy", True, "centering and sharpening, as published",
                must_not=("inert-loss", "representation-collapse", "orthogonality-vanishing")),
        Variant("no-centering", False,
                "the centre stays 0: one output dimension dominates every input",
                expected=(Expect("representation-collapse", "teacher"),),
                must_not=("inert-loss",)),
        Variant("no-sharpening", False,
                "teacher temperature 0.1 = the student's: the teacher's output is uniform for "
                "every input",
                expected=(Expect("representation-collapse", "teacher"),),
                must_not=("inert-loss",)),
    ),
    seeds=(1, 3),
    quick=(("healthy", 1), ("no-centering", 1), ("no-sharpening", 1)),
)
