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
DeepSeek modeling code has none). Batch 32 digits (T = 512 tokens), Adam lr 3e-3, 600 steps.
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
MEASURED
CPU ~10 s a run (shared machine).
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

STEPS, BATCH, LR = 600, 32, 3e-3
ROUTED, TOP_K, WIDTH, HIDDEN, PATCHES = 16, 4, 32, 16, 16
ALPHA = {"published": 1e-2, "alpha-1e-5": 1e-5}


def expert_balance(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i of DeepSeekMoE sec. 3.3 (``MoEGate``'s aux loss before alpha)."""
    fi = F.one_hot(topk_idx.flatten(), ROUTED).to(scores.dtype).mean(0) * ROUTED
    return (scores.mean(0) * fi).sum()


class Experts(nn.Module):
    """``count`` SwiGLU-free FFNs WIDTH-HIDDEN-WIDTH evaluated together (all are small)."""

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
