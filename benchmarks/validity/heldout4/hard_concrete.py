"""L0 regularisation with hard-concrete gates, after Louizos, Welling & Kingma 2018 ("Learning
Sparse Neural Networks through L0 Regularization", ICLR; sec. 2.1-2.2, eq. 9-12) and the
official code AMLab-Amsterdam/L0_regularization ``l0_layers.py`` (``L0Dense``: ``qz_loga``,
``quantile_concrete``, ``cdf_qz``, ``_reg_w``, ``sample_z``) and ``train_lenet5.py`` (Adam lr
1e-3, batch 100, ``loss_function`` = cross-entropy + ``model.regularization()``, the model built
with N = 60000, ``constrain_parameters`` after every step, ``lambas`` 1 per layer), read with
the repository tools.

Published setup: every input unit of a layer has a gate z = min(1, max(0, s (zeta - gamma) +
gamma)), s = sigmoid((log u - log(1 - u) + log_alpha) / beta), u ~ U(0, 1) (eq. 10-11), with
beta = 2/3 (``temperature``), gamma = -0.1, zeta = 1.1 (``limit_a``, ``limit_b``),
log_alpha initialised at log(1 - p) - log p for a drop rate p = 0.5 (std 1e-2) and clamped to
[log 1e-2, log 1e2] after each step (``constrain_parameters``). The expected L0 norm is
sum_j sigmoid(log_alpha_j - beta log(-gamma / zeta)) (eq. 12; ``1 - cdf_qz(0)``), weighted by
lambda (``lamba``) and scaled by the training-set size N the model receives, added to the task's
cross-entropy; at test time the gate is its deterministic mode
min(1, max(0, sigmoid(log_alpha)(zeta - gamma) + gamma)).
The MLP of the paper (784-300-100, gates on every layer's inputs) on MNIST.

Here: scikit-learn's 8x8 digits, an MLP 64-128-10 of two ``L0Dense``-like layers, gates on the
64 pixels and on the 128 hidden units (one gate sample per row, ``local_rep``), no L2 term
(weight_decay 0), Adam lr 1e-2 (the repo's 1e-3 scaled up for 600 steps), batch 128, 600
steps. Losses ``task`` (cross-entropy) and ``L0`` (the expected L0 norm, eq. 12, summed over
both layers' gates) passed to ``probe.backward`` with the L0 weight lambda / N as a fixed loss
weight. Watched as a user would (docs/probe.md): the gate logits, the input of the stretched
sigmoid ((log u - log(1 - u) + log_alpha) / beta) of both layers, with
``watch_saturation("gates", temperature=beta)`` and ``observe(gates=...)``.

Variants (truth by construction):
- ``published``: healthy, lambda = 20 (the paper tunes lambda per architecture; 20 / N here
  prunes about 40% of the pixels and 80% of the hidden units at the dense net's accuracy).
- ``l0-weight-too-large``: broken, lambda = 1000 (50x): the L0 term's gradient on log_alpha swamps
  the task's, every gate is pushed to the clamp, closes (its mode is 0) and the network
  outputs its last bias: accuracy at chance.
Measured on the test split (450 digits), without gradprobe: test accuracy with the gates at
their mode, share of gates open at test (mode > 0), the dense reference (same MLP, no gates,
same steps), and the norms of the task's and the L0 term's (weighted) gradients on the gate
logits over the first 50 steps (``torch.autograd.grad``):
                        seed 0          seed 1
  dense reference:      accuracy 0.976  0.971
  published:            accuracy 0.967  0.971, open gates 38/64 pixels + 22/128 hidden,
                        38/64 + 25/128; early task/L0 gradient ratio 2.05, 2.07;
  l0-weight-too-large:  accuracy 0.100  0.102 (chance), open gates 0/64 + 0/128 on both
                        seeds; early task/L0 gradient ratio 0.041, 0.042.
About 3-5 CPU-seconds a run (probe and dense reference included).
Expected on ``l0-weight-too-large``: ``gradient-swamping`` on ``task`` (its gradient on the gate
logits, the parameters the two losses share, is a small fraction of the weighted L0 term's
while it still has everything to learn) and ``static-loss-weights`` on ``task`` (the fixed
L0 weight is that harm's cause). Allowed: ``sigmoid-saturation`` on ``gates`` (the closed
gates' logits sit in the sigmoid's tail). Must not (both): ``inert-loss``, ``non-finite``;
on the healthy variant also ``gradient-swamping``, ``static-loss-weights``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, HIDDEN = 600, 128, 1e-2, 128
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
LAMBDA = {"published": 20.0, "l0-weight-too-large": 1000.0}
EARLY_STEPS = 50


def stretch(s: torch.Tensor) -> torch.Tensor:
    """Eq. 11: stretch to (gamma, zeta) and clip to [0, 1], so gates can be exactly 0 or 1."""
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class L0Dense(nn.Module):
    """A linear layer whose input units are gated by hard-concrete gates (l0_layers.py)."""

    def __init__(self, n_in: int, n_out: int, gated: bool = True):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.gated = gated
        self.log_alpha = nn.Parameter(torch.randn(n_in) * 1e-2 + math.log(0.5 / 0.5))

    def gate_logits(self, n: int) -> torch.Tensor:
        """The stretched sigmoid's input, one gate sample per row (eq. 10)."""
        u = torch.rand(n, self.log_alpha.numel()).clamp(1e-6, 1 - 1e-6)
        return (u.log() - (1 - u).log() + self.log_alpha) / BETA

    def mode(self) -> torch.Tensor:
        return stretch(torch.sigmoid(self.log_alpha))

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        if not self.gated:
            return self.linear(x)
        gate = self.mode() if logits is None else stretch(torch.sigmoid(logits))
        return self.linear(x * gate)

    def expected_l0(self) -> torch.Tensor:
        """Eq. 12: the probability that each gate is non-zero, summed."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()


class GatedMLP(nn.Module):
    def __init__(self, gated: bool = True):
        super().__init__()
        self.fc1, self.fc2 = L0Dense(64, HIDDEN, gated), L0Dense(HIDDEN, 10, gated)

    def forward(self, x: torch.Tensor, sample: bool = True):
        """Class logits and, when sampling, the gate logits of both layers."""
        logits = [layer.gate_logits(len(x)) if sample else None for layer in (self.fc1, self.fc2)]
        out = self.fc2(F.relu(self.fc1(x, logits[0])), logits[1])
        return out, (torch.cat(logits, 1) if sample else None)

    def expected_l0(self) -> torch.Tensor:
        return self.fc1.expected_l0() + self.fc2.expected_l0()

    def clamp_log_alpha(self) -> None:
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.log_alpha.clamp_(math.log(1e-2), math.log(1e2))


def _fit(model: GatedMLP, l0_weight: float, gen: torch.Generator, log: Path | None) -> list[float]:
    """Train (probed when ``log`` is given; the dense reference has no gates, no L0 term and
    no probe); return the early steps' task / weighted-L0 gradient-norm ratios on the gate
    logits."""
    x_tr, y_tr, _, _ = digits_split()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    gates = [model.fc1.log_alpha, model.fc2.log_alpha]
    ratios = []
    probe = None if log is None else gradprobe.Probe(model, run_file=log)
    if probe is not None:
        probe.watch_saturation("gates", temperature=BETA)
    with probe or contextlib.nullcontext():
        for step in range(STEPS):
            idx = next(order)
            out, gate_logits = model(x_tr[idx])
            task = F.cross_entropy(out, y_tr[idx])
            if probe is None:
                task.backward()
            else:
                l0 = model.expected_l0()
                if step < EARLY_STEPS:
                    g_task, g_l0 = (torch.cat([g.flatten() for g in torch.autograd.grad(
                        loss, gates, retain_graph=True)]) for loss in (task, l0))
                    ratios.append(float(g_task.norm() / (l0_weight * g_l0.norm())))
                probe.observe(gates=gate_logits)
                probe.backward({"task": task, "L0": l0}, weights={"L0": l0_weight})
            opt.step()
            opt.zero_grad()
            model.clamp_log_alpha()
    return ratios


def _accuracy(model: GatedMLP) -> float:
    _, _, x_te, y_te = digits_split()
    model.eval()
    with torch.no_grad():
        return float((model(x_te, sample=False)[0].argmax(1) == y_te).float().mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    x_tr = digits_split()[0]
    model = GatedMLP()
    ratios = _fit(model, LAMBDA[variant] / len(x_tr), torch.Generator().manual_seed(seed), log)
    open_px = int((model.fc1.mode() > 0).sum())
    open_hidden = int((model.fc2.mode() > 0).sum())
    accuracy = _accuracy(model)
    torch.manual_seed(seed)
    dense = GatedMLP(gated=False)
    _fit(dense, 0.0, torch.Generator().manual_seed(seed), None)
    ratios.sort()
    return {"accuracy": accuracy, "dense_accuracy": _accuracy(dense),
            "open_pixel_gates": open_px, "pixel_gates": 64,
            "open_hidden_gates": open_hidden, "hidden_gates": HIDDEN,
            "early_task_over_l0_grad_median": ratios[len(ratios) // 2]}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="hard-concrete-l0",
    source="Louizos, Welling & Kingma 2018 (L0 regularization, ICLR) eq. 9-12; "
           "AMLab-Amsterdam/L0_regularization l0_layers.py L0Dense",
    train=train,
    variants=(
        Variant("published", True,
                "hard-concrete gates (beta 2/3, gamma -0.1, zeta 1.1) under a moderate L0 "
                "weight: a sparse net at the dense net's accuracy",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights")),
        Variant("l0-weight-too-large", False,
                "the L0 weight 50x too large: its gradient on the gate logits swamps the "
                "task's, every gate closes and the accuracy falls to chance",
                expected=(Expect("gradient-swamping", "task"),
                          Expect("static-loss-weights", "task")),
                allowed=(Expect("sigmoid-saturation", "gates"),),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("l0-weight-too-large", 1)),
)
