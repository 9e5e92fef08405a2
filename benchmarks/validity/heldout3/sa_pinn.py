"""Self-adaptive physics-informed network on the 2-D Helmholtz equation, after McClenny &
Braga-Neto 2023 ("Self-adaptive physics-informed neural networks", J. Comput. Phys. 474,
111722; arXiv:2009.04544; the paper itself was not read here, the method is taken from the
code) and levimcclenny/SA-PINNs (Helmholtz/helmholtz.py; Allen-Cahn/AC.py for the weights on
a second loss term; both read with the read_file tool).

Method: every training point gets a trainable weight, lambda_r,i on the residual points and
lambda_b,j on the boundary points, inside its squared error:

    L(theta, lambda) = mean_i (lambda_r,i r_i)^2 + sum over edges mean_j (lambda_b,j u_j)^2

(``tf.reduce_mean(tf.square(col_weights * f_u_pred))``; AC.py weighs its initial-condition
points the same way with ``u_weights``). The network minimises L, the weights maximise it:
both by Adam (lr 1e-3, beta_1 0.99 in helmholtz.py), the weights' step on the negated
gradient (``apply_gradients(zip([-grads_col], [col_weights]))``; here Adam's
``maximize=True``). A point whose error stays large gets a growing weight. Weights start
uniform in (0, 1) (``tf.random.uniform``). Problem (helmholtz.py): u_xx + u_yy + k^2 u = q on
[-1, 1]^2, k = 1, u = 0 on the boundary, exact u = sin(a1 pi x) sin(a2 pi y), a1 = 1, a2 = 4
(``helmholtz_pinn.exact``/``residual``/``edges``, shared with the corpus's Helmholtz family).
Published (helmholtz.py): a tanh MLP [2, 50, 50, 50, 50, 1] (Glorot normal), 100,000 fixed
Latin-hypercube residual points and 100 per edge, full batch, 10,000 Adam steps then
10,000 L-BFGS.

Here (CPU): a tanh MLP [2, 50, 50, 50, 1] on inputs scaled to unit variance (``pinn.MLP``),
1,000 fixed uniform residual points and 50 per edge, full batch, 2,000 Adam steps, no L-BFGS.
helmholtz.py weighs only its residual points; the boundary points get weights too (as
AC.py weighs its second term, the initial condition), started uniform in (0, 1) like
the residual's (AC.py's 100x start for its initial-condition weights was tried: seed 0 / 1
relative L2 error 0.57 / 0.78, the interior fitted worse; a weight learning rate of 5e-3 as
in AC.py: 0.33 / 0.62 with boundary weights in (0, 1), 1.55 on seed 1 with the 100x start).
The losses are passed to the probe as ``residual`` and ``boundary`` with the per-point
weights inside them: docs/probe.md's learned loss weights are one scalar per loss, which
per-point weights are not. The weights are plain tensors outside the model.

Truth, measured without gradprobe on a 100 x 100 grid: the relative L2 error of u (helmholtz.py's
``error_u``) and the largest error on 400 boundary points. Every 50 steps, with
torch.autograd.grad on the losses as trained (per-point weights inside): the ratio of the
boundary loss's gradient norm to the residual loss's over every weight and bias
(``helmholtz_pinn.gradient_ratio``), and per weight matrix, reported as the median over the
hidden layers (input and hidden weight matrices) for the whole run and for its first 500
steps, and on the output layer; each loss's end/start (``common.loss_end_over_start``).

Variants (truth by construction):
- ``self-adaptive``: healthy, as published (at this budget far from converged: no L-BFGS,
  2,000 Adam steps; but 3-8x better than equal weights on every seed). Measured, seeds 0 / 1:
  relative L2 error 0.357 / 0.344, boundary error 0.89 / 0.80; hidden-layer gradient ratio
  boundary/residual 0.11 / 0.074 over the first 500 steps, 0.37 / 0.35 over the run (output
  layer 0.75 / 0.69); residual end/start 0.0009 / 0.0010, boundary 18 / 39 (it starts near 0:
  the initial network is near 0 everywhere); mean lambda_r 1.10 / 1.15 and lambda_b
  1.61 / 1.77 at the end (from 0.5). Must not: ``gradient-swamping``,
  ``static-loss-weights``, ``gradient-conflict``.
- ``equal-weights``: every weight fixed at 1 (the plain PINN). The
  residual's scale ((a2 pi)^2 ~ 158) holds the boundary term's gradient to a small fraction of
  the residual's while the interior is being fitted; the network settles in a solution that
  violates the boundary values. Measured, seeds 0 / 1: relative L2 error 1.08 / 2.74,
  boundary error 1.64 / 4.28 (both worse than self-adaptive on every seed); hidden-layer
  gradient ratio 0.036 / 0.015 over the first 500 steps (3-5x below the self-adaptive run's),
  0.31 / 0.17 over the run (output layer 0.68 / 0.47; over all parameters 0.31 / 0.21):
  after the first quarter the ratio is not far below the healthy run's, the wrong solution
  is by then in place. Residual end/start 0.0005 / 0.0077, boundary 16 / 267.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``boundary`` (the swamped
  term under a fixed weight). Allowed: ``constraint-neglect`` naming ``boundary`` (the
  residual is driven to ~0 while the boundary error rises; true by meaning, though the
  healthy run's boundary loss rises from its near-0 start as well). Must not:
  ``gradient-conflict``.

One run takes 26-36 CPU-seconds (one thread, on a shared machine).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import gradprobe

from ..common import loss_end_over_start
from ..harness import Expect, Family, Variant
from ..helmholtz_pinn import edges, gradient_ratio, residual, solution_errors
from ..pinn import MLP

STEPS, RESIDUAL_POINTS, EDGE_POINTS, EDGES = 2000, 1000, 50, 4
LR, BETAS = 1e-3, (0.99, 0.999)
RATIO_EVERY = 50
EARLY = 10  # the ratios of the first 500 steps


def layer_ratios(model: MLP, losses: dict) -> list[float]:
    """||grad L_b|| / ||grad L_r|| on each layer's weight matrix, input layer first."""
    weights = [lin.weight for lin in model.linears]
    grads = [torch.autograd.grad(losses[k], weights, retain_graph=True) for k in ("boundary", "residual")]
    return [float(b.norm() / r.norm()) for b, r in zip(*grads)]


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP(layers=(2, 50, 50, 50, 1), mean=0.0, std=1 / math.sqrt(3))
    xy_r = 2 * torch.rand(RESIDUAL_POINTS, 2, generator=gen) - 1
    xy_b = torch.cat(edges(EDGE_POINTS, gen))
    adaptive = variant == "self-adaptive"
    if adaptive:
        lam_r = torch.rand(RESIDUAL_POINTS, 1, generator=gen).requires_grad_()
        lam_b = torch.rand(len(xy_b), 1, generator=gen).requires_grad_()
        ascent = torch.optim.Adam([lam_r, lam_b], lr=LR, betas=BETAS, maximize=True)
    else:
        lam_r, lam_b = torch.ones(RESIDUAL_POINTS, 1), torch.ones(len(xy_b), 1)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    ratios, per_layer, series = [], [], {"residual_loss": [], "boundary_loss": []}
    probe = gradprobe.Probe(model, run_file=log)
    with probe:
        for step in range(STEPS):
            # The edges hold equal numbers of points: the sum of their means is EDGES x the mean.
            losses = {"residual": (lam_r * residual(model, xy_r)).pow(2).mean(),
                      "boundary": EDGES * (lam_b * model(xy_b)).pow(2).mean()}
            if step % RATIO_EVERY == 0:
                ratios.append(gradient_ratio(model, losses, 1.0))
                per_layer.append(layer_ratios(model, losses))
            for name in losses:
                series[f"{name}_loss"].append(losses[name].item())
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
            if adaptive:
                ascent.step()
                ascent.zero_grad()
    return solution_errors(model) | {
        "grad_ratio_boundary_residual": float(torch.tensor(ratios).median()),
        "hidden_layer_ratio": float(torch.tensor(per_layer)[:, :-1].median(dim=0).values.median()),
        "output_layer_ratio": float(torch.tensor(per_layer)[:, -1].median()),
        "early_hidden_layer_ratio": float(torch.tensor(per_layer)[:EARLY, :-1].median(dim=0).values.median()),
        **loss_end_over_start(series),
        "lambda_r_mean": lam_r.mean().item(), "lambda_b_mean": lam_b.mean().item()}


FAMILY = Family(
    name="sa-pinn-helmholtz",
    source="McClenny & Braga-Neto 2023 (J. Comput. Phys.), self-adaptive per-point weights, "
           "2-D Helmholtz a1=1 a2=4; levimcclenny/SA-PINNs Helmholtz/helmholtz.py",
    train=train,
    variants=(
        Variant("self-adaptive", True, "per-point weights trained by gradient ascent keep the "
                "boundary points weighted as their errors persist: relative L2 error 3-8x below "
                "equal weights' on every seed (measured)",
                must_not=("gradient-swamping", "static-loss-weights", "gradient-conflict")),
        Variant("equal-weights", False,
                "every weight fixed at 1: the residual's scale ((a2 pi)^2) holds the boundary "
                "gradient to a small fraction of the residual's while the interior is fitted, "
                "the boundary values are not fitted (measured worse than self-adaptive on "
                "every seed)",
                expected=(Expect("gradient-swamping", "boundary"),
                          Expect("static-loss-weights", "boundary")),
                allowed=(Expect("constraint-neglect", "boundary"),),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1),
    quick=(("equal-weights", 1),),
)
