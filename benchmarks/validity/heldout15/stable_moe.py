"""StableMoE (Dai, Dong, Ma, Zheng, Sui, Chang & Wei 2022, "StableMoE: Stable Routing Strategy
for Mixture of Experts", ACL), sec. 3. A mixture-of-experts layer whose token-to-expert
assignment is learnt in stage 1 and then frozen. Stage 1 (sec. 3.1): affinities s_{t,e} =
E_e^T h_t against learnt expert centroids E, each token sent to its top-1 expert a_t, the
expert's output gated by a sigmoid, h_t + sigma(s_{t,a_t}) FFN_{a_t}(h_t); the balance loss
L_bal = alpha sum_e ((|A_e| - n/N) / (n/N)) sum_{t in A_e} sigma(s_{t,e}) (it lowers the
scores of an over-loaded expert's tokens and raises an under-loaded one's); and a lightweight
router (a word embedding R with its own centroids E_hat) distilled from the assignment,
L_dis = cross entropy of softmax(E_hat^T R(x_t)) against a_t; stage 1 trains L_task + L_bal +
L_dis. Stage 2 (sec. 3.2): the distilled router is frozen and alone assigns the tokens (a fixed
routing), the balance and distillation losses are dropped, the sigmoid gate still reads the
learnt centroids; L_task only. The paper's point: the balance loss keeps the experts evenly
used, the frozen router stops the routing from fluctuating.

Official code, read with the repository tools: Hunter-DDM/stablemoe (fairseq-based)
``fairseq/modules/moe_layer.py`` ``BaseLayer`` (``expert_centroids`` and
``distill_expert_centroids`` drawn ``orthogonal_(gain=0.1)``; ``routing_emb`` the 'wordemb'
distilled model; ``forward``: affinities ``features.matmul(expert_centroids.T)`` or, in stage
2 and at evaluation, ``routing_features.matmul(distill_expert_centroids.T)``; ``distill_loss
= F.cross_entropy(distill affinities, affinities.max(1).indices, reduction='sum')`` in stage
1; ``greedy_assignment`` top-1; capacity ``tpe * capacity_factor``, tokens past it passed
unchanged; ``alpha = sigmoid(routed.mv(expert_centroids[e]))``, output ``alpha *
expert(x) + (1 - alpha) * x``; ``is_stage2``: ``num_updates >= two_stage_updates``),
``calculate_balance_loss`` (``(n_assigned - tpe) / tpe * sigmoid(affinities[:, e]).sum()``
over the expert's tokens), ``MoESublayer`` (x + ff2(relu(ff1(LN(x)))), ff2 zero-initialised);
``fairseq/criterions/xentropy_with_aux_loss.py`` ``XEntropyAuxCriterion.forward`` (``loss =
lm_loss + balance_factor * balance_loss + distill_factor * distill_loss``, summed, fairseq
dividing by the sample size); README.md's command (``--two-stage-updates 6000``,
``--max-update 60000``, ``--distill-factor 0.3``, ``--balance-factor 0.3``,
``--capacity-factor 2``, ``--assignment-algorithm GA``, Adam betas (0.9, 0.98), lr 6e-4).

Here (CPU budget): scikit-learn's 8x8 digits, each digit a sequence of its 8 rows as tokens
(embedding 8 -> 32 plus a learnt position embedding), one dense sublayer (the layers below
the MoE layer of the source's Transformer), the StableMoE layer with N = 8 experts (each a
MoESublayer 32-64-32), mean pooling and a linear head; batch 128 digits (1,024 tokens), Adam
lr 3e-3 betas (0.9, 0.98), no gradient clipping, 800 steps. The distilled router is the
'wordemb' router of a token that has no id: a linear map of the raw token (its 8 pixels and
its position one-hot) to 16 dims (the source's 50), drawn N(0, 1) as nn.Embedding's rows,
with its own centroids. Stage 1 is the first 25% of the steps (the source's 10%: at 80 steps
the distilled router had not learnt the assignment, its loss 1.7-1.8 per token against ln 8
= 2.08, and the stage-2 routing ended at 0.65-0.84 of log 8 on seed 0 (two router
initialisations tried); at 200 steps it ends at 0.93).
The losses, summed over tokens and divided by the digits as fairseq divides by the sample
size: ``task`` (cross entropy, first), ``balance`` (weight 0.3 in stage 1) and ``distill``
(weight 0.3 in stage 1), both weight 0 in stage 2 (the source drops them); the distilled
router's parameters get learning rate 0 from stage 2 on (frozen). The router watched as a
user of an MoE watches it (as switch_moe.py does): the expert centroids as prototypes
``router`` of the MoE layer's input ``tokens``, each token's expert (the router in use: the
centroids in stage 1, the distilled router in stage 2) observed as its group. The probe's
usage is the Euclidean nearest centroid, not the largest dot product the router takes.

Truth, measured without gradprobe on the test digits (3,600 tokens) with the frozen distilled
router (the evaluation routing of the source): experts used (>= 1% of the tokens), usage
entropy / log 8, the two largest experts' share, test accuracy; the same usage of the
Euclidean nearest centroid (``euclid_*``, what the probe counts); the share of tokens on which
the distilled router agrees with the centroids when it takes over (``switch_agreement``); and
in stage 1, every 10 steps, ||weight x grad_E balance|| / ||grad_E task|| on the centroids by
``torch.autograd.grad`` (median, min, max over the second half of stage 1).

Variants (truth by construction):
- ``published``: healthy, as published (balance 0.3, distill 0.3, two stages).
- ``balance-1e-5``: broken. The balance factor 1e-5 (30,000 times too small): its gradient
  on the centroids is 4e-4 of the task's and the routing is left to top-1's rich-get-richer
  loop from an already skewed start (0.29-0.47 of log 8 on the first batch): a few experts take most
  tokens, and the frozen router keeps that skew for the rest of the run.

Measured, seeds 0 / 1 (one thread):
  published:     7 / 8 experts used, usage entropy 0.928 / 0.982, two largest 35% / 32%,
                 test accuracy 0.962 / 0.951; Euclidean usage 0.847 / 0.938; switch
                 agreement 0.69 / 0.59; balance / task gradient on the centroids 0.52 / 0.57
                 (median; 0.14-1.40 over the window);
  balance-1e-5:  5 / 6 experts used, usage entropy 0.705 / 0.762, two largest 62% / 57%,
                 test accuracy 0.969 / 0.960; Euclidean usage 0.738 / 0.832; switch
                 agreement 0.83 / 0.72; gradient ratio 4e-4 / 4e-4 (2e-4 to 1e-3).
The broken routing is skewed, not collapsed to one or two experts (the capacity limit of
stage 1 passes the overflow unchanged, which caps the rich-get-richer loop); the accuracy
of this small task does not suffer (0.96-0.97): the failure is the balance the method is
for, not the task. Reference, not a variant: distill factor 1e-4 gives the published run
to four digits (seed 0: usage 0.928, agreement 0.687): the distillation loss reaches only the
distilled router's own parameters, and Adam's step does not depend on a loss's scale.

Alarms. Expected on ``balance-1e-5``: ``gradient-swamping`` on ``balance`` (its weighted
gradient 4e-4 of the task's on the centroids it shares with it, 1,000 times below the
published run's) and ``static-loss-weights`` on ``balance`` (its weight fixed at 1e-5 for
all of stage 1: that weight is the cause). Allowed there: ``prototype-collapse`` on ``router``
(a skew of the usage, measured 0.70-0.76; the probe's Euclidean usage 0.74-0.83, in the
range docs/findings.md gives for a mostly-used skewed set). Must not, both variants:
``inert-loss`` (``distill`` trains only the lightweight router by design, the source's
distillation into a separate model; ``balance`` reaches the centroids and the tokens),
``non-finite``; on the healthy variant also ``prototype-collapse``, ``gradient-swamping``,
``static-loss-weights`` and ``gradient-conflict`` (the published weights balance the
experts: 7-8 of 8 in use, entropy 0.93-0.98).

CPU: about 5.6-6.8 seconds a run (800 steps, probe and the ratio measurements included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant
from ..switch_moe import usage

BATCH, STEPS, EXPERTS, WIDTH, HIDDEN, ROUTE_DIM = 128, 800, 8, 32, 64, 16
STAGE1 = STEPS // 4  # the source: --two-stage-updates 6000 of --max-update 60000 (10%)
CAPACITY_FACTOR, BALANCE, DISTILL, LR, RATIO_EVERY = 2.0, 0.3, 0.3, 3e-3, 10
# variant -> (balance factor, distill factor)
SETUP = {"published": (BALANCE, DISTILL), "balance-1e-5": (1e-5, DISTILL)}


class SubLayer(nn.Module):
    """fairseq MoESublayer: x + ff2(relu(ff1(LN(x)))), ff2's weight started at zero."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.ff1, self.ff2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
        nn.init.zeros_(self.ff2.weight)

    def forward(self, x):
        return x + self.ff2(F.relu(self.ff1(self.norm(x))))


