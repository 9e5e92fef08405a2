"""TWIST, twin class distributions, after Wang, Kong, Zhang, Liu & Li 2021 ("Self-Supervised
Learning by Estimating Twin Class Distributions", arXiv 2110.07402, abstract and sec. 3) and the
official bytedance/TWIST (``loss.py``: ``EntLoss``, ``KL``, ``EH``, ``HE``; read through the
port in openvinotoolkit/training_extensions' mmcls ``TwistLoss``, "code adapted from
bytedance/TWIST", same terms and defaults).

Published setup: two augmented views of each image through one network (backbone +
projection MLP whose last layer is followed by a non-affine batch norm) giving K-way logits;
p = softmax(logits). The loss is the sum of three terms, each symmetrised over the views:
  ``kl`` (consistency): 0.5 (KL(p1 || p2) + KL(p2 || p1)), averaged over the batch;
  ``eh`` (sharpness): the mean over the batch of each sample's entropy H(p_i);
  ``he`` (diversity): the entropy H(mean_i p_i) of the batch-mean distribution;
and the repository trains ``final = kl + (1 + lam1) eh - lam2 he`` with lam1 = 0, lam2 = 1,
tau = 1 (p sharpened by softmax(logits / tau) in eh and he), eps 1e-5 inside every log. The
abstract: minimising the divergence alone collapses to the same class distribution for all
images; the entropy of the mean distribution is maximised to make the predictions diverse.

Here (CPU): scikit-learn's digits with the corpus's augmentations (``common.augment``), two
views; backbone ``common.DigitEncoder`` (width 128, standing in for the ResNet-50), head
Linear 128 -> 256, batch norm, ReLU, Linear 256 -> K = 32 classes (4096 published for
ImageNet's 1000 classes; here about 3x the 10 digits), then ``BatchNorm1d(K, affine=False)``
(the projector's last layer in the ports that credit bytedance/TWIST); batch 128, Adam lr 1e-3 (LARS published), 400 steps. The three terms are passed to
the probe with the repository's names and signs: ``kl``, ``eh`` (weight 1 + lam1) and ``he``
(weight -lam2). Watched as docs/probe.md says a user would: the backbone's features
(``features``), the class-probability output p of the first view (``probs``), and the head's
last layer (one row per class) as prototypes ``classes`` of its input (``hidden``), each
sample's class (argmax p) observed as its group.

Variants (truth by construction):
- ``published``: healthy, lam1 = 0, lam2 = 1, standardising batch norm.
- ``plain-head-no-diversity``: broken, lam2 = 0 (``he`` still computed and passed with weight
  0) on a head without the final batch norm (logits straight from the last Linear, as a
  user writing TWIST's loss over a plain classifier would): consistency and sharpness alone
  are minimised by one confident class for every input, the collapse the diversity term
  exists to rule out.
Dropped: lam2 = 0 with the published batch norm. The non-affine batch norm keeps every
logit at unit variance over the batch, which by itself prevents the one-class collapse
here: 20 / 22 classes used, mean-prediction entropy 0.985 / 0.988 of log K against 26 / 25
and 0.996 / 0.992 published (seeds 0 / 1), no harm to declare. The plain head with lam2 = 1
(measured, not a variant: neither published nor clearly broken) uses 6 / 9 classes, mean
prediction entropy 0.68 / 0.74: the one-class collapse below needs the missing term.
Measured on the test split without gradprobe (seeds 0 / 1, one thread, CPU 5-9 s a run):
classes used (argmax of p for >= 1% of the test digits), largest class share, entropy of the
mean prediction and mean per-sample entropy (both / log K), total variance of p over the
test digits, centred effective rank of ``hidden`` and ``features``, linear-probe accuracy of
the features:
  published:               26 / 25 of 32 classes used, largest share 0.10 / 0.10, mean
                           prediction entropy 0.996 / 0.992, per-sample entropy 0.72 / 0.76,
                           variance of p 0.106 / 0.102, hidden rank 104 / 105, features rank
                           74 / 74, linear probe 0.967 / 0.969;
  plain-head-no-diversity: 1 / 1 class takes every test digit (share 1.00), mean prediction
                           entropy 0.0002 / 0.0002, per-sample entropy 0.0002 / 0.0001,
                           variance of p 0.000 / 0.000 (p is the same one-hot for every
                           input), hidden rank 123 / 111, features rank 80 / 76, linear probe
                           0.971 / 0.962 (the backbone and the hidden layer do not collapse).
Expected on ``plain-head-no-diversity``: ``prototype-collapse`` on ``classes`` (one class
row takes every input) and ``representation-collapse`` on ``probs`` (the class-probability
output no longer depends on the input). Must not (both): ``inert-loss``; on ``published``
also ``prototype-collapse``, ``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import (DigitEncoder, augment, batches, centred_effective_rank, digits_split,
                      linear_probe_accuracy)
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 400, 128, 1e-3
CLASSES, HIDDEN, WIDTH = 32, 256, 128
LAM1, TAU, EPS = 0.0, 1.0, 1e-5
LAM2 = {"published": 1.0, "plain-head-no-diversity": 0.0}


class TwistNet(nn.Module):
    def __init__(self, standardize: bool):
        super().__init__()
        self.backbone = DigitEncoder(WIDTH)
        self.hidden = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU())
        self.classifier = nn.Linear(HIDDEN, CLASSES)
        self.standardize = nn.BatchNorm1d(CLASSES, affine=False) if standardize else nn.Identity()

    def forward(self, x):
        features = self.backbone(x)
        hidden = self.hidden(features)
        return features, hidden, self.standardize(self.classifier(hidden))


def kl_term(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    return (p1 * (p1 + EPS).log() - p1 * (p2 + EPS).log()).sum(1).mean()


def mean_entropy(p: torch.Tensor) -> torch.Tensor:
    """EH: each sample's entropy, averaged (the sharpness term)."""
    return -(p * (p + EPS).log()).sum(1).mean()


