"""ArcFace, after Deng, Guo, Xue & Zafeiriou 2019 ("ArcFace: Additive Angular Margin Loss for
Deep Face Recognition", CVPR, sec. 2.1 eq. 3; deepinsight/insightface
recognition/arcface_torch/losses.py ``ArcFace``), with a center-loss-like intra-class term as
the second loss.

Published setup: the last fully connected layer's weight W (one row per identity, no bias) and
the embedding are l2-normalised, so the logit of class j is cos(theta_j); the target logit is
replaced by cos(theta_y + m) and every logit multiplied by s (eq. 3):
  L = -log( e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}) )
with s = 64, m = 0.5. losses.py keeps the target logit monotonic where theta_y + m > pi
(cos theta_y <= cos(pi - m): cos theta_y - sin(pi - m) m instead). W is trained with the
network (insightface's partial_fc keeps it in the optimizer, SGD momentum 0.9, wd 5e-4).

Here: scikit-learn's 8x8 digits (``digits_split``, 10 classes as identities, test split as
unseen images). Network: ``DigitEncoder`` and a linear 128 -> 16 embedding; W 10 x 16,
normal init. SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 300 steps. Second loss
``center``: the mean 1 - cos(embedding, W_y) over the batch, weight 0.1 (the intra-class
compactness term users add to ArcFace, Center Loss's pull on the unit sphere). Losses
``arcface`` (first) and ``center``. The probe watches the normalised embedding ``embedding``
and the normalised centres as ``watch_prototypes("centres", ..., latent="embedding")`` with
the labels (the centres' row ids) observed as ``groups``.

Variants (truth by construction):
- ``arcface``: healthy, as published.
- ``same-centres-not-optimised``: W is left out of the optimizer (the user passes the
  backbone's parameters only; W still requires grad and gets one, but never moves) and is
  initialised with a constant (``nn.init.constant_``), so every class centre is the same
  point: the margin logits cannot tell classes apart and only the batch-to-batch noise of
  the loss shapes the embedding.
Measured without gradprobe on the test split (seeds 0 / 1): kNN accuracy (k 20, cosine,
train split as the gallery), verification AUC (same- vs different-class test pairs by
cosine), accuracy by nearest centre, centred effective rank of the normalised embedding,
the centres' total movement and largest pairwise cosine at the end:
  arcface:                    kNN 0.973 / 0.978, AUC 0.989 / 0.995, centre acc 0.971 / 0.978,
                              rank 9.4 / 7.7, movement 16.4 / 12.0, max cosine 0.36 / 0.42;
  same-centres-not-optimised: kNN 0.758 / 0.778 (21.5 / 20.0 points below healthy), AUC
                              0.706 / 0.794, centre acc 0.096 / 0.104 (chance), rank 8.6 /
                              7.9, movement 0, max cosine 1.
Tried and not kept: W out of the optimizer with its random normal init (kNN 0.980 / 0.976,
no harm: 16-dimensional random centres are far enough apart for the embedding to meet
them); a 3-dimensional embedding (the healthy run itself failed on seed 0, kNN 0.65);
scale 1 or 8 and margins 1.2 or 1.5 (all trained to kNN >= 0.978 on digits, no harm).
Runs take 1.5-3 CPU-seconds.
Expected (broken): ``prototype-stale`` on ``centres`` (they never move while the embedding
does). Allowed: ``prototype-collapse`` on ``centres`` (one point from the start: collapsed
by construction, though they never closed in). Must not (both): ``inert-loss``,
``gradient-conflict``, ``non-finite``; healthy also ``prototype-stale``,
``prototype-collapse``, ``representation-collapse``, ``gradient-swamping``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import DigitEncoder, batches, centred_effective_rank, digits_split, knn_accuracy
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 300, 128, 0.1, 0.9, 5e-4
CENTER_WEIGHT = 0.1
SCALE, MARGIN = 64.0, 0.5
CLASSES, EMBED = 10, 16


class ArcFaceNet(nn.Module):
    """Backbone, embedding and the class-centre matrix W of the ArcFace head."""

    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        self.embed = nn.Linear(self.encoder.width, EMBED)
        self.centres = nn.Parameter(torch.randn(CLASSES, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.encoder(x))


def arcface_loss(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as losses.py ``ArcFace.forward`` computes it (the non-easy margin)."""
    target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    with_margin = target * math.cos(MARGIN) - (1 - target ** 2).sqrt() * math.sin(MARGIN)
    kept_monotonic = torch.where(target > math.cos(math.pi - MARGIN), with_margin,
                                 target - math.sin(math.pi - MARGIN) * MARGIN)
    logits = cos.scatter(1, labels[:, None], kept_monotonic) * SCALE
    return F.cross_entropy(logits, labels)


