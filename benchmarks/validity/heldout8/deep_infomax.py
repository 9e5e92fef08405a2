"""Deep InfoMax, after Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler &
Bengio 2019 ("Learning Deep Representations by Mutual Information Estimation and
Maximization", ICLR, sec. 3, eq. 8: alpha times the global MI, beta times the local MI
averaged over the M x M locations of a feature map, and gamma times an adversarial prior
matching), the official code rdevon/DIM read here: ``cortex_DIM/models/dim.py``
(``GlobalDIM``, ``LocalDIM``: each adds ``scale * loss`` to the encoder's loss, the scale
"called alpha" / "beta" in the paper), ``cortex_DIM/functions/dim_losses.py``
(``fenchel_dual_loss``, measure JSD) and ``cortex_DIM/models/prior_matching.py``
(``PriorMatching``: a sigmoid on the encoder output, a uniform prior, a discriminator trained
on the detached output, the encoder trained on the non-saturating generator loss times the
scale "called gamma").

Published setup: a DCGAN/AlexNet-like conv encoder gives a local feature map C (M x M
locations) and a global vector Y; local DIM scores Y against C at every location through 1x1
conv MI networks (``MI1x1ConvNet``), global DIM scores Y against C through the rest of the
encoder's layers copied; the JSD estimator E_neg - E_pos with E_pos = -softplus(-u) on the
matching pairs of the batch and E_neg = softplus(-u) + u on the other pairs, u a dot product;
prior matching of sigmoid(Y) to U[0, 1]^d with a 1000-200 unit discriminator; Adam, lr 1e-4,
batch 64 (the plugins' defaults). gamma is small next to the MI terms (0.1 in the paper's
local setting, sec. 4, as recalled: the paper was not re-read in this session).

Here: scikit-learn's 8x8 digits; encoder conv 3x3 x32 -> conv 4x4 stride 2 x64 (C: 4x4
locations of 64 channels) -> MLP 1024-256-64 (Y, 64 units); MI units 64; discriminator
64-256-64-1; Adam lr 1e-3 (a shorter run) for 600 steps of batch 64; alpha = 0.5, beta = 1,
gamma = 0.1 (eq. 8 with both MI terms on). Losses passed as ``global_dim``, ``local_dim`` and
``prior_matching`` (the code's plugin names) weighted alpha, beta, gamma; the discriminator is
trained apart on its own loss, outside the probed model, as the code trains it; Y watched as
latent ``Y``.

Variants (truth by construction):
- ``published``: healthy: alpha 0.5, beta 1, gamma 0.1.
- ``prior-gamma-huge``: broken. gamma = 100: the prior-matching term drowns both MI terms on
  the encoder and the encoder, chasing the discriminator, collapses Y to nearly one point
  (the GAN's mode collapse) instead of keeping the input's information.
Measured on the test split, independently of gradprobe (seeds 0 / 1): accuracy of a
logistic-regression probe and of a 20-NN cosine vote on Y (``common``), the centred effective
rank of Y (of 64), the mean per-unit std of Y, and the median ratio of the weighted encoder
gradient norms of each MI term over the prior term's (``common.trunk_grad_ratio`` by autograd
on the encoder, every 20 steps):
  published:        linear 0.907 / 0.931, kNN 0.847 / 0.904, rank 11.4 / 12.5, std 0.96 /
                    0.95, local_dim / prior 2.9 / 2.1, global_dim / prior 2.1 / 1.9;
  prior-gamma-huge: linear 0.549 / 0.762, kNN 0.344 / 0.482, rank 4.3 / 5.5, std 0.0014 /
                    0.015, local_dim / prior 0.0005 / 0.0004, global_dim / prior 0.0002 /
                    0.0006.
For the reader: an untrained encoder (every weight 0, measured once, seed 1) gives linear
0.969, kNN 0.947, rank 44 on these easy digits; the published DIM trades some of that for a
12-dimensional code, and the harm of the broken variant is measured against the published
run, not against random features.
Expected on ``prior-gamma-huge``: ``representation-collapse`` on ``Y`` (spread down 60-700x,
centred rank 11-12 -> 4-5), ``gradient-swamping`` on ``local_dim`` and on ``global_dim`` (each
~0.05% of the prior term's weighted gradient on the encoder, measured through the run) and
``static-loss-weights`` on ``local_dim`` and ``global_dim`` (the fixed gamma = 100 is the
cause). Allowed there: ``gradient-conflict`` on ``global_dim|prior_matching`` and
``local_dim|prior_matching``. Must not (both): ``inert-loss``, ``non-finite``; on the
healthy variant also ``representation-collapse``, ``gradient-swamping``,
``static-loss-weights`` and ``gradient-conflict``. 16-19 CPU-seconds a run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (batches, centred_effective_rank, digits_split, knn_accuracy,
                      linear_probe_accuracy, trunk_grad_ratio)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, MI_UNITS, GLOBAL_UNITS = 600, 64, 1e-3, 64, 64
RATIO_EVERY = 20  # steps between the independent gradient-ratio measurements
# (alpha, beta, gamma): the weights of global MI, local MI and prior matching of eq. 8
SETTINGS = {"published": (0.5, 1.0, 0.1), "prior-gamma-huge": (0.5, 1.0, 100.0)}


class Encoder(nn.Module):
    """A conv encoder on 8x8 digits: a 4x4 local feature map C (64 channels) and a global
    vector Y computed from it (the DCGAN-like encoder of the code, scaled down)."""

    def __init__(self):
        super().__init__()
        self.local = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU())
        self.to_global = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(),
                                       nn.Linear(256, GLOBAL_UNITS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.local(x.view(-1, 1, 8, 8))
        return c, self.to_global(c)


class MI1x1ConvNet(nn.Module):
    """The code's ``MI1x1ConvNet``: two 1x1 convolutions with a linear 1x1 shortcut."""

    def __init__(self, n_in: int, n_units: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(n_in, n_units, 1), nn.ReLU(),
                                   nn.Conv2d(n_units, n_units, 1))
        self.shortcut = nn.Conv2d(n_in, n_units, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class DeepInfoMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.local_net = MI1x1ConvNet(64, MI_UNITS)  # LocalDIM: C at each location
        self.global_net = MI1x1ConvNet(GLOBAL_UNITS, MI_UNITS)  # LocalDIM: Y as a 1x1 map
        # GlobalDIM: the rest of the encoder's layers, copied, on C (Y needs none: NopNet)
        self.global_local_net = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(),
                                              nn.Linear(256, GLOBAL_UNITS))


