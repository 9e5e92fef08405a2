"""Augmented Lagrangian relaxation of a PINN's boundary constraint (Son, Jang, Han & Hwang
2023, "Enhanced physics-informed neural networks with Augmented Lagrangian relaxation method
(AL-PINNs)", Neurocomputing 548, sec. 3: the boundary condition posed as a constraint of the
residual minimisation, relaxed into the augmented Lagrangian L(theta, lambda) = L_r(theta) +
beta L_b(theta) + (1/N_b) sum_i lambda_i (u(x_i) - g(x_i)), one Lagrange multiplier per
boundary point, the network trained by gradient descent on L and the multipliers by gradient
ascent on it, beta the fixed penalty parameter), as the authors' HwijaeSon/AL-PINNs writes it:
``Helmholtz/Helmholtz_AL-PINNs.py`` ``train`` (``loss1`` the MSE of u_xx + u_yy + k^2 u - q
on the grid, ``loss2`` the MSE of u on the boundary points, ``loss = loss1 + beta*loss2 +
(lbd*output_bdry.view(-1)).mean()``, ``loss.backward()``, then ``lbd.grad *= -1`` before
``optimizer.step()``) and ``main_function`` (k 1, a1 1, a2 4 on [-1, 1]^2, exact solution
sin(a1 pi x) sin(a2 pi y), a 51 x 51 grid, its edge points the boundary set, ``lbd`` zeros of
that size, one Adam over ``[{'params': u_model.parameters()}, {'params': lbd, 'lr':
lbd_lr}]``; defaults ``--beta 1000``, ``--lr 1e-3``, ``--lbd_lr 1``, ``--EPOCH 10000``,
``--model deep_narrow``: ``networks.py`` ``u_Net_deep_narrow``, 8 tanh layers of 64).

Published setup: the 2-D Helmholtz problem above (and Klein-Gordon, viscous Burgers); AL-PINNs
reach a much smaller relative L2 error than the vanilla PINN (beta-weighted penalty only) and
the multiplier-only Lagrangian method (the paper's tables; the vanilla script
``Helmholtz_vanilla_PINNs.py`` is the comparison).

Here (CPU budget): the same Helmholtz problem (k 1, a1 1, a2 4, [-1, 1]^2, zero Dirichlet
boundary), a 26 x 26 collocation grid (676 points, 100 on the boundary, the 51 x 51 grid
halved per side), a tanh MLP 2-40-40-40-1 (the deep-narrow 8 x 64 scaled down), full-batch
Adam lr 1e-3, multipliers at lr 1 (the script's), 1500 steps (of 10000); the error measured on
a 101 x 101 grid of the exact solution (the script's stored test points are not available
offline). ``Probe(model)`` with ``residual`` (loss1, first), ``boundary`` (loss2, weight
beta) and ``multiplier`` (the term mean(lambda_i u(x_i)), weight 1, kept as its own loss: it
is linear in u with the multipliers as coefficients, and the ascent step is the script's
negated multiplier gradient after the probe's backward); ``probe.log(rel_l2_error=...)``
every 100 steps.

Truth, measured without gradprobe: the relative L2 error against the exact solution on the
101 x 101 test grid (whole grid and interior), the mean |u| on its boundary points (the
boundary error: the exact solution is 0 there), the mean |lambda|, the losses over the first
and last 50 steps, and every 50 steps the boundary penalty's weighted gradient norm over the
residual's on the network by ``torch.autograd.grad`` (median over the first 300 steps and
over the run).

Variants (truth by construction):
- ``published``: healthy, AL-PINN as published (beta 1000, one multiplier per boundary point
  at lr 1). Measured, seeds 0 / 1: relative L2 error 0.065 / 0.082 (interior 0.063 / 0.081),
  boundary error 0.032 / 0.022; residual 6429 -> 7.3 / 6429 -> 5.6, boundary 0.0002 -> 0.0017
  / 0.0006 -> 0.0013 (held near 0 by the penalty and the multipliers), multiplier term 0.009
  -> -7.4 / -0.001 -> -0.60, mean |lambda| 252 / 294; weighted boundary over residual gradient
  on the network 1.14 / 0.64 (first 300 steps), 0.86 / 0.79 (median): the two balanced. (The
  paper's vanilla-PINN comparison, beta 1 without multipliers, once in a like run on seed 0,
  unprobed and not part of ``train``: relative L2 error 2.35, boundary error 1.53.) Must not:
  ``constraint-neglect``, ``gradient-swamping``, ``inert-loss``, ``non-finite``.
- ``boundary-neglected``: broken. The penalty beta 0.01 and the multipliers off (lbd_lr 0,
  the term dropped): the Helmholtz residual alone does not fix the solution (k^2 u + Laplace u
  = q has homogeneous solutions), the boundary values drift and the network fits the residual
  with a wrong solution. Measured, seeds 0 / 1: relative L2 error 18.9 / 39.2 (published
  0.065 / 0.082), boundary error 7.7 / 15.4 (published 0.032 / 0.022); residual 6420 -> 4.3 /
  6421 -> 6.0 (lower than published: it is fitted), boundary 1.10 -> 88 / 0.15 -> 267 (rose
  80-1800-fold); weighted boundary over residual gradient on the network 0.0012 / 0.0009 (first
  300 steps), 0.013 / 0.007 (median). Expected: ``constraint-neglect`` on ``boundary`` (the
  residual driven down while the boundary, a loss on points of its own, rises) and
  ``gradient-swamping`` on ``boundary`` (its weighted gradient a small fraction of the
  residual's). Allowed: ``static-loss-weights`` on ``residual`` and ``boundary`` (the weights
  are fixed; their value is the fault). Must not: ``inert-loss``, ``non-finite``.

CPU: about 8-9 seconds a run (two cores shared with other jobs while measuring).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradprobe

from ..harness import Expect, Family, Variant

K, A1, A2 = 1.0, 1.0, 4.0  # Helmholtz_AL-PINNs.py: k, a1, a2 = 1, 1, 4
STEPS, GRID, TEST_GRID, WIDTH, DEPTH, LR, EVERY = 1500, 26, 101, 40, 3, 1e-3, 100
RATIO_EVERY = 50
# variant: (penalty beta, multiplier learning rate, multiplier term in the objective)
SETTINGS = {"published": (1000.0, 1.0, True), "boundary-neglected": (0.01, 0.0, False)}


def exact(x: torch.Tensor) -> torch.Tensor:
    """The script's analytic(): u = sin(a1 pi x) sin(a2 pi y), zero on the square's boundary."""
    return torch.sin(A1 * math.pi * x[:, :1]) * torch.sin(A2 * math.pi * x[:, 1:])


def forcing(x: torch.Tensor) -> torch.Tensor:
    """The script's q(): u_xx + u_yy + k^2 u of the exact solution."""
    return (K ** 2 - (A1 * math.pi) ** 2 - (A2 * math.pi) ** 2) * exact(x)


