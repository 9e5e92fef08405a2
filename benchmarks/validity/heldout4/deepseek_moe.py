"""DeepSeekMoE layer (fine-grained routed experts plus a shared expert) trained with the
expert-level balance loss, after Dai et al. 2024 ("DeepSeekMoE: Towards Ultimate Expert
Specialization in Mixture-of-Experts Language Models", arXiv 2401.06066, sec. 3.1-3.3:
h_t = u_t + sum_shared FFN(u_t) + sum_i g_it FFN_i(u_t), g_it = s_it for the top-K_r of
s_it = softmax_i(u_t^T e_i) and 0 otherwise; L_ExpBal = alpha_1 sum_i f_i P_i with
f_i = N'/(K' T) x (tokens choosing expert i), P_i = (1/T) sum_t s_it; alpha_1 0.01 in the small
2B model's setup) and its public modeling code ``modeling_deepseek.py`` of
deepseek-ai/deepseek-moe-16b-base (``MoEGate``: softmax scores, ``topk`` without renormalising
(``norm_topk_prob`` False), ``aux_loss = (Pi * fi).sum() * alpha`` with ``ce`` the one-hot mean
of the top-k indices and ``fi = ce * n_routed_experts``; ``DeepseekMoE``: routed output plus
``shared_experts(identity)``). Read with the search tool (the paper's sec. 3.3 equations as
transcribed in fleckleind/LargeModels ``DeepSeek/DeepSeekMoE/README.md``, the ``MoEGate`` of
the DeepSeek modeling file and its ports).

Here (CPU): st_moe.py's token setup (each 8x8 digit is 16 tokens, its 2x2 patches, embedded
4 -> 32 plus a learned position embedding; one pre-LN block x + MoE(LN(x)); mean pooling, a
linear head to 10 classes). The MoE is DeepSeekMoE's at small scale: N_r = 16 fine-grained
routed experts (FFN 32-16-32, a quarter of st_moe.py's 64-wide expert: segmentation m = 4),
K_r = 4 of them per token, 1 shared expert of the same width; no token dropping (the
DeepSeek modeling code has none). Batch 32 digits (T = 512 tokens), Adam lr 3e-3, 1,500
steps (at 600 the published run had not spread yet: usage entropy 0.91 / 0.86 against
0.83 / 0.81 with alpha_1 1e-5).
Losses ``task`` (cross-entropy) and ``aux_loss`` (sum_i f_i P_i, weight alpha_1, the name of
the modeling code). The router is watched as docs/probe.md shows: the layer-normed tokens as
the latent ``tokens``, ``watch_prototypes("router", gate.weight, latent="tokens")`` and each
token's digit class as ``groups``.

Variants (truth by construction):
- ``published``: healthy, alpha_1 = 0.01.
- ``alpha-1e-5``: broken: alpha_1 = 1e-5, a thousand times below the published factor; the
  balance loss's gradient is negligible and nothing opposes the router concentrating its
  top-4 choices on a few experts.
Measured without gradprobe (test digits, the trained router's top-4 choices: experts chosen by
>= 1% of the token slots, usage entropy / log 16, largest expert's share of the slots, the
balance sum_i f_i P_i at the end (1 when even), test accuracy; the router gradient ratio
alpha_1 |grad aux_loss| / |grad task| on the gate weight, every 10 steps, median of the second
half), seeds 0 / 1:
  published:  15 / 14 experts used, usage entropy 0.965 / 0.944 of log 16, largest expert
              8.9% / 9.5% of the slots (6.25% even), balance 1.14 / 1.25, test accuracy 0.971 /
              0.976, router gradient ratio 0.052 / 0.038;
  alpha-1e-5: 11 / 11 experts used, usage entropy 0.832 / 0.840, largest expert 16.4% / 13.8%,
              balance 1.85 / 1.72, test accuracy 0.973 / 0.973, router gradient ratio 1.1e-4 /
              below 1e-4.
(alpha_1 = 0, 600 steps, seed 0: 10 experts used, entropy 0.81, as 1e-5 at 600 steps.) The harm
is the routing: a third of the routed experts (5 of 16) fall below 1% of the choices and the
busiest takes two to three times its even share; with the shared expert and 4 choices per
token, accuracy does not move on a task this small. The collapse is partial (11 of 16 experts
in use), so ``prototype-collapse`` on the router is allowed, not expected (docs/findings.md: a
skewed set whose members are mostly in use is not collapsed); ``static-loss-weights`` on
``aux_loss`` is allowed: the fixed factor is the cause.
Expected on ``alpha-1e-5``: ``gradient-swamping`` of ``aux_loss``. Must not (all):
``inert-loss``, ``gradient-conflict``; on ``published`` also ``gradient-swamping``,
``prototype-collapse``, ``static-loss-weights``, ``representation-collapse``, ``non-finite``.
CPU ~12-14 s a run (shared machine).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant
from ..heldout2.gshard_moe import RATIO_EVERY, patches, router_ratio

STEPS, BATCH, LR = 1500, 32, 3e-3
ROUTED, TOP_K, WIDTH, HIDDEN, PATCHES = 16, 4, 32, 16, 16
ALPHA = {"published": 1e-2, "alpha-1e-5": 1e-5}


def expert_balance(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i of DeepSeekMoE sec. 3.3 (``MoEGate``'s aux loss before alpha)."""
    fi = F.one_hot(topk_idx.flatten(), ROUTED).to(scores.dtype).mean(0) * ROUTED
    return (scores.mean(0) * fi).sum()


