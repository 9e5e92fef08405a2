"""A physics-informed network trained with temporal causal weights, after Wang, Sankaran &
Perdikaris 2024 ("Respecting causality for training physics-informed neural networks",
CMAME 421, 116813; arXiv 2203.07404, sec. 3: the temporally weighted residual loss and the
causal training algorithm with the causality parameter annealed) and the official
code PredictiveIntelligenceLab/CausalPINNs (read: KS/Causal_PINNs_KS.py, ``PINN.loss_ics``,
``PINN.loss_res``, ``residuals_and_weights``, ``loss``, ``train`` and the tol list).

Published setup (the code): a tanh MLP on (t, x) whose input is the periodic embedding
[t, 1, cos(k w x), sin(k w x)], k = 1..M (so the periodic boundary condition holds exactly);
every step a fresh batch of n_t sorted random times and n_x random points; the residual's
mean square per time slice L_t(t_i); the initial-condition loss L_0 = lambda_ic *
mean((u(0, x) - u0(x))^2) with lambda_ic = 1e3; the causal weights
w_i = stop_gradient(exp(-tol * (sum_{k<i} L_t(t_k) + L_0))) (the paper's weights, the
initial condition as the zeroth slice, as the code adds L_0); total loss
mean_i(w_i L_t(t_i)) + L_0; Adam lr 1e-3 decayed by 0.9 every 5,000 steps; the causality
parameter tol annealed over [1e-2, 1e-1, 1, 10, 100], each value trained until
min_i w_i > 0.99.

Here (CPU): the 1-D advection equation u_t + beta u_x = 0 on t in [0, 1], x in [0, 2 pi),
beta = 2, u0 = sin(x), exact u = sin(x - beta t) (the convection benchmark of Krishnapriyan
et al. 2021, on which plain PINNs fail at large beta), with the published embedding (M = 2),
3 hidden layers of 48, n_t = 16, n_x = 32, 64 fixed initial points, Adam lr 3e-3 (decayed
as published) for 3,000 steps, tol annealed over [1e-2, 1e-1, 1], each value left once
min w_i > 0.99 as published. Why scaled (seed 0, relative L2 error of the causal run):
beta 4, lr 1e-3, 2,000 steps, tol forced on to 100 after 400 steps each: 1.07; the same with
tol up to 1 left only at min w_i > 0.99: 0.57; beta 2 at lr 1e-3, 2,000 steps: 0.30; at lr
3e-3, 2,000 steps: 0.15: not trained within a CPU budget, so they would show nothing. The
published tol values above 1 are never reached within 3,000 steps here (the runs end at tol
0.1). The losses are passed under the code's names, ``ics`` (weight lambda_ic) and ``res`` (the
causally weighted residual mean(w_i L_t)), in the order of its logs (loss_ics, loss_res).

Truth, measured without gradprobe: the relative L2 error of u against the exact solution on
a 101 x 101 grid (``rel_l2_error``) and of u(0, x) against u0 (``initial_rel_error``); every
50 steps, with torch.autograd.grad, the weighted gradient norm of ``ics`` over that of
``res`` over all parameters (``ics_over_res_grad``, median over the run) and the
unweighted-mean residual (``plain_res``), the cosine of the two losses' gradients over all
parameters (``cos_ics_res``); each loss's end over start.

Variants (truth by construction):
- ``causal``: healthy, as published (lambda_ic 1e3, causal weights, annealed tol).
- ``no-causal-ic-1e-4``: the plain PINN (every w_i = 1) with the initial condition weighted
  1e-4 instead of 1e3: the residual alone is satisfied by any constant, and the initial
  condition, far too weak, never pulls the solution off it.
Measured, seeds 0 / 1:
  causal:            rel_l2_error 0.078 / 0.059, initial_rel_error 0.0055 / 0.0035, the
                     plain residual at the end 0.021 / 0.018, min causal weight at the end
                     0.97 / 0.97 (tol 0.1); ics falls to 0.16 / 0.37 of its start, res to
                     0.020 / 0.017; the weighted ics gradient is 4.9 / 9.2 times res's
                     (median; 10%-90% range 1.1-42 / 1.3-86: the causal residual is the
                     smaller one, its weights near 0 until the earlier times are fitted);
                     cos(ics, res) -0.16 / -0.09 (negative on 63% / 52% of the checks).
  no-causal-ic-1e-4: rel_l2_error 1.001 / 0.998 and initial_rel_error 1.001 / 0.998 (u is
                     a constant: the trivial solution; 13-17x the causal run's error); ics
                     ends at 0.99 / 1.01 of its start while res falls to 0.11 / 0.014 (the
                     plain residual ends below 1e-4); the weighted ics gradient is 0.94% /
                     0.71% of res's (median; 10%-90% range 0.23%-2.2% / 0.23%-3.1%);
                     cos(ics, res) -0.10 / +0.09 (negative on 57% / 42% of the checks).
CPU ~14-18 s a run (one thread, shared machine).
Expected on ``no-causal-ic-1e-4``: ``gradient-swamping`` of ``ics`` (its weighted gradient
is under 1% of the residual's while it never moves from its start) and
``static-loss-weights`` naming ``ics`` (the fixed weight 1e-4 is the cause; the published
1e3 with causal weights fits it). Must not (both): ``gradient-conflict`` (cosines near 0,
about half of the checks negative), ``inert-loss`` (both losses reach every layer); on
``causal`` also ``gradient-swamping`` and ``static-loss-weights``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradprobe

from ..common import loss_end_over_start
from ..harness import Expect, Family, Variant

BETA, M_X, WIDTH = 2.0, 2, 48
N_T, N_X, N_IC = 16, 32, 64
STEPS, LR = 3000, 3e-3
TOLS = (1e-2, 1e-1, 1.0)
IC_WEIGHT = {"causal": 1e3, "no-causal-ic-1e-4": 1e-4}
TRUTH_EVERY = 50


def exact(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x - BETA * t)


class PeriodicMLP(nn.Module):
    """The official code's MLP: [t, 1, cos(kx), sin(kx)] embedding, tanh, Xavier init."""

    def __init__(self):
        super().__init__()
        sizes = (2 + 2 * M_X, WIDTH, WIDTH, WIDTH, 1)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for lin in self.linears:
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, M_X + 1, dtype=x.dtype)
        h = torch.cat([t, torch.ones_like(t), torch.cos(k * x), torch.sin(k * x)], 1)
        for lin in self.linears[:-1]:
            h = torch.tanh(lin(h))
        return self.linears[-1](h)


