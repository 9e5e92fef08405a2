"""Gradient Vaccine (GradVac), after Wang, Tsvetkov, Firat & Cao 2021 ("Gradient Vaccine:
Investigating and Improving Multi-task Optimization in Massively Multilingual Models", ICLR;
sec. 3.3, Algorithm 1: for each task i, g_i^PC = g_i; for each other task j in random order,
phi_ij = cos(g_i^PC, g_j); if phi_ij < phi_hat_ij (the target), g_i^PC += ||g_i^PC||
(phi_hat_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi_hat_ij^2)) / (||g_j|| sqrt(1 -
phi_hat_ij^2)) g_j, which lifts the cosine exactly to the target; the target is an EMA of the
observed similarities, phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij, started at 0; the
update is sum_i g_i^PC) and LibMTL's port median-research-group/LibMTL
``LibMTL/weighting/GradVac.py`` (read with the read_file tool: ``GradVac.backward``, per-task
gradients of the shared parameters from ``AbsWeighting._compute_grad`` in
``LibMTL/weighting/abstract_weighting.py``, ``rho_T`` the targets of shape [tasks, tasks,
groups] started at 0, ``GradVac_group_type`` 0 (the whole shared model as one group),
``GradVac_beta`` 0.5 (its default), the corrected gradients summed and written back by
``_reset_grad``). One difference kept on purpose: LibMTL moves ``rho_T`` only on the steps it
corrects (its EMA line sits inside the ``if``), so its targets can only fall below 0; the
paper's (and torchjd's ``GradVac``) EMA follows every observed similarity, so the targets
adapt up as well as down. This port follows the paper.

Published setup: massively multilingual NMT (one Transformer for 25 languages, a target-
language tag on the input, encoder, decoder and output vocabulary shared by all languages;
GradVac on the gradients of language pairs, whole model or per layer) and XTREME.

Here (no download): scikit-learn's 8x8 digits (``common.digits_split``) as the "sentences",
two "languages" that share every parameter as the multilingual model does: an MLP (64 pixels +
a 2-dim one-hot task tag, the language tag) -> 128 -> ReLU -> 128 -> ReLU -> 10 shared logits
(the shared vocabulary). Task ``digit`` reads the label y with tag 0, task ``shifted`` the
label (y + 5) mod 10 with tag 1, on the same images each step; both are 10-class
cross-entropies. Adam lr 1e-3, batch 128, 600 steps. The probe records each task's loss with
``probe.before_backward`` and GradVac (or the plain sum) writes ``.grad`` in place of the
backward (docs/quickstart.md, "Loops that run their own backward"), as
benchmarks/validity/heldout7/pcgrad.py and heldout10/graddrop.py do.

Truth, measured without gradprobe on the test split: each task's accuracy against the same
network trained on that task alone (same steps and seed, its tag fed, plain backward); every
10 steps the cosine of the two tasks' gradients over every parameter (median, share below 0),
the ratio of their norms (smaller over larger), the share of steps where GradVac corrected
and its final targets; the last 50 steps' mean losses.

Variants (truth by construction):
- ``gradvac``: healthy, GradVac as published on the tagged pair. The two label maps disagree on
  every digit, so the shared parameters are pulled apart until the network has learnt to
  read the tag (the conflict of two dissimilar languages on one model); once it has, the
  tasks conflict only somewhat. Measured, seeds 0 / 1: digit accuracy 0.969 / 0.982 against
  0.976 / 0.978 single-task, shifted 0.982 / 0.984 against 0.978 / 0.976 (both at their
  single-task level); cosine of the two gradients median +0.09 / +0.06 over the run, below 0
  on 43% / 42% of the measured steps, median -0.08 / -0.18 over the first 100 steps;
  norm ratio 0.93 / 0.92; GradVac corrected on 47% / 49% of the steps, final targets
  -0.07 / +0.33 (the EMA follows the similarity up and down); last-50-step losses digit
  0.035 / 0.034, shifted 0.034 / 0.031. Must not: ``gradient-conflict`` (negative cosines on
  many steps, but no task held back), ``gradient-swamping``, ``static-loss-weights``,
  ``inert-loss``, ``non-finite``.
- ``summed-untagged``: broken. The plain equal-weight sum of the same two losses with the tag
  left out of the input (both tasks read the bare image, as if the language tag were
  dropped): nothing tells the tasks apart, the two label maps contradict each other on every
  image, and the sum's optimum puts probability 1/2 on y and 1/2 on (y + 5) mod 10 (each loss
  then ln 2 = 0.69), so each task's accuracy is about a coin toss between the two; the two
  gradients oppose at comparable norms for the whole run (the harm is the direction, not a
  scale). Measured, seeds 0 / 1: digit accuracy 0.482 / 0.440 against 0.976 / 0.978
  single-task, shifted 0.493 / 0.542 against 0.978 / 0.976; cosine median -0.90 / -0.85, below
  0 on 92% / 95% of the measured steps; norm ratio 0.99 / 0.99; last-50-step losses 0.713 /
  0.717 (digit) and 0.713 / 0.717 (shifted) against ~0.03 for ``gradvac``. Expected:
  ``gradient-conflict`` on ``digit|shifted``. Allowed: ``static-loss-weights`` on ``digit`` and
  ``shifted`` (fixed weights of a harmful conflict). Must not: ``gradient-swamping`` (norm
  ratio ~1), ``inert-loss``, ``non-finite``.
- ``gradvac-untagged``: broken. GradVac on the untagged pair: the surgery lifts each
  gradient's cosine to its target, but no update can make one set of logits serve two
  contradicting label maps; the targets follow the similarity down to -0.95 / -0.94 and the
  tasks stay where the plain sum leaves them. The probe records the losses' own gradients,
  which still oppose. Measured, seeds 0 / 1: digit accuracy 0.489 / 0.422, shifted 0.487 /
  0.560 (single-task as above); cosine median -0.89 / -0.86, below 0 on 92% / 95%; norm
  ratio 0.99 / 0.99; corrected on 55% / 59% of the steps; last-50-step losses 0.71 / 0.72.
  Expected, allowed and must-not as ``summed-untagged``.
(Not kept: the tag fed and the plain sum, no GradVac, learns the pair as well, measured seeds
0 / 1: digit 0.971 / 0.982, shifted 0.982 / 0.984; the harm of the broken variants is the
missing tag's contradiction, which neither the sum nor GradVac can resolve; GradVac itself is
not claimed to beat the sum here.)

CPU: about 2.5-2.8 seconds a run (the variant and its two single-task references, one thread).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, WIDTH = 600, 128, 1e-3, 128
BETA = 0.5  # LibMTL's default GradVac_beta
MEASURE_EVERY = 10
TASKS = ("digit", "shifted")


class TaggedNet(nn.Module):
    """Every parameter shared by both tasks; the task tag is part of the input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64 + len(TASKS), WIDTH), nn.ReLU(),
                                 nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))

    def forward(self, x: torch.Tensor, task: int, tagged: bool) -> torch.Tensor:
        tag = torch.zeros(len(x), len(TASKS))
        if tagged:
            tag[:, task] = 1.0
        return self.net(torch.cat([x, tag], 1))


