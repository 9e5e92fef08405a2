"""Barlow Twins, after facebookresearch/barlowtwins (main.py) and Zbontar, Jing, Misra, LeCun &
Deny 2021 ("Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML).

Published setup: encoder + projector (3 linear layers of 8192, BN and ReLU between, no bias
on the last), embeddings batch-normalised without affine, the cross-correlation matrix
c = bn(z1)^T bn(z2) / N, loss = sum_i (1 - c_ii)^2 (invariance) + lambda sum_{i != j} c_ij^2
(redundancy reduction), lambda = 0.0051 (5e-3 in the paper); LARS, batch 2048.

Here: the digits backbone (``common.DigitEncoder``), projector 128-128-128-128 (CPU budget), the same
loss with its two terms passed to the probe as two losses (``invariance`` and
``redundancy``, weight lambda), Adam lr 1e-3, batch 256, 400 steps, ``common.augment`` views;
the projector output is watched.

Variants (truth by construction):
- ``lambda-0.0051``: healthy (the published loss).
- ``lambda-0``: the redundancy-reduction term switched off. The invariance term alone is
  minimised when every embedding dimension is the same augmentation-invariant feature: what
  prevents dimensional collapse is the off-diagonal term (paper, section 2 and the loss
  ablation, Table 4). Checked by the centred effective rank of the projector output on test
  digits. Expected: ``representation-collapse`` on ``z``.
Must not: ``gradient-swamping`` and ``gradient-conflict`` on the healthy variant (the
published weight 0.0051 is small by design: the redundancy term sums d(d-1) squares).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradprobe

from .common import DigitEncoder, augment, batches, digits_split, representation_truth
from .harness import Expect, Family, Variant

BATCH, STEPS, DIM = 256, 400, 128


def projector(*widths: int) -> nn.Sequential:
    """Barlow Twins' projector through ``widths`` (input first): bias-free linear layers with
    batch norm and ReLU between them, none after the last."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers[:-2])


def cross_correlation_terms(bn: nn.BatchNorm1d, z1: torch.Tensor, z2: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's two terms on the cross-correlation c = bn(z1)^T bn(z2) / N:
    sum_i (1 - c_ii)^2 (invariance) and sum_{i != j} c_ij^2 (redundancy, unweighted)."""
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag, off_diag


class BarlowTwins(nn.Module):
    """The digits backbone, a projector through ``widths`` (after the backbone's) and the
    embeddings' affine-free batch norm; ``forward`` returns the loss's two terms."""

    def __init__(self, *widths: int):
        super().__init__()
        self.encoder = DigitEncoder()
        self.projector = projector(self.encoder.width, *widths)
        self.bn = nn.BatchNorm1d(widths[-1], affine=False)

    def forward(self, x1, x2):
        return cross_correlation_terms(self.bn, self.projector(self.encoder(x1)),
                                       self.projector(self.encoder(x2)))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, _, _ = digits_split()
    model = BarlowTwins(DIM, DIM, DIM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lam = 0.0 if variant == "lambda-0" else 0.0051
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z", model.projector)
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            on_diag, off_diag = model(augment(x_tr[idx], gen), augment(x_tr[idx], gen))
            probe.backward({"invariance": on_diag, "redundancy": off_diag}, weights={"redundancy": lam})
            opt.step()
            opt.zero_grad()
    return representation_truth(model.encoder, model.projector)


FAMILY = Family(
    name="barlow-twins",
    source="facebookresearch/barlowtwins (main.py); Zbontar et al. 2021",
    train=train,
    variants=(
        Variant("lambda-0.0051", True, "the published loss",
                must_not=("representation-collapse", "gradient-swamping", "gradient-conflict")),
        Variant("lambda-0", False,
                "redundancy reduction off: nothing keeps the embedding dimensions from encoding "
                "one feature (dimensional collapse)",
                expected=(Expect("representation-collapse", "z"),)),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("lambda-0", 1),),
)
