"""Center Loss, after Wen et al. 2016 ("A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV; eq. 2-4 and Algorithm 1), KaiyangZhou/pytorch-center-loss (center_loss.py,
main.py: LeNet++ with a 2-D PReLU feature, centers initialised from a standard normal) and
davidsandberg/facenet's ``center_loss`` (the centers a non-trainable variable moved by
``scatter_sub``).

Published setup (the paper's MNIST toy): a network whose last hidden layer is a 2-D deep
feature x, a linear softmax classifier on x, and the joint loss
L = L_S + lambda L_C with L_C = 1/2 mean_i ||x_i - c_{y_i}||^2 (Caffe's center-loss layer
averages over the batch); one center per class, updated outside SGD on every mini-batch by
eq. 4: delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j]),
c_j <- c_j - alpha delta c_j, with alpha = 0.5 and lambda from 0.003 to 0.1 (the centers get
no gradient from L_C). SGD with momentum 0.9 and weight decay 5e-4 (KaiyangZhou's main.py).

Here: scikit-learn digits, an MLP 64-128-128 (PReLU) into the 2-D PReLU feature (LeNet++'s
``fc1``/``prelu_fc1``) and the linear classifier 2->10, batch 128, SGD lr 0.05 divided by 10
at steps 342 and 514 (the paper's schedule, sec. 4.1: at 16K and 24K of 28K iterations),
lambda 0.1, alpha 0.5, 600 steps. Without the schedule (as until session 12) the healthy
``pk-sampler`` seed 3 diverged to NaN at step 592 in one install (accuracy 0.1). Losses: ``softmax`` and ``center`` (weight lambda). The probe is
attached as a user would: ``Probe(model, run_file=...)``, the feature watched as a latent with the
labels as groups, and the center table watched as prototypes of that latent.

Variants (truth by construction, checked on the training split's features at the end:
``center_lag``, the mean distance of each center to its class's mean feature in units of the
features' within-class spread; ``center_spread``, the centers' mean pairwise distance over
the class means'; and the test accuracy). The centers start at zero (facenet) unless said:
- ``paper``: healthy, eq. 4 with alpha = 0.5: the centers track the class means.
- ``paper-random-start``: healthy, the same with the centers drawn from a standard normal at
  the start (KaiyangZhou's initialisation): far from the first features, which are ~0.1 in
  norm, and at the class means within a few dozen steps.
- ``no-update``: the update step never runs (alpha = 0; facenet's ``scatter_sub`` left out
  of the train op): the centers stay at zero while the features move under the softmax loss.
  Expected: ``prototype-stale`` on ``centers``.
- ``unmasked-update``: eq. 4 with the class indicator [y_i = j] dropped (every center is moved
  towards every feature of the batch): every center follows the batch's mean feature, one
  point for ten classes. Expected: ``prototype-collapse`` on ``centers``.
- ``pk-sampler``: healthy, the paper's update with the identity (P x K) sampler of the re-ID
  setups that train softmax + triplet + center loss (Hermans et al. 2017, "In Defense of the
  Triplet Loss"; Luo et al. 2019, michuanhaohao/reid-strong-baseline,
  ``RandomIdentitySampler``): every batch holds P = 4 classes x K = 32 digits, and the probe
  is told so (``Probe(..., expect_groups_per_batch=4)``).
- ``pk-sampler-ignored``: the same declaration, but the loader is the plain shuffled one
  (reid-strong-baseline's ``DATALOADER.SAMPLER: 'softmax'`` branch builds
  ``DataLoader(..., shuffle=True)`` instead of the identity sampler): the sampler did not
  take effect. Measured in the loop without gradprobe: ``groups_per_batch``, the mean
  number of classes in a batch (4 with the sampler, ~10 without). Expected:
  ``batch-composition-mismatch`` on ``batch``. Measured (seeds 0-3): ``groups_per_batch``
  4 with the sampler, 10 without; gradprobe: quiet on ``pk-sampler``, ``warning
  batch-composition-mismatch`` ("10 groups/batch vs 4 declared") on every ignored one.
- ``lambda-0``: the joint loss with lambda = 0 (the paper's softmax-only baseline, Fig. 3(a)):
  L_C is still computed, logged and its centers updated, but nothing pulls the features
  to them. The softmax loss falls towards 0 while the center loss rises: the features grow
  and spread within their classes, separable but not discriminative (sec. 3.1-3.2).
  Measured without gradprobe: ``center_loss_ratio``, L_C over the last 50 steps' batches
  over its first step's, and ``intra_over_inter``, the features' within-class RMS distance
  to their class mean over the mean distance between class means (training split).
  The probe is told the center loss's role (``roles={"center": "prototype"}``, as
  docs/findings.md advises): undeclared, its name reads as a task loss (the name hint "ce"
  matches its start), and a task loss is no constraint. Expected: ``constraint-neglect`` on
  ``center``. Measured (seeds 0-3): ``center_loss_ratio`` 1.2e4-3.4e4, ``intra_over_inter``
  0.18-0.23 against 0.044-0.058 for ``paper``, test accuracy 0.93-0.94; gradprobe: ``error
  constraint-neglect`` on every seed (softmax x0.008-0.019, center x1.1e3-1.5e3 of its start).
Allowed on both broken variants, true by construction: ``prototype-collapse`` on
``no-update`` (its ten centers are one point, zero), ``gradient-conflict`` on
``softmax|center`` (L_C pulls every feature towards one point the softmax loss must separate
the classes from, and stalls while the softmax loss falls) and the ``static-loss-weights`` it
implies on ``center``. Must not (all variants): ``representation-collapse`` (the softmax
loss keeps the features separable); the healthy ones no prototype finding and no conflict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split
from .harness import Expect, Family, Variant

CLASSES, FEATURE_DIM = 10, 2
P_CLASSES, K_PER_CLASS = 4, 32  # the identity sampler's batch: P classes x K digits = BATCH
LATE_STEPS = 50  # the end of the run, for the center loss's end level
STEPS, BATCH, LR = 600, 128, 0.05
LAMBDA, ALPHA = 0.1, 0.5
# The paper's schedule (sec. 4.1: lr / 10 at 16K and 24K of 28K iterations), scaled to STEPS.
DECAY_AT = [STEPS * 16 // 28, STEPS * 24 // 28]


class FeatureNet(nn.Module):
    """An MLP into LeNet++'s 2-D PReLU deep feature, and the softmax classifier on it."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.PReLU(), nn.Linear(width, width),
                                  nn.PReLU(), nn.Linear(width, FEATURE_DIM), nn.PReLU())
        self.classifier = nn.Linear(FEATURE_DIM, CLASSES)

    def forward(self, x):
        feature = self.body(x)
        return feature, self.classifier(feature)


