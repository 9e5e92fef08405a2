"""X-MoE routing (Chi, Dong, Huang, Dai, Ma, Patra, Singhal, Bajaj, Song, Mao, Huang & Wei
2022, "On the Representation Collapse of Sparse Mixture of Experts", NeurIPS), sec. 3: the
router scores a token h against expert embeddings e_k in a low-dimensional space,
s_k = cos(W h, e_k) / tau (dimension reduction W, L2 normalisation of both sides, a learnable
temperature tau), top-1 routing on softmax(s), with the load-balancing loss of Fedus et al.
(2022, eq. 4: N sum_i f_i P_i) at alpha 0.01 added to the task loss; sparse routing through
cosine scores on the hypersphere keeps the routing from collapsing the token
representations and keeps the experts used.

Official code: microsoft/unilm ``xmoe/README.md`` points to microsoft/torchscale,
``torchscale/component/xmoe/routing.py``: ``Top1Gate(use_xmoe=True)`` (``wg_reduction =
Linear(model_dim, 16, bias=False)``, expert embeddings ``wg`` (N x 16) initialised
``orthogonal_(gain=0.32)`` and rescaled to norm 1.5 under ``no_grad`` at every forward,
``_cosine``), ``top1gating`` (capacity factor x tokens / N in training, gate-scaled expert
output, ``l_aux = mean(me * ce) * N * N``, i.e. N sum_i f_i P_i). That release leaves the
token side un-normalised and the temperature out (``gating_t`` is referenced but never
created); the learnable temperature of the paper is taken from Microsoft's tutel
implementation of cosine routing, microsoft/tutel ``tutel/gates/cosine_top.py``
``CosineTopKGate`` (both sides ``F.normalize``d, ``logit_scale = exp(clamp(log(1 / t),
max=log(1 / 0.01)))``, init t 0.5).

Published setup: X-MoE layers in a Transformer pre-trained by multilingual masked language
modelling and evaluated on cross-lingual tasks (the release: top-1 gating with capacity,
routing dimension 16), with the balancing loss of Fedus et al. at alpha 0.01. Here (CPU): each
8x8 digit is a sequence of 8 row tokens, embedded 8 -> 32 plus a learned position embedding;
one pre-LN MoE sublayer x + MoE(LN(x)) with N = 8 experts (FFN 32-64-32), routing dimension
16, capacity factor 1.0 in training (none at evaluation); mean pooling and a linear head
(the token/classifier scaffold of benchmarks/validity/switch_moe.py, whose ``balance_loss``
and ``usage`` are imported); batch 128 digits (1,024 tokens), Adam lr 3e-3, 800 steps. The
losses are ``task`` (cross entropy, first) and ``balance`` (N sum f_i P_i; its weight is the
coefficient). A temperature started at 0.07 (the release's ``TEMPERATURE_FOR_L_UAX``) left
this port's published run at 6 / 8 experts used, entropy 0.80 / 0.97, test accuracy 0.942 /
0.956 (seeds 0 / 1; an earlier draft learning tau itself, not its log, fell to 5 experts,
entropy 0.72 on seed 0): tutel's 0.5 start is used.

The router, watched as a user of an MoE would: its expert embeddings are prototypes in the
routing space, ``watch_prototypes("router", <unit expert embeddings>, latent="route_space")``
with the normalised projected tokens watched as ``route_space`` and the router's top-1 choices
passed as ``observe(groups=...)``. On the unit sphere the nearest embedding in Euclidean
distance is the largest cosine, so the probe's usage is the router's. Probe at its defaults.

Truth, measured without gradprobe: on the test digits the top-1 usage of each expert, experts
used (>= 1% of tokens), usage entropy / log N, the two largest experts' share, test accuracy;
the same usage over the last 100 training batches (``train_late_*``); the learned
temperature; and every 10 steps ||weight grad(balance)|| / ||grad(task)|| over the router's
parameters (projection, embeddings, temperature) by ``torch.autograd.grad`` (median of the
second half).

Variants (truth by construction):
- ``published``: healthy, balance weight 0.01. Measured seeds 0 / 1: 8 / 7 experts used,
  usage entropy 0.957 / 0.920 of log 8, two largest experts 33% / 41% of the tokens, test
  accuracy 0.967 / 0.951, temperature 0.5 -> 0.230 / 0.226; balance/task gradient ratio on
  the router 0.029 / 0.038. Must not: ``prototype-collapse``, ``gradient-swamping``,
  ``static-loss-weights``, ``representation-collapse``.
- ``balance-1e-5``: broken. The balancing loss 1,000 times too weak: top-1 routing's
  rich-get-richer loop is left alone and a few experts take most tokens. Measured seeds 0 /
  1: 4 / 5 experts used, entropy 0.610 / 0.732, two largest 73% / 58%, test accuracy 0.951 /
  0.953; ratio 6.3e-5 / 5.9e-5. Expected: ``gradient-swamping`` of ``balance`` (its weighted
  gradient a negligible share of the task's on the router) and ``static-loss-weights`` on
  ``balance`` (the weight fixed at 1e-5 is the cause). Allowed: ``prototype-collapse`` on
  ``router`` (the partial collapse below).
- ``no-balance``: broken. No balancing loss (one loss). Measured seeds 0 / 1: 4 / 5 experts
  used, entropy 0.575 / 0.748, two largest 78% / 56%, test accuracy 0.951 / 0.951. Expected:
  ``prototype-collapse`` on ``router``: with one loss nothing but the router's usage can tell,
  and the router is watched for exactly that (3-4 of 8 experts under 1% of the tokens).

The collapse is partial on both broken variants (the capacity limit keeps each expert at
<= 1/8 of a batch in training, as in switch-moe): entropy 0.58-0.75 and 4-5 experts used
against 0.92-0.96 and 7-8 healthy, on both seeds.

CPU, one thread: 3.2-5.9 s a run.
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
from ..switch_moe import SwitchClassifier, balance_loss, dispatch, usage

BATCH, STEPS, EXPERTS, WIDTH, HIDDEN, ROUTE_DIM = 128, 800, 8, 32, 64, 16
LR, RATIO_EVERY = 3e-3, 10  # capacity factor 1.0: switch_moe.dispatch
EMBED_GAIN, EMBED_NORM, TAU_INIT, TAU_MIN = 0.32, 1.5, 0.5, 0.01
WEIGHT = {"published": 1e-2, "balance-1e-5": 1e-5, "no-balance": None}


class XMoELayer(nn.Module):
    """Top-1 routing by s_k = cos(W h, e_k) / tau (Chi et al. 2022, eq. 3-4): W projects the
    token to a 16-d routing space, the expert embeddings e_k are kept on a sphere of radius
    1.5 (the release's no-grad renormalisation), tau is learned; experts FFN 32-64-32, each
    takes at most capacity x tokens / N tokens in training, the overflow passes through the
    residual only; the expert output is scaled by its gate."""

    def __init__(self):
        super().__init__()
        self.reduction = nn.Linear(WIDTH, ROUTE_DIM, bias=False)
        embeddings = torch.empty(EXPERTS, ROUTE_DIM)
        nn.init.orthogonal_(embeddings, gain=EMBED_GAIN)
        self.embeddings = nn.Parameter(embeddings)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / TAU_INIT)))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(),
                                                   nn.Linear(HIDDEN, WIDTH))
                                     for _ in range(EXPERTS))

    def unit_embeddings(self) -> torch.Tensor:
        return F.normalize(self.embeddings, dim=1)

    def forward(self, tokens):
        with torch.no_grad():
            self.embeddings.mul_(EMBED_NORM / self.embeddings.norm(dim=1, keepdim=True))
        routed = F.normalize(self.reduction(tokens), dim=1)
        scale = self.log_scale.clamp(max=math.log(1.0 / TAU_MIN)).exp()  # 1 / tau
        scores = scale * routed @ self.unit_embeddings().t()
        probs = F.softmax(scores, dim=-1)
        gate, choice = probs.max(dim=-1)
        return dispatch(self.experts, tokens, gate, choice, self.training), routed, probs, choice


class XMoEClassifier(SwitchClassifier):
    """switch_moe's classifier (embedding, positions, LayerNorm, head) with the X-MoE layer."""

    layer = XMoELayer

    def forward(self, x):
        """Logits, the tokens in the routing space, router probabilities, top-1 choices:
        each digit's 8 rows as tokens through x + MoE(LN(x)), mean-pooled."""
        tokens = (self.embed(x.view(-1, 8, 8)) + self.position).reshape(-1, WIDTH)
        moe_out, routed, probs, choice = self.moe(self.norm(tokens))
        pooled = (tokens + moe_out).view(-1, 8, WIDTH).mean(1)
        return self.head(pooled), routed, probs, choice


def router_ratio(model: XMoEClassifier, losses: dict, weight: float) -> float:
    """||weight grad_router(balance)|| / ||grad_router(task)|| over the router's parameters
    (projection, expert embeddings, temperature), by torch.autograd.grad."""
    params = [model.moe.reduction.weight, model.moe.embeddings, model.moe.log_scale]
    norm = lambda loss: torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(
        loss, params, retain_graph=True)))
    return float(weight * norm(losses["balance"]) / norm(losses["task"]).clamp_min(1e-30))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = XMoEClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    weight = WEIGHT[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("route_space")
    probe.watch_prototypes("router", model.moe.unit_embeddings, latent="route_space")
    train_usage, ratios = [], []
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            logits, routed, probs, choice = model(x_tr[idx])
            losses = {"task": F.cross_entropy(logits, y_tr[idx])}
            if weight is not None:
                losses["balance"] = balance_loss(probs, choice)
                if step % RATIO_EVERY == 0:
                    ratios.append(router_ratio(model, losses, weight))
            probe.observe(route_space=routed, groups=choice)
            probe.backward(losses, weights={"balance": weight} if weight is not None else None)
            opt.step()
            opt.zero_grad()
            if step >= STEPS - 100:
                train_usage.append(choice)
    model.eval()
    with torch.no_grad():
        logits, _, _, choice = model(x_te)
    late = usage(torch.cat(train_usage).numpy())
    truth = ({"router_ratio_late_median": float(np.median(ratios[len(ratios) // 2:]))}
             if ratios else {})
    return truth | (usage(choice.numpy())
            | {f"train_late_{k}": float(v) for k, v in late.items()}
            | {"test_acc": float((logits.argmax(1) == y_te).float().mean()),
               "temperature": float(torch.exp(-model.moe.log_scale.detach()))})


FAMILY = Family(
    name="x-moe",
    source="Chi et al. 2022 (On the Representation Collapse of Sparse Mixture of Experts, "
           "NeurIPS, sec. 3: cosine routing in a 16-d space with a learnable temperature, "
           "balance loss 0.01); microsoft/unilm xmoe -> microsoft/torchscale "
           "torchscale/component/xmoe/routing.py Top1Gate(use_xmoe), top1gating; "
           "microsoft/tutel tutel/gates/cosine_top.py CosineTopKGate",
    train=train,
    variants=(
        Variant("published", True,
                "X-MoE routing with the balancing loss at 0.01: 7-8 of 8 experts in use, usage "
                "entropy 0.92-0.96 of log 8 (measured)",
                must_not=("prototype-collapse", "gradient-swamping", "static-loss-weights",
                          "representation-collapse")),
        Variant("balance-1e-5", False,
                "the balancing loss 1,000 times too weak (ratio ~6e-5 of the task's gradient on "
                "the router): 4-5 experts take the tokens, entropy 0.61-0.73 (measured)",
                expected=(Expect("gradient-swamping", "balance"),
                          Expect("static-loss-weights", "balance")),
                allowed=(Expect("prototype-collapse", "router"),)),
        Variant("no-balance", False,
                "no balancing loss: 4-5 experts take the tokens, entropy 0.58-0.75, 3-4 expert "
                "embeddings unused by the router (measured)",
                expected=(Expect("prototype-collapse", "router"),)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("balance-1e-5", 1)),
)
