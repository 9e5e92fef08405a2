"""Prototypical Networks with N-way K-shot episodes, after Snell, Swersky & Zemel 2017
("Prototypical Networks for Few-shot Learning", NeurIPS, sec. 2.2 eq. 1-2 and Algorithm 1;
jakesnell/prototypical-networks, protonets/models/few_shot.py ``Protonet.loss``), with the
center loss of Wen et al. 2016 ("A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV, eq. 2) added as a compactness term around the episode's prototypes.

Published setup (few_shot.py): an episode holds n_class classes, n_support support and
n_query query images of each; the encoder embeds both, each prototype is the mean of its
class's support embeddings, ``dists = euclidean_dist(zq, z_proto)`` (squared Euclidean), and
the loss is the mean negative ``log_softmax(-dists)`` of each query's own class; few-shot
accuracy is measured on episodes of classes never trained on (Omniglot: 60-way training
episodes, 5-/20-way test episodes). The center loss 1/2 sum_i |z_i - c_{y_i}|^2 pulls every
embedding towards its class centre; here the centre is the episode's prototype (the mean of
its support) and the term is averaged over the support and query rows, weighted 0.1.

Here: the digits train split's classes 0-4 are the training classes, the test split's
classes 5-9 the held-out ones. Encoder 64-128-BN-ReLU-128-BN-ReLU-64 (the four conv
blocks scaled to 8x8 digits), training episodes 5-way (every training class, as Omniglot's
60-way uses many) x 5 support x 10 query images, each seen through ``common.augment``
(shift, intensity, erased patch, noise: a regulariser that lifts the held-out classes'
accuracy from 0.57-0.61 without it to 0.71-0.73), Adam lr 1e-3, 600 episodes. The probe is
told the plan (``expect_groups_per_batch=5``), sees each episode's labels as
``observe(groups=...)`` and watches the episode's embeddings ``z`` with those labels.

Truth, measured without gradprobe: the classes per training episode; the proto loss's
gradient norm on the encoder (``torch.autograd.grad``); 5-way 5-shot accuracy over 300 test
episodes (chance 0.2, the paper's evaluation) of the held-out classes
(``fewshot_acc_heldout_classes``) and of the test split's unseen images of the training
classes (``fewshot_acc_train_classes``); the centred effective rank and total variance of the
held-out classes' test embeddings. For reference, nearest-prototype on raw pixels scores
0.897 (training classes) / 0.888 (held-out classes), the untrained encoder 0.815-0.822 /
0.779-0.794 (seeds 0 / 1). At this scale (5 training classes of 8x8 digits) training does
not transfer to the held-out classes: even the healthy encoder scores below the untrained
one there, so the harm is read on both: the held-out classes and the training classes'
unseen images.

Variants (truth by construction):
- ``five-way``: healthy, 5-way episodes as published. Measured, seeds 0 / 1: 5 classes per
  episode, fewshot_acc_heldout_classes 0.710 / 0.734, fewshot_acc_train_classes 0.980 /
  0.985, held-out embedding total variance 1.98 / 1.70, effective rank 34.5 / 35.4.
- ``one-class-episodes``: the episode sampler draws n_class = 1 (the way count left at 1)
  while the plan says 5. With one prototype the softmax over prototypes is 1 for every
  query: the proto loss is exactly 0 and so is its gradient, and the center loss alone
  trains the encoder, pulling every episode's embeddings together and nothing apart.
  Measured, seeds 0 / 1: 1 class per episode, proto gradient norm 0 at every step,
  fewshot_acc_heldout_classes 0.624 / 0.644 (8.6 / 9.0 points below healthy),
  fewshot_acc_train_classes 0.695 / 0.656 (28 / 33 points below healthy, below the untrained
  encoder's 0.82), held-out embedding total variance 0.021 / 0.016 (about 100x below
  healthy) at effective rank 50.3 / 50.7 (above healthy's).
  Expected: ``batch-composition-mismatch`` on ``batch`` and ``inert-loss`` on ``proto`` (a
  zero gradient at every step while its graph reaches the encoder). Allowed:
  ``representation-collapse`` on ``z`` (each observed episode is one class that the center
  loss alone pulls to its mean: the batch's spread shrinks by construction, while the rank
  of the embedding over all classes does not fall).
Must not (healthy): ``batch-composition-mismatch``, ``inert-loss``,
``representation-collapse``, ``gradient-swamping``, ``gradient-conflict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import augment, centred_effective_rank, digits_split
from ..harness import Expect, Family, Variant

EPISODES, LR = 600, 1e-3
PLAN_WAY, SUPPORT, QUERY = 5, 5, 10
CENTER_WEIGHT = 0.1
TRAIN_CLASSES, HELDOUT_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
TEST_EPISODES, TEST_QUERY = 300, 10


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64))


def episodes(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], way: int, shots: int,
             gen: torch.Generator):
    """Endless episodes: ``way`` classes drawn at random, ``shots`` images of each, as
    (images, episode-local labels 0..way-1, digit labels), class by class."""
    members = {c: torch.nonzero(y == c).squeeze(1) for c in classes}
    while True:
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:way].tolist()]
        idx = torch.stack([members[c][torch.randperm(len(members[c]), generator=gen)[:shots]]
                           for c in chosen])  # way x shots
        yield x[idx], torch.arange(way)[:, None].expand(way, shots), y[idx]


def split_episode(z: torch.Tensor, way: int, support: int):
    """Support rows, query rows (way x shots x d) and the prototypes: support means."""
    z = z.view(way, -1, z.shape[-1])
    return z[:, :support], z[:, support:], z[:, :support].mean(1)


def proto_loss(query: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """few_shot.py's loss: -log softmax(-squared distance) of each query's own prototype, and
    the predictions."""
    way, n_query, d = query.shape
    log_p = F.log_softmax(-torch.cdist(query.reshape(-1, d), prototypes) ** 2, dim=1)
    target = torch.arange(way).repeat_interleave(n_query)
    return F.nll_loss(log_p, target), log_p.argmax(1) == target


def center_loss(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s 1/2 |z_i - c_{y_i}|^2 with the prototypes as centres, mean over rows."""
    return 0.5 * ((z - prototypes[:, None]) ** 2).sum(-1).mean()


