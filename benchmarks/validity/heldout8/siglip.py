"""SigLIP, after Zhai, Mustafa, Kolesnikov & Beyer 2023 ("Sigmoid Loss for Language Image
Pre-Training", ICCV): sec. 3.2 and Algorithm 1 (the pairwise sigmoid loss: logits =
dot(z_img, z_txt^T) * exp(t') + b over l2-normalised embeddings of the two towers, labels
2 * eye(n) - 1, loss = -sum(log_sigmoid(labels * logits)) / n, with a learnable temperature
t' started at log 10 and a learnable bias b started at -10, so that training starts near
the prior of few positives and needs no large early correction); sec. 3.3 (the chunked
implementation: each device sums its own positives and the negatives of the other devices'
chunks, so the loss is a positive term plus a negative term); the paper's ablation of the
bias term (the init b = -10 against no bias). Official code google-research/big_vision
``big_vision/trainers/proj/image_text/siglip.py`` (``logits = jnp.dot(zimg, ztxt.T)``,
``logits = logits * t + b``, ``m1_diag1 = -jnp.ones_like(logits) + 2 * jnp.eye(...)``,
``loglik = jax.nn.log_sigmoid(m1_diag1 * logits)``, ``nll = -jnp.sum(loglik, axis=-1)``,
``l = jnp.mean(nll)``, with ``t`` and ``b`` returned by the model; the chunked version is a
TODO there).

Published setup: a ViT image tower and a text transformer, WebLI image-text pairs, batch
32k, (Adafactor-style) Adam with weight decay, lr 1e-3.

Here (CPU): the two "modalities" are the top and the bottom halves (32 pixels each) of an
augmented 8x8 digit (``common.augment`` on scikit-learn's digits, ``common.digits_split``),
each read by its own tower (an MLP 32-128-128-32 with batch norm, the digit-sized analogue
of the ViT and of the text transformer), l2-normalised 32-d embeddings, batch 256, AdamW lr
1e-3, weight decay 1e-4, 300 steps. Algorithm 1's loss is passed to the probe as its two
sums (sec. 3.3's split), ``siglip_positive`` (the n matching pairs) and ``siglip_negative``
(the n^2 - n others), both divided by n, weights 1 and 1: their sum is exactly the
published loss. Watched as docs/probe.md says: the sigmoid's logits as ``logits`` with their
targets ``labels`` (eye(n)) and the temperature exp(t'), and both embeddings
(``image_embedding``, ``text_embedding``) as latents.

Variants (truth by construction):
- ``published``: healthy, t' = log 10 and b = -10, both learnt.
- ``temperature-fixed-1000``: broken. exp(t') frozen at 1000 and no bias (b = 0, not learnt):
  cosines of +-0.2 already give logits of +-200, so almost every sigmoid is saturated from
  the first step, the negatives with a positive cosine on the wrong side; the loss becomes a
  hard sign constraint on every pair, which the towers cannot fit.
Measured on the test split without gradprobe (seeds 0 / 1): top-half -> bottom-half
retrieval among the 450 test digits (instance top-1, chance 0.002; class of the retrieved
digit), kNN accuracy of the top-half embedding (k 20, cosine, ``common.knn_accuracy``), its
centred effective rank (of 32), the share of test logits with |logit| >= logit(0.99), the
share saturated on the wrong side of their target (sigmoid <= 0.01 for a matching pair,
>= 0.99 for another) among all pairs and among the matching pairs, the same share on the
last training batch, the learnt temperature and bias:
  published:              retrieval 0.096 / 0.096, class 0.693 / 0.678, kNN 0.856 / 0.831,
                          rank 23.3 / 22.7, saturated 0.74 / 0.72, wrong 0.0001 / 0.0001,
                          matching pairs wrong 0.042 / 0.036, last batch wrong 0.0006 /
                          0.0004, t 11.4 / 11.2, b -9.96 / -9.96;
  temperature-fixed-1000: retrieval 0.009 / 0.011, class 0.304 / 0.371, kNN 0.809 / 0.756,
                          rank 20.3 / 21.1, saturated 0.993 / 0.995, wrong 0.0069 / 0.0042,
                          matching pairs wrong 0.94 / 0.96, last batch wrong 0.0061 /
                          0.0059.
The healthy run's saturated logits are negatives pushed below their target (the bias -10
puts them there by design): saturated on the right side. In the broken run the n^2 - n
negatives win: 94-96% of the matching pairs end with a negative cosine, saturated on the
wrong side (sigmoid < 0.01 where the target is 1); diluted among all n^2 pairs that is
0.4-0.7% of the logits. About 3.5 CPU-seconds a run.
Expected on ``temperature-fixed-1000``: ``sigmoid-saturation`` on ``logits`` (saturated on
the wrong side of the targets, under a fixed temperature). Allowed there:
``gradient-conflict`` on ``siglip_positive|siglip_negative`` (the negative sum's push beat
the positive sum's pull on the matching pairs: true, but the cause is the temperature).
Must not (both): ``inert-loss``, ``non-finite``, ``representation-collapse`` (the
embeddings keep a rank of 20-23 of 32), ``static-loss-weights`` (1 and 1 make the
published loss; the harm comes from the temperature, not a weight); on the healthy variant
also ``sigmoid-saturation``, ``gradient-swamping`` and ``gradient-conflict`` (the two sums
of one loss at its published init).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import augment, batches, centred_effective_rank, digits_split, knn_accuracy
from ..harness import Expect, Family, Variant

STEPS, BATCH, DIM, WIDTH, LR, WEIGHT_DECAY = 300, 256, 32, 128, 1e-3, 1e-4
# (temperature exp(t') at the start, bias at the start, both learnt)
INIT = {"published": (10.0, -10.0, True), "temperature-fixed-1000": (1000.0, 0.0, False)}
SATURATED = math.log(0.99 / 0.01)  # |logit| at which the sigmoid is within 0.01 of 0 or 1


def tower() -> nn.Module:
    return nn.Sequential(nn.Linear(32, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, DIM))


class SigLIP(nn.Module):
    def __init__(self, temperature: float, bias: float, learnt: bool):
        super().__init__()
        self.image_tower, self.text_tower = tower(), tower()
        self.t_prime = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learnt)
        self.b = nn.Parameter(torch.tensor(bias), requires_grad=learnt)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zimg = F.normalize(self.image_tower(x[:, :32]), dim=1)
        ztxt = F.normalize(self.text_tower(x[:, 32:]), dim=1)
        return zimg, ztxt, zimg @ ztxt.T * self.t_prime.exp() + self.b


def sigmoid_loss_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's loss split into its positive and negative sums (both over n)."""
    n = len(logits)
    loglik = F.logsigmoid((2 * torch.eye(n) - 1) * logits)
    positive = loglik.diagonal().sum()
    return -positive / n, -(loglik.sum() - positive) / n