def grid(n: int) -> torch.Tensor:
    g = torch.linspace(-1.0, 1.0, n)
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


def mlp() -> nn.Sequential:
    """A tanh MLP 2-40-40-40-1 (the script's u_Net_deep_narrow, 8 x 64 tanh, scaled down)."""
    layers, width_in = [], 2
    for _ in range(DEPTH):
        layers += [nn.Linear(width_in, WIDTH), nn.Tanh()]
        width_in = WIDTH
    return nn.Sequential(*layers, nn.Linear(width_in, 1))


def residual_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """loss1: MSE of u_xx + u_yy + k^2 u - q at the collocation points."""
    x = x.clone().requires_grad_(True)
    u = model(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    u_xx = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True)[0][:, :1]
    u_yy = torch.autograd.grad(du[:, 1].sum(), x, create_graph=True)[0][:, 1:]
    return ((u_xx + u_yy + K ** 2 * u - forcing(x)) ** 2).mean()


def boundary_over_residual(model: nn.Module, losses: dict, beta: float) -> float:
    """The boundary penalty's weighted gradient norm over the residual's on the network, by
    autograd, independent of gradprobe."""
    params = list(model.parameters())
    norms = {}
    for name in ("residual", "boundary"):
        grads = torch.autograd.grad(losses[name], params, retain_graph=True)
        norms[name] = float(torch.cat([g.flatten() for g in grads]).norm())
    return beta * norms["boundary"] / max(norms["residual"], 1e-30)