def labels(task: str, y: torch.Tensor) -> torch.Tensor:
    return y if task == "digit" else (y + 5) % 10


def task_losses(model: TaggedNet, x: torch.Tensor, y: torch.Tensor, tagged: bool) -> dict:
    return {task: F.cross_entropy(model(x, i, tagged), labels(task, y))
            for i, task in enumerate(TASKS)}


def flat_gradients(model: nn.Module, losses: dict) -> torch.Tensor:
    """[tasks, parameters]: each loss's gradient over every (shared) parameter."""
    params = list(model.parameters())
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, params, retain_graph=True)]) for loss in losses.values()])


def gradvac_update(grads: torch.Tensor, targets: torch.Tensor, rng: random.Random
                   ) -> tuple[torch.Tensor, bool]:
    """Algorithm 1 on the whole model as one group: each task's gradient lifted towards the
    others' (original) gradients up to the EMA target cosine; returns the summed update and
    whether any correction was made. ``targets`` (phi_hat) is updated in place."""
    corrected = grads.clone()
    changed = False
    for i in range(len(grads)):
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            g_i, g_j = corrected[i], grads[j]
            phi = float(g_i @ g_j / (g_i.norm() * g_j.norm() + 1e-8))
            goal = float(targets[i, j])
            if phi < goal:
                w = (float(g_i.norm()) * (goal * np.sqrt(1 - phi ** 2)
                                          - phi * np.sqrt(1 - goal ** 2))
                     / (float(g_j.norm()) * np.sqrt(1 - goal ** 2) + 1e-8))
                corrected[i] = g_i + w * g_j
                changed = True
            targets[i, j] = (1 - BETA) * goal + BETA * phi
    return corrected.sum(0), changed


