"""Relaxed decoupling and sparsity (record-22, insight 4 / next steps 3 and 6).

Finding ids addressed: ``orthogonality-vanishing``, ``gradient-conflict``, ``latent-dependence``
(correlation_loss); ``overfitting`` (l1_penalty).
"""

from __future__ import annotations

import torch

__all__ = ["correlation_loss", "l1_penalty"]


def correlation_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean squared Pearson correlation between every dimension of ``x`` [N, dx] and of ``y`` [N, dy].

    What: ``mean_{a,b} corr(x[:, a], y[:, b])^2`` over the batch, a number in [0, 1]; 0 when
    every pair of dimensions is linearly uncorrelated.

    Why: the strict orthogonality loss ``||z_I^T z_E||^2`` is not scale-invariant: its gradient
    vanishes as the norm of ``z_I`` or ``z_E`` shrinks, so the optimiser can satisfy it by
    collapsing a latent rather than decoupling it, and it fights the other losses
    (record-22, root cause 4). Correlation is invariant to the scale (and offset) of each
    dimension, so its gradient does not die with the norms, and it asks only for linear
    decorrelation, a weaker and biologically more plausible requirement than orthogonality
    (insight 4). A dimension with zero variance in the batch contributes 0, with a finite
    (zero) gradient (``eps`` guards the square root and the division).

    Reference: decorrelation penalties of this kind appear e.g. in DeCov (Cogswell et al.,
    ICLR 2016) and Barlow Twins' cross-correlation matrix (Zbontar et al., ICML 2021); here
    applied across two latents rather than within one.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError("x and y must be [N, dx] and [N, dy] with the same N")
    if x.shape[0] < 2:
        return x.new_zeros(())
    xc = x - x.mean(dim=0, keepdim=True)
    yc = y - y.mean(dim=0, keepdim=True)
    # sqrt(s + eps^2), not sqrt(s) + eps: the derivative of sqrt at 0 is infinite, and a
    # constant dimension (s == 0 exactly, e.g. dead ReLUs) would turn the backward into NaN.
    xs = xc / (xc.pow(2).sum(dim=0, keepdim=True) + eps * eps).sqrt()
    ys = yc / (yc.pow(2).sum(dim=0, keepdim=True) + eps * eps).sqrt()
    corr = xs.t() @ ys  # [dx, dy] Pearson correlations
    return corr.pow(2).mean()


def l1_penalty(*tensors: torch.Tensor) -> torch.Tensor:
    """Sum over the given tensors of their mean absolute value (``sum_t mean |t|``).

    What/why: an L1 sparsity pressure on latents (record-22, next step 6: L1 on z_I and z_E),
    so that each dimension is used only where it carries signal, which limits the capacity
    the model can spend on per-cell-line compensation (biological cause 3, overfitting).
    Reference: Tibshirani, "Regression Shrinkage and Selection via the Lasso", 1996.
    """
    if not tensors:
        raise ValueError("l1_penalty needs at least one tensor")
    total = tensors[0].abs().mean()
    for t in tensors[1:]:
        total = total + t.abs().mean()
    return total
