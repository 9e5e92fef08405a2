"""Masked Siamese Networks, after Assran et al. 2022 ("Masked Siamese Networks for
Label-Efficient Learning", ECCV; sec. 3, eq. 1-3: soft nearest-prototype predictions of a
masked anchor view and an unmasked target view, the target sharpened with temperature T, a
cross-entropy between them, plus lambda times the mean-entropy-maximisation regulariser
``me_max`` that keeps the prototypes in use; the paper's statement that without it the
representation collapses to few prototypes is from memory, not re-read here), the official
code facebookresearch/msn ``src/losses.py`` (``init_msn_loss``: ``snn`` = softmax(normalised
query . normalised prototypes / tau) @ proto_labels, ``sharpen(p, T) = p^(1/T)`` normalised,
``loss = mean(sum(-targets * log probs))``, ``rloss = -H(mean probs) + log K``) read with the
repository tools, and the loss assembly ``ploss + memax_weight * me_max + ent_weight * ent``
of the training loop (seen in a port of ``src/msn_train.py``, found with the string search).

Published setup: ViT encoder, a 3-layer projection head, 1024 prototypes (rows of a learned
matrix, proto_labels the identity), tau = 0.1, T = 0.25, ``memax_weight`` = 1, ``ent_weight``
0, the target encoder an EMA of the anchor encoder (momentum 0.996 -> 1), the anchor views
with random patches dropped, AdamW.

Here: scikit-learn's 8x8 digits; ``DigitEncoder`` of common.py (width 128) with a projection
Linear 128 -> 128 -> 32 (batch norm, ReLU); K = 32 prototypes of dimension 32; anchor view =
common.py's ``augment`` with 3 of the 16 2x2 patches dropped (the digit-sized masking),
target view another ``augment`` through the EMA encoder (momentum 0.996 -> 1, linear);
tau 0.05 (not the source's 0.1), T 0.25; batch 128, AdamW lr 1e-3 (weight decay 0.04), 400
steps. Tuned on the healthy variant, seed 0, by usage alone: at tau 0.1, half the patches
dropped, 800 steps the healthy run itself ended on 2 and 1 prototypes (seeds 0, 1), its
predictions nearly flat (mean largest probability 0.2-0.3); 800 steps at tau 0.05 also
ended on 2; tau 0.05 with 3 patches dropped at 400 steps is the setting below. So at this
scale the healthy run's usage falls with longer training: it is healthy at 400 steps, as
measured, not at any length. The two terms are
passed as two losses under the source's names ``ploss`` and ``me_max`` (weight lambda).
Watched as docs/probe.md says: the normalised anchor projection ``anchor`` as a latent, the
normalised prototype rows (what ``snn`` compares with) as prototypes ``prototypes`` of
``anchor``, each anchor's target assignment (argmax of the sharpened target) as its group.

Variants (truth by construction):
- ``me-max``: healthy, lambda = 1 (the source's ``memax_weight``).
- ``no-me-max``: broken, lambda = 0 (the regulariser is still computed and passed, weighted
  0): nothing keeps the mean prediction spread, and the sharpened targets pull every view
  to the few prototypes that already win.
Measured on the test split (450 digits), independently of gradprobe (seeds 0 and 1):
prototypes used (argmax of the target encoder's prediction on one augmented view of each
digit, the training views; and on the clean digits), their perplexity, kNN accuracy (k = 20,
cosine, common.py) of the target encoder's features, centred effective rank of the
projections:
  me-max:    27 and 27 used, perplexity 9.4 and 9.9 (clean: 22 and 23, 11.0 and 8.1),
             kNN 0.924 and 0.931, projection rank 25.9 and 26.5;
  no-me-max:  3 and  2 used, perplexity 2.8 and 1.0 (clean:  3 and  2,  2.9 and 1.3),
             kNN 0.918 and 0.931, projection rank 26.4 and 26.7.
The collapse is the prototypes' only: the features keep their kNN accuracy and rank.
About 6-7 CPU-seconds a run (400 steps, probe included).
Expected on ``no-me-max``: ``prototype-collapse`` on ``prototypes``. Allowed there:
``inert-loss`` on ``me_max`` (weighted 0, it trains nothing). Must not (both):
``static-loss-weights``, ``representation-collapse`` (kNN and rank unchanged); on the
healthy variant also ``inert-loss``, ``prototype-collapse``, ``prototype-stale``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      knn_accuracy, perplexity)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, WEIGHT_DECAY = 400, 128, 1e-3, 0.04
PROTOTYPES, DIM, TAU, SHARPEN_T = 32, 32, 0.05, 0.25
MOMENTUM_START, MASKED_PATCHES = 0.996, 3
MEMAX_WEIGHT = {"me-max": 1.0, "no-me-max": 0.0}


class Siamese(nn.Module):
    """The anchor network: encoder, projection head and the prototype matrix."""

    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        self.projector = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                       nn.Linear(128, DIM))
        self.prototypes = nn.Parameter(torch.randn(PROTOTYPES, DIM) / DIM ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.encoder(x)), dim=1)


def snn(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Soft nearest prototypes (proto_labels the identity): softmax of cosine / tau."""
    return F.softmax(query @ F.normalize(prototypes, dim=1).t() / TAU, dim=1)


