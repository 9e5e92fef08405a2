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
- ``naive-cross-entropy``: broken: the ``cross-entropy`` variant with the cost written as
  network2.py's ``CrossEntropyCost.fn`` without its ``np.nan_to_num``,
  -(y log a + (1 - y) log(1 - a)) on the probabilities. Nielsen's code comment gives the
  failure: an output saturated to exactly 1.0 in floating point (|z| > ~17 in float32,
  frequent with the large init) makes (1 - y) log(1 - a) NaN or +inf; here autograd then
  passes NaN to every parameter, which stays NaN. Measured: the first step whose cost is not
  finite, the parameter tensors holding NaN at the end, and the test accuracy. Expected:
  ``non-finite`` on ``cost`` (the L2 term and the watched logits, computed from the NaN
  weights, follow from step 1: allowed).
- ``train-27-images``: broken: Nielsen's overfitting experiment of chapter 3 ("Overfitting
  and regularization": ``CrossEntropyCost``, ``large_weight_initializer``, the first 1,000 of
  the 50,000 training images, mini-batches of 10, eta 0.5, no regularisation, the test cost
  monitored): here the first 27 training digits (the same 2%), every weight and bias drawn
  from N(0, 1), 4,000 steps, the cost alone. The test cost is logged every 100 steps
  (``probe.log(val_cost=...)``, on the 450 test digits). As in the book's figure, the test
  cost falls for a few hundred steps and then rises for the rest of the run while the
  training cost keeps falling. Measured: the test cost's minimum, its last value and the
  rise, the training cost at the validation minimum and at the end, and the test accuracy.
  Expected: ``overfitting`` on ``val_cost``.
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
# train-27-images: Nielsen's 1,000 of 50,000 training images (2%) of our 1,347, trained for
# 4,000 steps (the book: 400 epochs of 100 mini-batches), the test cost logged every 100
SMALL_TRAIN, SMALL_STEPS, VAL_EVERY = 27, 4000, 100
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


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, naive: bool) -> torch.Tensor:
    """network2.py's CrossEntropyCost, summed over outputs and averaged over the mini-batch: on
    the logits (stable), or (``naive``) as written on the probabilities, without nan_to_num."""
    if naive:
        a = torch.sigmoid(logits)
        return -(target * torch.log(a) + (1 - target) * torch.log(1 - a)).sum(1).mean()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    if variant == "train-27-images":
        return train_small(seed, log)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = Network(output_std=1 / math.sqrt(30) if variant == "quadratic-small-init" else 5.0)
    quadratic = variant in ("quadratic", "quadratic-small-init")
    first_non_finite = None
    opt = torch.optim.SGD(model.parameters(), lr=3.0 if quadratic else 0.5)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_saturation("output", target="onehot")
    l2_scale = LAMBDA / (2 * len(x_tr))
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            target = F.one_hot(y_tr[idx], 10).float()
            logits = model(x_tr[idx])
            probe.observe(output=logits, onehot=target)
            # network2.py's costs: summed over outputs, averaged over the mini-batch
            cost = 0.5 * (torch.sigmoid(logits) - target).pow(2).sum(1).mean() if quadratic else \
                cross_entropy(logits, target, naive=variant == "naive-cross-entropy")
            l2 = model.hidden.weight.pow(2).sum() + model.output.weight.pow(2).sum()
            probe.backward({"cost": cost, "l2": l2}, weights={"l2": l2_scale})
            opt.step()
            opt.zero_grad()
            if first_non_finite is None and not torch.isfinite(cost):
                first_non_finite = step
    with torch.no_grad():
        logits = model(x_te)
    out, target = torch.sigmoid(logits), F.one_hot(y_te, 10).float()
    saturated = logits.abs() > SATURATION
    outcome = {"test_acc": float((logits.argmax(1) == y_te).float().mean()),
               "saturated": float(saturated.float().mean()),
               "saturated_wrong": float((saturated & ((out - target).abs() > 0.5)).float().mean())}
    if variant == "naive-cross-entropy":
        outcome.update(first_non_finite_step=first_non_finite,
                       nan_parameter_tensors=sum(bool(p.isnan().any()) for p in model.parameters()))
    return outcome


def train_small(seed: int, log: Path) -> dict:
    """Nielsen's overfitting run (chapter 3), scaled: 27 training digits, large init, the
    cross-entropy cost alone, the test cost logged as ``val_cost``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    x_tr, y_tr = x_tr[:SMALL_TRAIN], y_tr[:SMALL_TRAIN]
    model = Network(output_std=1.0)
    for p in model.parameters():  # network2.py's large_weight_initializer
        nn.init.normal_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    test_target = F.one_hot(y_te, 10).float()
    val, train_cost = [], []
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step, idx in zip(range(SMALL_STEPS), batches(len(x_tr), BATCH, gen)):
            cost = cross_entropy(model(x_tr[idx]), F.one_hot(y_tr[idx], 10).float(), naive=False)
            probe.backward({"cost": cost})
            opt.step()
            opt.zero_grad()
            if step % VAL_EVERY == 0:
                with torch.no_grad():
                    val.append(float(cross_entropy(model(x_te), test_target, naive=False)))
                    train_cost.append(float(cross_entropy(model(x_tr), F.one_hot(y_tr, 10).float(),
                                                          naive=False)))
                probe.log(val_cost=val[-1])
    low = min(range(len(val)), key=val.__getitem__)
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return {"test_acc": acc, "val_cost_min": val[low], "val_cost_min_step": low * VAL_EVERY,
            "val_cost_end": val[-1], "val_cost_rise": val[-1] / val[low] - 1,
            "train_cost_at_val_min": train_cost[low], "train_cost_end": train_cost[-1]}


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
        Variant("naive-cross-entropy", False,
                "cross-entropy written on the probabilities without nan_to_num: outputs "
                "saturated to exactly 1.0 make the cost NaN/inf and every parameter NaN "
                "(first non-finite step measured)",
                expected=(Expect("non-finite", "cost"),),
                # true consequences: the L2 term and the watched logits are NaN from step 1
                allowed=(Expect("non-finite", "l2"), Expect("non-finite", "output")),
                must_not=_MUST_NOT),
        Variant("train-27-images", False,
                "Nielsen's overfitting run on 2% of the data: the logged test cost rises from "
                "its minimum for the rest of the run while the training cost keeps falling",
                expected=(Expect("overfitting", "val_cost"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("cross-entropy", 1), ("quadratic", 1)),
)
