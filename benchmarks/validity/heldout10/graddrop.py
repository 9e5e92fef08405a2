"""GradDrop, gradient sign dropout at the shared activation, after Chen, Ngiam, Huang, Luong,
Kretzschmar, Chai & Anguelov 2020 ("Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS; sec. 3, Algorithm 1: at a shared activation A, per-task
gradients grad_i A; sign purity P = 1/2 (1 + sum_i grad_i / sum_i |grad_i|); a uniform U per
activation unit keeps the positive gradients where P > U and the negative ones where P < U;
the kept gradients are summed and backpropagated into the trunk) and LibMTL's port
median-research-group/LibMTL ``LibMTL/weighting/GradDrop.py`` (read with the read_file tool:
``rep_grad`` mode, per-task gradients on the representation multiplied by the input's sign
and summed over the batch, ``M = P.gt(U) * grads.gt(0) + P.lt(U) * grads.lt(0)``, the
transformed gradient ``per_grads * (leak + (1 - leak) * M)`` summed over tasks and passed to
``rep.backward``; leak 0, LibMTL's default).

Published setup: CelebA, Waymo 3D detection, NYUv2 and the like, GradDrop on the shared
feature map of a multi-task network with per-task heads; task losses summed.

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``), a shared trunk
64-64-64 (ReLU) whose output is the GradDrop activation (watched as ``trunk``), per-task
linear heads; Adam lr 1e-3, batch 128, 600 steps. The probe records the raw per-task losses
through ``probe.before_backward`` (GradDrop changes the update, not the losses) and GradDrop
writes the gradients itself (docs/quickstart.md, "Loops that run their own backward").

Truth, measured without gradprobe on the test split: each task's accuracy against the same
network trained on that task alone (same steps and seed, plain backward); every 10 steps
the cosine of the two weighted task gradients over the trunk's parameters (median, share
below 0) and the ratio of their norms (smaller over larger).

Variants (truth by construction):
- ``graddrop``: healthy, GradDrop as published on ``digit`` (10-class cross-entropy, its own
  head) and ``parity`` (even/odd, its own head): both reach their single-task accuracy.
- ``summed-mirror``: GradDrop off, the plain sum of ``digit`` and ``mirror`` (the label
  9 - digit) read from ONE head, the mirror weighted 3 (a fixed weight). No logits satisfy
  both label maps; the sum's optimum gives the mirror every argmax and holds the digit task
  at no accuracy. Expected: ``gradient-conflict`` on ``digit|mirror``; allowed:
  ``static-loss-weights`` on ``digit`` and ``mirror`` (fixed weights of a harmful
  conflict). Must not: ``gradient-swamping`` (the weighted norms are comparable).

Measured (seeds 0 / 1, one thread; single-task: the same network on that loss alone):
- ``graddrop``: digit accuracy 0.967 / 0.958 against 0.969 / 0.969 single-task, parity 0.976 /
  0.964 against 0.987 / 0.980 (within 1.6 points); trunk cosine median +0.28 / +0.30, below 0
  on 10% / 15% of the measured steps; norm ratio 0.71 / 0.72.
- ``summed-mirror``: digit accuracy 0.009 / 0.013 against 0.969 / 0.969 single-task; mirror
  0.958 / 0.953 against 0.976 / 0.969; trunk cosine median -0.38 / -0.33, below 0 on 88% /
  92% of the measured steps; weighted norm ratio 0.68 / 0.68 (comparable norms).
(This broken pair is the conflict of heldout7/pcgrad.py's ``summed-mirror`` on this
network; GradDrop itself is not claimed to fix it.)

One run (the variant and its single-task references) takes 3-7 CPU-seconds.
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

STEPS, BATCH, LR, WIDTH = 600, 128, 1e-3, 64
MEASURE_EVERY = 10
MIRROR_WEIGHT = 3.0
LEAK = 0.0  # LibMTL's default


class MultiHeadNet(nn.Module):
    def __init__(self, heads: dict[str, int]):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                                   nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(WIDTH, size) for name, size in heads.items()})

    def forward(self, x):
        rep = self.trunk(x)
        return rep, {name: head(rep) for name, head in self.heads.items()}


def task_targets(variant: str, y: torch.Tensor) -> dict:
    """Each task's (head, label): the mirror reads the digit head."""
    if variant == "summed-mirror":
        return {"digit": ("digit", y), "mirror": ("digit", 9 - y)}
    return {"digit": ("digit", y), "parity": ("parity", y % 2)}


def make_model(variant: str) -> MultiHeadNet:
    return MultiHeadNet({"digit": 10} if variant == "summed-mirror" else {"digit": 10, "parity": 2})


