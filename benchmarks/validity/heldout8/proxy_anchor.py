"""Proxy Anchor loss, after Kim, Kim, Cho & Kwak 2020 ("Proxy Anchor Loss for Deep Metric
Learning", CVPR, eq. 4; tjddus9597/Proxy-Anchor-CVPR2020, code/losses.py
``Proxy_Anchor`` and code/train.py), with a softmax classification head on the embedding as
the second loss.

Published setup: one proxy per training class (``nn.Parameter(torch.randn(nb_classes,
sz_embed))``, ``kaiming_normal_(mode='fan_out')``), kept in the criterion; cosine similarity
s(x, p) of the l2-normalised embeddings and proxies; eq. 4:
  l(X) = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
       + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))
with alpha = 32, delta = 0.1; P+ the proxies with a positive in the batch. train.py adds the
criterion's parameters to AdamW as their own group at 100 times the learning rate, weight
decay 1e-4. Recall@1 is the retrieval metric.

Here: scikit-learn's 8x8 digits (``digits_split``; the 10 classes are trained and retrieved
on the test split's unseen images: the unseen-class protocol does not transfer at this
scale, see heldout3/protonet.py). Network: ``DigitEncoder`` (64-128-BN-ReLU-128-BN-ReLU) and a
linear 128 -> 64 embedding; 10 proxies of 64. AdamW lr 1e-3 (the paper's 1e-4 is for a
pretrained backbone), proxies at 100x (0.1), weight decay 1e-4, batch 100, 400 steps. The
second loss ``ce``: a linear classifier 64 -> 10 on the embedding, weight 0.1 (a user's
auxiliary softmax head). Losses ``proxy_anchor`` (first) and ``ce``. The probe watches the
normalised embedding ``embedding`` (the latent the loss reads) and the normalised proxies as
``watch_prototypes("proxies", ..., latent="embedding")`` with the labels (the proxies' own
row ids) observed as ``groups``.

Variants (truth by construction):
- ``proxies-100x``: healthy, as published.
- ``same-proxies-not-optimised``: the optimizer is built from the network's parameters
  alone, the proxies' 100x group forgotten (the proxies still require grad and get a
  gradient, but never move), and the proxies are initialised as one random row repeated
  (every class's proxy the same point), so the proxy term cannot tell classes apart and
  only the small ``ce`` head shapes the embedding apart.
Measured without gradprobe on the test split (seeds 0 / 1): Recall@1 (cosine, self
excluded), the proxies' total movement, the mean pairwise cosine of the proxies at the end:
  proxies-100x:               Recall@1 0.989 / 0.991, classifier acc 0.987 / 0.991,
                              proxy movement 24.3 / 23.6, mean proxy cosine 0.24 / 0.24;
  same-proxies-not-optimised: Recall@1 0.942 / 0.949 (4.7 / 4.2 points below healthy),
                              classifier acc 0.953 / 0.940, movement 0, mean cosine 1.
Forgetting the group alone (random proxies, never moved) did no measurable harm: Recall@1
0.984 / 0.993 (64-dimensional random proxies are near-orthogonal, mean cosine -0.03 / -0.004,
fixed targets the embedding learns to meet), so that variant was not kept: the stale proxies
harm only where their start is bad, here the same point for every class. Runs take 2-5
CPU-seconds.
Expected (broken): ``prototype-stale`` on ``proxies`` (they never move while the embedding
does). Allowed: ``prototype-collapse`` on ``proxies`` (every proxy is the same point from the
start: collapsed by construction, though they never closed in). Must not (both):
``inert-loss``, ``gradient-conflict``, ``non-finite``; healthy also ``prototype-stale``,
``prototype-collapse``, ``representation-collapse``, ``gradient-swamping``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, LR_MULT, WEIGHT_DECAY = 400, 100, 1e-3, 100.0, 1e-4
ALPHA, DELTA, CE_WEIGHT = 32.0, 0.1, 0.1
CLASSES, EMBED = 10, 64


class ProxyAnchorNet(nn.Module):
    """Encoder, embedding, the class proxies and an auxiliary classifier."""

    def __init__(self, same_proxies: bool):
        super().__init__()
        self.encoder = DigitEncoder()
        self.embed = nn.Linear(self.encoder.width, EMBED)
        proxies = torch.empty(1 if same_proxies else CLASSES, EMBED)
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies.expand(CLASSES, EMBED).clone())
        self.classifier = nn.Linear(EMBED, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.encoder(x))


def proxy_anchor_loss(embedding: torch.Tensor, proxies: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4, as losses.py ``Proxy_Anchor.forward`` computes it."""
    cos = F.normalize(embedding, dim=1) @ F.normalize(proxies, dim=1).t()
    positive = F.one_hot(labels, CLASSES).bool()
    pos_exp = torch.exp(-ALPHA * (cos - DELTA)).masked_fill(~positive, 0.0)
    neg_exp = torch.exp(ALPHA * (cos + DELTA)).masked_fill(positive, 0.0)
    with_positives = positive.any(0)
    pos_term = torch.log1p(pos_exp.sum(0))[with_positives].sum() / with_positives.sum()
    neg_term = torch.log1p(neg_exp.sum(0)).sum() / CLASSES
    return pos_term + neg_term