def errors(model: nn.Module, x_test: torch.Tensor, on_edge: torch.Tensor) -> dict:
    with torch.no_grad():
        u, ref = model(x_test), exact(x_test)
    return {"rel_l2_error": float((u - ref).norm() / ref.norm()),
            "boundary_abs_error": float(u[on_edge].abs().mean()),
            "interior_rel_l2_error": float((u - ref)[~on_edge].norm() / ref[~on_edge].norm())}


def train(variant: str, seed: int, log: Path) -> dict:
    beta, multiplier_lr, with_multiplier = SETTINGS[variant]
    torch.manual_seed(seed)
    x_train = grid(GRID)
    x_bdry = x_train[(x_train.abs() == 1.0).any(1)]
    x_test = grid(TEST_GRID)
    test_edge = (x_test.abs() == 1.0).any(1)
    model = mlp()
    # one multiplier per boundary point, initialised at 0, in the optimiser at its own lr
    lbd = torch.zeros(len(x_bdry), requires_grad=True)
    opt = torch.optim.Adam([{"params": model.parameters()},
                            {"params": [lbd], "lr": multiplier_lr}], lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    levels: dict[str, list[float]] = {}
    ratios: list[float] = []
    with probe:
        for step in range(STEPS):
            u_bdry = model(x_bdry)
            losses = {"residual": residual_loss(model, x_train),
                      "boundary": (u_bdry ** 2).mean()}
            if with_multiplier:
                losses["multiplier"] = (lbd * u_bdry.view(-1)).mean()
            for name, loss in losses.items():
                levels.setdefault(name, []).append(float(loss.detach()))
            if step % RATIO_EVERY == 0:
                ratios.append(boundary_over_residual(model, losses, beta))
            probe.backward(losses, weights={"boundary": beta})
            if lbd.grad is not None:
                lbd.grad.neg_()  # gradient ascent on the multipliers (lbd.grad *= -1)
            opt.step()
            opt.zero_grad()
            lbd.grad = None
            if step % EVERY == EVERY - 1:
                probe.log(rel_l2_error=errors(model, x_test, test_edge)["rel_l2_error"])
    outcome = errors(model, x_test, test_edge)
    outcome["multiplier_mean_abs"] = float(lbd.detach().abs().mean())
    for name, series in levels.items():
        outcome[f"{name}_first50"] = float(np.mean(series[:50]))
        outcome[f"{name}_last50"] = float(np.mean(series[-50:]))
    outcome["boundary_over_residual_grad_first300"] = float(np.median(ratios[:300 // RATIO_EVERY]))
    outcome["boundary_over_residual_grad_median"] = float(np.median(ratios))
    return outcome


FAMILY = Family(
    name="al-pinn",
    source="Son, Jang, Han & Hwang 2023 (Enhanced physics-informed neural networks with "
           "Augmented Lagrangian relaxation method (AL-PINNs), Neurocomputing, sec. 3: one "
           "multiplier per boundary point by gradient ascent, penalty beta 1000); "
           "HwijaeSon/AL-PINNs Helmholtz/Helmholtz_AL-PINNs.py train, main_function "
           "(2-D Helmholtz k 1, a1 1, a2 4), networks.py",
    train=train,
    variants=(
        Variant("published", True,
                "AL-PINN as published (beta 1000, multipliers at lr 1): relative L2 error "
                "0.065-0.082, boundary error 0.02-0.03 (measured)",
                must_not=("constraint-neglect", "gradient-swamping", "inert-loss",
                          "non-finite")),
        Variant("boundary-neglected", False,
                "penalty 0.01 and no multipliers: the boundary loss rises 80-1800-fold while "
                "the residual is fitted, relative L2 error 19-39 and boundary error 7.7-15 "
                "(measured)",
                expected=(Expect("constraint-neglect", "boundary"),
                          Expect("gradient-swamping", "boundary")),
                allowed=(Expect("static-loss-weights", "residual"),
                         Expect("static-loss-weights", "boundary")),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("boundary-neglected", 1)),
)
