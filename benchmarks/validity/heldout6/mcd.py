"""Maximum Classifier Discrepancy, after Saito, Watanabe, Ushiku & Harada 2018 ("Maximum
Classifier Discrepancy for Unsupervised Domain Adaptation", CVPR, sec. 3.2-3.3;
mil-tokyo/MCD_DA, classification/solver.py ``train`` and ``train_onestep``,
classification/model/grad_reverse.py).

Published method: a feature generator G and two classifiers F1, F2. Step A trains G, F1, F2
on labelled source (``loss_s1`` + ``loss_s2``, cross entropy); step B, G fixed, trains F1, F2
on ``loss_s - loss_dis`` (maximise the discrepancy d = mean |softmax(F1) - softmax(F2)| on
target, ``discrepancy`` in solver.py); step C trains G alone to minimise ``loss_dis`` on target,
n = 4 times. The repository also has the single-update form ``train_onestep``: one backward
of ``loss_s1 + loss_s2 + loss_dis`` with ``loss_dis = -discrepancy`` and the target features
passed through a gradient reversal layer into F1 and F2 (``reverse=True``), so that the
classifiers maximise the discrepancy while G minimises it, in one step (in the stored
solver.py the line ``loss_dis.backward()`` is commented out, which leaves the target out of
that update; here ``loss_dis`` is in the backward, as the method states).

Here: this combined step is what is trained and probed, one ``probe.backward`` with the
losses by the source's names ``loss_s1``, ``loss_s2``, ``loss_dis``. Source = the digits
training split (``common.digits_split``); target = the same digits at half contrast on a grey
background (0.5 x + 0.35: a domain shift a generator can absorb, as MNIST -> USPS is in the
paper; pixel shifts of 1-2 pixels left even MCD at 4-21% target accuracy on 8x8 images, so
they were dropped): unlabelled target images come from the training split, target accuracy
is measured on the transformed test split. G 64-128-ReLU-128-ReLU,
F1, F2 128-64-ReLU-10 (independent initialisations), Adam lr 1e-3 (the repository: 2e-4),
batch 64 source + 64 target, 1,500 steps (10-13 CPU-seconds a run with its source-only
reference). Accuracies on the test split as the repository's ``test`` reports them: F1
alone, F2 alone (``correct1``, ``correct2``) and the ensemble F1 + F2 (``correct3``).

Variants (truth by construction):
- ``mcd``: healthy, as above.
- ``detached-generator``: the target features enter the classifiers as ``feat_t.detach()``:
  ``loss_dis`` still trains F1, F2 to disagree but its gradient never reaches G, so G is
  trained by the source alone (the wiring fault of a domain head reading detached features).
A source-only run (``loss_s1 + loss_s2`` only, the same steps and seed) is the reference.
Measured (seeds 0 / 1), target test split unless named:
  source-only:        target ensemble 0.278 / 0.496 (source 0.967 / 0.973);
  mcd:                source 0.973 / 0.971; target ensemble 0.973 / 0.967, F1 0.969 / 0.962,
                      F2 0.973 / 0.960; discrepancy on target 0.008 / 0.015;
  detached-generator: source 0.969 / 0.978; target ensemble 0.938 / 0.960, F1 0.880 / 0.827,
                      F2 0.813 / 0.947; discrepancy on target 0.069 / 0.064.
The detached run does NOT stay at the source-only level (the brief's guess): the classifiers
still learn to disagree on target, which adapts them far beyond source-only, but the
generator never closes the disagreement: the discrepancy stays 4-8x the healthy one and the
mean single-classifier target accuracy is 0.85 / 0.89 against 0.97 / 0.96 (the ensemble
0.94 / 0.96 against 0.97 / 0.97). The harm is moderate and holds on both seeds. Two other
constructions were measured and dropped, their harm large but no finding id naming their
cause: no gradient reversal (G also maximises the discrepancy: target 0.24 / 0.30) and
``loss_dis`` weighted 0 (the stored ``train_onestep``, whose backward of it is commented out:
target 0.28 / 0.50, the source-only level).
Expected on ``detached-generator``: ``inert-loss`` on ``loss_dis`` (its gradient reaches
F1 and F2 only, never the shared generator it was meant to train). Must not (both):
``non-finite``; healthy: ``inert-loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

CONTRAST, BACKGROUND = 0.5, 0.35
STEPS, BATCH, LR = 1500, 64, 1e-3


def target_domain(x: torch.Tensor) -> torch.Tensor:
    """The digits at half contrast on a grey background."""
    return CONTRAST * x + BACKGROUND


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def discrepancy(out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    return (out1.softmax(1) - out2.softmax(1)).abs().mean()


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def fit(variant: str, seed: int, log: Path | None) -> dict:
    x_s, y_s, x_te, y_te = digits_split()
    x_t, x_t_te = target_domain(x_s), target_domain(x_te)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict({"G": nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128),
                                              nn.ReLU()),
                           "C1": classifier(), "C2": classifier()})
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    src, tgt = batches(len(x_s), BATCH, gen), batches(len(x_t), BATCH, gen)
    for _ in range(STEPS):
        i_s, i_t = next(src), next(tgt)
        feat_s = model["G"](x_s[i_s])
        losses = {"loss_s1": F.cross_entropy(model["C1"](feat_s), y_s[i_s]),
                  "loss_s2": F.cross_entropy(model["C2"](feat_s), y_s[i_s])}
        if variant != "source-only":
            feat_t = model["G"](x_t[i_t])
            detached = variant == "detached-generator"
            feat_t = feat_t.detach() if detached else GradReverse.apply(feat_t)
            losses["loss_dis"] = -discrepancy(model["C1"](feat_t), model["C2"](feat_t))
        if probe is not None:
            probe.backward(losses)
        else:
            sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    if probe is not None:
        probe.close()
    with torch.no_grad():
        def accuracy(x, heads=("C1", "C2")):
            feat = model["G"](x)
            return float((sum(model[h](feat) for h in heads).argmax(1) == y_te).float().mean())
        feat = model["G"](x_t_te)
        return {"source_acc": accuracy(x_te), "target_acc": accuracy(x_t_te),
                "target_acc_c1": accuracy(x_t_te, ("C1",)),
                "target_acc_c2": accuracy(x_t_te, ("C2",)),
                "target_discrepancy": float(discrepancy(model["C1"](feat), model["C2"](feat)))}


def train(variant: str, seed: int, log: Path) -> dict:
    outcome = fit(variant, seed, log)
    reference = fit("source-only", seed, None)
    return outcome | {"source_only_target_acc": reference["target_acc"],
                      "source_only_source_acc": reference["source_acc"]}


FAMILY = Family(
    name="mcd",
    source="Saito et al. 2018, Maximum Classifier Discrepancy (CVPR) sec. 3.2; mil-tokyo/MCD_DA "
           "classification/solver.py train_onestep (gradient reversal)",
    train=train,
    variants=(
        Variant("mcd", True, "one update of loss_s1 + loss_s2 + loss_dis with the target "
                "features reversed into F1, F2 as published: target accuracy 0.97 against 0.28 / "
                "0.50 source-only (measured)", must_not=("inert-loss", "non-finite")),
        Variant("detached-generator", False,
                "the target features enter F1, F2 detached: loss_dis never reaches G; the "
                "discrepancy on target stays 4-8x the healthy one and the single classifiers "
                "reach 0.85 / 0.89 on target against 0.97 / 0.96 (measured)",
                expected=(Expect("inert-loss", "loss_dis"),),
                must_not=("non-finite",)),
    ),
    seeds=(0, 1),
    quick=(("detached-generator", 0),),
)