class StableMoELayer(nn.Module):
    """StableMoE's layer (Hunter-DDM/stablemoe fairseq/modules/moe_layer.py BaseLayer):
    affinities s = h E^T with expert centroids E (orthogonal, gain 0.1); top-1 assignment
    (greedy, 'GA'); each expert takes at most capacity x n / N tokens in training (the rest
    pass unchanged); output sigma(s_{t,a_t}) expert(h) + (1 - sigma) h. The distilled router:
    a lightweight embedding of the raw token R(x) with centroids E_hat, trained in stage 1 by
    cross entropy towards the assignment, and routing alone (frozen) in stage 2."""

    def __init__(self):
        super().__init__()
        self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(EXPERTS, WIDTH), gain=0.1))
        self.experts = nn.ModuleList(SubLayer() for _ in range(EXPERTS))
        self.route_embed = nn.Linear(16, ROUTE_DIM)  # the 'wordemb' router of a raw token
        nn.init.normal_(self.route_embed.weight)  # drawn as nn.Embedding's rows, N(0, 1)
        self.distill_centroids = nn.Parameter(
            nn.init.orthogonal_(torch.empty(EXPERTS, ROUTE_DIM), gain=0.1))

    def distilled_parameters(self):
        return [*self.route_embed.parameters(), self.distill_centroids]

    def forward(self, h, raw, stage2: bool):
        n = len(h)
        affinities = h @ self.centroids.t()
        distill_scores = self.route_embed(raw) @ self.distill_centroids.t()
        with torch.no_grad():
            routing = distill_scores if (stage2 or not self.training) else affinities
            choice = routing.argmax(1)
        distill = F.cross_entropy(distill_scores, affinities.detach().argmax(1), reduction="sum")
        limit = int(CAPACITY_FACTOR * n / EXPERTS) if self.training else n
        out = h.clone()
        balance = h.new_zeros(())
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == e).squeeze(1)
            if len(rows) == 0:
                continue
            gate = torch.sigmoid(affinities[rows, e])
            # the balance loss (calculate_balance_loss): (|A_e| - n/N) / (n/N) sum sigma(s_te)
            balance = balance + (len(rows) - n / EXPERTS) / (n / EXPERTS) * gate.sum()
            kept = rows[:limit]
            g = gate[:limit, None]
            out[kept] = g * expert(h[kept]) + (1 - g) * h[kept]
        return out, choice, balance, distill


