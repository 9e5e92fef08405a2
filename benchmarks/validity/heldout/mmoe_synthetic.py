"""Two regression tasks of controllable correlation on a shared-bottom network, after Ma et
al. 2018 ("Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD; sec. 3.2 synthetic data, sec. 3.3 shared-bottom results).

Published data (sec. 3.2): two orthogonal unit vectors u1, u2 in R^d; w1 = c u1,
w2 = c (p u1 + sqrt(1 - p^2) u2) for a correlation p; x ~ N(0, I_d);
y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k, eps_k ~ N(0, 0.01);
d = 100, c = 1, m = 10 (alpha_i, beta_i are "given parameters"; here drawn from N(0, 1)
with the run's seed, as public ports do). Published model: a shared bottom (ReLU layer) under two towers (ReLU
hidden 8, linear output), MSE per task, Adam; the shared-bottom model's loss rises as the task
correlation falls (their Fig. 3); MMoE (several experts with one softmax gate per task) is
their fix.

Here: the same data, 10,000 training and 2,000 test points, shared bottom 100 -> 16 (ReLU)
and towers 16 -> 8 -> 1; Adam lr 1e-3, batch 128, 1,000 steps. Losses ``task1`` and ``task2``
(MSE, weight 1). Each task is also trained alone (the same bottom and its own tower, the same
steps and seed), so that harm is measured against a single-task model, and the cosine of the
two tasks' gradients on the shared bottom is measured with torch.autograd every 10 steps,
independently of gradprobe. The shared bottom's output is watched (``bottom``).

Variants: task correlation p = 0.9, 0 and -0.9. At this size the shared bottom does not
harm either task at any correlation: measured against the single-task models, see below.
(On 2,000 training points and 1,500 steps overfitting made the comparison erratic: the shared
bottom 2.1x worse than single-task at p = 0.9 and 0.94x at p = 0, seed 1; with a bottom of
width 2, dead units made every run erratic.) The MMoE model itself is left out: there is no
harm here for it to fix. The brief was to declare an alarm
only where the harm is real and large, so every variant is healthy and expects nothing:
the family tests that tasks whose gradients are orthogonal (p = 0) or partly opposed
(p = -0.9, the linear parts pull the bottom in opposite directions) are not reported as
harmful when sharing costs neither task anything. Must not: ``gradient-conflict``,
``gradient-swamping``, ``static-loss-weights``, ``representation-collapse``.
Measured on the test split (seeds 1 and 3; harm = shared-bottom MSE / single-task MSE;
cosine of the two tasks' gradients on the shared bottom, median and share below 0):
  correlation-0.9:       harm 1.00 / 1.00 (seed 1), 1.11 / 1.24 (seed 3); cosine 0.57 and
                         0.28, below 0 on 4% and 3% of steps;
  correlation-0:         harm 1.00 / 0.90, 1.07 / 1.10; cosine 0.005 and 0.08, below 0 on 48%
                         and 16%;
  correlation-minus-0.9: harm 0.85 / 0.80, 1.25 / 1.25; cosine -0.06 and -0.03, below 0 on
                         73% and 71%.
The seed-3 data (alpha, beta drawn per seed) has target variance 6.0 against 1.6 for seed
1: its largest excess, 0.025 MSE, is 0.4% of the target variance, and it is the same at
p = 0.9 as at p = -0.9, so it is no task conflict. The seed-1 data gives the shared bottom
the edge at p = -0.9 (harm 0.80-0.85) although the gradients oppose on 73% of steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..harness import Family, Variant

D, C, M, NOISE_VAR = 100, 1.0, 10, 0.01
N_TRAIN, N_TEST = 10000, 2000
STEPS, BATCH, LR, BOTTOM, TOWER = 1000, 128, 1e-3, 16, 8
CORRELATION = {"correlation-0.9": 0.9, "correlation-0": 0.0, "correlation-minus-0.9": -0.9}


def synthetic(p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ma et al.'s recipe: (x, y) with y (n, 2) for task correlation p."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((D, 2)))[0].T  # two orthonormal rows
    w1, w2 = C * u[0], C * (p * u[0] + math.sqrt(1 - p * p) * u[1])
    alpha, beta = rng.standard_normal(M), rng.standard_normal(M)
    x = rng.standard_normal((N_TRAIN + N_TEST, D))
    ys = []
    for w in (w1, w2):
        proj = x @ w
        ys.append(proj + np.sin(alpha[None, :] * proj[:, None] + beta[None, :]).sum(1)
                  + rng.normal(0.0, math.sqrt(NOISE_VAR), len(x)))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(np.stack(ys, 1), dtype=torch.float32)


class SharedBottom(nn.Module):
    def __init__(self, tasks: int):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(D, BOTTOM), nn.ReLU())
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(BOTTOM, TOWER), nn.ReLU(), nn.Linear(TOWER, 1))
            for _ in range(tasks))

    def forward(self, x):
        h = self.bottom(x)
        return h, torch.cat([t(h) for t in self.towers], dim=1)


def fit(model: SharedBottom, x: torch.Tensor, y: torch.Tensor, seed: int, step_fn) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=gen)
        h, out = model(x[idx])
        step_fn(step, h, [F.mse_loss(out[:, k], y[idx, k]) for k in range(out.shape[1])])
        opt.step()
        opt.zero_grad()


def test_mse(model: SharedBottom, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    with torch.no_grad():
        out = model(x)[1]
    return [float(F.mse_loss(out[:, k], y[:, k])) for k in range(out.shape[1])]


def train(variant: str, seed: int, log: Path) -> dict:
    x, y = synthetic(CORRELATION[variant], seed)
    x_tr, y_tr, x_te, y_te = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    torch.manual_seed(seed)
    model = SharedBottom(2)
    cosines = []
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("bottom", model.bottom)

    def step_fn(step, h, losses):
        if step % 10 == 0:
            shared = list(model.bottom.parameters())
            g = [torch.cat([t.flatten() for t in torch.autograd.grad(loss, shared, retain_graph=True)])
                 for loss in losses]
            cosines.append(float(F.cosine_similarity(g[0], g[1], dim=0)))
        probe.backward({"task1": losses[0], "task2": losses[1]})

    with probe:
        fit(model, x_tr, y_tr, seed, step_fn)
    multi = test_mse(model, x_te, y_te)
    single = []
    for k in range(2):
        torch.manual_seed(seed)
        alone = SharedBottom(1)
        fit(alone, x_tr, y_tr[:, k:k + 1], seed, lambda step, h, losses: losses[0].backward())
        single += test_mse(alone, x_te, y_te[:, k:k + 1])
    cos = np.array(cosines)
    return {"mse1": multi[0], "mse2": multi[1], "single_mse1": single[0], "single_mse2": single[1],
            "harm1": multi[0] / single[0], "harm2": multi[1] / single[1],
            "median_cosine": float(np.median(cos)), "negative_share": float((cos < 0).mean())}


FAMILY = Family(
    name="mmoe-synthetic",
    source="Ma et al. 2018 (MMoE, KDD) sec. 3.2 synthetic data, shared-bottom baseline",
    train=train,
    variants=tuple(
        Variant(name, True, f"task correlation {p}: the shared bottom costs neither task "
                "anything against a single-task model (measured)",
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights",
                          "representation-collapse"))
        for name, p in CORRELATION.items()),
    seeds=(1, 3),
    quick=(("correlation-minus-0.9", 1),),
)
