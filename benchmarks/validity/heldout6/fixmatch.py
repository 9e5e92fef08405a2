"""FixMatch, after Sohn et al. 2020 ("FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS, sec. 2.2-2.3, eq. 1-4 and Algorithm 1), the PyTorch
re-implementation kekmodel/FixMatch-pytorch (``train.py``: ``Lx``, ``Lu``, ``mask``,
``loss = Lx + args.lambda_u * Lu``) of google-research/fixmatch; read here through code
search excerpts of these loss lines (the repository's and close copies).

Published setup: per step B labelled images and mu * B unlabelled ones (mu = 7); the
supervised loss Lx is the cross-entropy on weakly augmented labelled images (eq. 2); for
each unlabelled image the prediction on a weak augmentation, without gradient, gives the
pseudo-label argmax q_b, kept when max q_b >= tau (tau = 0.95); the unsupervised loss Lu is
the cross-entropy of the prediction on a strong augmentation against that pseudo-label,
masked, averaged over all mu * B images (eq. 4); loss = Lx + lambda_u * Lu with
lambda_u = 1; weak: flip and translation, strong: RandAugment + Cutout; SGD with Nesterov
momentum, lr 0.03, weight decay 5e-4, cosine decay.

Here: scikit-learn's 8x8 digits, 100 labels (10 per class) of the 1347 training images, the
rest unlabelled; the backbone of the self-supervised families (``DigitEncoder``) with a
linear head, one forward over the concatenated labelled, weak and strong batches (as
kekmodel does, so batch norm sees all three); B = 16, mu = 7; weak augmentation: a random
shift of up to one pixel (digits are not flip-invariant); strong: ``common.augment`` (shift,
intensity, 3x3 erasing, noise: the digit-sized RandAugment + Cutout); Adam lr 1e-3 (the
optimiser of the other digit families) for 500 steps. Losses passed as ``Lx`` and ``Lu``
(the repository's names), ``Lu`` weighted lambda_u; features watched as latent ``features``.

Variants (truth by construction):
- ``published``: healthy, tau 0.95, lambda_u 1.
- ``tau0-lambda100``: broken. tau = 0 (every pseudo-label kept, right or wrong) and
  lambda_u = 100 fixed from step 0: the unlabelled term, trained on the untrained model's own
  guesses, drowns the supervised term on the shared layers and confirms its guesses until the
  model predicts one or two classes (confirmation bias).
Dropped: ``tau0`` (tau = 0 with lambda_u = 1) is not harmful here: test accuracy 0.938 / 0.927
against 0.911 / 0.909 published (digits are easy enough that 92% of its pseudo-labels are
right), so it is no broken variant.
Reference without Lu (lambda_u = 0, the 100 labels only), measured once: test accuracy
0.893 / 0.913 (seeds 0 / 1).
Measured on the test split (450 images), independently of gradprobe (seeds 0 / 1): test
accuracy, classes predicted, perplexity of the predicted-class usage (10 = all used
evenly), share of unlabelled images whose pseudo-label is kept and accuracy of the kept
pseudo-labels against the hidden true labels (last 100 steps), the median ratio of the
weighted trunk gradient norms Lx / lambda_u Lu (``common.trunk_grad_ratio`` by autograd,
every 20 steps where a pseudo-label is kept):
  published:      accuracy 0.911 / 0.909, 10 / 10 classes, perplexity 9.96 / 9.95, mask 0.47 /
                  0.48, pseudo-label accuracy 0.994 / 0.997, ratio 2.5 / 2.3;
  tau0-lambda100: accuracy 0.147 / 0.096, 2 / 2 classes, perplexity 1.99 / 1.45, mask 1.0 /
                  1.0, pseudo-label accuracy 0.136 / 0.093, ratio 0.080 / 0.092.
The features keep their centred effective rank (78.5 / 81.4 of 128, against 80.1 / 79.4
published): the harm is in the predictions, not a collapsed latent, so
``representation-collapse`` is declared neither way on the broken run.
Expected on ``tau0-lambda100``: ``gradient-swamping`` on ``Lx`` (the supervised term's
weighted gradient ~8-9% of the unlabelled term's on the shared trunk while the model is
wrong) and ``static-loss-weights`` on ``Lx`` (the fixed lambda_u = 100 is the cause). Must not
(both): ``inert-loss``, ``non-finite``; on the healthy variant also ``gradient-swamping``,
``static-loss-weights``, ``representation-collapse``. 5-6 CPU-seconds a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe

from ..common import (augment, batches, centred_effective_rank, digits_split, shift_one_pixel,
                      trunk_grad_ratio)
from ..harness import Expect, Family, Variant
from .mean_teacher import CLASSES, LABELS_PER_CLASS, Classifier, labelled_subset

STEPS, LABELLED_BATCH, MU, LR = 500, 16, 7, 1e-3
RATIO_EVERY = 20  # steps between the independent gradient-ratio measurements
SETTINGS = {"published": (0.95, 1.0), "tau0-lambda100": (0.0, 100.0)}  # (tau, lambda_u)


def weak_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """FixMatch's weak augmentation on 8x8 digits: a random shift of up to one pixel."""
    return shift_one_pixel(x, gen).reshape(x.shape[0], 64)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    threshold, lambda_u = SETTINGS[variant]
    x_tr, y_tr, x_te, y_te = digits_split()
    labelled = labelled_subset(y_tr, LABELS_PER_CLASS, gen)
    unlabelled = torch.ones(len(x_tr), dtype=torch.bool)
    unlabelled[labelled] = False
    unlabelled = torch.nonzero(unlabelled).flatten()
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lab_order = batches(len(labelled), LABELLED_BATCH, gen)
    unl_order = batches(len(unlabelled), MU * LABELLED_BATCH, gen)
    kept = []  # share of unlabelled images whose pseudo-label passed the threshold
    ratios = []  # weighted trunk gradient norm, Lx / Lu (Lu where any pseudo-label is kept)
    pseudo_correct = []  # accuracy of kept pseudo-labels (true labels unseen by training)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    with probe:
        for step in range(STEPS):
            idx_l, idx_u = labelled[next(lab_order)], unlabelled[next(unl_order)]
            x_u = x_tr[idx_u]
            inputs = torch.cat([weak_augment(x_tr[idx_l], gen), weak_augment(x_u, gen),
                                augment(x_u, gen)])
            features, logits = model(inputs)
            probe.observe(features=features)
            logits_x = logits[:LABELLED_BATCH]
            logits_u_w, logits_u_s = logits[LABELLED_BATCH:].chunk(2)
            max_probs, targets_u = torch.softmax(logits_u_w.detach(), -1).max(-1)
            mask = (max_probs >= threshold).float()
            kept.append(float(mask.mean()))
            if mask.sum() > 0:
                pseudo_correct.append(float(((targets_u == y_tr[idx_u]).float() * mask).sum()
                                            / mask.sum()))
            losses = {"Lx": F.cross_entropy(logits_x, y_tr[idx_l]),
                      "Lu": (F.cross_entropy(logits_u_s, targets_u, reduction="none")
                             * mask).mean()}
            if step % RATIO_EVERY == 0 and mask.sum() > 0 and lambda_u > 0:
                ratios.append(trunk_grad_ratio(model, losses, {"Lu": lambda_u}, "Lx", "Lu"))
            probe.backward(losses, weights={"Lu": lambda_u})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        features, logits = model(x_te)
        predicted = logits.argmax(1)
    usage = torch.bincount(predicted, minlength=CLASSES).float() / len(predicted)
    usage = usage[usage > 0]
    return {"test_accuracy": float((predicted == y_te).float().mean()),
            "classes_predicted": int(predicted.unique().numel()),
            "prediction_perplexity": float(torch.exp(-(usage * usage.log()).sum())),
            "feature_effective_rank": centred_effective_rank(features.numpy()),
            "mask_rate_last100": float(np.mean(kept[-100:])),
            "pseudo_label_accuracy_last100": float(np.mean(pseudo_correct[-100:])),
            "median_lx_over_lu_grad": float(np.median(ratios)) if ratios else float("nan")}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="fixmatch",
    source="Sohn et al. 2020 (FixMatch, NeurIPS, eq. 1-4, Algorithm 1); kekmodel/FixMatch-pytorch "
           "train.py (Lx, Lu, mask, lambda_u) of google-research/fixmatch",
    train=train,
    variants=(
        Variant("published", True,
                "pseudo-labels kept above confidence 0.95, lambda_u 1: the unlabelled images "
                "add to the 100 labels",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights",
                                      "representation-collapse")),
        Variant("tau0-lambda100", False,
                "every pseudo-label kept (tau 0) at lambda_u 100 from step 0: the model's own "
                "early guesses drown the labels and it ends predicting two classes",
                expected=(Expect("gradient-swamping", "Lx"),
                          Expect("static-loss-weights", "Lx")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("tau0-lambda100", 0)),
)
