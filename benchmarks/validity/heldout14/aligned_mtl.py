"""Aligned-MTL, after Senushkin, Patakin, Kuznetsov & Konushin 2023 ("Independent Component
Alignment for Multi-Task Learning", CVPR; sec. 3-4: the stability of a multi-task update is
measured by the condition number kappa(G) = sigma_max / sigma_min of the tasks' gradient
matrix G (rows: the tasks' gradients on the shared parameters); Aligned-MTL replaces G by the
nearest matrix with kappa = 1, found from the eigen-decomposition of the Gram matrix
M = G G^T = V Lambda V^T: the aligned matrix is B G with B = sqrt(lambda_min) V Lambda^{-1/2}
V^T (Theorem 1, the rescaling by the smallest singular value; Algorithm 1), and the update is
the sum of the aligned gradients, i.e. task weights alpha = 1^T B) and LibMTL's port of the
official code (SamsungLabs/MTL): median-research-group/LibMTL
``LibMTL/weighting/Aligned_MTL.py`` ``Aligned_MTL.backward`` (read with the read_file tool:
``grads = self._get_grads(losses, mode='backward')`` the tasks' gradients on the shared
parameters, each task's own ``backward`` reaching its head unweighted; ``M = grads @
grads.t()``; ``torch.symeig``; the rank from the tolerance max(lambda) * max(M.shape) *
float eps; eigenpairs sorted descending and cut to the rank; ``B = lmbda[-1].sqrt() * ((V @
diag(1 / lmbda.sqrt())) @ V.t())``; ``alpha = B.sum(0)``; ``_backward_new_grads(alpha,
grads)`` writes sum_i alpha_i g_i onto the shared parameters).

Published setup: scene understanding benchmarks (NYUv2, Cityscapes: segmentation, depth,
surface normals) among others, shared encoders with task decoders; the motivation is tasks
whose gradients differ in scale by orders of magnitude (a regression next to a
classification), where the plain sum is dominated by the largest gradient (an ill-
conditioned gradient matrix).

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``), a shared two-layer
trunk with a digit head and an ink-regression head (``common.DigitInkNet``, width 128): task
``digit`` (10-class cross-entropy, the main loss, first) and task ``ink`` (squared error to
each image's total ink in units of 4 grey levels, about 78 on average: a regression target on
a scale far above the cross-entropy's). Adam lr 1e-3, batch 64, 40 epochs (as
heldout5/cagrad.py, whose ink is in units of 8). The probe records both losses with
``probe.before_backward(losses, weights=alpha)`` (the weights the update gives the tasks on
the shared trunk; 1 each for the plain sum), the heads get the plain sum's gradient (each
task's own, as LibMTL's per-task ``backward``), the trunk's ``.grad`` is overwritten with the
update, then ``probe.after_backward`` (docs/quickstart.md, "Loops that run their own
backward"; as heldout5/cagrad.py).

Truth, measured without gradprobe on the test split: digit accuracy and ink MSE against the
same network trained on each task alone (``fit`` "digit-only" / "ink-only", same steps and
seed, plain backward; ``heldout5.cagrad.evaluate``); every 20 steps the ratio of the raw trunk
gradient norms digit / ink (``common.trunk_grad_ratio``), their cosine, the condition number
of the 2 x 2 gradient matrix (sqrt of lambda_max / lambda_min of M) and, for Aligned-MTL, the
weights alpha.

Variants (truth by construction):
- ``aligned-mtl``: healthy, Aligned-MTL as published: the update's two components are
  rescaled to equal length (for near-orthogonal gradients alpha ~ (1, |g_digit| / |g_ink|)),
  so the ink's scale cannot take the trunk. Measured, seeds 0 / 1: digit accuracy 0.969 /
  0.931 against 0.976 / 0.973 single-task; ink MSE 0.279 / 0.041 against 0.252 / 0.236
  single-task; median weights alpha digit 1.00 / 1.00, ink 0.056 / 0.123 (the update's ink
  component scaled down to the digit's length); the raw trunk gradients stay unbalanced
  (digit / ink 0.053 / 0.122 over the run, 0.009 / 0.0008 over the first 200 steps; the
  weighted ones, alpha times the norms, are balanced by construction); condition number of
  the raw gradient matrix 18.8 / 8.2 (median); cosine +0.003 / +0.010.
  Must not: ``gradient-swamping``, ``static-loss-weights``, ``gradient-conflict``,
  ``inert-loss``, ``non-finite``.
- ``equal-weights``: broken, the plain sum digit + ink, one backward: the ink regression's
  gradient on the trunk is tens of times the digit's and the trunk serves the ink; digit
  accuracy falls far below single-task. Measured, seeds 0 / 1: digit accuracy 0.200 / 0.207
  against 0.976 / 0.973 single-task (Aligned-MTL 0.969 / 0.931); ink MSE 0.253 / 0.236
  (single-task 0.252 / 0.236: the trunk is the ink's); trunk gradient ratio digit / ink
  0.032 / 0.017 over the first 200 steps, 0.24 / 0.24 over the run; cosine -0.003 / +0.003;
  condition number 4.2 / 4.2. Expected: ``gradient-swamping`` on ``digit`` (its gradient
  drowned by the ink's) and ``static-loss-weights`` on ``digit`` (its fixed weight, while it
  is swamped, is the cause; adaptive weighting such as Aligned-MTL's is the cure). Must not:
  ``gradient-conflict`` (the cosines are about 0: the harm is the scale, not the direction),
  ``inert-loss``, ``non-finite``.
(Not kept: the ink in units of 8 grey levels, heldout5/cagrad.py's target: its equal-weight run
is that family's own run, step for step.)

CPU: about 4.4-4.9 seconds a run (the variant and its two single-task references, one thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe

from ..common import DigitInkNet, batches, digits_split, ink_of, trunk_grad_ratio
from ..harness import Expect, Family, Variant
from ..heldout5.cagrad import BATCH, EPOCHS, LR, WIDTH, evaluate, trunk_cosine

INK_UNIT = 4.0  # the ink target in units of 4 grey levels (about 78 on average)
MEASURE_EVERY = 20
EARLY = 10  # the measurements of the first 200 steps


def aligned_weights(grads: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL's task weights alpha = 1^T B from the tasks' gradients (rows), as LibMTL's
    ``Aligned_MTL.backward`` (``torch.linalg.eigh`` in place of the removed ``symeig``)."""
    gram = grads @ grads.T
    lmbda, vecs = torch.linalg.eigh(gram)
    tol = lmbda.max() * max(gram.shape) * torch.finfo(gram.dtype).eps
    rank = int((lmbda > tol).sum())
    order = torch.argsort(lmbda, descending=True)
    lmbda, vecs = lmbda[order][:rank], vecs[:, order][:, :rank]
    b = lmbda[-1].sqrt() * ((vecs @ torch.diag(1 / lmbda.sqrt())) @ vecs.T)
    return b.sum(0)


