"""Barlow Twins with its loss split into its two terms, as a user diagnosing it would pass it:
issue 21's row "Barlow Twins with the loss split into ``on_diag`` and ``off_diag`` (weight
0.0051), a two-layer projector, every 10 steps".

Public source: Zbontar, Jing, Misra, LeCun & Deny 2021 ("Barlow Twins: Self-Supervised
Learning via Redundancy Reduction", ICML), eq. 1: the cross-correlation c of the two views'
batch-normalised embeddings, L = sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2,
lambda = 0.0051 in facebookresearch/barlowtwins (main.py: ``on_diag`` and ``off_diag``,
the names used here; ``--lambd 0.0051``), projector 8192-8192-8192, LARS, batch 2048.

Here (CPU): the digits backbone (``common.DigitEncoder``), a two-layer projector 128-128-64
(BN and ReLU between, no bias), batch 256, Adam lr 1e-3, 300 steps, ``common.augment``
views. The two terms are passed to the probe as two losses, ``on_diag`` and ``off_diag``
(weight lambda), with ``Probe(every=10)``; the projector output is watched as ``z``.
Unlike ``barlow.py`` (one projector depth more, the default cadence, other loss names), this
family reproduces the issue's setup, where the redundancy term rises from ~0 at
initialisation to its equilibrium by design.

Variants (truth by construction, checked without gradprobe on the test digits: the centred
effective rank (numpy, ``common.centred_effective_rank``) of the projector output at steps
50, 100, ... 300 and at the end, its normalised std, linear-probe and kNN accuracy):
- ``lambda-0.0051``: healthy, the published loss. Must raise no warning or error.
- ``off-diag-0``: the redundancy term weighted 0. The invariance term alone is minimised when
  every dimension encodes the same invariant feature: dimensional collapse (paper, sec. 2;
  Table 4's loss ablation). Expected: ``representation-collapse`` on ``z``.

Measured (seeds 0 / 1, one thread): ``lambda-0.0051``: effective rank of z 12.2 / 12.2 at the
end (19.2 / 19.2 at step 50: it settles there), normalised std 0.96 / 0.97, mean squared
off-diagonal correlation (last batch: ``off_diag`` / 64 x 63) 0.22 / 0.21, backbone linear 0.967 / 0.978,
kNN 0.916 / 0.911. ``off-diag-0``: rank 6.8 / 7.2 (from 16.8 / 17.4 at step 50), mean squared
off-diagonal correlation 0.75 / 0.68, normalised std 0.96 / 0.99 (the collapse is
dimensional, not to a point), linear 0.962 / 0.971, kNN 0.913 / 0.911. gradprobe today (the
baseline, as in issue 21): ``lambda-0.0051``: a false ``error gradient-conflict``
on_diag|off_diag (median cos -0.80 / -0.80) and ``warning static-loss-weights``;
``off-diag-0``: nothing on either seed (the collapse is missed). With a 128-wide projector
output (ranks 20 against 9.6) the healthy runs get only ``info gradient-conflict`` and the
collapse is found (``warning representation-collapse``, rank 15 of 128). CPU ~5 s a run.
"""

from __future__ import annotations

from pathlib import Path

import torch

import gradprobe

from .barlow import BarlowTwins
from .common import (augment, batches, centred_effective_rank, digits_split, knn_accuracy,
                     representation_truth)
from .harness import Expect, Family, Variant

BATCH, STEPS, EVERY, HIDDEN, DIM = 256, 300, 10, 128, 64
LAMBDA = 0.0051
RANK_EVERY = 50


def test_rank(model: BarlowTwins, x_te: torch.Tensor) -> float:
    """Centred effective rank of the projector output on the test digits (eval mode, so the
    batch-norm statistics used in training are not touched)."""
    model.eval()
    with torch.no_grad():
        z = model.projector(model.encoder(x_te)).numpy()
    model.train()
    return centred_effective_rank(z)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = BarlowTwins(HIDDEN, DIM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lam = 0.0 if variant == "off-diag-0" else LAMBDA
    probe = gradprobe.Probe(model, every=EVERY, run_file=log)
    probe.watch_latent("z", model.projector)
    ranks = []
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            on_diag, off_diag = model(augment(x_tr[idx], gen), augment(x_tr[idx], gen))
            probe.backward({"on_diag": on_diag, "off_diag": off_diag}, weights={"off_diag": lam})
            opt.step()
            opt.zero_grad()
            if (step + 1) % RANK_EVERY == 0:
                ranks.append(test_rank(model, x_te))
    truth = representation_truth(model.encoder, model.projector)
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.encoder(x_tr).numpy(), model.encoder(x_te).numpy()
    return truth | {"z_rank_min": min(ranks), "z_rank_max": max(ranks),
                    "knn_acc": knn_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy()),
                    "on_diag_end": float(on_diag.detach()), "off_diag_end": float(off_diag.detach())}


FAMILY = Family(
    name="barlow-split",
    source="Zbontar et al. 2021, eq. 1 (facebookresearch/barlowtwins main.py, lambd 0.0051)",
    train=train,
    variants=(
        Variant("lambda-0.0051", True,
                "the published loss, its two terms passed apart: the redundancy term rises from "
                "~0 at initialisation to its equilibrium by design",
                must_not=("representation-collapse", "gradient-conflict", "gradient-swamping",
                          "static-loss-weights")),
        Variant("off-diag-0", False,
                "redundancy reduction weighted 0: nothing keeps the projector's dimensions from "
                "encoding one feature (dimensional collapse)",
                expected=(Expect("representation-collapse", "z"),)),
    ),
    quick=(("off-diag-0", 1),),
)