class StableMoEClassifier(nn.Module):
    """Each 8x8 digit as 8 row tokens: embedding (8 -> 32) plus a position embedding, one dense
    sublayer, the StableMoE layer, mean pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(8, WIDTH))
        self.dense = SubLayer()
        nn.init.normal_(self.dense.ff2.weight, std=0.02)
        self.moe = StableMoELayer()
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x, stage2: bool = False):
        rows = x.view(-1, 8, 8)
        tokens = (self.embed(rows) + self.position).reshape(-1, WIDTH)
        h = self.dense(tokens)
        raw = torch.cat([rows, torch.eye(8).expand(len(rows), 8, 8)], 2).reshape(-1, 16)
        routed, choice, balance, distill = self.moe(h, raw, stage2)
        # fairseq sums every term and divides by the sample size (here: the digits)
        balance, distill = balance / len(rows), distill / len(rows)
        logits = self.head(routed.view(-1, 8, WIDTH).mean(1))
        return logits, h, choice, balance, distill


def router_ratio(model: StableMoEClassifier, losses: dict, factor: float) -> float:
    """||factor grad_E(balance)|| / ||grad_E(task)|| on the expert centroids E, by
    torch.autograd.grad, independently of the probe."""
    w = model.moe.centroids
    g_task, = torch.autograd.grad(losses["task"], w, retain_graph=True)
    g_bal, = torch.autograd.grad(losses["balance"], w, retain_graph=True)
    return float(factor * g_bal.norm() / g_task.norm().clamp_min(1e-30))


def routers_agreement(model: StableMoEClassifier, x: torch.Tensor) -> float:
    """Share of the tokens of ``x`` that the distilled router sends where the stage-1 router
    (the centroids) sends them."""
    model.eval()
    with torch.no_grad():
        _, h, choice, _, _ = model(x, stage2=True)
        return float(((h @ model.moe.centroids.t()).argmax(1) == choice).float().mean())


def train(variant: str, seed: int, log: Path) -> dict:
    balance_factor, distill_factor = SETUP[variant]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = StableMoEClassifier()
    distilled = {id(p) for p in model.moe.distilled_parameters()}
    opt = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if id(p) not in distilled]},
         {"params": model.moe.distilled_parameters()}], lr=LR, betas=(0.9, 0.98))
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("tokens")
    probe.watch_prototypes("router", model.moe.centroids, latent="tokens")
    outcome, ratios = {}, []
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            stage2 = step >= STAGE1
            if step == STAGE1:
                opt.param_groups[1]["lr"] = 0.0  # the distilled router frozen
                outcome["switch_agreement"] = routers_agreement(model, x_te)
                model.train()
            logits, h, choice, balance, distill = model(x_tr[idx], stage2)
            losses = {"task": F.cross_entropy(logits, y_tr[idx]), "balance": balance,
                      "distill": distill}
            weights = {"balance": 0.0 if stage2 else balance_factor,
                       "distill": 0.0 if stage2 else distill_factor}
            if not stage2 and step % RATIO_EVERY == 0:
                ratios.append(router_ratio(model, losses, balance_factor))
            probe.observe(tokens=h, groups=choice)
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits, h, choice, _, _ = model(x_te, stage2=True)
        nearest = torch.cdist(h, model.moe.centroids).argmin(1)
    truth = usage(choice.numpy()) | {"test_acc": float((logits.argmax(1) == y_te).float().mean())}
    truth |= {"euclid_" + k: v for k, v in usage(nearest.numpy()).items()}
    late = ratios[len(ratios) // 2:]
    return truth | outcome | {"router_ratio_median": float(np.median(late)),
                              "router_ratio_min": float(min(late)),
                              "router_ratio_max": float(max(late))}


FAMILY = Family(
    name="stable-moe",
    source="Dai et al. 2022 (StableMoE: Stable Routing Strategy for Mixture of Experts, ACL, "
           "sec. 3: stage 1 with the sigmoid-gated top-1 routing, balance loss 0.3 and a "
           "distilled lightweight router, stage 2 with that router frozen); Hunter-DDM/"
           "stablemoe fairseq/modules/moe_layer.py BaseLayer (calculate_balance_loss, "
           "distill_loss), fairseq/criterions/xentropy_with_aux_loss.py, README.md",
    train=train,
    variants=(
        Variant("published", True,
                "StableMoE as published (balance 0.3, distill 0.3, the distilled router "
                "frozen for stage 2): experts evenly used (measured: 7-8 of 8, usage entropy "
                "0.93-0.98 of log 8, accuracy 0.95-0.96)",
                must_not=("prototype-collapse", "gradient-swamping", "static-loss-weights",
                          "gradient-conflict", "inert-loss", "non-finite")),
        Variant("balance-1e-5", False,
                "the balance factor 1e-5 (30,000x too small): its gradient is 4e-4 of the "
                "task's on the centroids, a few experts take most tokens and the frozen "
                "router keeps the skew (measured: 5-6 of 8 experts, usage entropy "
                "0.70-0.76, two largest 57-62% against 32-35%)",
                expected=(Expect("gradient-swamping", "balance"),
                          Expect("static-loss-weights", "balance")),
                allowed=(Expect("prototype-collapse", "router"),),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("balance-1e-5", 1)),
)