def graddrop_backward(model: MultiHeadNet, rep: torch.Tensor, losses: dict, weights: dict):
    """LibMTL's GradDrop (rep_grad mode): heads get their own tasks' gradients, the trunk the
    sign-dropped sum of the tasks' gradients on the shared activation."""
    head_params = list(model.heads.parameters())
    per_grads = []
    for name, loss in losses.items():
        grads = torch.autograd.grad(weights.get(name, 1.0) * loss, [rep] + head_params,
                                    retain_graph=True, allow_unused=True)
        per_grads.append(grads[0])
        for p, g in zip(head_params, grads[1:]):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    per_grads = torch.stack(per_grads)
    grads = (per_grads * rep.detach().sign()).sum(1)
    purity = 0.5 * (1 + grads.sum(0) / (grads.abs().sum(0) + 1e-7))
    uniform = torch.rand_like(purity)
    keep = (purity.gt(uniform) * grads.gt(0) + purity.lt(uniform) * grads.lt(0)).float()
    rep.backward((per_grads * (LEAK + (1 - LEAK) * keep.unsqueeze(1))).sum(0))


def trunk_gradients(model: MultiHeadNet, losses: dict, weights: dict) -> list[torch.Tensor]:
    params = list(model.trunk.parameters())
    return [weights.get(name, 1.0) * torch.cat(
        [g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for name, loss in losses.items()]


def accuracies(variant: str, model: MultiHeadNet) -> dict:
    _, _, x_te, y_te = digits_split()
    with torch.no_grad():
        outputs = model(x_te)[1]
    return {name: float((outputs[head].argmax(1) == label).float().mean())
            for name, (head, label) in task_targets(variant, y_te).items()}


def fit(variant: str, seed: int, log: Path | None, alone: str | None = None):
    """Train ``variant``'s tasks; with ``alone`` the loss of that name only (no probe)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    model = make_model(variant)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    weights = {"mirror": MIRROR_WEIGHT} if variant == "summed-mirror" else {}
    measured = {"cosine": [], "norm_ratio": []}
    probe = None
    if not alone:
        probe = gradprobe.Probe(model, run_file=log)
        probe.watch_latent("trunk", model.trunk)
    for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
        rep, outputs = model(x_tr[idx])
        losses = {name: F.cross_entropy(outputs[head], label)
                  for name, (head, label) in task_targets(variant, y_tr[idx]).items()}
        if alone:
            losses[alone].backward()
        else:
            pending = probe.before_backward(losses, weights)
            if step % MEASURE_EVERY == 0:
                grads = trunk_gradients(model, losses, weights)
                norms = sorted(float(g.norm()) for g in grads)
                measured["cosine"].append(float(grads[0] @ grads[1]) / (norms[0] * norms[1]))
                measured["norm_ratio"].append(norms[0] / norms[1])
            if variant == "graddrop":
                graddrop_backward(model, rep, losses, weights)
            else:
                pending.total.backward()
            probe.after_backward(pending)
        opt.step()
        opt.zero_grad()
    if probe:
        probe.close()
    return model, measured


def train(variant: str, seed: int, log: Path) -> dict:
    model, measured = fit(variant, seed, log)
    outcome = {f"acc_{name}": acc for name, acc in accuracies(variant, model).items()}
    for name in task_targets(variant, torch.zeros(1, dtype=torch.long)):
        outcome[f"single_acc_{name}"] = accuracies(variant, fit(variant, seed, None, alone=name)[0])[name]
    cos = np.array(measured["cosine"])
    outcome.update(cos_median=float(np.median(cos)), negative_cos_share=float((cos < 0).mean()),
                   norm_ratio=float(np.median(measured["norm_ratio"])))
    return outcome


FAMILY = Family(
    name="graddrop",
    source="Chen et al. 2020 (NeurIPS), GradDrop Algorithm 1; median-research-group/LibMTL "
           "LibMTL/weighting/GradDrop.py",
    train=train,
    variants=(
        Variant("graddrop", True, "GradDrop at the shared trunk's output on digit and parity, "
                "each with its own head: both reach their single-task accuracy (measured)",
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights")),
        Variant("summed-mirror", False, "GradDrop off, the plain sum of digit and 3 x mirror "
                "(9 - digit) read from one head: the mirror takes every argmax and the digit "
                "task is held at no accuracy against its single-task run (measured)",
                expected=(Expect("gradient-conflict", "digit|mirror"),),
                allowed=(Expect("static-loss-weights", "digit"),
                         Expect("static-loss-weights", "mirror")),
                must_not=("gradient-swamping",)),
    ),
    seeds=(0, 1),
    quick=(("summed-mirror", 1), ("graddrop", 1)),
)
