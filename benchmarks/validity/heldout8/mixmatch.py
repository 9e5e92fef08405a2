"""MixMatch, after Berthelot, Carlini, Goodfellow, Papernot, Oliver & Raffel 2019 ("MixMatch:
A Holistic Approach to Semi-Supervised Learning", NeurIPS, sec. 3 and Algorithm 1), the
official code google-research/mixmatch ``mixmatch.py`` (``guess_label``, ``loss_xe``,
``loss_l2u``, ``w_match`` ramped by ``warmup_kimg``), read here in full.

Published setup: per step a batch of labelled images and one of unlabelled images; each
labelled image augmented once, each unlabelled image K = 2 times; the label guess of an
unlabelled image is the mean of the model's softmax over its K augmentations, sharpened with
temperature T = 0.5 (p^(1/T), renormalised) and held without gradient; MixUp with
lambda ~ Beta(alpha, alpha), alpha = 0.75, lambda' = max(lambda, 1 - lambda), every labelled
and unlabelled example mixed with a random member of the shuffled union (Algorithm 1, lines
10-13); ``loss_xe`` the cross-entropy of the mixed labelled examples against their mixed
one-hot labels, ``loss_l2u`` the squared difference between the mixed guesses and the
predicted distributions, averaged over examples and classes (the code's ``reduce_mean``);
loss = loss_xe + w_match * loss_l2u, w_match = 100 (the code's default; lambda_U in the
paper) ramped up linearly from 0 over the first 1024 kimg; Adam lr 0.002, weight decay 0.02
and an EMA of the weights for evaluation.

Here: scikit-learn's 8x8 digits, 100 labels (10 per class) of the 1347 training images, the
rest unlabelled; the backbone of the self-supervised families (``DigitEncoder``) with a
linear head (the sixth set's ``Classifier``); 32 labelled and 32 unlabelled images a step;
augmentation a random shift of up to one pixel (the digit-sized flip + crop: digits are not
flip-invariant); one forward over the concatenated mixed batch (the code interleaves to keep
batch-norm statistics alike, one forward does the same); Adam lr 0.002 for 600 steps, the
ramp over the first 200 steps; no weight decay and no EMA (the raw model is evaluated, the
code's ``classify_raw``): small scale, CPU. Losses passed by the code's names ``loss_xe``
and ``loss_l2u``, ``loss_l2u`` weighted w_match times the ramp; the trunk features watched
as latent ``features``.

Variants (truth by construction):
- ``published``: healthy: T = 0.5, K = 2, alpha = 0.75, w_match = 100 ramped up linearly.
- ``w_match-huge-no-rampup``: broken. w_match = 1e5, fixed from step 0 (no ramp-up): the
  consistency between the untrained model's guesses and its predictions drowns the labelled
  cross-entropy on the shared layers, and the model settles on its own early guesses.
Reference without the unlabelled term (w_match = 0, the 100 labels with MixUp), measured
once (seeds 0 / 1): test accuracy 0.904 / 0.929.
Measured on the test split (450 images), independently of gradprobe (seeds 0 / 1): test
accuracy, classes predicted, the median ratio of the weighted trunk gradient norms
loss_xe / (w_match * loss_l2u) (``common.trunk_grad_ratio`` by autograd, every 20 steps once
the weight is non-zero):
  published:              accuracy 0.953 / 0.956 (above the reference on both seeds), 10 / 10
                          classes, ratio 0.42 / 0.39;
  w_match-huge-no-rampup: accuracy 0.096 / 0.096 (below the reference by 0.81 / 0.83), 1 / 1
                          class predicted, ratio 0.012 / 0.008.
The features keep their centred effective rank (77.4 / 73.6 of 128, against 78.3 / 78.1
published): the harm is in the predictions, so ``representation-collapse`` is declared
neither way on the broken run. 3-5 CPU-seconds a run.
Expected on ``w_match-huge-no-rampup``: ``gradient-swamping`` on ``loss_xe`` (the labelled
term's weighted gradient ~1% of the consistency term's on the shared trunk, while the model
is wrong on 90% of the images) and ``static-loss-weights`` on ``loss_xe`` (the fixed
w_match = 1e5 is the cause). Allowed there: ``gradient-conflict`` on ``loss_xe|loss_l2u``
(the consistency pulls every prediction to one class against the labels). Must not (both):
``inert-loss``, ``non-finite``; on the healthy variant also ``gradient-swamping``,
``static-loss-weights``, ``gradient-conflict`` (the consistency term raises the accuracy above
the labels alone) and ``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, trunk_grad_ratio
from ..harness import Expect, Family, Variant
from ..heldout6.fixmatch import weak_augment
from ..heldout6.mean_teacher import CLASSES, LABELS_PER_CLASS, Classifier, labelled_subset

STEPS, BATCH, LR, RAMPUP_STEPS = 600, 32, 2e-3, 200
AUGMENTATIONS, TEMPERATURE, ALPHA = 2, 0.5, 0.75  # K, T, alpha of Algorithm 1
RATIO_EVERY = 20  # steps between the independent gradient-ratio measurements
SETTINGS = {"published": (100.0, RAMPUP_STEPS), "w_match-huge-no-rampup": (1e5, 0)}


def guess_label(model: Classifier, views: list[torch.Tensor]) -> torch.Tensor:
    """The code's ``guess_label``: the softmax averaged over the K views, sharpened at T."""
    with torch.no_grad():
        p_model = torch.stack([F.softmax(model(v)[1], 1) for v in views]).mean(0)
    p_target = p_model.pow(1 / TEMPERATURE)
    return p_target / p_target.sum(1, keepdim=True)