def saturated_wrong(logits: torch.Tensor) -> torch.Tensor:
    """Logits saturated on the wrong side of their target: a positive pair's sigmoid <= 0.01,
    a negative pair's >= 0.99."""
    return torch.where(torch.eye(len(logits), dtype=torch.bool), logits <= -SATURATED,
                       logits >= SATURATED)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = SigLIP(*INIT[variant])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_saturation("logits", temperature=lambda: model.t_prime.exp().item(),
                           target="labels")
    probe.watch_latent("image_embedding")
    probe.watch_latent("text_embedding")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            zimg, ztxt, logits = model(augment(x_tr[idx], gen))
            probe.observe(logits=logits, labels=torch.eye(len(idx)), image_embedding=zimg,
                          text_embedding=ztxt)
            positive, negative = sigmoid_loss_terms(logits)
            batch_wrong = float(saturated_wrong(logits.detach()).float().mean())
            probe.backward({"siglip_positive": positive, "siglip_negative": negative})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        zimg, ztxt, logits = model(x_te)
        z_tr = model(x_tr)[0]
    retrieved = logits.argmax(1)
    wrong = saturated_wrong(logits)
    return {"retrieval_top1": float((retrieved == torch.arange(len(x_te))).float().mean()),
            "retrieval_class": float((y_te[retrieved] == y_te).float().mean()),
            "knn_acc": knn_accuracy(z_tr.numpy(), y_tr.numpy(), zimg.numpy(), y_te.numpy()),
            "z_rank": centred_effective_rank(zimg.numpy()), "z_dim": DIM,
            "saturated_share": float((logits.abs() >= SATURATED).float().mean()),
            "saturated_wrong_share": float(wrong.float().mean()),
            "positives_saturated_wrong": float(wrong.diagonal().float().mean()),
            "last_batch_saturated_wrong": batch_wrong,
            "temperature": model.t_prime.exp().item(), "bias": model.b.item()}


_MUST_NOT = ("inert-loss", "non-finite", "representation-collapse", "static-loss-weights")

FAMILY = Family(
    name="siglip",
    source="Zhai et al. 2023, SigLIP (ICCV), sec. 3.2-3.3, Algorithm 1 (t' = log 10, b = -10); "
           "google-research/big_vision big_vision/trainers/proj/image_text/siglip.py",
    train=train,
    variants=(
        Variant("published", True,
                "learnt temperature from 10 and bias from -10, as published: the negatives start "
                "saturated towards their target 0, the positives are learnt",
                must_not=_MUST_NOT + ("sigmoid-saturation", "gradient-swamping",
                                      "gradient-conflict")),
        Variant("temperature-fixed-1000", False,
                "temperature frozen at 1000 and no bias: the sigmoid is saturated from the first "
                "step, many pairs on the wrong side of their target, and retrieval drops",
                expected=(Expect("sigmoid-saturation", "logits"),),
                allowed=(Expect("gradient-conflict", "siglip_positive|siglip_negative"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("temperature-fixed-1000", 0)),
)
