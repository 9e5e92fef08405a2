"""SwAV, with and without its Sinkhorn-Knopp equipartition: issue 21's row "SwAV (Caron et
al. 2020) without the Sinkhorn equipartition".

Public source: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020 ("Unsupervised Learning
of Visual Features by Contrasting Cluster Assignments", NeurIPS), sec. 3.1 and
facebookresearch/swav (main_swav.py): l2-normalised embeddings z, a prototype layer
(``nn.Linear(128, 3000, bias=False)``) whose rows are l2-normalised before each step, scores
z^T c, codes q from ``distributed_sinkhorn`` (Q = exp(scores / epsilon), 3 alternating
row/column normalisations, epsilon 0.05: every prototype gets an equal share of the batch),
and the swapped prediction loss: each view's codes are the cross-entropy target of the other
view's softmax(scores / 0.1); projection head 2048-2048-128 (BN, ReLU), LARS, batch 4096.

Here (CPU): the digits backbone (``common.DigitEncoder``), head 128-128-64, K = 30
prototypes, two views of ``common.augment`` (no multi-crop, no queue, no prototype freezing),
batch 256, Adam lr 1e-3, 300 steps. One loss, ``swapped``. As the issue's user did, the
l2-normalised embedding is watched as ``z`` (observed), the prototype layer's weight with
``watch_prototypes("prototypes", ..., latent="z")``, and each row's assignment (the argmax of
its codes) is passed as ``observe(groups=...)``. Probe at its defaults.

Variants (truth by construction, measured without gradprobe on the test digits: the share of
each prototype in the argmax assignments, prototypes used (>= 1%), their entropy / log K,
kNN (``common.knn_accuracy``) and linear-probe accuracy of the backbone, rank of z):
- ``sinkhorn``: healthy, the published codes. Must raise no warning or error.
- ``no-sinkhorn``: codes = softmax(scores / epsilon), no equipartition. Nothing stops every
  embedding and its codes from moving to one prototype, which predicts every view perfectly
  (the trivial solution that the equipartition constraint exists to rule out, sec. 3.1).
  Expected: ``prototype-collapse`` on ``prototypes``; ``representation-collapse`` on ``z`` is
  allowed (the embeddings collapse with their assignments).
- ``frozen-prototypes``: the published codes, but the prototypes never get a gradient:
  main_swav.py drops their gradient while ``iteration < freeze_prototypes_niters`` (313, the
  first epoch of the ImageNet run), and a freeze set longer than the run (here: the whole
  run, as when the value is given in epochs or the run is short) leaves them where they were
  drawn while the embeddings move. Measured without gradprobe: ``prototypes_moved``, the
  share of prototype rows whose direction changed by more than 1e-6 between the first
  normalised step and the end (0 by construction), and ``z_shift``, how far the normalised
  embeddings of the training digits moved over the run (1 - mean cosine of each digit's
  first- and last-step embedding). Expected: ``prototype-stale`` on ``prototypes``.
  Measured (seeds 0 / 1): ``prototypes_moved`` 0 / 0 (``sinkhorn``: 1 / 1), ``z_shift`` 0.93 /
  0.92 (``sinkhorn``: 0.85 / 0.86), 25 / 28 prototypes used, kNN 0.93 / 0.92; gradprobe:
  ``error prototype-stale`` (still on 100% of the steps) on both seeds, nothing else.

Measured (seeds 0 / 1, one thread): ``sinkhorn``: 27 / 27 of 30 prototypes used, assignment
entropy 0.949 / 0.941 of log K, largest share 0.082, backbone kNN 0.916 / 0.907, linear
0.964 / 0.967, normalised std of z 0.75 / 0.77. ``no-sinkhorn``: 1 prototype takes every test
digit (entropy 0.00), normalised std of z 0.29 / 0.25 (the backbone keeps kNN 0.936 / 0.940).
gradprobe today (the baseline, issue 21): ``sinkhorn`` quiet on both seeds; ``no-sinkhorn``
``error representation-collapse`` on ``z`` (spread x0.14 / x0.11 of peak) and no
``prototype-collapse`` (each batch holds one group, exempt by construction). CPU ~6 s a run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import DigitEncoder, augment, batches, digits_split, knn_accuracy, representation_truth
from .harness import Expect, Family, Variant

BATCH, STEPS, DIM, PROTOTYPES = 256, 300, 64, 30
TEMPERATURE, EPSILON = 0.1, 0.05
SINKHORN_ITERATIONS = {"sinkhorn": 3, "no-sinkhorn": 0, "frozen-prototypes": 3}
MOVED_TOLERANCE = 1e-6  # a prototype row moved when its direction changed by more than this


class SwAV(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = DigitEncoder()
        w = self.encoder.width
        self.head = nn.Sequential(nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, DIM))
        self.prototypes = nn.Linear(DIM, PROTOTYPES, bias=False)

    def forward(self, x):
        z = F.normalize(self.head(self.encoder(x)), dim=1)
        return z, self.prototypes(z)


def codes(scores: torch.Tensor, iterations: int) -> torch.Tensor:
    """main_swav.py's ``distributed_sinkhorn`` on one process: Q = exp(scores / epsilon), then
    ``iterations`` alternating normalisations (prototypes to 1/K, rows to 1/B), rows summing to
    1. With 0 iterations this is softmax(scores / epsilon): no equipartition."""
    q = torch.exp((scores - scores.max()) / EPSILON).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q / q.sum(dim=0, keepdim=True)).T


def swapped_loss(s1: torch.Tensor, s2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((q1 * F.log_softmax(s2 / TEMPERATURE, dim=1)).sum(1).mean()
                   + (q2 * F.log_softmax(s1 / TEMPERATURE, dim=1)).sum(1).mean())


def assignment_truth(scores: torch.Tensor) -> dict:
    share = np.bincount(scores.argmax(1).numpy(), minlength=PROTOTYPES) / scores.shape[0]
    nz = share[share > 0]
    return {"prototypes_used": int((share >= 0.01).sum()), "top_share": float(share.max()),
            "assignment_entropy": float(-(nz * np.log(nz)).sum() / math.log(PROTOTYPES)) + 0.0}


@torch.no_grad()
def _embeddings(model: SwAV, x: torch.Tensor) -> torch.Tensor:
    """The l2-normalised embeddings of x in eval mode (batch-norm running statistics), the
    training mode restored."""
    was = model.training
    model.eval()
    z = F.normalize(model.head(model.encoder(x)), dim=1)
    model.train(was)
    return z


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = SwAV()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    iterations = SINKHORN_ITERATIONS[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    probe.watch_prototypes("prototypes", model.prototypes.weight, latent="z")
    frozen = variant == "frozen-prototypes"
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            with torch.no_grad():
                model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
            if step == 0:
                first_prototypes = model.prototypes.weight.detach().clone()
                first_z = _embeddings(model, x_tr)
            (z1, s1), (z2, s2) = model(augment(x_tr[idx], gen)), model(augment(x_tr[idx], gen))
            with torch.no_grad():
                q1, q2 = codes(s1, iterations), codes(s2, iterations)
            probe.observe(z=z1, groups=q1.argmax(1))
            probe.backward({"swapped": swapped_loss(s1, s2, q1, q2)})
            if frozen:  # main_swav.py: ``if iteration < args.freeze_prototypes_niters``
                model.prototypes.weight.grad = None
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        f_tr, f_te = model.encoder(x_tr), model.encoder(x_te)
        scores = model.prototypes(F.normalize(model.head(f_te), dim=1))
    truth = representation_truth(model.encoder, model.head) | assignment_truth(scores)
    moved = (F.normalize(model.prototypes.weight.detach(), dim=1) - first_prototypes).norm(dim=1)
    truth |= {"prototypes_moved": float((moved > MOVED_TOLERANCE).float().mean()),
              "z_shift": float(1 - (_embeddings(model, x_tr) * first_z).sum(1).mean())}
    return truth | {"knn_acc": knn_accuracy(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy())}


FAMILY = Family(
    name="swav",
    source="Caron et al. 2020, sec. 3.1 (facebookresearch/swav main_swav.py), eps 0.05, 3 iterations",
    train=train,
    variants=(
        Variant("sinkhorn", True,
                "the published codes: Sinkhorn-Knopp spreads each batch over the prototypes",
                must_not=("prototype-collapse", "representation-collapse")),
        Variant("no-sinkhorn", False,
                "codes without equipartition: one prototype takes every assignment",
                expected=(Expect("prototype-collapse", "prototypes"),),
                allowed=(Expect("representation-collapse", "z"),)),
        Variant("frozen-prototypes", False,
                "freeze_prototypes_niters longer than the run: the prototypes never get a "
                "gradient while the embeddings move (prototypes_moved 0, z_shift > 0)",
                expected=(Expect("prototype-stale", "prototypes"),),
                must_not=("prototype-collapse", "representation-collapse")),
    ),
    quick=(("no-sinkhorn", 1),),
)
