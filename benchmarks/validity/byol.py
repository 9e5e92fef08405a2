"""BYOL, after Grill et al. 2020 ("Bootstrap Your Own Latent", NeurIPS; deepmind-research/byol)
and its PyTorch port lucidrains/byol-pytorch.

Published setup: an online network (encoder, projector MLP fc-BN-ReLU-fc with hidden 4096
and output 256, predictor MLP of the same shape) and a target network (encoder + projector)
that is an exponential moving average of the online one; loss 2 - 2 cos(q(z1), z2') summed
over both view orders, the target's outputs carrying no gradient; LARS with base lr 0.2 x
batch/256, weight decay 1.5e-6; target decay 0.99 in lucidrains' port. The predictor is
what keeps BYOL from collapsing: without it the online network can match the slowly moving
target with a constant (the paper's ablation, section 5, and Chen & He 2021, Table 1, for the
same architecture without the moving average).

Here: the digits backbone (``common.DigitEncoder``), projector and predictor with hidden
256 and output 64, SGD with momentum 0.9 at the paper's base lr 0.2 and weight decay 1.5e-6
(LARS is not in PyTorch), decay 0.99, batch 256, 500 steps, ``common.augment`` views.
The probe: ``Probe(model, run_file=...)`` on the online network, the l2-normalised projector output
watched (docs/probe.md: watch what a cosine loss compares), the symmetrised loss passed as
one loss.

Variants (truth by construction):
- ``predictor``: healthy (the published method).
- ``no-predictor``: the online projection is compared with the target's directly. Within
  the run the outputs converge to one direction (the normalised std of the projector output
  on test digits, ``z_std``, falls to ~0.03 against ~0.9, so every pair of outputs has cosine
  ~1 and the loss is met without learning) while their spread loses dimensions (the centred
  RankMe the probe records falls to ~9 of 64 against ~21 with the predictor) and their
  linear-probe accuracy drops (``z_linear_acc`` ~0.87 against ~0.94). Expected:
  ``representation-collapse`` on ``z``. Must not: ``weak-contrastive-signal``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import DigitEncoder, augment, batches, digits_split, representation_truth
from .harness import Expect, Family, Variant

HIDDEN, DIM = 256, 64
BATCH, STEPS = 256, 500
DECAY = 0.99


def mlp(inp: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, DIM))


class Online(nn.Module):
    def __init__(self, predictor: bool):
        super().__init__()
        self.encoder = DigitEncoder()
        self.projector = mlp(self.encoder.width)
        self.predictor = mlp(DIM) if predictor else nn.Identity()

    def forward(self, x):
        z = self.projector(self.encoder(x))
        return self.predictor(z), z


def byol_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, target.detach(), dim=1)).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, _, _ = digits_split()
    online = Online(predictor=variant == "predictor")
    target = nn.Sequential(copy.deepcopy(online.encoder), copy.deepcopy(online.projector))
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(online.parameters(), lr=0.2, momentum=0.9, weight_decay=1.5e-6)
    probe = gradprobe.Probe(online, run_file=log)
    probe.watch_latent("z")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            v1, v2 = augment(x_tr[idx], gen), augment(x_tr[idx], gen)
            with torch.no_grad():
                t1, t2 = target(v1), target(v2)
            (p1, z1), (p2, _) = online(v1), online(v2)
            probe.observe(z=F.normalize(z1, dim=1))  # what the cosine loss compares
            probe.backward({"byol": byol_loss(p1, t2) + byol_loss(p2, t1)})
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # exponential moving average of the online weights
                src = [*online.encoder.parameters(), *online.projector.parameters()]
                for t, o in zip(target.parameters(), src):
                    t.mul_(DECAY).add_(o, alpha=1 - DECAY)
                src_buffers = [*online.encoder.buffers(), *online.projector.buffers()]
                for t, o in zip(target.buffers(), src_buffers):
                    t.copy_(o)
    return representation_truth(online.encoder, online.projector)


FAMILY = Family(
    name="byol",
    source="Grill et al. 2020 (deepmind-research/byol); lucidrains/byol-pytorch",
    train=train,
    variants=(
        Variant("predictor", True, "the published method (predictor + moving-average target)",
                must_not=("representation-collapse",)),
        Variant("no-predictor", False,
                "no predictor: the online network can match the slowly moving target with a "
                "constant, the collapse BYOL's ablation reports",
                expected=(Expect("representation-collapse", "z"),),
                must_not=("weak-contrastive-signal",)),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("no-predictor", 1),),
)
