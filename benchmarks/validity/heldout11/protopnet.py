"""ProtoPNet, after Chen, Li, Tao, Barnett, Su & Rudin 2019 ("This Looks Like That: Deep
Learning for Interpretable Image Recognition", NeurIPS, sec. 2.1 "Stochastic gradient descent
of layers before last layer", the objective CrsEnt + lambda_1 Clst + lambda_2 Sep;
cfchen-duke/ProtoPNet ``train_and_test.py`` ``_train_or_test`` (class_specific: the cluster
and separation costs as ``max_dist - max((max_dist - min_distances) * prototypes_of_(correct|
wrong)_class)``, the default sum ``cross_entropy + 0.8 * cluster_cost - 0.08 *
separation_cost + 1e-4 * l1`` with ``l1`` the last layer's weights off the class-identity
mask) and ``model.py`` ``PPNet`` (``_l2_convolution``, the minimum over patches by a negated
max-pool, ``distance_2_similarity`` = log((d + 1) / (d + 1e-4)), prototypes ``torch.rand``,
the last layer set to 1 on each prototype's class and -0.5 elsewhere, the add-on layers
ending in a sigmoid).

Published setup: a pretrained CNN (VGG/ResNet/DenseNet) on 224x224 birds, a 7x7 feature map
of 128-dim sigmoid patches, 10 prototypes of shape 128x1x1 per class (2,000 for 200 classes),
warm-up epochs, then joint SGD of every layer before the last one (Adam, lr 1e-4 features,
3e-3 add-on and prototypes), prototype projection ("push") onto the nearest training patch
every 10 epochs and convex optimisation of the last layer.

Here: scikit-learn's 8x8 digits; features conv 1-16-32 (3x3) with a 2x2 max-pool give a 4x4
map of 32 channels, add-on 1x1 convs 32-16-16 ending in the sigmoid, 2 prototypes of 16x1x1
per class (20 in all; max_dist = 16); trained from scratch jointly (no pretrained backbone, so
the features' lr is 1e-3 and no warm-up; the last layer is trained in the same Adam step at
1e-3 with the l1 term instead of a separate last-layer stage), batch 64, 700 steps; no push
(projection is an edit of the prototypes after training, not a loss). Losses passed by the
source's names: ``cross_entropy``, ``cluster_cost``, ``separation_cost`` (weight -0.08) and
``l1`` (1e-4). The probe watches the patches (every image's 16 patch vectors, ``patches``)
and the prototype table as a user would: ``watch_prototypes("prototypes", ...,
latent="patches")``.

Truth, measured without gradprobe (on the test split, 450 images): test accuracy; the mean
distance of each prototype to its nearest training patch (``proto_to_patch``: what the
cluster cost pulls down and what makes a prototype "look like" a part of an image); the
prototypes' mean pairwise distance and the ratio of the closest pair of prototypes to it,
against chance ``(2 / (P(P - 1)))^(1/r)`` over the table's effective rank r; the usage of the
prototypes by the test patches (nearest prototype per patch, entropy / log P), how many of
the 20 prototypes are nearest to at least 1% of the patches, and the l1 term at the end.

Variants (truth by construction):
- ``published``: healthy, as above. Measured, seeds 0 / 1: test_acc 0.938 / 0.949,
  proto_to_patch 0.071 / 0.113, mean pairwise distance 0.82 / 0.92, closest pair 0.124 /
  0.084 of the mean (chance 0.49 / 0.51: 0.25 / 0.17 of it), patch usage 0.84 / 0.85, 17 / 16
  of 20 prototypes used; ``l1`` (90 at the -0.5 start) ends at 92.7 / 92.5: at 1e-4 the l1
  term does not sparsify the last layer in the joint stage, as published (the separate
  last-layer stage, omitted here, does that), and nothing is held back by it.
- ``prototypes-frozen``: ``prototype_vectors.requires_grad`` left False, as the source's
  ``last_only`` stage leaves it, while the joint stage trains the features, add-on and last
  layers (a stage switch missed). The prototypes stay at their ``torch.rand`` start while
  the patches move; the cluster cost can only pull the patches towards fixed random points.
  Measured, seeds 0 / 1: test_acc 0.873 / 0.880 (6.5 / 6.9 points below published),
  proto_to_patch 0.549 / 0.542 (7.7x / 4.8x published: the prototypes no longer look like
  any training patch, the method's point), mean pairwise distance 1.54 / 1.63 (not
  collapsed), closest pair 0.60 / 0.59 of the mean (chance 0.68 / 0.68), patch usage 0.70 /
  0.70 (above the 0.5 of a usage collapse), 11 / 10 prototypes used, l1 95.3 / 94.0.
  Expected: ``prototype-stale`` on ``prototypes`` (the table never moves while its latent
  does; no prototype ids are observed, so no lag tells a fixed table by design).
  Must not: ``prototype-collapse`` (the table is neither merged nor shrunk nor unused).
Must not (published): ``prototype-collapse``, ``prototype-stale``, ``gradient-conflict``,
``representation-collapse``. CPU time per run: 8-10 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

CLASSES, PER_CLASS, DIM = 10, 2, 16
PROTOTYPES = CLASSES * PER_CLASS
STEPS, BATCH = 700, 64
PUBLISHED_WEIGHTS = {"cluster_cost": 0.8, "separation_cost": -0.08, "l1": 1e-4}


class PPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.add_on_layers = nn.Sequential(nn.Conv2d(32, DIM, 1), nn.ReLU(),
                                           nn.Conv2d(DIM, DIM, 1), nn.Sigmoid())
        self.prototype_vectors = nn.Parameter(torch.rand(PROTOTYPES, DIM, 1, 1))
        self.register_buffer("prototype_class_identity",
                             F.one_hot(torch.arange(PROTOTYPES) // PER_CLASS, CLASSES).float())
        self.last_layer = nn.Linear(PROTOTYPES, CLASSES, bias=False)
        with torch.no_grad():  # model.py set_last_layer_incorrect_connection(-0.5)
            ident = self.prototype_class_identity.t()
            self.last_layer.weight.copy_(ident - 0.5 * (1 - ident))

    def forward(self, x: torch.Tensor):
        """Logits, each prototype's minimum distance over the patches, the patches (rows)."""
        f = self.add_on_layers(self.features(x.view(-1, 1, 8, 8)))
        patches = f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, DIM)
        protos = self.prototype_vectors.flatten(1)
        # _l2_convolution: |x|^2 - 2 x.p + |p|^2, clipped at 0
        dist = F.relu((patches ** 2).sum(-1, keepdim=True) - 2 * patches @ protos.t()
                      + (protos ** 2).sum(-1))
        min_distances = dist.min(1).values
        similarity = torch.log((min_distances + 1) / (min_distances + 1e-4))
        return self.last_layer(similarity), min_distances, patches.reshape(-1, DIM)