def write_grad(model: nn.Module, update: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = update[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


@torch.no_grad()
def accuracies(model: TaggedNet, tagged: bool) -> dict:
    _, _, x_te, y_te = digits_split()
    return {task: float((model(x_te, i, tagged).argmax(1) == labels(task, y_te)).float().mean())
            for i, task in enumerate(TASKS)}


def fit(variant: str, seed: int, log: Path | None, alone: str | None = None):
    """Train ``variant``; with ``alone`` the tagged loss of that name only (no probe)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    x_tr, y_tr, _, _ = digits_split()
    tagged = variant == "gradvac" or alone is not None
    model = TaggedNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    targets = torch.zeros(len(TASKS), len(TASKS))
    measured = {"cosine": [], "norm_ratio": [], "corrected": [], "digit": [], "shifted": []}
    probe = gradprobe.Probe(model, run_file=log) if alone is None else None
    for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
        losses = task_losses(model, x_tr[idx], y_tr[idx], tagged)
        if alone is not None:
            losses[alone].backward()
        else:
            pending = probe.before_backward(losses)
            grads = flat_gradients(model, losses)
            if variant.startswith("gradvac"):
                update, changed = gradvac_update(grads, targets, rng)
                measured["corrected"].append(float(changed))
            else:
                update = grads.sum(0)  # the plain equal-weight sum
            write_grad(model, update)
            probe.after_backward(pending)
            if step % MEASURE_EVERY == 0:
                norms = sorted(float(g.norm()) for g in grads)
                measured["cosine"].append(float(grads[0] @ grads[1]) / (norms[0] * norms[1]))
                measured["norm_ratio"].append(norms[0] / norms[1])
            if step >= STEPS - 50:
                for task in TASKS:
                    measured[task].append(float(losses[task].detach()))
        opt.step()
        opt.zero_grad()
    if probe is not None:
        probe.close()
    return model, measured, targets


def train(variant: str, seed: int, log: Path) -> dict:
    model, measured, targets = fit(variant, seed, log)
    outcome = {f"acc_{task}": acc for task, acc in
               accuracies(model, tagged=variant == "gradvac").items()}
    for task in TASKS:
        outcome[f"single_acc_{task}"] = accuracies(fit(variant, seed, None, alone=task)[0],
                                                   tagged=True)[task]
    cos = np.array(measured["cosine"])
    outcome |= {"cos_median": float(np.median(cos)), "negative_cos_share": float((cos < 0).mean()),
                "cos_first_100_steps": float(np.median(cos[:10])),
                "norm_ratio": float(np.median(measured["norm_ratio"])),
                "last50_loss_digit": float(np.mean(measured["digit"])),
                "last50_loss_shifted": float(np.mean(measured["shifted"]))}
    if variant.startswith("gradvac"):
        outcome |= {"corrected_share": float(np.mean(measured["corrected"])),
                    "final_target_digit_shifted": float(targets[0, 1]),
                    "final_target_shifted_digit": float(targets[1, 0])}
    return outcome


FAMILY = Family(
    name="gradvac",
    source="Wang, Tsvetkov, Firat & Cao 2021 (Gradient Vaccine, ICLR, sec. 3.3, Algorithm 1); "
           "median-research-group/LibMTL LibMTL/weighting/GradVac.py",
    train=train,
    variants=(
        Variant("gradvac", True,
                "GradVac (adaptive EMA cosine targets, beta 0.5) on two tasks that share every "
                "parameter and read a task tag: their label maps oppose until the tag is "
                "learnt; both reach their single-task accuracy (measured)",
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights",
                          "inert-loss", "non-finite")),
        Variant("summed-untagged", False,
                "the plain equal-weight sum with the task tag left out: the two label maps "
                "contradict each other on every image, their gradients oppose at comparable "
                "norms and neither task gets far above half its single-task accuracy "
                "(measured)",
                expected=(Expect("gradient-conflict", "digit|shifted"),),
                allowed=(Expect("static-loss-weights", "digit"),
                         Expect("static-loss-weights", "shifted")),
                must_not=("gradient-swamping", "inert-loss", "non-finite")),
        Variant("gradvac-untagged", False,
                "GradVac on the untagged pair of summed-untagged: the surgery cannot make one "
                "set of logits serve two contradicting label maps, the tasks' own gradients "
                "still oppose and neither gets far above half its single-task accuracy "
                "(measured)",
                expected=(Expect("gradient-conflict", "digit|shifted"),),
                allowed=(Expect("static-loss-weights", "digit"),
                         Expect("static-loss-weights", "shifted")),
                must_not=("gradient-swamping", "inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("gradvac", 1), ("summed-untagged", 1)),
)
