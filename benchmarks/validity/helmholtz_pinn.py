"""A physics-informed network for the 2-D Helmholtz equation, after Wang, Teng & Perdikaris
2021 ("Understanding and mitigating gradient flow pathologies in physics-informed neural
networks", SIAM J. Sci. Comput., section 2.3 and Algorithm 1;
PredictiveIntelligenceLab/GradientPathologiesPINNs, Helmholtz/Helmholtz2D.py and
Helmholtz2D_model_tf.py).

Problem: u_xx + u_yy + k^2 u = q on [-1, 1]^2, k = 1, u = 0 on the boundary, exact solution
u = sin(a1 pi x) sin(a2 pi y) with a1 = 1, a2 = 4, so q = (k^2 - (a1 pi)^2 - (a2 pi)^2) u.
The residual's scale ((a2 pi)^2 ~ 158) makes its gradient dwarf the boundary term's.

Published training loop: a tanh MLP [2, 50, 50, 50, 1] (Xavier init, zero biases) on inputs
standardised by the domain's mean and std; per step 128 fresh uniform residual points and 128
points on each of the four edges; L = L_r + lambda L_b with L_b the sum of the four edges'
mean squared errors; Adam lr 1e-3 with exponential decay 0.9 per 1,000 steps; 40,000 steps.
Learning-rate annealing (Algorithm 1, model "M2"): every 10 steps
lambda_hat = max |grad L_r| / mean over the weight matrices of mean |grad(lambda L_b)|,
lambda <- 0.9 lambda + 0.1 lambda_hat (``pinn.annealed_weight``, shared with the 1-D family).

Here (CPU-small): 128 residual points (as published: with 64 the annealed error is still
0.57 after 2,500 steps) and 32 points per edge per step, 3,000 steps (the decay per 1,000
steps kept). The annealed weight is passed to ``probe.backward`` as the boundary
loss's weight at every step, as it changes.

Variants (truth by construction):
- ``annealing``: healthy (Algorithm 1); lambda climbs to the tens.
- ``equal-weights``: lambda = 1 ("M1"). The boundary loss's gradient stays far below the
  residual's: the network fits the PDE's interior but not the boundary values, and the
  solution is wrong.
Measured without gradprobe on a 100 x 100 grid: the relative L2 error of u (the paper's
figure of merit) and the largest boundary error; and over all weights and biases, the ratio
of the weighted boundary gradient's norm to the residual gradient's (median over every 50th
step). Expected on ``equal-weights``: ``gradient-swamping`` and ``static-loss-weights`` on
``boundary``. The annealed run must stay quiet (issue 21, row "2-D Helmholtz PINN": today a
false ``gradient-swamping`` on 2 of 3 seeds, judged on the first layer alone).

Measured (seeds 0 / 1, one thread, ~30 s of CPU each): ``annealing`` relative L2 error
0.081 / 0.22, largest boundary error 0.34 / 0.44, lambda 73 / 63 at the end, boundary/residual
gradient ratio over all parameters 0.10 / 0.17; ``equal-weights`` error 0.97 / 1.61, boundary
error 1.5 / 2.5, gradient ratio 0.029 / 0.031.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import gradprobe

from .harness import Expect, Family, Variant
from .pinn import MLP, annealed_weight

STEPS, RESIDUAL_POINTS, EDGE_POINTS = 3000, 128, 32
A1, A2, K = 1.0, 4.0, 1.0
RATIO_EVERY = 50


def exact(xy: torch.Tensor) -> torch.Tensor:
    return torch.sin(A1 * math.pi * xy[:, :1]) * torch.sin(A2 * math.pi * xy[:, 1:])


def forcing(xy: torch.Tensor) -> torch.Tensor:
    return (K ** 2 - (A1 * math.pi) ** 2 - (A2 * math.pi) ** 2) * exact(xy)


def residual(model: MLP, xy: torch.Tensor) -> torch.Tensor:
    xy = xy.requires_grad_(True)
    u = model(xy)
    (du,) = torch.autograd.grad(u.sum(), xy, create_graph=True)
    (d_ux,) = torch.autograd.grad(du[:, 0].sum(), xy, create_graph=True)
    (d_uy,) = torch.autograd.grad(du[:, 1].sum(), xy, create_graph=True)
    return d_ux[:, :1] + d_uy[:, 1:] + K ** 2 * u - forcing(xy)


def edges(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """n uniform points on each of the square's four edges."""
    t = 2 * torch.rand(4, n, generator=gen) - 1
    one = torch.ones(n)
    return [torch.stack([t[0], -one], 1), torch.stack([one, t[1]], 1),
            torch.stack([t[2], one], 1), torch.stack([-one, t[3]], 1)]