def mixup(x: torch.Tensor, p: torch.Tensor, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 10-13: each example mixed with a random member of the shuffled
    batch, lambda' = max(lambda, 1 - lambda) so the mix stays closer to the first."""
    lam = float(torch.distributions.Beta(ALPHA, ALPHA).sample())
    lam = max(lam, 1 - lam)
    partner = torch.randperm(len(x), generator=gen)
    return lam * x + (1 - lam) * x[partner], lam * p + (1 - lam) * p[partner]


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    w_match, rampup = SETTINGS[variant]
    x_tr, y_tr, x_te, y_te = digits_split()
    labelled = labelled_subset(y_tr, LABELS_PER_CLASS, gen)
    unlabelled = torch.ones(len(x_tr), dtype=torch.bool)
    unlabelled[labelled] = False
    unlabelled = torch.nonzero(unlabelled).flatten()
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lab_order = batches(len(labelled), BATCH, gen)
    unl_order = batches(len(unlabelled), BATCH, gen)
    ratios = []  # weighted trunk gradient norm, loss_xe / loss_l2u
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    with probe:
        for step in range(STEPS):
            idx_l, idx_u = labelled[next(lab_order)], unlabelled[next(unl_order)]
            x_l = weak_augment(x_tr[idx_l], gen)
            views = [weak_augment(x_tr[idx_u], gen) for _ in range(AUGMENTATIONS)]
            guess = guess_label(model, views)
            mixed_x, mixed_p = mixup(torch.cat([x_l] + views),
                                     torch.cat([F.one_hot(y_tr[idx_l], CLASSES).float()]
                                               + [guess] * AUGMENTATIONS), gen)
            features, logits = model(mixed_x)
            probe.observe(features=features)
            soft_xe = -(mixed_p[:BATCH] * F.log_softmax(logits[:BATCH], 1)).sum(1)
            losses = {"loss_xe": soft_xe.mean(),
                      "loss_l2u": (mixed_p[BATCH:] - F.softmax(logits[BATCH:], 1)).pow(2).mean()}
            weight = w_match * (min(step / rampup, 1.0) if rampup else 1.0)
            if step % RATIO_EVERY == 0 and weight > 0:
                ratios.append(trunk_grad_ratio(model, losses, {"loss_l2u": weight},
                                               "loss_xe", "loss_l2u"))
            probe.backward(losses, weights={"loss_l2u": weight})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        features, logits = model(x_te)
        predicted = logits.argmax(1)
    return {"test_accuracy": float((predicted == y_te).float().mean()),
            "classes_predicted": int(predicted.unique().numel()),
            "feature_effective_rank": centred_effective_rank(features.numpy()),
            "median_xe_over_l2u_grad": float(np.median(ratios)) if ratios else float("nan")}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="mixmatch",
    source="Berthelot et al. 2019 (MixMatch, NeurIPS, sec. 3, Algorithm 1); "
           "google-research/mixmatch mixmatch.py (guess_label, loss_xe, loss_l2u, w_match, "
           "warmup_kimg)",
    train=train,
    variants=(
        Variant("published", True,
                "K = 2 guesses sharpened at T = 0.5, MixUp alpha 0.75, w_match 100 ramped up "
                "linearly: the unlabelled images raise accuracy above the 100 labels alone",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights",
                                      "gradient-conflict", "representation-collapse")),
        Variant("w_match-huge-no-rampup", False,
                "w_match 1e5 fixed from step 0: the consistency with the untrained model's own "
                "guesses drowns the labelled cross-entropy and the model predicts one class",
                expected=(Expect("gradient-swamping", "loss_xe"),
                          Expect("static-loss-weights", "loss_xe")),
                allowed=(Expect("gradient-conflict", "loss_xe|loss_l2u"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("w_match-huge-no-rampup", 0)),
)
