"""Auxiliary-loss-free load balancing of a top-K mixture of experts, after Wang et al. 2024
("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664) as
DeepSeek-V3 uses it (arXiv 2412.19437, sec. 2.1.2), with DeepSeek-V3's complementary
sequence-wise balance loss.

Published routing (DeepSeek-V3 eqs. 13-16; Wang et al. sec. 3): token affinities
s_i,t = Sigmoid(u_t^T e_i); a per-expert bias b_i enters the top-K SELECTION only,
g'_i,t = s_i,t if s_i,t + b_i is among the K largest of {s_j,t + b_j}, else 0; the gating
values are g_i,t = g'_i,t / sum_j g'_j,t (no bias in them). After each step the bias is
updated from the batch's load c_i (tokens routed to expert i): b_i <- b_i + u sign(mean(c) - c_i)
(Wang et al. Algorithm 1; "bias update speed" gamma in DeepSeek-V3), so an overloaded expert
is selected less and an idle one more, without any gradient. The sequence-wise balance loss
(DeepSeek-V3 eqs. 17-20): L_Bal = alpha sum_i f_i P_i, f_i = E / (K T) sum_t 1(expert i
selected for token t), P_i = (1/T) sum_t s'_i,t with s'_i,t = s_i,t / sum_j s_j,t, over the T
tokens of one sequence (here averaged over the sequences of the batch), alpha "extremely
small" (1e-4 here).

Here: each scikit-learn digit is a sequence of T = 8 tokens (its pixel rows, with a learnt
position embedding), a token embedding Linear 8 -> 32 + ReLU, one MoE layer of E = 16 experts
(32 -> 32 -> 32, ReLU), K = 2, the tokens' outputs averaged into a linear classifier to 10
classes; Adam lr 1e-2, 64 sequences (512 tokens) per batch, 600 steps; u = 0.01 (the paper's
1e-3 with logits of a 1B-parameter model; affinities here move faster). Losses ``task``
(cross-entropy) and ``balance`` (L_Bal, weight alpha). The router is watched as a user of
the documented API would: its weight rows (one per expert) as prototypes of the MoE layer's
input (``router`` over ``moe_in``), each token's digit class as ``groups`` (docs/probe.md,
"A mixture-of-experts router": groups must show mixed batches, not the expert assignments,
as heldout4/deepseek_moe.py does), and the gating values as a latent (``gates``).

Variants (truth by construction):
- ``bias-update``: healthy, as published: u = 0.01, alpha = 1e-4.
- ``no-bias-update``: broken, u = 0 (the bias update left off) with the same tiny alpha:
  nothing of weight opposes the self-reinforcing routing and half the experts go idle.
Measured on the test split, without gradprobe (seeds 0 and 1): entropy of the load (top-K
assignments per expert) over log E, experts given 1% or more of the assignments, the largest
expert's share, the sequence-wise L_Bal (without alpha; 1 for a perfectly balanced sequence),
test accuracy:
  bias-update:    entropy 0.997 / 0.995, 16 / 16 experts, largest 0.084 / 0.096,
                  L_Bal 1.30 / 1.29, accuracy 0.951 / 0.960;
  no-bias-update: entropy 0.633 / 0.704, 9 / 8 experts, largest 0.343 / 0.193,
                  L_Bal 2.88 / 2.22, accuracy 0.951 / 0.962.
Half the experts sit idle without the bias update, on both seeds; the task does not suffer at
this size (a few experts suffice for digits): the failure is the routing, which is what the
method is for. The collapse is partial: with E = 8, lr 3e-3 the same construction kept 7-8
of 8 experts (entropy 0.81-0.85), with lr 1e-2 and 1,200 steps 5-6 of 8 (0.74-0.83); 32
experts gave 11 / 7 of 32 (0.60 / 0.53) at about twice the cost, so 16 were kept. A run takes
~9-14 CPU-seconds.
Expected on ``no-bias-update``: ``gradient-swamping`` on ``balance`` (with u = 0 the balance
loss is the only force against the imbalance, and at alpha = 1e-4 its gradient is drowned by
the task's while the load it measures stays unbalanced: L_Bal 2.2-2.9 against 1.3 healthy).
Allowed: ``prototype-collapse`` on ``router`` (half the experts idle, a partial collapse that
docs/findings.md does not call collapsed by usage alone), ``static-loss-weights`` on
``balance`` (the fixed alpha goes with the swamping) and ``representation-collapse`` on
``gates``. Must not (both): ``inert-loss``, ``gradient-conflict``; on ``bias-update`` also
``prototype-collapse``, ``representation-collapse``, ``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 600, 64, 1e-2
TOKENS, EXPERTS, TOP_K, WIDTH, ALPHA = 8, 16, 2, 32, 1e-4
BIAS_SPEED = {"bias-update": 0.01, "no-bias-update": 0.0}


class LossFreeMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.register_buffer("expert_bias", torch.zeros(EXPERTS))  # b_i: no gradient
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
            for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor):
        """x (tokens, width) -> output, gating values g (tokens, E), selection mask, affinities."""
        affinity = torch.sigmoid(self.router(x))
        chosen = (affinity + self.expert_bias).topk(TOP_K, dim=1).indices
        selected = torch.zeros_like(affinity, dtype=torch.bool).scatter(1, chosen, True)
        gated = affinity * selected
        gates = gated / gated.sum(1, keepdim=True)
        out = torch.stack([e(x) for e in self.experts], dim=1)  # (tokens, E, width)
        return (gates[:, :, None] * out).sum(1), gates, selected, affinity


def sequence_balance_loss(selected: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20 per sequence, averaged over the batch's sequences (without alpha)."""
    selected = selected.view(-1, TOKENS, EXPERTS).float()
    affinity = affinity.view(-1, TOKENS, EXPERTS)
    f = EXPERTS / (TOP_K * TOKENS) * selected.sum(1)
    p = (affinity / affinity.sum(2, keepdim=True)).mean(1)
    return (f * p).sum(1).mean()


class SequenceClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, WIDTH)
        self.position = nn.Parameter(torch.zeros(TOKENS, WIDTH))
        self.moe = LossFreeMoE()
        self.classifier = nn.Linear(WIDTH, 10)

    def forward(self, images: torch.Tensor):
        tokens = F.relu(self.embed(images.view(-1, TOKENS, 8)) + self.position).reshape(-1, WIDTH)
        out, gates, selected, affinity = self.moe(tokens)
        logits = self.classifier(out.view(-1, TOKENS, WIDTH).mean(1))
        return logits, tokens, gates, selected, affinity


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = SequenceClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    speed = BIAS_SPEED[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("moe_in")
    probe.watch_latent("gates")
    probe.watch_prototypes("router", model.moe.router.weight, latent="moe_in")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            logits, tokens, gates, selected, affinity = model(x_tr[idx])
            probe.observe(moe_in=tokens, gates=gates,
                          groups=y_tr[idx].repeat_interleave(TOKENS))
            probe.backward({"task": F.cross_entropy(logits, y_tr[idx]),
                            "balance": sequence_balance_loss(selected, affinity)},
                           weights={"balance": ALPHA})
            opt.step()
            opt.zero_grad()
            load = selected.sum(0).float()
            model.moe.expert_bias += speed * torch.sign(load.mean() - load)
    with torch.no_grad():
        logits, _, _, selected, _ = model(x_te)
    load = selected.sum(0).double() / selected.sum()
    p = load[load > 0]
    return {"load_entropy": float(-(p * p.log()).sum() / torch.log(torch.tensor(float(EXPERTS)))),
            "experts_used": int((load >= 0.01).sum()),
            "largest_load": float(load.max()),
            "test_acc": float((logits.argmax(1) == y_te).float().mean())}


_MUST_NOT = ("inert-loss", "gradient-conflict")

FAMILY = Family(
    name="lossfree-moe",
    source="Wang et al. 2024 (auxiliary-loss-free load balancing, arXiv 2408.15664) Algorithm 1; "
           "DeepSeek-V3 (arXiv 2412.19437) sec. 2.1.2 eqs. 13-20",
    train=train,
    variants=(
        Variant("bias-update", True, "per-expert bias updated by u sign(mean load - load), as "
                "published: the experts share the load (measured)",
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse",
                                      "static-loss-weights")),
        Variant("no-bias-update", False,
                "u = 0: the bias never moves and the balance loss is 1e-4 of the task, so half "
                "the experts sit idle (measured)",
                expected=(Expect("gradient-swamping", "balance"),),
                allowed=(Expect("prototype-collapse", "router"),
                         Expect("static-loss-weights", "balance"),
                         Expect("representation-collapse", "gates")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("bias-update", 1), ("no-bias-update", 1)),
)
