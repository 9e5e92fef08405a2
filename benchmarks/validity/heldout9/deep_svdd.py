"""Deep SVDD, after Ruff, Vandermeulen, Goernitz, Deecke, Siddiqui, Binder, Mueller & Kloft
2018 ("Deep One-Class Classification", ICML; sec. 3.1 eq. 3-4: the one-class objective
min_W 1/n sum_i ||phi(x_i; W) - c||^2 + lambda/2 sum_l ||W^l||_F^2; sec. 3.3 Propositions
1-3: c = 0, bias terms or bounded activations admit the trivial solution phi = c, the
"hypersphere collapse") and the official code lukasruff/Deep-SVDD-PyTorch (read:
src/optim/deepSVDD_trainer.py ``init_center_c`` and the training loop).

Published (the code): bias-free networks (``bias=False`` on every layer, batch norm
without affine terms), c fixed before training as the mean of the network's outputs on the
training set in an initial forward pass, with coordinates closer than eps = 0.1 to 0 pushed
to +-eps (a zero coordinate of c is trivially reached by zero weights); loss
mean ||phi(x) - c||^2; Adam lr 1e-3 (1e-4 for the fine-tuning), weight decay 1e-6 on all
weights; anomaly score ||phi(x) - c||^2; one MNIST digit as the normal class, the other
nine as anomalies, test AUC. The code pretrains the network as an autoencoder's encoder.

Here (CPU): scikit-learn's 8x8 digits (common.digits_split), digit 0 as the normal class
(train rows of class 0 only), test AUC of the score on the whole test split (0 normal, 1-9
anomalous); an MLP 64-64-32-16 with leaky ReLU (the code's activation), no autoencoder
pretraining (the published init is kept: the random network's forward pass gives c);
Adam lr 1e-3, batch 32, 1500 steps. The weight decay is passed as its own loss, as eq. 4
writes it: losses ``svdd`` (mean squared distance to c) and ``weight_decay``
(0.5 sum ||W||_F^2, bias terms excluded) with the weight lambda. The 16-dim output is
watched as the latent ``feature``.

Variants (truth by construction):
- ``bias-free``: healthy, as published (no bias terms, c from the initial forward pass,
  lambda = 1e-6).
- ``bias-strong-decay``: broken. Every layer has a bias term (c computed the same way) and
  lambda = 1e-2: by Proposition 2 the last layer's bias can equal c while the weights go to
  0, and the strong decay drives them there: phi(x) = c for every input, hypersphere
  collapse, the score is constant. Bias terms alone (lambda 1e-6) did not collapse in 600
  or 1500 steps here (AUC 0.999 / 0.987, seed 0: the spread shrinks to 0.003 / 0.002 of
  |c|^2 but AUC is scale-free), so the decay is part of the construction; the control,
  bias-free at lambda 1e-2, keeps AUC 0.92 / 0.91 (seeds 0 / 1; its features end in one
  direction, rank 1.0, spread 0.018 / 0.019 of |c|^2): the bias is what lets it collapse.
Measured on the test split, independently of gradprobe (seeds 0 / 1): test AUC, centred
effective rank of the test features (numpy SVD), their total variance over |c|^2:
  bias-free:         AUC 0.962 / 0.897, rank 5.9 / 7.0 of 16, spread 0.049 / 0.023;
  bias-strong-decay: AUC 0.500 / 0.500, rank 0.0 / 0.0, spread 0.0 / 0.0 (every test
                     feature equals c to float precision).
CPU ~3-4 s a run (one thread, shared machine).
Expected on ``bias-strong-decay``: ``representation-collapse`` on ``feature`` (every output
goes to c).
Must not (both): ``inert-loss`` (both losses reach every weight), ``gradient-conflict``
(weight decay opposing the data term is the regulariser's job); on the healthy variant also
``representation-collapse``, ``gradient-swamping``, ``static-loss-weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, EPS = 1500, 32, 1e-3, 0.1
WEIGHT_DECAY = {"bias-free": 1e-6, "bias-strong-decay": 1e-2}
NORMAL_CLASS = 0


def network(bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64, bias=bias), nn.LeakyReLU(),
                         nn.Linear(64, 32, bias=bias), nn.LeakyReLU(),
                         nn.Linear(32, 16, bias=bias))


def init_center_c(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The code's ``init_center_c``: mean output of an initial forward pass, coordinates near
    0 pushed to +-eps so that zero weights cannot reach them."""
    with torch.no_grad():
        c = net(x).mean(0)
    c[(c.abs() < EPS) & (c < 0)] = -EPS
    c[(c.abs() < EPS) & (c >= 0)] = EPS
    return c


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    normal = x_tr[y_tr == NORMAL_CLASS]
    net = network(bias=variant == "bias-strong-decay")
    c = init_center_c(net, normal)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]
    probe = gradprobe.Probe(net, run_file=log)
    probe.watch_latent("feature")
    order = batches(len(normal), BATCH, gen)
    with probe:
        for _ in range(STEPS):
            feature = net(normal[next(order)])
            probe.observe(feature=feature)
            losses = {"svdd": (feature - c).pow(2).sum(1).mean(),
                      "weight_decay": 0.5 * sum(w.pow(2).sum() for w in weights)}
            probe.backward(losses, weights={"weight_decay": WEIGHT_DECAY[variant]})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        feature = net(x_te)
        score = (feature - c).pow(2).sum(1).numpy()
    z = feature.numpy().astype(np.float64)
    spread = float(((z - z.mean(0)) ** 2).sum(1).mean())
    return {"test_auc": float(roc_auc_score((y_te != NORMAL_CLASS).numpy(), score)),
            "feature_rank": centred_effective_rank(z),
            "spread_over_c2": spread / float(c.pow(2).sum())}


_MUST_NOT = ("inert-loss", "gradient-conflict")

FAMILY = Family(
    name="deep-svdd",
    source="Ruff et al. 2018 (Deep One-Class Classification, ICML, eq. 3-4, sec. 3.3); "
           "lukasruff/Deep-SVDD-PyTorch src/optim/deepSVDD_trainer.py",
    train=train,
    variants=(
        Variant("bias-free", True,
                "bias-free network, c from an initial forward pass: the features keep "
                "their spread around c and anomalies score far from it",
                must_not=_MUST_NOT + ("representation-collapse", "gradient-swamping",
                                      "static-loss-weights")),
        Variant("bias-strong-decay", False,
                "bias terms on every layer and weight decay 1e-2: the last bias takes the value "
                "c while the weights decay to 0, every feature maps to c (hypersphere collapse)",
                expected=(Expect("representation-collapse", "feature"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("bias-free", 0), ("bias-strong-decay", 0)),
)