class Centers(nn.Module):
    """One center per class, a buffer moved by eq. 4 (no gradient reaches it): zeros at the
    start as facenet's variable, or standard normal as KaiyangZhou's parameter."""

    def __init__(self, random_start: bool):
        super().__init__()
        start = torch.randn if random_start else torch.zeros
        self.register_buffer("centers", start(CLASSES, FEATURE_DIM))

    def loss(self, feature: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (feature - self.centers[y]).pow(2).sum(1).mean()

    @torch.no_grad()
    def update(self, feature: torch.Tensor, y: torch.Tensor, alpha: float, masked: bool) -> None:
        """Eq. 4; ``masked=False`` drops the class indicator (every sample counts for every
        center)."""
        member = F.one_hot(y, CLASSES).T.to(feature.dtype) if masked else \
            torch.ones(CLASSES, len(y), dtype=feature.dtype)
        delta = (member.sum(1, keepdim=True) * self.centers - member @ feature) \
            / (1 + member.sum(1, keepdim=True))
        self.centers -= alpha * delta


def center_truth(model: FeatureNet, centers: torch.Tensor) -> dict:
    """Where the centers ended against the features they should summarise (training split),
    and the test accuracy, computed without gradprobe."""
    x_tr, y_tr, x_te, y_te = digits_split()
    model.eval()
    with torch.no_grad():
        f_tr, _ = model(x_tr)
        acc = float((model(x_te)[1].argmax(1) == y_te).float().mean())
    means = torch.stack([f_tr[y_tr == j].mean(0) for j in range(CLASSES)])
    within = float((f_tr - means[y_tr]).pow(2).sum(1).mean().sqrt())
    lag = float((centers - means).norm(dim=1).mean()) / within
    spread = float(torch.pdist(centers).mean() / torch.pdist(means).mean())
    return {"acc": acc, "center_lag": lag, "center_spread": spread,
            "intra_over_inter": within / float(torch.pdist(means).mean())}


def identity_batches(labels: torch.Tensor, gen: torch.Generator):
    """Endless P x K batches (reid-strong-baseline's ``RandomIdentitySampler``): P classes
    drawn without replacement, K of each class's items drawn without replacement."""
    while True:
        chosen = torch.randperm(CLASSES, generator=gen)[:P_CLASSES]
        yield torch.cat([members[torch.randperm(len(members), generator=gen)[:K_PER_CLASS]]
                         for members in (torch.nonzero(labels == c).squeeze(1) for c in chosen)])


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    model, criterion = FeatureNet(), Centers(random_start=variant == "paper-random-start")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, DECAY_AT, gamma=0.1)
    alpha = 0.0 if variant == "no-update" else ALPHA
    declared_pk = variant.startswith("pk-sampler")
    probe = gradprobe.Probe(model, run_file=log,
                            expect_groups_per_batch=P_CLASSES if declared_pk else None,
                            roles={"center": "prototype"} if variant == "lambda-0" else None)
    probe.watch_latent("feature", labels="groups")
    probe.watch_prototypes("centers", criterion.centers, latent="feature")
    sampler = identity_batches(y_tr, gen) if variant == "pk-sampler" else \
        batches(len(x_tr), BATCH, gen)
    groups_seen, center_losses = [], []
    with probe:
        for _, idx in zip(range(STEPS), sampler):
            y = y_tr[idx]
            feature, logits = model(x_tr[idx])
            probe.observe(feature=feature, groups=y)
            losses = {"softmax": F.cross_entropy(logits, y), "center": criterion.loss(feature, y)}
            probe.backward(losses, weights={"center": 0.0 if variant == "lambda-0" else LAMBDA})
            opt.step()
            schedule.step()
            opt.zero_grad()
            criterion.update(feature.detach(), y, alpha, masked=variant != "unmasked-update")
            groups_seen.append(len(y.unique()))
            center_losses.append(float(losses["center"]))
    truth = center_truth(model, criterion.centers)
    if declared_pk:
        truth["groups_per_batch"] = sum(groups_seen) / len(groups_seen)
    if variant == "lambda-0":
        late = center_losses[-LATE_STEPS:]
        truth["center_loss_ratio"] = sum(late) / len(late) / center_losses[0]
    return truth