def gradient_ratio(model: MLP, losses: dict, lam: float) -> float:
    """||grad(lambda L_b)|| / ||grad L_r|| over every parameter of the network."""
    params = list(model.parameters())
    norms = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]).norm()
             for loss in (losses["residual"], lam * losses["boundary"])]
    return float(norms[1] / norms[0])


@torch.no_grad()
def solution_errors(model: MLP, exact=exact) -> dict[str, float]:
    """The relative L2 error against the exact solution (this module's ``exact`` unless given)
    on a 100 x 100 grid, and the largest boundary error on 100 points an edge."""
    grid = torch.linspace(-1, 1, 100)
    xy = torch.cartesian_prod(grid, grid)
    boundary = torch.cat(edges(100, torch.Generator().manual_seed(1234)))
    u, u_true = model(xy), exact(xy)
    return {"rel_l2_error": float((u - u_true).norm() / u_true.norm()),
            "boundary_error": float(model(boundary).abs().max())}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP(layers=(2, 50, 50, 50, 1), mean=0.0, std=1 / math.sqrt(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9 ** (1 / 1000))
    lam, ratios = 1.0, []
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step in range(STEPS):
            xy_r = 2 * torch.rand(RESIDUAL_POINTS, 2, generator=gen) - 1
            losses = {"residual": residual(model, xy_r).pow(2).mean(),
                      "boundary": sum(model(xy).pow(2).mean() for xy in edges(EDGE_POINTS, gen))}
            if variant == "annealing" and step % 10 == 0:
                lam = 0.9 * lam + 0.1 * annealed_weight(model, losses, lam)
            if step % RATIO_EVERY == 0:
                ratios.append(gradient_ratio(model, losses, lam))
            probe.backward(losses, weights={"boundary": lam})
            opt.step()
            opt.zero_grad()
            sched.step()
    return solution_errors(model) | {
        "lambda": lam, "grad_ratio_boundary_residual": float(torch.tensor(ratios).median())}


FAMILY = Family(
    name="helmholtz-pinn",
    source="Wang, Teng & Perdikaris 2021 (SIAM J. Sci. Comput.), 2-D Helmholtz a1=1 a2=4; "
           "PredictiveIntelligenceLab/GradientPathologiesPINNs",
    train=train,
    variants=(
        Variant("annealing", True, "learning-rate annealing (Algorithm 1) balances the boundary term",
                must_not=("gradient-swamping", "gradient-conflict", "static-loss-weights")),
        Variant("equal-weights", False,
                "lambda = 1: the residual's scale ((a2 pi)^2) keeps the boundary gradient far "
                "below the residual's, the boundary values are not fitted",
                expected=(Expect("gradient-swamping", "boundary"),
                          Expect("static-loss-weights", "boundary")),
                # True since rule change 41: the swamped boundary, an objective with a
                # forward pass of its own, is pushed off its start level while the residual
                # falls (largest boundary error measured above).
                allowed=(Expect("constraint-neglect", "boundary"),),
                must_not=("gradient-conflict",)),
    ),
    quick=(("equal-weights", 1),),
)