@torch.no_grad()
def fewshot_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     classes: tuple[int, ...], seed: int) -> float:
    """Mean accuracy over 5-way 5-shot episodes of ``classes`` (the paper's evaluation)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    hits = []
    for _, (images, _, _) in zip(range(TEST_EPISODES),
                                 episodes(x, y, classes, 5, 5 + TEST_QUERY, gen)):
        _, query, prototypes = split_episode(model(images.reshape(-1, 64)), 5, 5)
        hits.append(proto_loss(query, prototypes)[1].float().mean())
    return float(torch.stack(hits).mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    way = PLAN_WAY if variant == "five-way" else 1
    model = encoder()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log, expect_groups_per_batch=PLAN_WAY)
    probe.watch_latent("z", labels="groups")
    classes_seen, proto_grad, train_acc = [], [], []
    with probe:
        for _, (images, _, digits) in zip(range(EPISODES), episodes(
                x_tr, y_tr, TRAIN_CLASSES, way, SUPPORT + QUERY, gen)):
            z = model(augment(images.reshape(-1, 64), gen))
            _, query, prototypes = split_episode(z, way, SUPPORT)
            proto, hits = proto_loss(query, prototypes)
            center = center_loss(z.view(way, -1, z.shape[-1]), prototypes)
            proto_grad.append(float(torch.cat([g.flatten() for g in torch.autograd.grad(
                proto, list(model.parameters()), retain_graph=True)]).norm()))
            probe.observe(z=z, groups=digits.reshape(-1))
            probe.backward({"proto": proto, "center": center}, weights={"center": CENTER_WEIGHT})
            opt.step()
            opt.zero_grad()
            classes_seen.append(len(digits.unique()))
            train_acc.append(float(hits.float().mean()))
    model.eval()
    with torch.no_grad():
        held = torch.isin(y_te, torch.tensor(HELDOUT_CLASSES))
        z_held = model(x_te[held]).numpy()
    return {"classes_per_episode": float(np.mean(classes_seen)),
            "proto_grad_norm_max": max(proto_grad),
            "train_episode_acc_end": float(np.mean(train_acc[-50:])),
            "fewshot_acc_heldout_classes": fewshot_accuracy(model, x_te, y_te, HELDOUT_CLASSES, seed),
            "fewshot_acc_train_classes": fewshot_accuracy(model, x_te, y_te, TRAIN_CLASSES, seed),
            "heldout_z_rank": centred_effective_rank(z_held),
            "heldout_z_total_variance": float(z_held.var(0, ddof=1).sum())}


FAMILY = Family(
    name="protonet-episodes",
    source="Snell, Swersky & Zemel 2017, Prototypical Networks (NeurIPS), eq. 1-2, Algorithm 1; "
           "jakesnell/prototypical-networks protonets/models/few_shot.py; center loss of Wen "
           "et al. 2016",
    train=train,
    variants=(
        Variant("five-way", True, "5-way episodes as published: every query's softmax is over "
                "5 prototypes, the plan is 5 classes", must_not=(
                    "batch-composition-mismatch", "inert-loss", "representation-collapse",
                    "gradient-swamping", "gradient-conflict")),
        Variant("one-class-episodes", False,
                "episodes of 1 class against a plan of 5: the softmax over one prototype is 1, "
                "the proto loss and its gradient are exactly 0, only the center loss trains",
                expected=(Expect("batch-composition-mismatch", "batch"),
                          Expect("inert-loss", "proto")),
                allowed=(Expect("representation-collapse", "z"),)),
    ),
    seeds=(0, 1),
    quick=(("five-way", 1), ("one-class-episodes", 1)),
)