def sharpen(p: torch.Tensor) -> torch.Tensor:
    sharp = p ** (1 / SHARPEN_T)
    return sharp / sharp.sum(1, keepdim=True)


def mask_patches(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Drop MASKED_PATCHES of the 16 2x2 patches of each digit (set to 0)."""
    keep = torch.rand(len(x), 16, generator=gen).argsort(1) >= MASKED_PATCHES
    pixels = keep.view(-1, 4, 1, 4, 1).expand(-1, 4, 2, 4, 2).reshape(-1, 64)
    return x * pixels


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Siamese()
    target = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("anchor")
    probe.watch_prototypes("prototypes", lambda: F.normalize(model.prototypes, dim=1),
                           latent="anchor")
    with probe:
        for step in range(STEPS):
            x = x_tr[next(order)]
            anchor = model(mask_patches(augment(x, gen), gen))
            probs = snn(anchor, model.prototypes)
            with torch.no_grad():
                targets = sharpen(snn(target(augment(x, gen)), model.prototypes))
            ploss = -(targets * torch.log(probs)).sum(1).mean()
            avg_probs = probs.mean(0)
            me_max = (avg_probs * torch.log(avg_probs)).sum() + math.log(PROTOTYPES)
            probe.observe(anchor=anchor, groups=targets.argmax(1))
            probe.backward({"ploss": ploss, "me_max": me_max},
                           weights={"me_max": MEMAX_WEIGHT[variant]})
            opt.step()
            opt.zero_grad()
            momentum = MOMENTUM_START + (1 - MOMENTUM_START) * step / STEPS
            with torch.no_grad():
                for p_target, p in zip(target.parameters(), model.parameters()):
                    p_target.mul_(momentum).add_(p, alpha=1 - momentum)
    target.eval()
    with torch.no_grad():
        f_tr, f_te = target.encoder(x_tr), target.encoder(x_te)
        z_te = target(x_te)
        clean = snn(z_te, model.prototypes).argmax(1)
        assigned = snn(target(augment(x_te, gen)), model.prototypes).argmax(1)
    return {"prototypes_used": int(assigned.unique().numel()), "prototypes": PROTOTYPES,
            "perplexity": perplexity(assigned, PROTOTYPES),
            "clean_used": int(clean.unique().numel()),
            "clean_perplexity": perplexity(clean, PROTOTYPES),
            "knn_acc": knn_accuracy(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy()),
            "projection_rank": centred_effective_rank(z_te.numpy())}


_MUST_NOT = ("static-loss-weights", "representation-collapse")

FAMILY = Family(
    name="msn",
    source="Assran et al. 2022 (Masked Siamese Networks, ECCV, eq. 1-3); "
           "facebookresearch/msn src/losses.py init_msn_loss",
    train=train,
    variants=(
        Variant("me-max", True,
                "the source's loss: masked anchor against a sharpened EMA target over "
                "prototypes, plus the mean-entropy regulariser with weight 1",
                must_not=_MUST_NOT + ("inert-loss", "prototype-collapse", "prototype-stale")),
        Variant("no-me-max", False,
                "me-max weight 0: nothing keeps the mean prediction spread over the "
                "prototypes, and the sharpened targets pull every view to a few of them",
                expected=(Expect("prototype-collapse", "prototypes"),),
                allowed=(Expect("inert-loss", "me_max"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("me-max", 1), ("no-me-max", 1)),
)