def recall_at_1(embedding: torch.Tensor, labels: torch.Tensor) -> float:
    z = F.normalize(embedding, dim=1)
    sim = (z @ z.t()).fill_diagonal_(-2.0)
    return float((labels[sim.argmax(1)] == labels).float().mean())


def train(variant: str, seed: int, log: Path) -> dict:
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    broken = variant == "same-proxies-not-optimised"
    model = ProxyAnchorNet(same_proxies=broken)
    network = [p for n, p in model.named_parameters() if n != "proxies"]
    groups = [{"params": network}]
    if not broken:
        groups.append({"params": [model.proxies], "lr": LR * LR_MULT})
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    start_proxies = model.proxies.detach().clone()
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding", labels="groups")
    probe.watch_prototypes("proxies", lambda: F.normalize(model.proxies.detach(), dim=1),
                           latent="embedding")
    with probe:
        for _ in range(STEPS):
            idx = next(order)
            embedding = model(x_tr[idx])
            losses = {"proxy_anchor": proxy_anchor_loss(embedding, model.proxies, y_tr[idx]),
                      "ce": F.cross_entropy(model.classifier(embedding), y_tr[idx])}
            probe.observe(embedding=F.normalize(embedding, dim=1), groups=y_tr[idx])
            opt.zero_grad()
            probe.backward(losses, weights={"ce": CE_WEIGHT})
            opt.step()
    model.eval()
    with torch.no_grad():
        embedding = model(x_te)
        proxies = F.normalize(model.proxies, dim=1)
        off_diagonal = ~torch.eye(CLASSES, dtype=torch.bool)
        return {"recall_at_1": recall_at_1(embedding, y_te),
                "classifier_acc": float((model.classifier(embedding).argmax(1) == y_te)
                                        .float().mean()),
                "proxy_movement": float((model.proxies - start_proxies).norm()),
                "proxy_mean_cosine": float((proxies @ proxies.t())[off_diagonal].mean())}


_MUST_NOT = ("inert-loss", "gradient-conflict", "non-finite")

FAMILY = Family(
    name="proxy-anchor",
    source="Kim, Kim, Cho & Kwak 2020 (Proxy Anchor Loss for Deep Metric Learning, CVPR, "
           "eq. 4; tjddus9597/Proxy-Anchor-CVPR2020 code/losses.py, proxies at 100x lr)",
    train=train,
    variants=(
        Variant("proxies-100x", True,
                "Proxy Anchor as published (alpha 32, delta 0.1, proxies in their own AdamW "
                "group at 100x the lr) plus a softmax head weighted 0.1",
                must_not=_MUST_NOT + ("prototype-stale", "prototype-collapse",
                                      "representation-collapse", "gradient-swamping")),
        Variant("same-proxies-not-optimised", False,
                "the proxies' optimizer group forgotten and every proxy initialised as the "
                "same row: they never move, the proxy term cannot tell classes apart and "
                "Recall@1 falls below the healthy run's",
                expected=(Expect("prototype-stale", "proxies"),),
                allowed=(Expect("prototype-collapse", "proxies"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("proxies-100x", 1), ("same-proxies-not-optimised", 1)),
)
