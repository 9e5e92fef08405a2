"""A sigmoid output layer trained with the quadratic cost on its probabilities, after Nielsen,
"Neural Networks and Deep Learning", chapter 3 ("The cross-entropy cost function";
mnielsen/neural-networks-and-deep-learning, src/network2.py) and Golik, Doetsch & Ney 2013
("Cross-entropy vs. squared error training", Interspeech).

Published setup (network2.py): a sigmoid MLP 784-30-10 on MNIST with one-hot targets, SGD
with mini-batches of 10, L2 regularisation (lambda / 2n) sum w^2 with lambda = 5; the
quadratic cost with eta = 3.0 (network.py) or the cross-entropy cost with eta = 0.5. With
the quadratic cost the output's error signal is (a - y) sigma'(z): an output saturated on the
wrong side (a ~ 1, y = 0) learns slowly; cross-entropy's (a - y) does not have the factor.

Here: 64-30-10 on scikit-learn's digits in [0, 1], the output layer initialised too large
(std 5, so most outputs start saturated, half of them on the wrong side), 2,000 steps (15
epochs). Losses: ``cost`` (quadratic or cross-entropy) and ``l2`` (lambda = 5, n = the
training set size), passed to the probe as two losses; the output layer's logits are
observed by a saturation watch ``output`` with the one-hot targets, as docs/probe.md tells
users of functional ``torch.sigmoid``.

Variants (truth by construction):
- ``cross-entropy``: healthy although saturated at first: the error signal a - y pulls wrong
  saturated outputs back (eta 0.5).
- ``quadratic-small-init``: healthy: quadratic cost (eta 3.0) with the output layer at
  Nielsen's improved init (std 1/sqrt(n_in)): outputs do not saturate wrongly.
- ``quadratic``: broken: quadratic cost (eta 3.0) with the large init: saturated wrong outputs
  pass a vanishing gradient and stay wrong. Checked by ``saturated_wrong`` (share of test
  outputs beyond |z| > 4.6 and more than 0.5 from the target) and the test accuracy.
  Expected: ``sigmoid-saturation`` on ``output``.
Must not (all variants): ``gradient-swamping``, ``gradient-conflict`` (the L2 term opposes
the cost by design).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split
from .harness import Expect, Family, Variant

STEPS, BATCH = 2000, 10
# network2.py: lambda = 5 for n = 50,000 images; the same weight decay per step, eta lambda / n,
# on our n = 1,347 training digits
LAMBDA = 5.0 * 1347 / 50_000
SATURATION = 4.6


class Network(nn.Module):
    def __init__(self, output_std: float):
        super().__init__()
        self.hidden, self.output = nn.Linear(64, 30), nn.Linear(30, 10)
        for layer, std in ((self.hidden, 1 / math.sqrt(64)), (self.output, output_std)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.normal_(layer.bias, std=1.0)

    def forward(self, x):
        return self.output(torch.sigmoid(self.hidden(x)))


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Network(output_std=1 / math.sqrt(30) if variant == "quadratic-small-init" else 5.0)
    quadratic = variant != "cross-entropy"
    opt = torch.optim.SGD(model.parameters(), lr=3.0 if quadratic else 0.5)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_saturation("output", target="onehot")
    l2_scale = LAMBDA / (2 * len(x_tr))
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            target = F.one_hot(y_tr[idx], 10).float()
            logits = model(x_tr[idx])
            probe.observe(output=logits, onehot=target)
            # network2.py's costs: summed over outputs, averaged over the mini-batch
            cost = 0.5 * (torch.sigmoid(logits) - target).pow(2).sum(1).mean() if quadratic else \
                F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()
            l2 = model.hidden.weight.pow(2).sum() + model.output.weight.pow(2).sum()
            probe.backward({"cost": cost, "l2": l2}, weights={"l2": l2_scale})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        logits = model(x_te)
    out, target = torch.sigmoid(logits), F.one_hot(y_te, 10).float()
    saturated = logits.abs() > SATURATION
    return {"test_acc": float((logits.argmax(1) == y_te).float().mean()),
            "saturated": float(saturated.float().mean()),
            "saturated_wrong": float((saturated & ((out - target).abs() > 0.5)).float().mean())}


_MUST_NOT = ("gradient-swamping", "gradient-conflict")

FAMILY = Family(
    name="sigmoid-mse",
    source="Nielsen, Neural Networks and Deep Learning ch. 3 (mnielsen/neural-networks-and-"
           "deep-learning src/network2.py); Golik et al. 2013",
    train=train,
    variants=(
        Variant("cross-entropy", True, "cross-entropy's error signal a - y undoes the saturated "
                "start", must_not=_MUST_NOT + ("sigmoid-saturation",)),
        Variant("quadratic-small-init", True, "quadratic cost without saturated outputs",
                must_not=_MUST_NOT + ("sigmoid-saturation",)),
        Variant("quadratic", False,
                "quadratic cost on saturated outputs: the error signal (a - y) sigma'(z) vanishes "
                "on outputs saturated on the wrong side, which stay wrong",
                expected=(Expect("sigmoid-saturation", "output"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("cross-entropy", 1), ("quadratic", 1)),
)