def verification_auc(embedding: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC of same-class vs different-class pairs by cosine (face
    verification's protocol), via the Mann-Whitney rank statistic."""
    z = F.normalize(embedding, dim=1)
    upper = torch.triu(torch.ones(len(z), len(z), dtype=torch.bool), diagonal=1)
    scores = (z @ z.t())[upper].double()
    same = (labels[:, None] == labels[None, :])[upper]
    ranks = scores.argsort().argsort().double() + 1
    n_same, n_diff = float(same.sum()), float((~same).sum())
    return float((ranks[same].sum() - n_same * (n_same + 1) / 2) / (n_same * n_diff))


def train(variant: str, seed: int, log: Path) -> dict:
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ArcFaceNet()
    broken = variant == "same-centres-not-optimised"
    if broken:
        nn.init.constant_(model.centres, EMBED ** -0.5)
    params = [p for n, p in model.named_parameters() if not (broken and n == "centres")]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    start_centres = model.centres.detach().clone()
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("embedding", labels="groups")
    probe.watch_prototypes("centres", lambda: F.normalize(model.centres.detach(), dim=1),
                           latent="embedding")
    with probe:
        for _ in range(STEPS):
            idx = next(order)
            labels = y_tr[idx]
            z = F.normalize(model(x_tr[idx]), dim=1)
            cos = z @ F.normalize(model.centres, dim=1).t()
            losses = {"arcface": arcface_loss(cos, labels),
                      "center": (1 - cos.gather(1, labels[:, None])).mean()}
            probe.observe(embedding=z, groups=labels)
            opt.zero_grad()
            probe.backward(losses, weights={"center": CENTER_WEIGHT})
            opt.step()
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model(x_tr), model(x_te)
        centres = F.normalize(model.centres, dim=1)
        off_diagonal = ~torch.eye(CLASSES, dtype=torch.bool)
        return {"knn_acc": knn_accuracy(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy()),
                "verification_auc": verification_auc(f_te, y_te),
                "embedding_rank": centred_effective_rank(F.normalize(f_te, dim=1).numpy()),
                "centre_acc": float(((F.normalize(f_te, dim=1) @ centres.t()).argmax(1) == y_te)
                                    .float().mean()),
                "centre_movement": float((model.centres - start_centres).norm()),
                "centre_max_cosine": float((centres @ centres.t())[off_diagonal].max())}


_MUST_NOT = ("inert-loss", "gradient-conflict", "non-finite")

FAMILY = Family(
    name="arcface",
    source="Deng, Guo, Xue & Zafeiriou 2019 (ArcFace: Additive Angular Margin Loss for Deep "
           "Face Recognition, CVPR, eq. 3, s 64, m 0.5; deepinsight/insightface "
           "recognition/arcface_torch/losses.py ArcFace)",
    train=train,
    variants=(
        Variant("arcface", True,
                "ArcFace as published (normalised W and embedding, s 64, m 0.5, W trained "
                "with the network) plus an intra-class cosine pull to W weighted 0.1",
                must_not=_MUST_NOT + ("prototype-stale", "prototype-collapse",
                                      "representation-collapse", "gradient-swamping")),
        Variant("same-centres-not-optimised", False,
                "W left out of the optimizer and initialised constant: every class centre is "
                "the same point and never moves, the margin logits cannot tell classes apart "
                "and kNN accuracy falls 20 points below the healthy run's",
                expected=(Expect("prototype-stale", "centres"),),
                allowed=(Expect("prototype-collapse", "centres"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("arcface", 1), ("same-centres-not-optimised", 1)),
)