class Experts(nn.Module):
    """``count`` ReLU FFNs WIDTH-HIDDEN-WIDTH evaluated together (all are small)."""

    def __init__(self, count: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(count, WIDTH, HIDDEN) / math.sqrt(WIDTH))
        self.b_in = nn.Parameter(torch.zeros(count, 1, HIDDEN))
        self.w_out = nn.Parameter(torch.randn(count, HIDDEN, WIDTH) / math.sqrt(HIDDEN))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # -> (count, T, WIDTH)
        return torch.relu(torch.einsum("td,edh->eth", tokens, self.w_in) + self.b_in) @ self.w_out


class DeepSeekMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(WIDTH, ROUTED, bias=False)
        self.routed = Experts(ROUTED)
        self.shared = Experts(1)

    def forward(self, tokens: torch.Tensor):
        scores = self.gate(tokens).softmax(-1)
        topk_weight, topk_idx = scores.topk(TOP_K, dim=-1)
        gates = torch.zeros_like(scores).scatter(1, topk_idx, topk_weight)
        routed = torch.einsum("te,etd->td", gates, self.routed(tokens))
        return routed + self.shared(tokens)[0], scores, topk_idx


class MoEClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(PATCHES, WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.moe = DeepSeekMoE()
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor):
        tokens = (self.embed(patches(x)) + self.position).reshape(-1, WIDTH)
        normed = self.norm(tokens)
        moe_out, scores, topk_idx = self.moe(normed)
        pooled = (tokens + moe_out).view(-1, PATCHES, WIDTH).mean(1)
        return self.head(pooled), normed, scores, topk_idx


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = MoEClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    alpha = ALPHA[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("tokens")
    probe.watch_prototypes("router", model.moe.gate.weight, latent="tokens")
    ratios = []
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            logits, normed, scores, topk_idx = model(x_tr[idx])
            task = F.cross_entropy(logits, y_tr[idx])
            aux_loss = expert_balance(scores, topk_idx)
            if step % RATIO_EVERY == 0:
                ratios.append(router_ratio(model, task, aux_loss, alpha))
            probe.observe(tokens=normed, groups=y_tr[idx].repeat_interleave(PATCHES))
            probe.backward({"task": task, "aux_loss": aux_loss}, weights={"aux_loss": alpha})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits, _, scores, topk_idx = model(x_te)
        balance_end = float(expert_balance(scores, topk_idx))
    share = np.bincount(topk_idx.flatten().numpy(), minlength=ROUTED) / topk_idx.numel()
    used = share[share > 0]
    return {"experts_used": int((share >= 0.01).sum()),
            "usage_entropy": float(-(used * np.log(used)).sum() / math.log(ROUTED)),
            "largest_share": float(share.max()),
            "balance_end": balance_end,
            "test_acc": float((logits.argmax(1) == y_te).float().mean()),
            "router_ratio_median": float(np.median(ratios[len(ratios) // 2:]))}


_MUST_NOT = ("inert-loss", "gradient-conflict")
_HEALTHY_MUST_NOT = _MUST_NOT + ("gradient-swamping", "prototype-collapse", "static-loss-weights",
                                 "representation-collapse", "non-finite")

FAMILY = Family(
    name="deepseek-moe",
    source="Dai et al. 2024 (DeepSeekMoE, arXiv 2401.06066, sec. 3.3 expert-level balance loss "
           "alpha_1 sum f_i P_i, fine-grained and shared experts); deepseek-ai "
           "deepseek-moe-16b-base modeling_deepseek.py MoEGate aux_loss, DeepseekMoE",
    train=train,
    variants=(
        Variant("published", True,
                "the published balance factor alpha_1 0.01: the top-4 choices spread over the "
                "16 routed experts",
                must_not=_HEALTHY_MUST_NOT),
        Variant("alpha-1e-5", False,
                "the balance loss weighted 1e-5: its gradient is negligible and the router's "
                "choices concentrate on fewer experts (partial collapse, measured)",
                expected=(Expect("gradient-swamping", "aux_loss"),),
                allowed=(Expect("static-loss-weights", "aux_loss"),
                         Expect("prototype-collapse", "router")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("alpha-1e-5", 1)),
)
