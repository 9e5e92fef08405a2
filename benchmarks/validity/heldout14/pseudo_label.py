"""Pseudo-Label (Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning
Method for Deep Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning,
sec. 3.1 eq. 1: the pseudo-label of an unlabelled image is the class of largest predicted
probability, recomputed at every weight update and used as if it were a true label; eq. 15:
the loss is the mean cross-entropy on the labelled batch plus alpha(t) times the mean
cross-entropy of the unlabelled batch on its pseudo-labels; eq. 16: alpha(t) is 0 before
epoch T1, rises linearly to alpha_f between T1 and T2, and is alpha_f after, with alpha_f 3,
T1 100, T2 600; sec. 3.3: a balance that is too high early disturbs training, too low does
not help; MNIST with 100 to 3000 labels and a dropout network), as the most-used implementation
writes it: microsoft/Semi-supervised-learning ``semilearn/algorithms/pseudolabel/pseudolabel.py``
``PseudoLabel.train_step`` (``sup_loss = ce_loss(logits_x_lb, y_lb)``; hard pseudo-labels from
the ``PseudoLabelingHook`` on the unlabelled logits, ``use_hard_label=True``, no gradient
through them; ``unsup_loss = consistency_loss(logits_x_ulb, pseudo_label, 'ce', mask=mask)``;
``total_loss = sup_loss + lambda_u * unsup_loss * unsup_warmup`` with ``unsup_warmup`` a linear
ramp ``clip(it / (unsup_warm_up * num_train_iter), 0, 1)``). Here as in the paper: no
confidence mask (semilearn's ``FixedThresholdingHook`` p_cutoff 0.95 is its addition), and the
paper's schedule, a flat zero before T1, then the ramp.

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split), 40 labels (4 per class,
``heldout6.mean_teacher.labelled_subset``), the whole training split as the unlabelled set;
the backbone of the self-supervised families with a linear head (``heldout6.mean_teacher.
Classifier``: MLP 64-128-128 with batch norm, ``features`` the trunk's output), a labelled batch
of 16 and an unlabelled batch of 64 in one forward, each image under ``heldout6.fixmatch.
weak_augment`` (the input noise the paper got from dropout); Adam lr 1e-3, 600 steps; eq. 16 on
steps: T1 100, T2 400, alpha_f 3. ``Probe(model)`` with ``sup_loss`` (first) and ``unsup_loss``
(weight alpha(t)); the trunk's output watched as latent ``features``.

Truth, measured without gradprobe: test accuracy (450 images), classes predicted and the
perplexity of the predicted-class usage, the centred effective rank of the test features (of
128), the share of pseudo-labels that are right (first and last 100 steps), the labelled loss
over the first and last 100 steps, and every 10 steps (where alpha > 0) the ratio
|grad sup_loss| / |alpha grad unsup_loss| and the cosine of the two gradients by
``torch.autograd.grad``, apart on the trunk and on the head, medians per phase of eq. 16
(before T1, the ramp, after T2); against a supervised-only reference (the same seed, labels,
batches and optimiser, alpha 0, unprobed).

Variants (truth by construction):
- ``published``: healthy, eq. 16 as published. Measured, seeds 0 / 1: test accuracy 0.884 /
  0.853 against supervised-only 0.780 / 0.820 (gain +0.104 / +0.033: beats the labels alone,
  as the paper's tables), 10 / 10 classes, perplexity 9.80 / 9.46; pseudo-labels right 0.52 /
  0.50 over the first 100 steps (when alpha is still 0) and 0.80 / 0.81 over the last 100;
  labelled loss 1.32 / 1.32 over the first 100 steps, 0.036 / 0.025 over the last; the head's
  gradient cosine +0.065 / +0.086 during the ramp, +0.082 / -0.054 after T2; the trunk's ratio
  0.68 / 0.75 during the ramp and 0.25 / 0.22 after T2 (the weighted pseudo-label term is the
  larger once alpha is 3, by then the labelled loss is fitted at ~0.03: nothing is starved);
  feature rank 70.0 / 71.5. Must not: ``gradient-conflict``, ``gradient-swamping``,
  ``static-loss-weights``, ``inert-loss``, ``representation-collapse``, ``non-finite``.
- ``alpha-final-from-start``: broken. alpha(t) = alpha_f = 3 from step 0 (the ramp left out,
  as in a port that sets the coefficient and forgets the schedule): the untrained network's own
  argmax guesses, 0.16 / 0.10 right over the first 100 steps (chance), are fitted three times
  as hard as the 40 labels, and the head is pulled against the labels (confirmation bias,
  sec. 3.3). Measured, seeds 0 / 1: test accuracy 0.564 / 0.540 (published 0.884 / 0.853,
  supervised-only 0.780 / 0.820: worse than the labels alone), 10 / 10 classes but perplexity
  5.83 / 5.38 (a few classes take most predictions); pseudo-labels right 0.61 / 0.51 over the
  last 100 steps (published 0.80 / 0.81); labelled loss 2.41 / 2.47 over the first 100 steps
  (published 1.32 / 1.32: it does not fall while the head is pulled apart); on the head the
  two gradients are of one size (ratio 1.05 / 1.11 before T1, 1.05 / 1.07 during steps
  100-400) and opposed, cosine -0.46 / -0.65 before T1 and -0.43 / -0.55 during steps 100-400
  (published +0.07 / +0.09), -0.27 on seed 1 still after T2; on the trunk they are orthogonal
  (cosine -0.04 / -0.07) and the labelled one is not drowned (ratio 1.24 / 1.58 before T1);
  feature rank 78.8 / 79.8 (the features keep their spread: the harm is in the head's labels).
  Expected: ``gradient-conflict`` on ``sup_loss|unsup_loss`` (the pseudo-label term pulls the
  shared head against the labels, cosine -0.4 to -0.65 at equal size, while the labelled loss
  stalls) and ``static-loss-weights`` on ``sup_loss`` (the fixed alpha_f from step 0 is the
  cause; eq. 16's ramp is the remedy). Allowed: ``static-loss-weights`` on ``unsup_loss`` (its
  weight is the one fixed at 3). Must not: ``gradient-swamping`` (the labelled gradient is as
  large as the other, ratio ~1 on head and trunk), ``inert-loss``,
  ``representation-collapse``, ``non-finite``.

Not built: pseudo-labels taken without ``detach`` (the brief's other candidate): argmax has
no gradient, so the run is the published one exactly; it is no failure.

CPU: about 3.7-5.6 seconds a run (the probed run plus the unprobed supervised-only reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe

from ..common import batches, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant
from ..heldout13.uda import backward_and_step, predictions
from ..heldout6.fixmatch import weak_augment
from ..heldout6.mean_teacher import Classifier, labelled_subset

STEPS, LABELLED_BATCH, UNLABELLED_BATCH, LR = 600, 16, 64, 1e-3
LABELS_PER_CLASS = 4
ALPHA_F = 3.0  # eq. 16: alpha_f = 3
T1, T2 = 100, 400  # eq. 16's epochs 100 and 600 of the paper's run, scaled to steps
RATIO_EVERY = 10  # steps between the independent gradient-ratio measurements


def alpha(variant: str, step: int) -> float:
    """Lee 2013 eq. 16: 0 before T1, linear from 0 to alpha_f between T1 and T2, then alpha_f;
    the broken run starts at alpha_f."""
    if variant == "supervised-only":
        return 0.0
    if variant == "alpha-final-from-start" or step >= T2:
        return ALPHA_F
    if step < T1:
        return 0.0
    return ALPHA_F * (step - T1) / (T2 - T1)


def ratio_and_cosine(params, losses: dict, weights: dict) -> tuple[float, float]:
    """|grad sup_loss| / |alpha grad unsup_loss| over ``params`` and the cosine of the two
    gradients there, by ``torch.autograd.grad`` (independent of gradprobe)."""
    sup, unsup = (weights.get(name, 1.0) * torch.cat([
        g.flatten() for g in torch.autograd.grad(losses[name], params, retain_graph=True)])
        for name in ("sup_loss", "unsup_loss"))
    return float(sup.norm() / unsup.norm()), float(F.cosine_similarity(sup, unsup, dim=0))


def phase_medians(measured: list, outcome: dict) -> None:
    """Medians of the (step, part, ratio, cosine) measurements per part (trunk, head) and per
    phase of eq. 16 (before T1, the ramp, after T2) into ``outcome`` (NaN: none there)."""
    for part in ("trunk", "head"):
        for phase, (start, end) in (("before_T1", (0, T1)), ("ramp", (T1, T2)),
                                    ("after_T2", (T2, STEPS))):
            rows = [(r, c) for step, p, r, c in measured if p == part and start <= step < end]
            outcome[f"{part}_sup_over_unsup_grad_{phase}"] = (
                float(np.median([r for r, _ in rows])) if rows else float("nan"))
            outcome[f"{part}_cos_sup_unsup_{phase}"] = (
                float(np.median([c for _, c in rows])) if rows else float("nan"))


def fit(variant: str, seed: int, log: Path | None) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    labelled = labelled_subset(y_tr, LABELS_PER_CLASS, gen)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lab_order = batches(len(labelled), LABELLED_BATCH, gen)
    unl_order = batches(len(x_tr), UNLABELLED_BATCH, gen)
    measured, pseudo_correct, levels = [], [], []
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    if probe is not None:
        probe.watch_latent("features")
    for step in range(STEPS):
        idx_l, idx_u = labelled[next(lab_order)], next(unl_order)
        features, logits = model(torch.cat([weak_augment(x_tr[idx_l], gen),
                                            weak_augment(x_tr[idx_u], gen)]))
        if probe is not None:
            probe.observe(features=features)
        sup_logits, unl_logits = logits[:LABELLED_BATCH], logits[LABELLED_BATCH:]
        sup_loss = F.cross_entropy(sup_logits, y_tr[idx_l])
        # eq. 15's pseudo-labels: the class of largest predicted probability, recomputed on
        # every update, used as if it were a true label (hard, no gradient through argmax)
        pseudo = unl_logits.detach().argmax(1)
        pseudo_correct.append(float((pseudo == y_tr[idx_u]).float().mean()))
        unsup_loss = F.cross_entropy(unl_logits, pseudo)
        losses = {"sup_loss": sup_loss, "unsup_loss": unsup_loss}
        weights = {"unsup_loss": alpha(variant, step)}
        levels.append((float(sup_loss.detach()), float(unsup_loss.detach())))
        if probe is not None and step % RATIO_EVERY == 0 and weights["unsup_loss"] > 0:
            for part in ("trunk", "head"):
                params = list(getattr(model, part).parameters())
                measured.append((step, part) + ratio_and_cosine(params, losses, weights))
        backward_and_step(probe, losses, weights, opt)
    if probe is not None:
        probe.close()
    model.eval()
    with torch.no_grad():
        features, logits = model(x_te)
    outcome = {**predictions(logits, y_te),
            "feature_effective_rank": centred_effective_rank(features.numpy()),
            "pseudo_label_accuracy_first100": float(np.mean(pseudo_correct[:100])),
            "pseudo_label_accuracy_last100": float(np.mean(pseudo_correct[-100:])),
            "sup_loss_first100": float(np.mean([a for a, _ in levels[:100]])),
            "sup_loss_last100": float(np.mean([a for a, _ in levels[-100:]])),
            "unsup_loss_last100": float(np.mean([b for _, b in levels[-100:]]))}
    phase_medians(measured, outcome)
    return outcome


def train(variant: str, seed: int, log: Path) -> dict:
    outcome = fit(variant, seed, log)
    reference = fit("supervised-only", seed, None)
    return outcome | {"supervised_only_test_accuracy": reference["test_accuracy"],
                      "gain_over_supervised_only":
                          outcome["test_accuracy"] - reference["test_accuracy"]}


_MUST_NOT = ("inert-loss", "representation-collapse", "non-finite")

FAMILY = Family(
    name="pseudo-label",
    source="Lee 2013 (Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method "
           "for Deep Neural Networks, ICML workshop, eq. 15-16: alpha(t) ramped from 0 at T1 "
           "to alpha_f 3 at T2); microsoft/Semi-supervised-learning "
           "semilearn/algorithms/pseudolabel/pseudolabel.py PseudoLabel.train_step",
    train=train,
    variants=(
        Variant("published", True,
                "Pseudo-Label as published (alpha 0 before T1, linear to 3 at T2): beats the "
                "supervised-only reference on 40 labels (measured)",
                must_not=_MUST_NOT + ("gradient-conflict", "gradient-swamping",
                                      "static-loss-weights")),
        Variant("alpha-final-from-start", False,
                "alpha 3 from step 0 without the ramp: the untrained network's chance-level "
                "pseudo-labels pull the shared head against the labels (cosine -0.4 to -0.65 "
                "at equal size), the labelled loss stalls, test accuracy 0.54-0.56 below "
                "supervised-only (measured)",
                expected=(Expect("gradient-conflict", "sup_loss|unsup_loss"),
                          Expect("static-loss-weights", "sup_loss")),
                allowed=(Expect("static-loss-weights", "unsup_loss"),),
                must_not=_MUST_NOT + ("gradient-swamping",)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("alpha-final-from-start", 1)),
)
