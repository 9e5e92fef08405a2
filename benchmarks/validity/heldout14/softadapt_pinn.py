"""SoftAdapt on a 2-D Poisson PINN, after Heydari, Thompson & Mehmood 2019 ("SoftAdapt:
Techniques for Adaptive Loss Weighting of Neural Networks with Multi-Part Loss Functions",
arXiv 1912.12355; sec. 3.1: each loss component's rate of change s_k is estimated by a
finite difference over its last n recorded values, and the weights are the softmax
alpha_k = exp(beta s_k) / sum_l exp(beta s_l), so a component that falls slowly (or rises)
gets more weight; sec. 3.1.1 and 3.1.3: the loss-weighted and slope-normalised variants) and
its official code dr-aheydari/SoftAdapt (read with the read_file tool):
``softadapt/algorithms/original_variant.py`` ``SoftAdapt.get_component_weights`` (slopes of
each component's stored values, then ``_softmax(rates_of_change, beta)``),
``softadapt/base/_softadapt_base_class.py`` ``SoftAdaptBase._softmax`` (shifted by the largest
slope, divided by the sum + ``_EPSILON``) and ``_compute_rates_of_change``,
``softadapt/utilities/_finite_difference.py`` ``_get_finite_difference`` (order None: the
number of points minus 1; an even order takes ``findiff.coefficients(deriv=1, acc=order)``'s
forward coefficients, for 5 points (-25/12, 4, -3, 4/3, -1/4), dotted with the values, oldest
first) and the README's loop: ``beta=0.1``, ``epochs_to_make_updates = 5``, the weights
started at ones, every 5 iterations recomputed from the values stored since the last update
and the stores cleared, the loss ``adapt_weights[0] * loss_1 + adapt_weights[1] * loss_2``.
This port: the original variant (sec. 3.1), beta 0.1, weights recomputed every 5 steps from
the last 5 values of each loss (5-point forward slope as above; the README's first update
sees 6 stored values and takes the 5th-order slope, here the last 5 as every later one).

Published setup: the paper applies SoftAdapt to image reconstruction with sparse
autoencoders and to synthetic data generation with introspective VAEs; the package is a
drop-in weighting for any multi-part loss, and it is used as a PINN loss balancer (e.g. the
comparison of Bischof & Kraus 2021). The 2-D PINN here is that use.

Here (no download): a PINN for the 2-D Poisson problem u_xx + u_yy = f on [-1, 1]^2 with the
manufactured solution u*(x, y) = sin(pi x) sin(pi y) + x y, f = -2 pi^2 sin(pi x) sin(pi y),
Dirichlet data u = x y on the boundary (x y is harmonic: the residual alone cannot see it, so
the boundary term is what fixes it). Network ``heldout13.deepxde_lshape.make_net`` (2 -> 32
-> 32 -> 32 -> 1, tanh, Glorot); 400 uniform interior points and 160 uniform boundary points
drawn from the seed, full batch; Adam lr 1e-3, 2,000 steps. Losses ``residual`` (mean squared
PDE residual, first: the main loss) and ``boundary`` (mean squared error to the Dirichlet
data), recorded with ``probe.backward(losses, weights=...)``, the weights as floats.

Truth, measured without gradprobe: the relative L2 error of u against u* on a 101 x 101 grid
(``rel_l2_error``), the RMS error on 400 fresh boundary points (``boundary_rms``), the losses
at the end and their end over start (``common.loss_end_over_start``, every 25 steps), the
weighted gradient ratio w_b |grad L_b| / (w_r |grad L_f|) over all parameters (every 10th
step, median; ``heldout13.deepxde_lshape.weighted_ratio``), and the SoftAdapt weights (mean
boundary weight over the run and its range).

Variants (truth by construction):
- ``softadapt``: healthy, SoftAdapt as published (original variant, beta 0.1, 5-step
  updates). With beta 0.1 the slopes barely move the softmax, so the weights stay close to
  (0.5, 0.5): a balanced weighting that adapts a little. Measured, seeds 0 / 1: relative L2
  error 0.121 / 0.117 against u* on the grid; boundary RMS 0.21 / 0.21; boundary weight mean
  0.501 / 0.501 (range 0.50-0.55); weighted gradient ratio boundary / residual 1.01 / 1.01
  (median); final losses residual 0.017 / 0.015, boundary 0.039 / 0.035 (boundary end over
  start 0.10 / 0.05). Must not: ``constraint-neglect``, ``gradient-swamping``,
  ``static-loss-weights`` (the weights adapt and nothing is harmed), ``inert-loss``,
  ``gradient-conflict``, ``non-finite``.
- ``boundary-underweighted``: broken. Fixed weights (residual 1, boundary 1e-3) instead of
  SoftAdapt: the boundary term's weighted gradient is a small fraction of the residual's; the
  network fits the Laplacian but leaves the harmonic part x y (set only by the boundary data)
  unfitted. Measured, seeds 0 / 1: relative L2 error 0.92 / 1.07 (SoftAdapt 0.12 / 0.12);
  boundary RMS 1.01 / 1.11 (SoftAdapt 0.21 / 0.21); weighted gradient ratio 0.034 / 0.032
  (median); final losses residual 0.004 / 0.014 (end over start 0.0002 / 0.0003), boundary
  0.88 / 1.28, 22-36 times SoftAdapt's (end over start 0.43 / 1.11). Expected:
  ``gradient-swamping`` on ``boundary`` (its weighted gradient drowned by the residual's),
  ``constraint-neglect`` on ``boundary`` (the main loss fitted, the constraint left high)
  and ``static-loss-weights`` on ``boundary`` (the fixed tiny weight is the cause; adaptive
  weighting such as SoftAdapt's is the cure). Allowed: ``gradient-conflict`` on
  ``residual|boundary`` (fitting the Laplacian moves u off the boundary data). Must not:
  ``inert-loss`` (the term still pulls, weakly), ``non-finite``.

CPU: about 7.6-8.3 seconds a run (one thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import gradprobe

from ..common import loss_end_over_start
from ..harness import Expect, Family, Variant
from ..heldout13.deepxde_lshape import make_net, weighted_ratio

N_DOMAIN, N_BOUNDARY, STEPS, LR = 400, 160, 2000, 1e-3
BETA, UPDATE_EVERY = 0.1, 5  # the README's beta and epochs_to_make_updates
FIXED_BOUNDARY_WEIGHT = 1e-3
# findiff.coefficients(deriv=1, acc=4)["forward"]: the 5-point forward first derivative
FORWARD_5 = np.array([-25 / 12, 4.0, -3.0, 4 / 3, -1 / 4])
EPSILON = 1e-8  # softadapt/constants/_stability_constants.py _EPSILON
RATIO_EVERY, LOSS_EVERY = 10, 25
PI = float(np.pi)


def exact(xy: torch.Tensor) -> torch.Tensor:
    return torch.sin(PI * xy[:, 0]) * torch.sin(PI * xy[:, 1]) + xy[:, 0] * xy[:, 1]


def source(xy: torch.Tensor) -> torch.Tensor:
    return -2 * PI ** 2 * torch.sin(PI * xy[:, 0]) * torch.sin(PI * xy[:, 1])


def laplacian(net: torch.nn.Module, xy: torch.Tensor) -> torch.Tensor:
    xy = xy.clone().requires_grad_(True)
    (du,) = torch.autograd.grad(net(xy).sum(), xy, create_graph=True)
    (u_xx,) = torch.autograd.grad(du[:, 0].sum(), xy, create_graph=True)
    (u_yy,) = torch.autograd.grad(du[:, 1].sum(), xy, create_graph=True)
    return u_xx[:, 0] + u_yy[:, 1]


def square_boundary(n: int, rng: np.random.Generator) -> torch.Tensor:
    """n uniform points on the perimeter of [-1, 1]^2."""
    s = rng.uniform(0, 8, n)
    edge, t = (s // 2).astype(int), s % 2 - 1
    one = np.ones(n)
    xy = np.select([edge[:, None] == k for k in range(4)],
                   [np.c_[t, -one], np.c_[one, t], np.c_[t, one], np.c_[-one, t]])
    return torch.as_tensor(xy, dtype=torch.float32)


def softadapt_weights(history: dict[str, list[float]]) -> dict[str, float]:
    """SoftAdapt (original variant): softmax of beta times each loss's 5-point forward slope
    over its last 5 values, shifted by the largest slope, over the sum + epsilon."""
    slopes = np.array([FORWARD_5 @ np.array(v[-len(FORWARD_5):]) for v in history.values()])
    e = np.exp(BETA * (slopes - slopes.max()))
    return dict(zip(history, (e / (e.sum() + EPSILON)).tolist()))


@torch.no_grad()
def solution_truth(net: torch.nn.Module) -> dict:
    axis = torch.linspace(-1, 1, 101)
    grid = torch.cartesian_prod(axis, axis)
    u, u_star = net(grid)[:, 0], exact(grid)
    edge = square_boundary(400, np.random.default_rng(1234))
    return {"rel_l2_error": float((u - u_star).norm() / u_star.norm()),
            "boundary_rms": float((net(edge)[:, 0] - exact(edge)).pow(2).mean().sqrt())}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = make_net()
    xy_f = torch.as_tensor(rng.uniform(-1, 1, (N_DOMAIN, 2)), dtype=torch.float32)
    xy_b = square_boundary(N_BOUNDARY, rng)
    f, g = source(xy_f), exact(xy_b)
    weights = {"residual": 1.0, "boundary": 1.0}  # the README starts at ones
    stored: dict[str, list[float]] = {"residual": [], "boundary": []}
    series: dict[str, list[float]] = {"residual_loss": [], "boundary_loss": []}
    ratios, boundary_weights = [], []
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    with gradprobe.Probe(net, run_file=log) as probe:
        for step in range(STEPS):
            losses = {"residual": (laplacian(net, xy_f) - f).pow(2).mean(),
                      "boundary": (net(xy_b)[:, 0] - g).pow(2).mean()}
            for name, loss in losses.items():
                stored[name].append(float(loss.detach()))
            if variant == "softadapt":
                if step > 0 and step % UPDATE_EVERY == 0:
                    weights = softadapt_weights(stored)
                    stored = {name: [] for name in stored}  # the README clears its stores
            else:
                weights = {"residual": 1.0, "boundary": FIXED_BOUNDARY_WEIGHT}
            boundary_weights.append(weights["boundary"])
            if step % RATIO_EVERY == 0:
                ratios.append(weighted_ratio(net, losses,
                                             weights["boundary"] / weights["residual"]))
            if step % LOSS_EVERY == 0 or step == STEPS - 1:
                for name, loss in losses.items():
                    series[f"{name}_loss"].append(float(loss.detach()))
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
    bw = np.array(boundary_weights[UPDATE_EVERY:])
    return solution_truth(net) | {
        "boundary_over_residual_grad": float(np.nanmedian(ratios)),
        "mean_boundary_weight": float(bw.mean()),
        "min_boundary_weight": float(bw.min()), "max_boundary_weight": float(bw.max()),
        "final_residual_loss": series["residual_loss"][-1],
        "final_boundary_loss": series["boundary_loss"][-1]} | loss_end_over_start(series)


FAMILY = Family(
    name="softadapt-pinn",
    source="Heydari, Thompson & Mehmood 2019 (SoftAdapt, arXiv 1912.12355, sec. 3.1); "
           "dr-aheydari/SoftAdapt softadapt/algorithms/original_variant.py, "
           "softadapt/base/_softadapt_base_class.py, softadapt/utilities/_finite_difference.py",
    train=train,
    variants=(
        Variant("softadapt", True,
                "SoftAdapt (beta 0.1, weights from 5-point loss slopes every 5 steps) on the "
                "residual and boundary losses of a 2-D Poisson PINN: u matches the "
                "manufactured solution and its boundary data (measured)",
                must_not=("constraint-neglect", "gradient-swamping", "static-loss-weights",
                          "inert-loss", "gradient-conflict", "non-finite")),
        Variant("boundary-underweighted", False,
                "fixed weights (1, 1e-3) in place of SoftAdapt: the boundary term's weighted "
                "gradient is drowned by the residual's, the harmonic part x y fixed only by "
                "the boundary data is left unfitted and the error is many times the "
                "healthy one (measured)",
                expected=(Expect("gradient-swamping", "boundary"),
                          Expect("constraint-neglect", "boundary"),
                          Expect("static-loss-weights", "boundary")),
                allowed=(Expect("gradient-conflict", "residual|boundary"),),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("softadapt", 1), ("boundary-underweighted", 1)),
)