_PROTOTYPE_IDS = ("prototype-stale", "prototype-collapse")
_HEALTHY_MUST_NOT = _PROTOTYPE_IDS + ("representation-collapse", "gradient-conflict")
# With the centres stuck (no update) or dragged to the batch mean (unmasked), the center
# loss stays at the level it rose to while the softmax loss falls: constraint-neglect is true
# there too (measured: end 0.82-0.94 of the level after the start window, seeds 0-3).
_CENTER_FIGHTS_SOFTMAX = (Expect("gradient-conflict", "softmax|center"),
                          Expect("static-loss-weights", "center"),
                          Expect("constraint-neglect", "center"))

FAMILY = Family(
    name="center_loss",
    source="Wen et al. 2016 (eq. 4); KaiyangZhou/pytorch-center-loss; davidsandberg/facenet",
    train=train,
    variants=(
        Variant("paper", True, "the paper's center update (eq. 4, alpha 0.5), centers from zero",
                must_not=_HEALTHY_MUST_NOT),
        Variant("paper-random-start", True,
                "the paper's center update, centers from a standard normal (KaiyangZhou)",
                must_not=_HEALTHY_MUST_NOT),
        Variant("no-update", False,
                "the center update step never runs: the centers stay at zero while the "
                "features move",
                expected=(Expect("prototype-stale", "centers"),),
                allowed=(Expect("prototype-collapse", "centers"),) + _CENTER_FIGHTS_SOFTMAX,
                must_not=("representation-collapse",)),
        Variant("unmasked-update", False,
                "eq. 4 without the class indicator: every center follows the batch's mean "
                "feature",
                expected=(Expect("prototype-collapse", "centers"),),
                allowed=_CENTER_FIGHTS_SOFTMAX,
                must_not=("prototype-stale", "representation-collapse")),
        Variant("pk-sampler", True,
                "the paper's update with the identity sampler (P = 4 classes x K = 32), declared "
                "to the probe",
                must_not=_HEALTHY_MUST_NOT + ("batch-composition-mismatch",)),
        Variant("pk-sampler-ignored", False,
                "P x K declared, but the loader is the plain shuffled one: ~10 classes a batch "
                "(groups_per_batch), not 4",
                expected=(Expect("batch-composition-mismatch", "batch"),),
                must_not=_HEALTHY_MUST_NOT),
        Variant("lambda-0", False,
                "lambda 0, the softmax-only baseline: the center loss rises while the softmax "
                "loss falls (center_loss_ratio > 1, intra_over_inter above the paper's)",
                expected=(Expect("constraint-neglect", "center"),),
                must_not=("representation-collapse", "prototype-stale", "prototype-collapse")),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("paper", 1), ("paper-random-start", 1), ("no-update", 1), ("unmasked-update", 1)),
)
