"""CCA-SSG, after Zhang, Wu, Yan, Wipf & Yu 2021 ("From Canonical Correlation Analysis to
Self-supervised Graph Neural Networks", NeurIPS; hengruizhang98/CCA-SSG, main.py).

Published objective (eq. 6): two augmented views A, B through one encoder, each output
column standardised over the batch, Z~ = (Z - mean) / (std sqrt(N)); then
L = ||Z~_A - Z~_B||_F^2 + lambda (||Z~_A^T Z~_A - I||_F^2 + ||Z~_B^T Z~_B - I||_F^2):
an invariance term and a decorrelation term, lambda = 1e-3 (Cora; 5e-4 to 1e-3 across the
paper's node-classification sets), Adam lr 1e-3, embedding 512, no projector (the
encoder's output is both trained and evaluated). The two terms sit at an equilibrium by
design: the invariance term would make every dimension the same invariant feature, the
decorrelation term keeps the dimensions apart.

Here: graphs replaced by scikit-learn's digits with the corpus's image augmentations
(``common.augment``: shift, intensity scale, erased patch, noise) in place of feature
masking and edge dropping; the two-layer GCN by a two-layer MLP 64-256-ReLU-256 (last layer
linear, as the GCN's); embedding 256 (512 in the paper; at 128 the decorrelation term is too
weak at lambda 1e-3 to keep the healthy run's rank above 8); batch 256; Adam lr 1e-3;
800 steps. The two terms are
passed to the probe as two losses, ``invariance`` and ``decorrelation`` with weight lambda,
and the standardised embedding of view A (what the loss compares) is watched as the latent
``z``.

Truth, measured without gradprobe on the test split: the centred effective rank of the
standardised embedding (``z_rank``, of 256: the correlation structure the decorrelation term
acts on) at the end and at initialisation (``z_rank_init``), and of the raw one
(``raw_rank``), the normalised std of the standardised
embedding (``z_std``, ``common.normalised_std``), a 5-nearest-neighbour and a linear-probe
accuracy of the embedding.

Variants (truth by construction):
- ``published``: healthy, lambda = 1e-3. Measured, seeds 0 / 1: z_rank 8.7 / 8.1 (90.1 /
  91.9 at initialisation), z_std 0.994 / 0.993, knn_acc 0.749 / 0.771, linear_acc 0.916 /
  0.918. The rank falls ~10-fold on the healthy run too: at lambda 1e-3 and 256 dimensions
  the equilibrium keeps ~8 effective directions, so this family's truth separates the
  variants against each other, not against the run's own start.
- ``no-decorrelation``: lambda = 0 (the paper's ablation "w/o L_dec", Table 4), the term
  still computed and passed with weight 0. Nothing keeps the standardised dimensions apart:
  they all turn to the same invariant feature (dimensional collapse; the per-dimension
  standardisation rules out a collapse to one point). Measured, seeds 0 / 1: z_rank 4.1 /
  3.6 (half the healthy run's; 1.6% of the 256 dimensions), z_std 0.998 / 0.999, knn_acc
  0.771 / 0.802 (no lower than healthy), linear_acc 0.867 / 0.871 (5 points below).
  Expected: ``representation-collapse`` on ``z``. Must not: ``gradient-swamping``,
  ``static-loss-weights`` (a weight of 0 is switched off, not static).
Must not (healthy): ``gradient-conflict``, ``gradient-swamping``, ``static-loss-weights``,
``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradprobe

from ..common import (augment, batches, centred_effective_rank, digits_split, knn_accuracy,
                      linear_probe_accuracy, normalised_std)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 800, 256, 1e-3
HIDDEN, DIM = 256, 256
LAMBDA = 1e-3


def standardised(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / (z.std(0) * z.shape[0] ** 0.5)


def cca_ssg_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> dict[str, torch.Tensor]:
    a, b = standardised(z_a), standardised(z_b)
    eye = torch.eye(a.shape[1])
    return {"invariance": (a - b).pow(2).sum(),
            "decorrelation": (a.T @ a - eye).pow(2).sum() + (b.T @ b - eye).pow(2).sum()}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))
    opt = torch.optim.Adam(encoder.parameters(), lr=LR)
    lam = LAMBDA if variant == "published" else 0.0
    with torch.no_grad():
        rank_at_init = centred_effective_rank(standardised(encoder(x_te)).numpy())
    probe = gradprobe.Probe(encoder, run_file=log)
    probe.watch_latent("z")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            z_a, z_b = encoder(augment(x_tr[idx], gen)), encoder(augment(x_tr[idx], gen))
            probe.observe(z=standardised(z_a))
            probe.backward(cca_ssg_terms(z_a, z_b), weights={"decorrelation": lam})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        f_tr, f_te = encoder(x_tr).numpy(), encoder(x_te).numpy()
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    z_te = (f_te - f_te.mean(0)) / (f_te.std(0) + 1e-8)
    return {"z_rank_init": rank_at_init, "z_rank": centred_effective_rank(z_te),
            "raw_rank": centred_effective_rank(f_te),
            "z_std": normalised_std(z_te),
            "knn_acc": knn_accuracy(f_tr, y_tr, f_te, y_te, k=5),
            "linear_acc": linear_probe_accuracy(f_tr, y_tr, f_te, y_te)}


FAMILY = Family(
    name="cca-ssg",
    source="Zhang et al. 2021, CCA-SSG (NeurIPS), eq. 6; hengruizhang98/CCA-SSG",
    train=train,
    variants=(
        Variant("published", True, "invariance and decorrelation (lambda 1e-3) at their "
                "designed equilibrium",
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights",
                          "representation-collapse")),
        Variant("no-decorrelation", False,
                "lambda = 0: nothing keeps the standardised dimensions apart, they all become "
                "the same invariant feature (dimensional collapse)",
                expected=(Expect("representation-collapse", "z"),),
                must_not=("gradient-swamping", "static-loss-weights")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("no-decorrelation", 1)),
)
