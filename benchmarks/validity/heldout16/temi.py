"""TEMI placeholder docstring (filled in below after measurement)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import digits_split
from ..harness import Expect, Family, Variant
from ..heldout2.scan import clustering_truth

FEATURES, HIDDEN, BOTTLENECK, CLUSTERS, HEADS = 256, 512, 128, 10, 4
KNN, BATCH, STEPS, LR, WEIGHT_DECAY = 10, 128, 400, 1e-3, 1e-4
BETA, STUDENT_TEMP, TEACHER_TEMP, PROBS_MOMENTUM = 0.6, 0.1, 0.1, 0.9
MOMENTUM_BASE = 0.99


def frozen_features(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for the pretrained backbone: a fixed random ReLU projection of the
    pixels (seed 1234 for every run, so every run sees the same embedding)."""
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(64, FEATURES, generator=gen) / 8.0
    return torch.relu(2.0 * x @ w)


class Head(nn.Module):
    """One TEMI/DINO head on the precomputed embedding: 2-layer MLP (GELU, no BN), an
    l2-normalised bottleneck and a bias-free last layer whose rows are the cluster vectors."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(),
                                 nn.Linear(HIDDEN, BOTTLENECK))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight-normalised last layer, g filled with 1 and trained (norm_last_layer False)
        self.last = nn.utils.parametrizations.weight_norm(
            nn.Linear(BOTTLENECK, CLUSTERS, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)

    def bottleneck(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(e), dim=-1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.last(self.bottleneck(e))


class MultiHead(nn.Module):
    def __init__(self):
        super().__init__()
        # the backbone's trainable LayerNorm (layer_norm_only=True), shared by every head
        self.norm = nn.LayerNorm(FEATURES)
        self.heads = nn.ModuleList(Head() for _ in range(HEADS))

    def forward(self, e: torch.Tensor) -> list[torch.Tensor]:
        e = self.norm(e)
        return [h(e) for h in self.heads]


def beta_pmi_loss(ps: torch.Tensor, pt: torch.Tensor, pk: torch.Tensor | None,
                  beta: float) -> torch.Tensor:
    """-log sum_k (ps_k pt_k)^beta / pk_k (loss_utils.beta_mi); pk None: the marginal dropped."""
    joint = (ps * pt) ** beta
    if pk is not None:
        joint = joint / pk
    return -joint.sum(-1).log()


def temi_head_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                   pk: torch.Tensor | None, beta: float) -> torch.Tensor:
    """One head's TEMI loss over the two views (MultiHeadWeightProbBase.forward): the teacher
    pair weight sum_k pt1_k pt2_k times the beta-PMI, student and teacher on different views."""
    pt = [F.softmax(t / TEACHER_TEMP, -1).detach() for t in teacher]
    ps = [F.softmax(s / STUDENT_TEMP, -1) for s in student]
    weight = (pt[0] * pt[1]).sum(-1)
    total = 0.0
    for w in range(2):
        for v in range(2):
            if v != w:
                total = total + (weight * beta_pmi_loss(ps[v], pt[w], pk, beta)).mean()
    return total / 2


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, y_te = digits_split()
    e_tr, e_te = frozen_features(x_tr), frozen_features(x_te)
    # EmbedNN: a view's partner is one of its KNN nearest neighbours in the frozen embedding
    en = F.normalize(e_tr, dim=-1)
    sim = en @ en.t()
    sim.fill_diagonal_(-2.0)
    neighbours = sim.topk(KNN, dim=1).indices
    beta = 1.0 if variant == "beta-one" else BETA
    student = MultiHead()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    pk = torch.full((HEADS, CLUSTERS), 1.0 / CLUSTERS)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(student, run_file=log)
    probe.watch_latent("bottleneck_0")
    probe.watch_prototypes("clusters_0", lambda: student.heads[0].last.weight,
                           latent="bottleneck_0")
    head_losses = np.zeros(HEADS)
    with probe:
        for step in range(STEPS):
            idx = torch.randint(0, len(e_tr), (BATCH,), generator=gen)
            nb = neighbours[idx, torch.randint(0, KNN, (BATCH,), generator=gen)]
            views = [e_tr[idx], e_tr[nb]]
            with torch.no_grad():
                teacher_out = [teacher(v) for v in views]
                for h in range(HEADS):
                    probs = torch.cat([F.softmax(t[h] / TEACHER_TEMP, -1) for t in teacher_out])
                    pk[h] = PROBS_MOMENTUM * pk[h] + (1 - PROBS_MOMENTUM) * probs.mean(0)
            student_out = [student(v) for v in views]
            probe.observe(bottleneck_0=student.heads[0].bottleneck(student.norm(views[0])),
                          groups=student_out[0][0].argmax(1))
            losses = {}
            for h in range(HEADS):
                marginal = None if variant == "no-marginal" else pk[h]
                losses[f"head_{h}"] = temi_head_loss([s[h] for s in student_out],
                                                     [t[h] for t in teacher_out], marginal, beta)
            head_losses = 0.9 * head_losses + 0.1 * np.array([float(l.detach()) for l in losses.values()])
            probe.backward(losses, weights={k: 1.0 / HEADS for k in losses})
            opt.step()
            opt.zero_grad()
            m = 1 - (1 - MOMENTUM_BASE) * (math.cos(math.pi * step / STEPS) + 1) / 2
            with torch.no_grad():
                for pt_, ps_ in zip(teacher.parameters(), student.parameters()):
                    pt_.mul_(m).add_((1 - m) * ps_)
            if step % 50 == 49:
                with torch.no_grad():
                    c = teacher.heads[0](e_te).argmax(1).numpy()
                probe.log(nmi_head0=clustering_truth(c, y_te.numpy())["nmi"])
    y = y_te.numpy()
    with torch.no_grad():
        per_head = [clustering_truth(o.argmax(1).numpy(), y) for o in teacher(e_te)]
    best = int(np.argmin(head_losses))
    out = {f"best_head_{k}": float(v) for k, v in per_head[best].items()}
    out |= {f"head_0_{k}": float(v) for k, v in per_head[0].items()}
    for k in ("nmi", "cluster_acc", "usage_entropy", "clusters_used"):
        out[f"mean_heads_{k}"] = float(np.mean([p[k] for p in per_head]))
    out["final_pk_max"] = float(pk.max(1).values.mean())
    return out
FAMILY = Family(name="temi", source="x", train=train, variants=(Variant("published", True, "x"), Variant("no-marginal", False, "x"), Variant("beta-one", False, "x")), seeds=(0, 1), quick=(("published", 1), ("no-marginal", 1)))