def slice_residuals(model: nn.Module, t_r: torch.Tensor, x_r: torch.Tensor) -> torch.Tensor:
    """L_t: the mean squared residual u_t + beta u_x on each time slice (n_t of them)."""
    t = t_r[:, None].expand(N_T, N_X).reshape(-1, 1).clone().requires_grad_(True)
    x = x_r[None, :].expand(N_T, N_X).reshape(-1, 1).clone().requires_grad_(True)
    u = model(t, x)
    u_t, u_x = torch.autograd.grad(u.sum(), (t, x), create_graph=True)
    return (u_t + BETA * u_x).pow(2).view(N_T, N_X).mean(1)


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    causal, ic_weight = variant == "causal", IC_WEIGHT[variant]
    x_ic = torch.linspace(0, 2 * math.pi, N_IC + 1)[:-1, None]
    model = PeriodicMLP()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9 ** (1 / 5000))
    tol_index = 0
    series: dict[str, list[float]] = {}
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step in range(STEPS):
            t_r = torch.rand(N_T, generator=gen).sort().values
            x_r = 2 * math.pi * torch.rand(N_X, generator=gen)
            ics = (model(torch.zeros_like(x_ic), x_ic) - torch.sin(x_ic)).pow(2).mean()
            l_t = slice_residuals(model, t_r, x_r)
            if causal:
                tol = TOLS[tol_index]
                before = torch.cat([torch.zeros(1), l_t.cumsum(0)[:-1]])
                w = torch.exp(-tol * (before + ic_weight * ics)).detach()
                if w.min() > 0.99 and tol_index < len(TOLS) - 1:
                    tol_index += 1
            else:
                w = torch.ones(N_T)
            losses = {"ics": ics, "res": (w * l_t).mean()}
            if step % TRUTH_EVERY == 0:
                g_ics, g_res = flat_grad(ics, params), flat_grad(losses["res"], params)
                measured = {"ics_over_res_grad": float(ic_weight * g_ics.norm()
                                                       / g_res.norm().clamp_min(1e-30)),
                            "cos_ics_res": float(torch.nn.functional.cosine_similarity(
                                g_ics, g_res, dim=0)),
                            "ics_loss": ics.item(), "res_loss": losses["res"].item(),
                            "plain_res": l_t.mean().item(), "min_causal_weight": float(w.min())}
                for name, value in measured.items():
                    series.setdefault(name, []).append(value)
            probe.backward(losses, weights={"ics": ic_weight})
            opt.step()
            opt.zero_grad()
            sched.step()
    t, x = torch.meshgrid(torch.linspace(0, 1, 101), torch.linspace(0, 2 * math.pi, 101),
                          indexing="ij")
    t, x = t.reshape(-1, 1), x.reshape(-1, 1)
    with torch.no_grad():
        u, truth = model(t, x).numpy().ravel(), exact(t, x).numpy().ravel()
    at_start = t.numpy().ravel() == 0
    return {"rel_l2_error": float(np.linalg.norm(u - truth) / np.linalg.norm(truth)),
            "initial_rel_error": float(np.linalg.norm(u[at_start] - truth[at_start])
                                       / np.linalg.norm(truth[at_start])),
            "ics_over_res_grad": float(np.median(series["ics_over_res_grad"])),
            "ics_over_res_grad_q10": float(np.quantile(series["ics_over_res_grad"], 0.1)),
            "ics_over_res_grad_q90": float(np.quantile(series["ics_over_res_grad"], 0.9)),
            "cos_ics_res": float(np.median(series["cos_ics_res"])),
            "cos_ics_res_negative_share": float(np.mean(np.array(series["cos_ics_res"]) < 0)),
            "plain_res_end": float(np.median(series["plain_res"][-5:])),
            "min_causal_weight_end": float(np.median(series["min_causal_weight"][-5:])),
            "tol_end": TOLS[tol_index] if causal else 0.0} | loss_end_over_start(series)


_MUST_NOT = ("gradient-conflict", "inert-loss")

FAMILY = Family(
    name="causal-pinn",
    source="Wang, Sankaran & Perdikaris 2024 (CMAME 421, 116813; arXiv 2203.07404), sec. 3, "
           "temporal causal weights, tol annealed; PredictiveIntelligenceLab/"
           "CausalPINNs KS/Causal_PINNs_KS.py",
    train=train,
    variants=(
        Variant("causal", True,
                "causal weights exp(-tol x cumulative residual) and the initial condition at "
                "weight 1e3, as published: the travelling wave is fitted from t = 0 onwards",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights")),
        Variant("no-causal-ic-1e-4", False,
                "no causal weights and the initial condition weighted 1e-4: the residual, "
                "satisfied by any constant, drives u to a constant while the initial "
                "condition's gradient stays under 1% of the residual's and it never moves",
                expected=(Expect("gradient-swamping", "ics"),
                          Expect("static-loss-weights", "ics")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("causal", 1), ("no-causal-ic-1e-4", 1)),
)