def losses_of(model: PPNet, logits, min_distances, label) -> dict:
    """train_and_test.py's class-specific costs."""
    max_dist = float(DIM)
    correct = model.prototype_class_identity[:, label].t()
    inverted, _ = torch.max((max_dist - min_distances) * correct, dim=1)
    inverted_wrong, _ = torch.max((max_dist - min_distances) * (1 - correct), dim=1)
    l1_mask = 1 - model.prototype_class_identity.t()
    return {"cross_entropy": F.cross_entropy(logits, label),
            "cluster_cost": torch.mean(max_dist - inverted),
            "separation_cost": torch.mean(max_dist - inverted_wrong),
            "l1": (model.last_layer.weight * l1_mask).norm(p=1)}


@torch.no_grad()
def truth(model: PPNet, x_tr, x_te, y_te) -> dict:
    model.eval()
    logits, _, _ = model(x_te)
    protos = model.prototype_vectors.flatten(1)
    train_patches = model(x_tr)[2]
    proto_to_patch = torch.cdist(protos, train_patches).min(1).values
    pair = torch.cdist(protos, protos)[torch.triu_indices(PROTOTYPES, PROTOTYPES, 1).unbind()]
    s = torch.linalg.svdvals(protos - protos.mean(0))
    p = (s / s.sum()).clamp_min(1e-12)
    rank = float(torch.exp(-(p * p.log()).sum()))
    chance = (2 / (PROTOTYPES * (PROTOTYPES - 1))) ** (1 / rank)
    nearest = torch.cdist(model(x_te)[2], protos).argmin(1)
    share = torch.bincount(nearest, minlength=PROTOTYPES).double() / len(nearest)
    q = share[share > 0]
    return {"test_acc": float((logits.argmax(1) == y_te).float().mean()),
            "proto_to_patch": float(proto_to_patch.mean()),
            "proto_mean_pair_distance": float(pair.mean()),
            "closest_pair_over_mean": float(pair.min() / pair.mean()),
            "closest_pair_by_chance": chance,
            "patch_usage": float(-(q * q.log()).sum() / np.log(PROTOTYPES)),
            "prototypes_used": int((share >= 0.01).sum()),
            "l1_end": float(losses_of(model, logits, model(x_te)[1], y_te)["l1"])}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = PPNet()
    opt = torch.optim.Adam([
        {"params": model.features.parameters(), "lr": 1e-3},
        {"params": model.add_on_layers.parameters(), "lr": 3e-3},
        {"params": [model.prototype_vectors], "lr": 3e-3},
        {"params": model.last_layer.parameters(), "lr": 1e-3}])
    if variant == "prototypes-frozen":
        model.prototype_vectors.requires_grad_(False)  # as train_and_test.last_only leaves it
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("patches")
    probe.watch_prototypes("prototypes", lambda: model.prototype_vectors.flatten(1),
                           latent="patches")
    order = batches(len(x_tr), BATCH, gen)
    with probe:
        for _ in range(STEPS):
            idx = next(order)
            logits, min_distances, patches = model(x_tr[idx])
            losses = losses_of(model, logits, min_distances, y_tr[idx])
            probe.observe(patches=patches)
            opt.zero_grad()
            probe.backward(losses, weights=PUBLISHED_WEIGHTS)
            opt.step()
    return truth(model, x_tr, x_te, y_te)


FAMILY = Family(
    name="protopnet",
    source="Chen et al. 2019, This Looks Like That (NeurIPS), sec. 2.1; cfchen-duke/ProtoPNet "
           "train_and_test.py _train_or_test, model.py PPNet",
    train=train,
    variants=(
        Variant("published", True,
                "ProtoPNet's joint objective as published: cross-entropy + 0.8 cluster cost "
                "- 0.08 separation cost + 1e-4 l1, 2 prototypes per class",
                must_not=("prototype-collapse", "prototype-stale", "gradient-conflict",
                          "representation-collapse")),
        Variant("prototypes-frozen", False,
                "the prototype vectors left with requires_grad False (as train_and_test.py's "
                "last_only stage leaves them) while the joint stage trains every other layer: "
                "the prototypes never move while the patches they summarise do",
                expected=(Expect("prototype-stale", "prototypes"),),
                must_not=("prototype-collapse",)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("prototypes-frozen", 1)),
)