def condition_number(grads: torch.Tensor) -> float:
    lmbda = torch.linalg.eigvalsh(grads @ grads.T)
    return float((lmbda.max() / lmbda.min().clamp_min(1e-30)).sqrt())


def trunk_rows(model: DigitInkNet, losses: dict) -> torch.Tensor:
    trunk = list(model.trunk.parameters())
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, trunk, retain_graph=True)]) for loss in losses.values()])


def write_trunk(model: DigitInkNet, update: torch.Tensor) -> None:
    offset = 0
    for p in model.trunk.parameters():
        p.grad = update[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def ink_target(x: torch.Tensor) -> torch.Tensor:
    return ink_of(x) / INK_UNIT


def task_losses(model: DigitInkNet, x: torch.Tensor, y: torch.Tensor) -> dict:
    logits, ink = model(x)
    return {"digit": F.cross_entropy(logits, y), "ink": F.mse_loss(ink, ink_target(x))}


def run_two_tasks(variant: str, seed: int, log: Path | None, losses_of, plan) -> DigitInkNet:
    """The loop of a two-task family on ``common.DigitInkNet`` that runs its own backward
    (this module's and heldout15/db_mtl.py's): Adam, EPOCHS epochs of BATCH, ``losses_of(model,
    x, y)`` the tasks' losses. Without ``log`` (no probe), the single-task reference
    "<task>-only": that task's loss alone, plain backward. With it, each step ``plan(model,
    step, losses)`` gives the weights the probe records and the backward that writes the
    update (None: the weighted sum's), run between ``probe.before_backward`` and
    ``probe.after_backward``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    model = DigitInkNet(WIDTH)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loader = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    try:
        for step in range(EPOCHS * (len(x_tr) // BATCH)):
            idx = next(loader)
            losses = losses_of(model, x_tr[idx], y_tr[idx])
            if probe is None:
                losses[variant.removesuffix("-only")].backward()
                opt.step()
                opt.zero_grad()
                continue
            weights, backward = plan(model, step, losses)
            pending = probe.before_backward(losses, weights=weights)
            if backward is None:
                pending.total.backward()
            else:
                backward()
            probe.after_backward(pending)
            opt.step()
            opt.zero_grad()
    finally:
        if probe is not None:
            probe.close()
    return model


def fit(variant: str, seed: int, log: Path | None):
    """Train ``variant`` with the probe into ``log``; "digit-only" / "ink-only" (no probe):
    the single-task references, that task's loss alone, plain backward."""
    measured = {"ratio": [], "cosine": [], "kappa": [], "alpha_digit": [], "alpha_ink": []}

    def plan(model: DigitInkNet, step: int, losses: dict):
        if variant == "aligned-mtl":
            grads = trunk_rows(model, losses)
            alpha = aligned_weights(grads)
            weights = dict(zip(losses, alpha.tolist()))
        else:
            weights = {"digit": 1.0, "ink": 1.0}
        if step % MEASURE_EVERY == 0:
            rows = grads if variant == "aligned-mtl" else trunk_rows(model, losses)
            measured["ratio"].append(trunk_grad_ratio(model, losses, {}, "digit", "ink"))
            measured["cosine"].append(trunk_cosine(model, losses))
            measured["kappa"].append(condition_number(rows))
            measured["alpha_digit"].append(weights["digit"])
            measured["alpha_ink"].append(weights["ink"])
        if variant != "aligned-mtl":
            return weights, None

        def backward():
            sum(losses.values()).backward()  # the heads: each task's own gradient
            write_trunk(model, (alpha[:, None] * grads).sum(0))
        return weights, backward

    return run_two_tasks(variant, seed, log, task_losses, plan), measured


def train(variant: str, seed: int, log: Path) -> dict:
    _, _, x_te, y_te = digits_split()
    model, m = fit(variant, seed, log)
    acc, mse = evaluate(model, x_te, y_te, target=ink_target)
    single_acc, _ = evaluate(fit("digit-only", seed, None)[0], x_te, y_te, target=ink_target)
    _, single_mse = evaluate(fit("ink-only", seed, None)[0], x_te, y_te, target=ink_target)
    return {"digit_acc": acc, "single_digit_acc": single_acc, "ink_mse": mse,
            "single_ink_mse": single_mse,
            "trunk_grad_ratio": float(np.median(m["ratio"])),
            "early_trunk_grad_ratio": float(np.median(m["ratio"][:EARLY])),
            "trunk_cosine": float(np.median(m["cosine"])),
            "condition_number": float(np.median(m["kappa"])),
            "alpha_digit": float(np.median(m["alpha_digit"])),
            "alpha_ink": float(np.median(m["alpha_ink"]))}


FAMILY = Family(
    name="aligned-mtl",
    source="Senushkin, Patakin, Kuznetsov & Konushin 2023 (Independent Component Alignment for "
           "Multi-Task Learning, CVPR, Theorem 1, Algorithm 1); median-research-group/LibMTL "
           "LibMTL/weighting/Aligned_MTL.py (from SamsungLabs/MTL)",
    train=train,
    variants=(
        Variant("aligned-mtl", True,
                "Aligned-MTL (the gradient matrix aligned to condition number 1 by the Gram "
                "matrix's eigen-decomposition) on a digit classifier and an ink regression "
                "on a shared trunk: the ink's scale no longer takes the trunk and digit "
                "accuracy stays near single-task (measured)",
                must_not=("gradient-swamping", "static-loss-weights", "gradient-conflict",
                          "inert-loss", "non-finite")),
        Variant("equal-weights", False,
                "the plain equal-weight sum: the ink regression's trunk gradient is tens of "
                "times the digit's, the trunk serves the ink and digit accuracy falls far "
                "below single-task; cosines about 0, no conflict (measured)",
                expected=(Expect("gradient-swamping", "digit"),
                          Expect("static-loss-weights", "digit")),
                must_not=("gradient-conflict", "inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("aligned-mtl", 1), ("equal-weights", 1)),
)