def fenchel_dual_jsd(l: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The code's ``fenchel_dual_loss`` with measure JSD: l (N, units, locations) and g
    (N, units) scored by dot product; E_pos = -softplus(-u) on the matching pairs, E_neg =
    softplus(-u) + u on the others, averaged over locations; loss E_neg - E_pos."""
    n, units, locations = l.shape
    u = (g @ l.permute(0, 2, 1).reshape(-1, units).t()).reshape(n, n, locations)
    mask = torch.eye(n)
    e_pos = (-F.softplus(-u)).mean(2)
    e_neg = (F.softplus(-u) + u).mean(2)
    return ((e_neg * (1 - mask)).sum() / (1 - mask).sum()
            - (e_pos * mask).sum() / mask.sum())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    alpha, beta, gamma = SETTINGS[variant]
    x_tr, y_tr, x_te, y_te = digits_split()
    model = DeepInfoMax()
    discriminator = nn.Sequential(nn.Linear(GLOBAL_UNITS, 256), nn.ReLU(), nn.Linear(256, 64),
                                  nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    ratios = {"local_dim": [], "global_dim": []}  # weighted encoder gradient norm / prior's
    shared = SimpleNamespace(trunk=model.encoder)  # the layers all three losses reach
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("Y")
    with probe:
        for step in range(STEPS):
            x = x_tr[next(order)]
            c, y = model.encoder(x)
            probe.observe(Y=y)
            l_local = model.local_net(c).flatten(2)
            g_local = model.global_net(y[:, :, None, None]).flatten(1)
            l_global = model.global_local_net(c)[:, :, None]
            z_q = torch.sigmoid(y)  # the code's nonlinearity before a uniform prior
            losses = {"global_dim": fenchel_dual_jsd(l_global, y),
                      "local_dim": fenchel_dual_jsd(l_local, g_local),
                      "prior_matching": F.softplus(-discriminator(z_q)).mean()}  # non-saturating
            weights = {"global_dim": alpha, "local_dim": beta, "prior_matching": gamma}
            if step % RATIO_EVERY == 0:
                for name, values in ratios.items():
                    values.append(trunk_grad_ratio(shared, losses, weights, name, "prior_matching"))
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
            z_p = torch.rand(z_q.shape, generator=gen)
            d_loss = (F.softplus(-discriminator(z_p))
                      + F.softplus(discriminator(z_q.detach()))).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
    model.eval()
    with torch.no_grad():
        y_train, y_test = model.encoder(x_tr)[1].numpy(), model.encoder(x_te)[1].numpy()
    labels_tr, labels_te = y_tr.numpy(), y_te.numpy()
    return {"linear_acc": linear_probe_accuracy(y_train, labels_tr, y_test, labels_te),
            "knn_acc": knn_accuracy(y_train, labels_tr, y_test, labels_te),
            "y_rank": centred_effective_rank(y_test), "y_dim": GLOBAL_UNITS,
            "y_std": float(y_test.std(0).mean()),
            **{f"median_{name}_over_prior_grad": float(np.median(values))
               for name, values in ratios.items()}}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="deep-infomax",
    source="Hjelm et al. 2019 (Deep InfoMax, ICLR, sec. 3, eq. 8); rdevon/DIM cortex_DIM/models/"
           "dim.py, functions/dim_losses.py fenchel_dual_loss, models/prior_matching.py",
    train=train,
    variants=(
        Variant("published", True,
                "global and local JSD MI (alpha 0.5, beta 1) with a light prior matching "
                "(gamma 0.1): Y keeps the digits' information",
                must_not=_MUST_NOT + ("representation-collapse", "gradient-swamping",
                                      "static-loss-weights", "gradient-conflict")),
        Variant("prior-gamma-huge", False,
                "prior matching weighted gamma 100: it drowns both MI terms on the encoder and "
                "Y collapses to nearly one point (probe and kNN accuracy fall)",
                expected=(Expect("representation-collapse", "Y"),
                          Expect("gradient-swamping", "local_dim"),
                          Expect("gradient-swamping", "global_dim"),
                          Expect("static-loss-weights", "local_dim"),
                          Expect("static-loss-weights", "global_dim")),
                allowed=(Expect("gradient-conflict", "global_dim|prior_matching"),
                         Expect("gradient-conflict", "local_dim|prior_matching")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("prior-gamma-huge", 0)),
)