def entropy_of_mean(p: torch.Tensor) -> torch.Tensor:
    """HE: the entropy of the batch-mean distribution (the diversity term)."""
    mean = p.mean(0)
    return -(mean * (mean + EPS).log()).sum()


def twist_losses(logits1: torch.Tensor, logits2: torch.Tensor) -> dict[str, torch.Tensor]:
    p1, p2 = F.softmax(logits1, -1), F.softmax(logits2, -1)
    s1, s2 = F.softmax(logits1 / TAU, -1), F.softmax(logits2 / TAU, -1)
    return {"kl": 0.5 * (kl_term(p1, p2) + kl_term(p2, p1)),
            "eh": 0.5 * (mean_entropy(s1) + mean_entropy(s2)),
            "he": 0.5 * (entropy_of_mean(s1) + entropy_of_mean(s2))}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = TwistNet(standardize=variant == "published")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("features")
    probe.watch_latent("probs")
    probe.watch_latent("hidden")
    probe.watch_prototypes("classes", lambda: model.classifier.weight, latent="hidden")
    weights = {"eh": 1.0 + LAM1, "he": -LAM2[variant]}
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            (f1, h1, l1), (_, _, l2) = (model(augment(x_tr[idx], gen)) for _ in range(2))
            p1 = F.softmax(l1, -1)
            probe.observe(features=f1, probs=p1, hidden=h1, groups=p1.argmax(1))
            probe.backward(twist_losses(l1, l2), weights=weights)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        f_tr = model(x_tr)[0]
        f_te, h_te, logits = model(x_te)
        p = F.softmax(logits, -1)
    log_k = math.log(CLASSES)
    share = torch.bincount(p.argmax(1), minlength=CLASSES).float() / len(p)
    return {"classes_used": int((share >= 0.01).sum()), "largest_class_share": float(share.max()),
            "mean_prediction_entropy": float(entropy_of_mean(p)) / log_k,
            "per_sample_entropy": float(mean_entropy(p)) / log_k,
            "probs_total_variance": float(p.var(0).sum()),
            "hidden_rank": centred_effective_rank(h_te.numpy()),
            "features_rank": centred_effective_rank(f_te.numpy()),
            "features_linear_acc": linear_probe_accuracy(f_tr.numpy(), y_tr.numpy(),
                                                         f_te.numpy(), y_te.numpy())}


FAMILY = Family(
    name="twist",
    source="Wang et al. 2021 (TWIST, arXiv 2110.07402, sec. 3); bytedance/TWIST "
           "loss.py EntLoss (KL, EH, HE)",
    train=train,
    variants=(
        Variant("published", True, "consistency, sharpness and diversity, lam1 0, lam2 1",
                must_not=("inert-loss", "prototype-collapse", "representation-collapse")),
        Variant("plain-head-no-diversity", False,
                "lam2 = 0 on a head without the standardising batch norm: without the entropy "
                "of the batch-mean prediction, one confident class for every input minimises "
                "consistency and sharpness",
                expected=(Expect("prototype-collapse", "classes"),
                          Expect("representation-collapse", "probs")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("plain-head-no-diversity", 0)),
)
