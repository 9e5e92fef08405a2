"""SimSiam, after facebookresearch/simsiam (simsiam/builder.py, main_simsiam.py) and Chen & He
2021 ("Exploring Simple Siamese Representation Learning", CVPR).

Published setup: an encoder (ResNet) whose fc is a 3-layer projection MLP (fc-BN-ReLU,
fc-BN-ReLU, fc-BN without affine; output dim 2048), a 2-layer bottleneck predictor (fc
2048->512, BN, ReLU, fc 512->2048), the symmetrised negative cosine
D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2, SGD lr 0.05 x batch/256, momentum 0.9, weight
decay 1e-4, cosine decay of the encoder's lr, fixed predictor lr. Without the stop-gradient
the outputs collapse to a constant at once (paper, Fig. 2: loss -1, std of the l2-normalised
output 0, accuracy 0.1%).

Here: a two-layer MLP backbone on the 8x8 digits (width 128), the same projector (dim 64)
and predictor (bottleneck 16 = dim/4, the published ratio), the same loss and optimiser,
batch 256, 500 steps, views from ``common.augment``. The probe is attached as the docs
tell a user: ``Probe(model, run_file=...)``, the one loss passed to ``probe.backward``, and the
l2-normalised projector output watched as a latent (docs/probe.md: watch what a cosine loss
compares).

Variants (truth by construction):
- ``stop-grad``: healthy (the published method).
- ``no-stop-grad``: the target branch not detached; the loss is minimised by a constant
  output, and the paper shows that it collapses. Checked here by the centred rank and the
  normalised std of the projector output on test digits (``z_rank``, ``z_std``).
  Expected: ``representation-collapse`` on ``z``. Must not: ``weak-contrastive-signal``
  (there are no negatives).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import DigitEncoder, augment, batches, digits_split, representation_truth
from .harness import Expect, Family, Variant

DIM, PRED_DIM = 64, 16
BATCH, STEPS = 256, 500
BASE_LR = 0.05 * BATCH / 256


class SimSiam(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        w = self.encoder.width
        self.projector = nn.Sequential(
            nn.Linear(w, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Linear(w, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Linear(w, DIM, bias=False), nn.BatchNorm1d(DIM, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(DIM, PRED_DIM, bias=False), nn.BatchNorm1d(PRED_DIM), nn.ReLU(),
            nn.Linear(PRED_DIM, DIM))

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, _, _ = digits_split()
    model = SimSiam()
    opt = torch.optim.SGD([{"params": [*model.encoder.parameters(), *model.projector.parameters()],
                            "fix_lr": False},
                           {"params": model.predictor.parameters(), "fix_lr": True}],
                          lr=BASE_LR, momentum=0.9, weight_decay=1e-4)
    stop_grad = variant == "stop-grad"
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            for group in opt.param_groups:  # cosine decay of the encoder's lr
                group["lr"] = BASE_LR if group["fix_lr"] else \
                    BASE_LR * 0.5 * (1 + math.cos(math.pi * step / STEPS))
            p1, p2, z1, z2 = model(augment(x_tr[idx], gen), augment(x_tr[idx], gen))
            probe.observe(z=F.normalize(z1, dim=1))  # what the cosine loss compares
            if stop_grad:
                z1, z2 = z1.detach(), z2.detach()
            loss = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
            probe.backward({"simsiam": loss})
            opt.step()
            opt.zero_grad()
    return representation_truth(model.encoder, model.projector)


FAMILY = Family(
    name="simsiam",
    source="facebookresearch/simsiam (builder.py, main_simsiam.py); Chen & He 2021",
    train=train,
    variants=(
        Variant("stop-grad", True, "the published method (stop-gradient on the target branch)",
                must_not=("representation-collapse",)),
        Variant("no-stop-grad", False,
                "no stop-gradient: a constant output minimises the loss; Chen & He 2021 "
                "(Fig. 2) show the collapse",
                expected=(Expect("representation-collapse", "z"),),
                must_not=("weak-contrastive-signal",)),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("stop-grad", 1), ("no-stop-grad", 1)),
)
