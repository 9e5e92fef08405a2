"""Sparsely-gated mixture of experts with noisy top-k gating, after Shazeer et al. 2017
("Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR)
and its PyTorch re-implementation davidmrau/mixture-of-experts (``moe.py``).

Published setup: y = sum_i G(x)_i E_i(x) with G(x) = Softmax(KeepTopK(H(x), k)) and
H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i) (eqs. 3-5); W_g and W_noise
initialised to zeros (appendix A); experts are one-hidden-layer ReLU networks. Balancing
losses (sec. 4 and appendix A): Importance(X) = sum_x G(x), L_importance =
w_importance * CV(Importance(X))^2, and Load(X)_i = sum_x P(x, i) with
P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)),
L_load = w_load * CV(Load(X))^2; w_importance = w_load = 0.1; k = 2 (the paper routes to
k = 2 or 4 experts). Noise std gets davidmrau's noise_epsilon 1e-2; CV^2 = var / (mean^2 +
1e-10).

Here: scikit-learn digits (64 pixels), an embedding Linear 64 -> 64 + ReLU, one MoE layer of
8 experts (64 -> 64 -> 64, ReLU), k = 2, a linear classifier to 10 classes; Adam lr 1e-3,
batch 128, 600 steps. Losses ``task`` (cross-entropy), ``importance`` and ``load`` (weights
w_importance, w_load). Nothing in the docs names routers, so they are watched as a user of
the documented API would: the gate's weight columns (one per expert) as the prototypes of
the MoE layer's input (``router`` over ``moe_in``), each row's top-1 expert observed as its
group, and the gate values G(x) as a latent (``gates``).

Variants (truth by construction):
- ``balanced``: healthy, w_importance = w_load = 0.1 (the published weights).
- ``weight-1e-5``: broken, w_importance = w_load = 1e-5: the balancing losses are present but
  their weighted gradients are ~1e-4 of what the published weights give, so nothing opposes
  the self-reinforcing routing the paper describes ("the gating network tends to converge to
  a state where it always produces large weights for the same few experts") and a few
  experts take every input.
Measured on the test split, without gradprobe (seeds 1 and 3): entropy of the top-1 expert
usage over log 8, experts that receive 1% or more of the top-k assignments, CV^2 of
Importance, test accuracy:
  balanced:    usage entropy 0.98 / 0.97, 8 / 8 experts, CV^2 0.015 / 0.012, accuracy 0.97 / 0.96;
  weight-1e-5: usage entropy 0.34 / 0.05, 3 / 4 experts, CV^2 3.0 / 6.8, accuracy 0.97 / 0.96.
(The task does not suffer at this size: a few experts suffice for digits. The failure is the
routing itself, which is what the balancing losses are for.)
Expected on ``weight-1e-5``: ``prototype-collapse`` on ``router`` (the inputs concentrate on a
few experts) and ``gradient-swamping`` of ``importance`` and ``load`` (their weighted gradients
are a negligible fraction of the task's while their CV^2 stays far from 0); allowed
``static-loss-weights`` on those two and ``representation-collapse`` on ``gates``. Must not
(both): ``inert-loss``, ``gradient-conflict``; on ``balanced`` also ``gradient-swamping``,
``prototype-collapse``, ``static-loss-weights``, ``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 600, 128, 1e-3
EXPERTS, TOP_K, WIDTH, NOISE_EPSILON = 8, 2, 64, 1e-2
WEIGHTS = {"balanced": 0.1, "weight-1e-5": 1e-5}


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(WIDTH, EXPERTS))
        self.w_noise = nn.Parameter(torch.zeros(WIDTH, EXPERTS))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
            for _ in range(EXPERTS))

    def gates(self, x: torch.Tensor):
        """G(x) (n, E), and the load P(x, i) summed over the batch (davidmrau's
        ``_prob_in_top_k``); noise only in training, as published."""
        clean = x @ self.w_gate
        if not self.training:
            top, idx = clean.topk(TOP_K, dim=1)
            return torch.zeros_like(clean).scatter(1, idx, top.softmax(1)), None
        std = F.softplus(x @ self.w_noise) + NOISE_EPSILON
        noisy = clean + torch.randn_like(clean) * std
        top, idx = noisy.topk(TOP_K + 1, dim=1)
        gates = torch.zeros_like(noisy).scatter(1, idx[:, :TOP_K], top[:, :TOP_K].softmax(1))
        normal = torch.distributions.Normal(0.0, 1.0)
        threshold_in, threshold_out = top[:, TOP_K:TOP_K + 1], top[:, TOP_K - 1:TOP_K]
        prob = torch.where(noisy > threshold_in, normal.cdf((clean - threshold_in) / std),
                           normal.cdf((clean - threshold_out) / std))
        return gates, prob.sum(0)

    def forward(self, x: torch.Tensor):
        gates, load = self.gates(x)
        out = torch.stack([e(x) for e in self.experts], dim=1)  # (n, E, width)
        return (gates[:, :, None] * out).sum(1), gates, load


class MoEClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU())
        self.moe = NoisyTopKMoE()
        self.classifier = nn.Linear(WIDTH, 10)

    def forward(self, x):
        h = self.embed(x)
        y, gates, load = self.moe(h)
        return self.classifier(y), h, gates, load


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = MoEClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    weight = WEIGHTS[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("moe_in")
    probe.watch_latent("gates")
    probe.watch_prototypes("router", lambda: model.moe.w_gate.t(), latent="moe_in")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            logits, h, gates, load = model(x_tr[idx])
            probe.observe(moe_in=h, gates=gates, groups=gates.argmax(1))
            losses = {"task": F.cross_entropy(logits, y_tr[idx]),
                      "importance": cv_squared(gates.sum(0)), "load": cv_squared(load)}
            probe.backward(losses, weights={"importance": weight, "load": weight})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits, _, gates, _ = model(x_te)
    top1 = torch.bincount(gates.argmax(1), minlength=EXPERTS).double() / len(x_te)
    p = top1[top1 > 0]
    assigned = torch.bincount(gates.topk(TOP_K, dim=1).indices.flatten(), minlength=EXPERTS)
    return {"usage_entropy": float(-(p * p.log()).sum() / torch.log(torch.tensor(float(EXPERTS)))),
            "experts_used": int((assigned >= 0.01 * assigned.sum()).sum()),
            "importance_cv2": float(cv_squared(gates.sum(0))),
            "test_acc": float((logits.argmax(1) == y_te).float().mean())}


_MUST_NOT = ("inert-loss", "gradient-conflict")
_BALANCING = ("importance", "load")

FAMILY = Family(
    name="shazeer-moe",
    source="Shazeer et al. 2017 (noisy top-k gating, importance and load losses); "
           "davidmrau/mixture-of-experts moe.py",
    train=train,
    variants=(
        Variant("balanced", True, "w_importance = w_load = 0.1: the experts are used evenly",
                must_not=_MUST_NOT + ("gradient-swamping", "prototype-collapse",
                                      "static-loss-weights", "representation-collapse")),
        Variant("weight-1e-5", False,
                "w_importance = w_load = 1e-5: nothing opposes the self-reinforcing routing, a "
                "few experts take every input",
                expected=(Expect("prototype-collapse", "router"),)
                + tuple(Expect("gradient-swamping", name) for name in _BALANCING),
                allowed=tuple(Expect("static-loss-weights", name) for name in _BALANCING)
                + (Expect("representation-collapse", "gates"),),
                must_not=_MUST_NOT),
    ),
    seeds=(1, 3),
    quick=(("balanced", 1), ("weight-1e-5", 1)),
)
