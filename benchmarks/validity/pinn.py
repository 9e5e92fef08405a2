"""A physics-informed network for 1-D Poisson, after Wang, Teng & Perdikaris 2021
("Understanding and mitigating gradient flow pathologies in physics-informed neural
networks", SIAM J. Sci. Comput.; PredictiveIntelligenceLab/GradientPathologiesPINNs,
Helmholtz/Helmholtz2D_model_tf.py for the training loop and Algorithm 1).

Problem: u''(x) = f(x) on [0, 1] with u(0) = 0, u(1) = 1, exact solution
u = sin(4 pi x) + x, so f = -16 pi^2 sin(4 pi x). The residual's scale (16 pi^2 ~ 158)
makes its gradient dwarf the boundary term's: the paper's analysis of 1-D Poisson (section
2.4) shows the boundary gradient swamped, growing with the solution's frequency.

Published training loop: a tanh MLP (Xavier init, zero biases) on inputs standardised by
the collocation points' mean and std; mini-batches of 128 fresh uniform residual points per
step; L = L_r + lambda L_b; Adam lr 1e-3 with exponential decay 0.9 per 1,000 steps.
Learning-rate annealing (Algorithm 1, model "M2" of the code): every 10 steps,
lambda_hat = max_theta |grad L_r| / mean_layers mean_theta |grad(lambda L_b)| over the weight
matrices, lambda <- 0.9 lambda + 0.1 lambda_hat.

Here: layers [1, 50, 50, 50, 1] as in the paper's Poisson example, 3,000 steps (the paper
runs 40,000), both boundary points in every step.

Variants (truth by construction):
- ``annealing``: healthy (Algorithm 1).
- ``equal-weights``: lambda = 1 ("M1"). The boundary loss's gradient is orders of magnitude
  below the residual's for the whole run; the network fits u'' but not the boundary values.
  Checked by the relative L2 error of u and the boundary error on a 1,000-point grid.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``boundary``.
  Must not: ``gradient-conflict``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import gradprobe

from .harness import Expect, Family, Variant

STEPS, BATCH = 3000, 128
MEAN, STD = 0.5, 1 / math.sqrt(12)  # of uniform collocation points on [0, 1]


def exact(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(4 * math.pi * x) + x


def forcing(x: torch.Tensor) -> torch.Tensor:
    return -16 * math.pi ** 2 * torch.sin(4 * math.pi * x)


class MLP(nn.Module):
    """The paper's tanh MLP on inputs standardised by the collocation points' mean and std."""

    def __init__(self, layers=(1, 50, 50, 50, 1), mean: float = MEAN, std: float = STD):
        super().__init__()
        self.mean, self.std = mean, std
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        for lin in self.linears:
            nn.init.normal_(lin.weight, std=1 / math.sqrt((lin.in_features + lin.out_features) / 2))
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        h = (x - self.mean) / self.std
        for lin in self.linears[:-1]:
            h = torch.tanh(lin(h))
        return self.linears[-1](h)


def second_derivative(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    return d2u


def annealed_weight(model: MLP, losses: dict, lam: float) -> float:
    """Algorithm 1's lambda_hat: max |grad L_r| over mean |grad(lambda L_b)| (weights only)."""
    weights = [lin.weight for lin in model.linears]
    g_res = torch.autograd.grad(losses["residual"], weights, retain_graph=True)
    g_bc = torch.autograd.grad(lam * losses["boundary"], weights, retain_graph=True)
    max_res = max(float(g.abs().max()) for g in g_res)
    mean_bc = sum(float(g.abs().mean()) for g in g_bc) / len(g_bc)
    return max_res / mean_bc


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9 ** (1 / 1000))
    x_bc, u_bc = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]])
    lam = 1.0
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step in range(STEPS):
            x_r = torch.rand(BATCH, 1, generator=gen)
            losses = {"residual": (second_derivative(model, x_r) - forcing(x_r)).pow(2).mean(),
                      "boundary": (model(x_bc) - u_bc).pow(2).mean()}
            if variant == "annealing" and step % 10 == 0:
                lam = 0.9 * lam + 0.1 * annealed_weight(model, losses, lam)
            probe.backward(losses, weights={"boundary": lam})
            opt.step()
            opt.zero_grad()
            sched.step()
    x = torch.linspace(0, 1, 1000).unsqueeze(1)
    with torch.no_grad():
        u, u_true = model(x), exact(x)
        bc_error = float((model(x_bc) - u_bc).abs().max())
    return {"rel_l2_error": float((u - u_true).norm() / u_true.norm()), "boundary_error": bc_error,
            "lambda": lam}


FAMILY = Family(
    name="pinn-poisson",
    source="Wang, Teng & Perdikaris 2021 (SIAM J. Sci. Comput.); "
           "PredictiveIntelligenceLab/GradientPathologiesPINNs",
    train=train,
    variants=(
        Variant("annealing", True, "learning-rate annealing (Algorithm 1) balances the boundary "
                "term", must_not=("gradient-swamping", "gradient-conflict", "static-loss-weights")),
        Variant("equal-weights", False,
                "lambda = 1: the residual's scale (16 pi^2) makes the boundary gradient orders of "
                "magnitude smaller for the whole run",
                expected=(Expect("gradient-swamping", "boundary"),
                          Expect("static-loss-weights", "boundary")),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("annealing", 1), ("equal-weights", 1)),
)
